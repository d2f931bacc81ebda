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

}  // namespace moe::ops
