// matmul: out[M,N] = a[M,K] · b[K,N] (+ out when accumulate), fp32 accumulation.
// a and b may be strided views (a transpose is a view), so a·bᵀ needs no copy. This is the dense
// reference GEMM; the experts' grouped GEMM is its own op.
#pragma once
#include "core/tensor.h"

namespace moe::ops {

void matmul(const Tensor& a, const Tensor& b, const Tensor& out, bool accumulate);

void matmul_cpu(const Tensor& a, const Tensor& b, const Tensor& out, bool accumulate);
void matmul_cuda(const Tensor& a, const Tensor& b, const Tensor& out, bool accumulate, void* stream);

}  // namespace moe::ops
