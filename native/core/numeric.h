// Storage types for the reduced-precision dtypes and their conversions to and from float.
// Written out bit by bit (no cuda_bf16.h) so the CPU reference and the kernels round identically.
#pragma once
#include <cstdint>
#include <cstring>
#include "core/hostdevice.h"

namespace moe {

struct bf16 {
  uint16_t bits;
};
struct f16 {
  uint16_t bits;
};
struct fp8e4m3 {
  uint8_t bits;
};  // OCP E4M3 "fn": bias 7, max 448, no infinities, NaN = S.1111.111

MOE_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}
MOE_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// ---- bf16: top 16 bits of a float, round to nearest even, NaN kept quiet.
MOE_HD float to_float(bf16 v) { return bits_float(uint32_t(v.bits) << 16); }
MOE_HD bf16 bf16_from_float(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x0040u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

// ---- f16 (IEEE binary16), round to nearest even, overflow to infinity, subnormals kept.
MOE_HD float to_float(f16 v) {
  uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  uint32_t exp = (v.bits >> 10) & 0x1fu, man = v.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    // subnormal: man * 2^-24
    float mag = float(man) * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
  }
  return bits_float(sign | ((exp + 112u) << 23) | (man << 13));
}
MOE_HD f16 f16_from_float(float f) {
  uint32_t u = float_bits(f);
  uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16{uint16_t(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return f16{uint16_t(sign | 0x7c00u)};  // rounds to >= 65520: infinity
  if (a < 0x38800000u) {                                       // below 2^-14: subnormal or zero
    // value in units of 2^-24, rounded to nearest even
    uint32_t exp = a >> 23;
    if (exp < 102) return f16{sign};  // below half of the smallest subnormal
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - exp;  // so that result = man >> shift is in units of 2^-24
    uint32_t q = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return f16{uint16_t(sign | q)};
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
  return f16{uint16_t(sign | ((r - 0x38000000u) >> 13))};
}

// ---- fp8 e4m3fn: saturating (values past 448 become +-448, like cvt.rn.satfinite), NaN stays NaN.
MOE_HD float to_float(fp8e4m3 v) {
  uint32_t sign = uint32_t(v.bits & 0x80u) << 24;
  uint32_t exp = (v.bits >> 3) & 0xfu, man = v.bits & 0x7u;
  if (exp == 0xf && man == 0x7) return bits_float(0x7fc00000u | sign);
  if (exp == 0) {
    float mag = float(man) * 0.001953125f;  // man * 2^-9
    return sign ? -mag : mag;
  }
  return bits_float(sign | ((exp + 120u) << 23) | (man << 20));
}
MOE_HD fp8e4m3 fp8e4m3_from_float(float f) {
  uint32_t u = float_bits(f);
  uint8_t sign = uint8_t((u >> 24) & 0x80u);
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return fp8e4m3{uint8_t(sign | 0x7fu)};
  if (a >= 0x43e00000u) return fp8e4m3{uint8_t(sign | 0x7eu)};  // >= 448 (and inf): saturate to 448
  if (a < 0x3c800000u) {                                        // below 2^-6: subnormal or zero
    uint32_t exp = a >> 23;
    if (exp < 117) return fp8e4m3{sign};  // below half of 2^-9: rounds to zero
    uint32_t man = (a & 0x7fffffu) | 0x800000u;
    uint32_t shift = 141 - exp;  // result in units of 2^-9
    uint32_t q = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return fp8e4m3{uint8_t(sign | q)};
  }
  uint32_t r = a + 0x7ffffu + ((a >> 20) & 1u);
  uint32_t out = (r - 0x3c000000u) >> 20;  // rebias 127 -> 7
  if (out > 0x7eu) out = 0x7eu;            // rounding up past 448 saturates
  return fp8e4m3{uint8_t(sign | out)};
}

// Uniform load/store through float for every floating storage type; integers pass through.
MOE_HD float to_float(float v) { return v; }
MOE_HD float to_float(int32_t v) { return float(v); }
MOE_HD float to_float(int64_t v) { return float(v); }
MOE_HD float to_float(uint8_t v) { return float(v); }

template <typename T> struct Convert;
template <> struct Convert<float> {
  MOE_HD static float from(float f) { return f; }
};
template <> struct Convert<bf16> {
  MOE_HD static bf16 from(float f) { return bf16_from_float(f); }
};
template <> struct Convert<f16> {
  MOE_HD static f16 from(float f) { return f16_from_float(f); }
};
template <> struct Convert<fp8e4m3> {
  MOE_HD static fp8e4m3 from(float f) { return fp8e4m3_from_float(f); }
};
// float -> integer: truncation toward zero, saturating: NaN gives 0 and a value past the type's range
// its nearest end, as the GPU's cvt.rzi does. A plain C++ cast of those is undefined behaviour
// (whatever the CPU's instruction leaves), so both paths clamp explicitly and agree bit for bit.
// `upper` is 2^bits (exact in float); the lower end is exact in float too.
template <typename I> MOE_HD I saturating_trunc(float f, float lower, float upper, I lowest, I highest) {
  if (!(f == f)) return I(0);
  if (f <= lower) return lowest;
  if (f >= upper) return highest;
  return I(f);
}
template <> struct Convert<int32_t> {
  MOE_HD static int32_t from(float f) {
    return saturating_trunc<int32_t>(f, -2147483648.0f, 2147483648.0f, int32_t(-2147483647 - 1), int32_t(2147483647));
  }
};
template <> struct Convert<int64_t> {
  MOE_HD static int64_t from(float f) {
    return saturating_trunc<int64_t>(f, -9223372036854775808.0f, 9223372036854775808.0f, int64_t(-9223372036854775807LL - 1),
                                     int64_t(9223372036854775807LL));
  }
};
template <> struct Convert<uint8_t> {
  MOE_HD static uint8_t from(float f) { return saturating_trunc<uint8_t>(f, 0.0f, 256.0f, uint8_t(0), uint8_t(255)); }
};

template <typename T> MOE_HD T from_float(float f) { return Convert<T>::from(f); }

template <typename T> struct IsFloating { static constexpr bool value = true; };
template <> struct IsFloating<int32_t> { static constexpr bool value = false; };
template <> struct IsFloating<int64_t> { static constexpr bool value = false; };
template <> struct IsFloating<uint8_t> { static constexpr bool value = false; };

}  // namespace moe
