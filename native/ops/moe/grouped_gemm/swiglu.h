// SwiGLU pieces shared by the CPU reference and the fused GEMM epilogues.
#pragma once
#include <cmath>
#include "core/hostdevice.h"

namespace moe::ops {

MOE_HD float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
MOE_HD float silu(float x) { return x * sigmoidf_(x); }
// d silu / dx = σ(x) · (1 + x · (1 − σ(x)))
MOE_HD float silu_grad(float x) {
  float s = sigmoidf_(x);
  return s * (1.0f + x * (1.0f - s));
}

}  // namespace moe::ops
