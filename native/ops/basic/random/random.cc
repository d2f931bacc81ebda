#include "ops/basic/random/random.h"

#include <cmath>

#include "ops/common/checks.h"
#include "ops/common/dispatch.h"

namespace moe::ops {

void random_fill(const Tensor& out, const RandomParams& params) {
  const char* op = params.kind == RandomKind::Uniform ? "rand" : "randn";
  require_defined(out, op, "out");
  require_dtype(out, {DType::f32, DType::bf16, DType::f16, DType::fp8e4m3}, op, "out");
  require_contiguous(out, op, "out");
  MOE_ARG_CHECK(std::isfinite(params.p0) && std::isfinite(params.p1), op, "parameters must be finite, got ", params.p0, " and ", params.p1);
  if (params.kind == RandomKind::Uniform) MOE_ARG_CHECK(params.p0 <= params.p1, op, "'low' ", params.p0, " is above 'high' ", params.p1);
  else MOE_ARG_CHECK(params.p1 >= 0, op, "'std' ", params.p1, " is negative");
  if (out.numel() == 0) return;
  MOE_ON_DEVICE(out, op, random_cpu(out, params), random_cuda(out, params, op_stream(out)));
}

}  // namespace moe::ops
