// The activation formulas of activation.h, one definition for the CPU reference and the kernels.
// fp32 throughout with the accurate library functions on both sides (expf, erff, tanhf: the GPU's
// within a few ulp of the CPU's, so results agree to about 1e-6 relative, and to the last bit of
// bf16/f16 but for rare rounding ties). Each is written in the order of operations of torch's
// kernels (ATen's CUDA activation kernels compute in fp32 the same way), so that bf16 results
// match torch's bit for bit wherever the library functions round alike. The fused SwiGLU epilogues
// use a faster σ of their own (grouped_gemm/swiglu.h: register pressure there); these are for
// standalone dense layers.
#pragma once
#include <cmath>
#include "core/hostdevice.h"
#include "ops/basic/activation/activation.h"

namespace moe::ops {

namespace activation_detail {
constexpr float kInvSqrt2 = 0.70710678118654752f;     // 1/√2
constexpr float kInvSqrt2Pi = 0.39894228040143268f;   // 1/√(2π)
constexpr float kSqrt2OverPi = 0.79788456080286536f;  // √(2/π)
constexpr float kGeluCubic = 0.044715f;
}  // namespace activation_detail

MOE_HD float activation_value(Activation kind, float x) {
  using namespace activation_detail;
  switch (kind) {
    case Activation::Relu: return (x > 0.0f || x != x) ? x : 0.0f;  // NaN stays NaN (torch.relu)
    case Activation::Silu: return x / (1.0f + expf(-x));
    case Activation::Gelu: return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
    case Activation::GeluTanh: {
      float x_cube = x * x * x;
      return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kGeluCubic * x_cube)));
    }
  }
  return x;
}

// dy · f'(x), as fp32.
MOE_HD float activation_grad(Activation kind, float dy, float x) {
  using namespace activation_detail;
  switch (kind) {
    case Activation::Relu: return x <= 0.0f ? 0.0f : dy;  // torch's threshold_backward: NaN passes dy
    case Activation::Silu: {
      float s = 1.0f / (1.0f + expf(-x));
      return dy * s * (1.0f + x * (1.0f - s));
    }
    case Activation::Gelu: {
      float cdf = 0.5f * (1.0f + erff(x * kInvSqrt2));
      float pdf = expf(-0.5f * x * x) * kInvSqrt2Pi;
      return dy * (cdf + x * pdf);
    }
    case Activation::GeluTanh: {
      float x_sq = x * x;
      float t = tanhf(kSqrt2OverPi * (x + kGeluCubic * (x_sq * x)));
      float left = 0.5f * x;
      float tanh_derivative = 1.0f - t * t;
      // Where tanh has saturated its derivative is exactly 0, and for a finite x with |x| ≥ 1.8447e19 (√FLT_MAX)
      // x² has overflowed: 0·inf would make NaN of a term that is 0 (torch gives NaN there). An
      // infinite x still gives NaN, as torch and the erf form do.
      bool saturated = tanh_derivative == 0.0f && x - x == 0.0f;
      float right_derivative = saturated ? 0.0f : left * tanh_derivative * (kSqrt2OverPi * (1.0f + 3.0f * kGeluCubic * x_sq));
      return dy * (0.5f * (1.0f + t) + right_derivative);
    }
  }
  return dy;
}

}  // namespace moe::ops
