// The per-block scale and conversions shared by the CPU loops and the kernels.
#pragma once
#include "core/numeric.h"

namespace moe::ops {

constexpr float kFp8Max = 448.0f;

MOE_HD float fp8_scale_for(float amax) { return amax > 0.0f ? amax / kFp8Max : 1.0f; }
// Division, not multiplication by 1/scale: the same rounding on both sides.
MOE_HD fp8e4m3 fp8_quantize(float v, float scale) { return fp8e4m3_from_float(v / scale); }
MOE_HD float fp8_dequantize(fp8e4m3 q, float scale) { return to_float(q) * scale; }

}  // namespace moe::ops
