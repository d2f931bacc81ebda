#include "ops/moe/expert_bias/expert_bias.h"

#include "ops/common/dispatch.h"
#include "ops/common/tensor_checks.h"

namespace moe::ops {

void expert_bias(const Tensor& rows, const Tensor& bias, const Tensor& offsets) {
  const char* op = "expertBias";
  require_tensor(rows, {DType::f32, DType::bf16, DType::f16}, rows, "rows", op, "rows");
  MOE_ARG_CHECK(rows.dim() == 2, op, "'rows' ", rows.describe(), " must be [M, N]");
  require_tensor(bias, {rows.dtype()}, rows, "rows", op, "bias");
  MOE_ARG_CHECK(bias.dim() == 2 && bias.size(1) == rows.size(1), op, "'bias' ", bias.describe(), " must be [E, ", rows.size(1),
                "]: one row per expert, as wide as 'rows'");
  require_tensor(offsets, {DType::i32}, rows, "rows", op, "offsets");
  require_shape(offsets, {bias.size(0) + 1}, op, "offsets", "one more than the experts of 'bias'");
  if (rows.numel() == 0 || bias.size(0) == 0) return;
  MOE_ON_DEVICE(rows, op, expert_bias_cpu(rows, bias, offsets), expert_bias_cuda(rows, bias, offsets, op_stream(rows)));
}

void expert_bias_backward(const Tensor& d_rows, const Tensor& offsets, const Tensor& d_bias, bool accumulate) {
  const char* op = "expertBiasBackward";
  require_tensor(d_rows, {DType::f32, DType::bf16, DType::f16}, d_rows, "dRows", op, "dRows");
  MOE_ARG_CHECK(d_rows.dim() == 2, op, "'dRows' ", d_rows.describe(), " must be [M, N]");
  require_tensor(d_bias, {DType::f32}, d_rows, "dRows", op, "out");
  MOE_ARG_CHECK(d_bias.dim() == 2 && d_bias.size(1) == d_rows.size(1), op, "'out' ", d_bias.describe(), " must be [E, ", d_rows.size(1),
                "]: one row per expert, as wide as 'dRows'");
  require_tensor(offsets, {DType::i32}, d_rows, "dRows", op, "offsets");
  require_shape(offsets, {d_bias.size(0) + 1}, op, "offsets", "one more than the experts of 'out'");
  if (d_bias.numel() == 0) return;
  MOE_ON_DEVICE(d_bias, op, expert_bias_backward_cpu(d_rows, offsets, d_bias, accumulate),
                expert_bias_backward_cuda(d_rows, offsets, d_bias, accumulate, op_stream(d_bias)));
}

}  // namespace moe::ops
