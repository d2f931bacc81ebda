// The formula of clamped_swiglu.h, shared by the CPU loops and the CUDA kernel.
#pragma once
#include <cmath>

#include "core/hostdevice.h"

namespace moe::ops {

// Comparisons written so that a NaN passes through (as torch.clamp); fminf would drop it.
MOE_HD float clamped_swiglu_value(float gate, float up, float alpha, float limit) {
  const float g = gate > limit ? limit : gate;
  const float u = up > limit ? limit : (up < -limit ? -limit : up);
  return (u + 1.0f) * (g / (1.0f + expf(-alpha * g)));
}

}  // namespace moe::ops
