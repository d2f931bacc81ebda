// Device-side fp8 conversions four values at a time, with the conversion instructions of sm_89+
// (cuda_fp8.h emulates them on older targets). They give the same bytes and values as block.h's
// portable functions, which the CPU reference uses: e4m3 -> half is exact, the product with the
// scale is the same fp32 multiply, and float -> e4m3 rounds to nearest even and saturates to 448
// (infinities included) in both. The NaN encoding is pinned to block.h's (sign kept, 0x7f).
#pragma once
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "ops/moe/fp8/block.h"

namespace moe::ops {

// Four e4m3 values packed in a word (lowest byte first) times `scale`.
__device__ __forceinline__ void fp8x4_dequantize(uint32_t packed, float scale, float* out) {
  const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(packed & 0xffffu), __NV_E4M3);
  const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(packed >> 16), __NV_E4M3);
  const float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
  out[0] = a.x * scale;
  out[1] = a.y * scale;
  out[2] = b.x * scale;
  out[3] = b.y * scale;
}

// Four values divided by `scale` (a division, as fp8_quantize does) and rounded to e4m3, packed.
__device__ __forceinline__ uint32_t fp8x4_quantize(const float* v, float scale) {
  float s[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) s[i] = __fdiv_rn(v[i], scale);
  uint32_t packed = uint32_t(__nv_cvt_float2_to_fp8x2(make_float2(s[0], s[1]), __NV_SATFINITE, __NV_E4M3)) |
                    (uint32_t(__nv_cvt_float2_to_fp8x2(make_float2(s[2], s[3]), __NV_SATFINITE, __NV_E4M3)) << 16);
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (isnan(s[i])) {
      const uint32_t nan = (signbit(s[i]) ? 0x80u : 0u) | 0x7fu;
      packed = (packed & ~(0xffu << (8 * i))) | (nan << (8 * i));
    }
  return packed;
}

}  // namespace moe::ops
