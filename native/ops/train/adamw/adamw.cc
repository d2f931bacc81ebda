#include "ops/train/adamw/adamw.h"

#include <cmath>

#include "ops/common/dispatch.h"
#include "ops/common/tensor_checks.h"

namespace moe::ops {

AdamWScalars adamw_scalars(const AdamWParams& p) {
  const double t = double(p.step);
  AdamWScalars s{};
  s.lr = float(p.lr);
  s.beta1 = float(p.beta1);
  s.beta2 = float(p.beta2);
  s.eps = float(p.eps);
  s.decay = float(1.0 - p.lr * p.weight_decay);
  s.step_size = float(p.lr / (1.0 - std::pow(p.beta1, t)));
  s.inv_sqrt_bc2 = float(1.0 / std::sqrt(1.0 - std::pow(p.beta2, t)));
  s.grad_scale = float(p.grad_scale);
  return s;
}

void adamw_step(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& param_bf16,
                const AdamWParams& p) {
  const char* op = "adamw";
  require_tensor(param, {DType::f32}, param, "param", op, "param");
  const int64_t n = param.numel();
  auto same_numel = [&](const Tensor& t, const char* arg) {
    MOE_ARG_CHECK(t.numel() == n, op, "'", arg, "' ", t.describe(), " has ", t.numel(), " elements but 'param' ", param.describe(), " has ",
                  n);
  };
  require_tensor(grad, {DType::f32, DType::bf16}, param, "param", op, "grad");
  same_numel(grad, "grad");
  require_tensor(exp_avg, {DType::f32}, param, "param", op, "expAvg");
  same_numel(exp_avg, "expAvg");
  require_tensor(exp_avg_sq, {DType::f32}, param, "param", op, "expAvgSq");
  same_numel(exp_avg_sq, "expAvgSq");
  if (param_bf16.defined()) {
    require_tensor(param_bf16, {DType::bf16}, param, "param", op, "paramBf16");
    same_numel(param_bf16, "paramBf16");
  }
  MOE_ARG_CHECK(std::isfinite(p.lr) && p.lr >= 0, op, "'lr' = ", p.lr, " must be finite and non-negative");
  MOE_ARG_CHECK(p.beta1 >= 0 && p.beta1 < 1, op, "'beta1' = ", p.beta1, " must be in [0, 1)");
  MOE_ARG_CHECK(p.beta2 >= 0 && p.beta2 < 1, op, "'beta2' = ", p.beta2, " must be in [0, 1)");
  MOE_ARG_CHECK(std::isfinite(p.eps) && p.eps > 0, op, "'eps' = ", p.eps, " must be finite and positive");
  MOE_ARG_CHECK(std::isfinite(p.weight_decay) && p.weight_decay >= 0, op, "'weightDecay' = ", p.weight_decay,
                " must be finite and non-negative");
  MOE_ARG_CHECK(p.step >= 1, op, "'step' = ", p.step, " must be at least 1 (the first step is 1)");
  MOE_ARG_CHECK(std::isfinite(p.grad_scale), op, "'gradScale' = ", p.grad_scale, " must be finite");
  if (n == 0) return;
  const AdamWScalars s = adamw_scalars(p);
  MOE_ON_DEVICE(param, op, adamw_step_cpu(param, grad, exp_avg, exp_avg_sq, param_bf16, s),
                adamw_step_cuda(param, grad, exp_avg, exp_avg_sq, param_bf16, s, op_stream(param)));
}

}  // namespace moe::ops
