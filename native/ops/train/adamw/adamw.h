// Fused AdamW step for fp32 master weights (Loshchilov & Hutter, "Decoupled Weight Decay
// Regularization"; the same update as torch.optim.AdamW). Per element, with t = step ≥ 1:
//   g      = gradScale · grad                       (gradScale: e.g. a global-norm clip factor)
//   param  = param − lr · weightDecay · param        (decoupled decay, on the old param)
//   m      = beta1 · m + (1 − beta1) · g             (exp_avg)
//   v      = beta2 · v + (1 − beta2) · g²            (exp_avg_sq)
//   param  = param − (lr / (1 − beta1^t)) · m / (sqrt(v) / sqrt(1 − beta2^t) + eps)
//   param_bf16 = bf16(param)                          (optional compute copy, same kernel)
// param, exp_avg, exp_avg_sq: f32; grad f32 or bf16 (the layer's weightGradDtype 'bf16' gradients,
// read as they are rather than cast to an f32 copy first); all contiguous, the same number of
// elements (shapes may differ only in how they are viewed); param_bf16 bf16 with that numel, or
// undefined. Updated in place.
// The bias corrections are computed once on the host in double.
#pragma once
#include "core/tensor.h"

namespace moe::ops {

struct AdamWParams {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  int64_t step = 1;
  double grad_scale = 1.0;
};

// The scalars a kernel uses, derived from AdamWParams (shared by both backends).
struct AdamWScalars {
  float lr, beta1, beta2, eps, decay;  // decay = 1 − lr·weightDecay
  float step_size;                     // lr / (1 − beta1^t)
  float inv_sqrt_bc2;                  // 1 / sqrt(1 − beta2^t)
  float grad_scale;
};
AdamWScalars adamw_scalars(const AdamWParams& p);

void adamw_step(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& param_bf16,
                const AdamWParams& p);

void adamw_step_cpu(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& param_bf16,
                    const AdamWScalars& s);
void adamw_step_cuda(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& param_bf16,
                     const AdamWScalars& s, void* stream);

}  // namespace moe::ops
