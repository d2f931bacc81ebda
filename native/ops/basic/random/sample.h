// One sample for element i, shared by the CPU loop and the kernel.
#pragma once
#include <cmath>
#include "ops/basic/random/philox.h"
#include "ops/basic/random/random.h"

namespace moe::ops {

MOE_HD float random_sample(const RandomParams& p, int64_t i) {
  Philox4 r = philox4x32_10(p.offset + uint64_t(i), p.seed);
  if (p.kind == RandomKind::Uniform) return fmaf(p.p1 - p.p0, uniform01(r.x[0]), p.p0);
  // Box-Muller; 1 - u keeps the log argument in (0, 1].
  float u1 = 1.0f - uniform01(r.x[0]), u2 = uniform01(r.x[1]);
  float z = sqrtf(-2.0f * logf(u1)) * cosf(6.2831853071795864f * u2);
  return fmaf(p.p1, z, p.p0);
}

}  // namespace moe::ops
