// AdamW reference loop: the update of adamw.h element by element, in double from the fp32 state
// (a bf16 gradient widened to float first).
#include <cmath>

#include "ops/common/convert.h"
#include "ops/train/adamw/adamw.h"

namespace moe::ops {

void adamw_step_cpu(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& param_bf16,
                    const AdamWScalars& s) {
  const int64_t n = param.numel();
  float* w = param.data<float>();
  const bool grad_bf16 = grad.dtype() == DType::bf16;
  const float* g = grad_bf16 ? nullptr : grad.data<float>();
  const bf16* gb = grad_bf16 ? grad.data<bf16>() : nullptr;  // widened exactly, as the kernel does
  float* m = exp_avg.data<float>();
  float* v = exp_avg_sq.data<float>();
  bf16* wb = param_bf16.defined() ? param_bf16.data<bf16>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const double gi = double(s.grad_scale) * double(grad_bf16 ? to_float(gb[i]) : g[i]);
    const double mi = double(s.beta1) * double(m[i]) + (1.0 - double(s.beta1)) * gi;
    const double vi = double(s.beta2) * double(v[i]) + (1.0 - double(s.beta2)) * gi * gi;
    const double denom = std::sqrt(vi) * double(s.inv_sqrt_bc2) + double(s.eps);
    const double wi = double(w[i]) * double(s.decay) - double(s.step_size) * mi / denom;
    m[i] = float(mi);
    v[i] = float(vi);
    w[i] = float(wi);
    if (wb) wb[i] = bf16_from_float(w[i]);
  }
}

}  // namespace moe::ops
