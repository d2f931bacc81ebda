// Sum of squares: out[0] = Σ_i x_i² (or out[0] + Σ_i x_i² with accumulate), out f32[1].
// The pieces of a global gradient norm: sum several tensors into one accumulator, all-reduce it
// across ranks, take the square root on the host. x: f32 or bf16, contiguous, any shape (an empty
// x adds nothing). The GPU sums in fp32 per block and in double across blocks, in a fixed order
// (deterministic; B = number of blocks depends on numel alone); the CPU reference sums in double.
#pragma once
#include "core/tensor.h"

namespace moe::ops {

void sum_of_squares(const Tensor& x, const Tensor& out, bool accumulate);

void sum_of_squares_cpu(const Tensor& x, const Tensor& out, bool accumulate);
void sum_of_squares_cuda(const Tensor& x, const Tensor& out, bool accumulate, void* stream);

}  // namespace moe::ops
