#include "ops/moe/fp8/fp8.h"

#include "ops/common/checks.h"
#include "ops/common/dispatch.h"

namespace moe::ops {

namespace {
void check(const char* op, const Tensor& dense, const char* dense_name, const Tensor& q, const Tensor& scales) {
  require_defined(dense, op, dense_name);
  require_defined(q, op, "q");
  require_defined(scales, op, "scales");
  require_dtype(dense, {DType::f32, DType::bf16}, op, dense_name);
  require_dtype(q, {DType::fp8e4m3}, op, "q");
  require_dtype(scales, {DType::f32}, op, "scales");
  for (const Tensor* t : {&dense, &q, &scales}) require_contiguous(*t, op, t == &dense ? dense_name : t == &q ? "q" : "scales");
  require_same_device(dense, dense_name, q, "q", op);
  require_same_device(dense, dense_name, scales, "scales", op);
  MOE_ARG_CHECK(dense.dim() == 2, op, "'", dense_name, "' must be [R, H], got ", dense.describe());
  MOE_ARG_CHECK(dense.size(1) % kFp8Block == 0, op, "'", dense_name, "' rows of ", dense.size(1), " values are not a multiple of ",
                kFp8Block, " (one scale per 128 values)");
  require_same_shape(dense, dense_name, q, "q", op);
  MOE_ARG_CHECK(scales.dim() == 2 && scales.size(0) == dense.size(0) && scales.size(1) == dense.size(1) / kFp8Block, op,
                "'scales' must be [", dense.size(0), ", ", dense.size(1) / kFp8Block, "], got ", scales.describe());
}
}  // namespace

void quantize_fp8(const Tensor& x, const Tensor& q, const Tensor& scales) {
  check("quantizeFp8", x, "x", q, scales);
  if (x.numel() == 0) return;
  MOE_ON_DEVICE(x, "quantizeFp8", quantize_fp8_cpu(x, q, scales), quantize_fp8_cuda(x, q, scales, op_stream(x)));
}

void dequantize_fp8(const Tensor& q, const Tensor& scales, const Tensor& out) {
  check("dequantizeFp8", out, "out", q, scales);
  if (out.numel() == 0) return;
  MOE_ON_DEVICE(out, "dequantizeFp8", dequantize_fp8_cpu(q, scales, out), dequantize_fp8_cuda(q, scales, out, op_stream(out)));
}

}  // namespace moe::ops
