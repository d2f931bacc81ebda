#include "ops/basic/fill/fill.h"

#include <cmath>
#include <cstring>

#include "ops/common/checks.h"
#include "ops/common/dispatch.h"

namespace moe::ops {

namespace {
uint64_t element_pattern(DType dtype, double value, const char* op) {
  uint64_t bits = 0;
  auto put = [&](auto v) { std::memcpy(&bits, &v, sizeof v); };
  if (!dtype_is_floating(dtype)) {
    MOE_ARG_CHECK(std::isfinite(value) && value == std::floor(value), op, "'value' ", value, " is not an integer, but the tensor is ",
                  dtype_name(dtype));
  }
  switch (dtype) {
    case DType::f32: put(float(value)); break;
    case DType::bf16: put(bf16_from_float(float(value)).bits); break;
    case DType::f16: put(f16_from_float(float(value)).bits); break;
    case DType::fp8e4m3: put(fp8e4m3_from_float(float(value)).bits); break;
    case DType::i32:
      MOE_ARG_CHECK(value >= -2147483648.0 && value <= 2147483647.0, op, "'value' ", value, " does not fit i32");
      put(int32_t(value));
      break;
    case DType::i64:
      MOE_ARG_CHECK(std::fabs(value) <= 9007199254740992.0, op, "'value' ", value,
                    " is beyond 2^53, the exact integer range of a JS number");
      put(int64_t(value));
      break;
    case DType::u8:
      MOE_ARG_CHECK(value >= 0 && value <= 255, op, "'value' ", value, " does not fit u8");
      put(uint8_t(value));
      break;
  }
  return bits;
}
}  // namespace

void fill(const Tensor& out, double value) {
  const char* op = "fill";
  require_defined(out, op, "out");
  uint64_t pattern = element_pattern(out.dtype(), value, op);
  if (out.numel() == 0) return;
  MOE_ON_DEVICE(out, op, fill_pattern_cpu(out, pattern), fill_pattern_cuda(out, pattern, op_stream(out)));
}

}  // namespace moe::ops
