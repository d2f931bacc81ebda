// Reductions along one dimension: out has a's shape with that dimension removed.
//   sum: floating inputs accumulate in fp32 on the GPU (double in the CPU reference), integers in int64.
//   max: NaN propagates (as in PyTorch); an empty dimension is an error.
// The input is seen as [outer, n, inner] around the reduced dimension.
#pragma once
#include "core/tensor.h"

namespace moe::ops {

enum class ReduceOp : int { Sum = 0, Max = 1 };

void reduce(ReduceOp kind, const Tensor& a, int dim, const Tensor& out);

void reduce_cpu(ReduceOp kind, const Tensor& a, int64_t outer, int64_t n, int64_t inner, const Tensor& out);
void reduce_cuda(ReduceOp kind, const Tensor& a, int64_t outer, int64_t n, int64_t inner, const Tensor& out, void* stream);

}  // namespace moe::ops
