// RMSNorm over the last dimension, and its backward.
//   forward:  rstd[t] = 1 / sqrt(mean_j x[t,j]² + eps);  y[t,j] = x[t,j] · rstd[t] · weight[j]
//   backward: x̂ = x·rstd;  g = dy ⊙ weight
//             dx[t,j]     = rstd[t] · (g[t,j] − x̂[t,j] · mean_i(g[t,i] · x̂[t,i]))
//             dWeight[j]  = Σ_t dy[t,j] · x̂[t,j]          (= or += with accumulate)
// Shapes: x, y, dy, dx [T,H] in one dtype (f32 or bf16); weight, dWeight [H] f32; rstd [T] f32
// (saved by the forward for the backward). All contiguous, one device. Computed in fp32 on the
// GPU (double in the CPU reference); dWeight is summed without atomics, in a fixed order.
#pragma once
#include "core/tensor.h"

namespace moe::ops {

void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& y, const Tensor& rstd);
void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dx, const Tensor& d_weight,
                      bool accumulate);

// ---- backends (arguments already checked)
void rmsnorm_forward_cpu(const Tensor& x, const Tensor& weight, double eps, const Tensor& y, const Tensor& rstd);
void rmsnorm_backward_cpu(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dx,
                          const Tensor& d_weight, bool accumulate);
void rmsnorm_forward_cuda(const Tensor& x, const Tensor& weight, double eps, const Tensor& y, const Tensor& rstd, void* stream);
void rmsnorm_backward_cuda(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dx,
                           const Tensor& d_weight, bool accumulate, void* stream);

}  // namespace moe::ops
