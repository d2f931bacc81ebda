// Elementwise arithmetic, computed in fp32 for the floating dtypes and exactly for integers:
//   add:   out = a + alpha * b
//   mul:   out = alpha * a * b
//   scale: out = alpha * a        (the mul kernels given no b)
// `b` may be smaller than `a` when its shape is a suffix of a's (a bias [H] over rows [T,H]); it is
// then repeated. All tensors contiguous, one dtype, one device.
#pragma once
#include "core/tensor.h"

namespace moe::ops {

enum class BinaryOp : int { Add = 0, Mul = 1 };

void binary(BinaryOp kind, const Tensor& a, const Tensor& b, const Tensor& out, double alpha);
void scale(const Tensor& a, double alpha, const Tensor& out);

void binary_cpu(BinaryOp kind, const Tensor& a, const Tensor& b, const Tensor& out, double alpha);
void binary_cuda(BinaryOp kind, const Tensor& a, const Tensor& b, const Tensor& out, double alpha, void* stream);

}  // namespace moe::ops
