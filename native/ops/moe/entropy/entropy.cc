#include "ops/moe/entropy/entropy.h"

#include "ops/common/checks.h"
#include "ops/common/dispatch.h"

namespace moe::ops {

void mean_row_entropy(const Tensor& scores, const Tensor& out) {
  const char* op = "routerEntropy";
  require_defined(scores, op, "scores");
  require_defined(out, op, "out");
  require_dtype(scores, {DType::f32}, op, "scores");
  require_dtype(out, {DType::f32}, op, "out");
  require_contiguous(scores, op, "scores");
  require_same_device(scores, "scores", out, "out", op);
  MOE_ARG_CHECK(scores.dim() == 2, op, "'scores' must be [T, E], got ", scores.describe());
  MOE_ARG_CHECK(out.numel() == 1, op, "'out' must hold one value, got ", out.describe());
  MOE_ON_DEVICE(scores, op, mean_row_entropy_cpu(scores, out), mean_row_entropy_cuda(scores, out, op_stream(out)));
}

}  // namespace moe::ops
