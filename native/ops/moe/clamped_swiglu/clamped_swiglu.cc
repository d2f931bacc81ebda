#include "ops/moe/clamped_swiglu/clamped_swiglu.h"

#include <cmath>

#include "ops/common/dispatch.h"
#include "ops/common/tensor_checks.h"

namespace moe::ops {

void clamped_swiglu(const Tensor& h13, const Tensor& out, float alpha, float limit) {
  const char* op = "clampedSwiglu";
  require_tensor(h13, {DType::f32, DType::bf16, DType::f16}, h13, "h13", op, "h13");
  MOE_ARG_CHECK(h13.dim() == 2 && h13.size(1) % 2 == 0, op, "'h13' ", h13.describe(),
                " must be [M, 2F]: gate and up interleaved by column");
  require_tensor(out, {h13.dtype()}, h13, "h13", op, "out");
  require_shape(out, {h13.size(0), h13.size(1) / 2}, op, "out", "[M, F] for 'h13' [M, 2F]");
  MOE_ARG_CHECK(std::isfinite(alpha), op, "'alpha' must be finite; received ", alpha);
  MOE_ARG_CHECK(limit > 0, op, "'limit' must be positive (Infinity: no clamp); received ", limit);
  if (out.numel() == 0) return;
  MOE_ON_DEVICE(out, op, clamped_swiglu_cpu(h13, out, alpha, limit), clamped_swiglu_cuda(h13, out, alpha, limit, op_stream(out)));
}

void clamped_swiglu_backward(const Tensor& dh, const Tensor& h13, const Tensor& dh13, float alpha, float limit) {
  const char* op = "clampedSwigluBackward";
  require_tensor(h13, {DType::f32, DType::bf16, DType::f16}, h13, "h13", op, "h13");
  MOE_ARG_CHECK(h13.dim() == 2 && h13.size(1) % 2 == 0, op, "'h13' ", h13.describe(),
                " must be [M, 2F]: gate and up interleaved by column");
  require_tensor(dh, {h13.dtype()}, h13, "h13", op, "dh");
  require_shape(dh, {h13.size(0), h13.size(1) / 2}, op, "dh", "[M, F] for 'h13' [M, 2F]");
  require_tensor(dh13, {h13.dtype()}, h13, "h13", op, "out");
  require_shape(dh13, h13.shape(), op, "out", "the shape of 'h13'");
  MOE_ARG_CHECK(std::isfinite(alpha), op, "'alpha' must be finite; received ", alpha);
  MOE_ARG_CHECK(limit > 0, op, "'limit' must be positive (Infinity: no clamp); received ", limit);
  if (dh13.numel() == 0) return;
  MOE_ON_DEVICE(dh13, op, clamped_swiglu_backward_cpu(dh, h13, dh13, alpha, limit),
                clamped_swiglu_backward_cuda(dh, h13, dh13, alpha, limit, op_stream(dh13)));
}

}  // namespace moe::ops
