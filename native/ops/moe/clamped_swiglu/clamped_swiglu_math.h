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

// The partial derivatives of clamped_swiglu_value by gate and up, times dh. A clamp passes the
// gradient where its input lies within the bounds, ends included (torch.clamp's backward), else 0.
//   ∂/∂g = (u + 1)·(s + alpha·g·s·(1 − s)),  s = sigmoid(alpha·g);   ∂/∂u = g·s
MOE_HD void clamped_swiglu_grads(float gate, float up, float dh, float alpha, float limit, float& dgate, float& dup) {
  const float g = gate > limit ? limit : gate;
  const float u = up > limit ? limit : (up < -limit ? -limit : up);
  const float s = 1.0f / (1.0f + expf(-alpha * g));
  dgate = gate > limit ? 0.0f : dh * (u + 1.0f) * (s + alpha * g * s * (1.0f - s));
  dup = (up > limit || up < -limit) ? 0.0f : dh * g * s;
}

}  // namespace moe::ops
