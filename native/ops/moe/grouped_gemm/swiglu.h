// SwiGLU pieces shared by the CPU reference and the fused GEMM epilogues.
//
// What the fused epilogues compute (every kernel and the CPU reference alike): the elementwise step
// takes the product as it is stored in the output's dtype, as an unfused GEMM followed by the
// elementwise op would (torch: _grouped_mm to bf16, then silu and mul). SwiGLU: h = silu(g1)·g3 from
// the g it saves (bf16 on the GPU); dSwiGLU: dg from dh rounded to the output's dtype. This lets the
// Hopper kernel hand the bf16 product tile to its storer warps and apply the epilogue there
// (hopper.cu, StoreVia::Handoff) with the same results as storing from the fp32 registers.
#pragma once
#include <cmath>
#include "core/hostdevice.h"

namespace moe::ops {

// σ(x). On the GPU from the fast exponential and reciprocal (MUFU.EX2, MUFU.RCP): within ~1e-6 of
// the exact value for |x| < 10 (relative; about |x|·1e-7 beyond), far below the bf16 spacing of the
// results (4e-3), and with no division slow path, which the Hopper kernel's storer warps, at 40
// registers (hopper.cu), cannot afford without spilling.
MOE_HD float sigmoidf_(float x) {
#if defined(__CUDA_ARCH__)
  return __fdividef(1.0f, 1.0f + __expf(-x));
#else
  return 1.0f / (1.0f + expf(-x));
#endif
}
MOE_HD float silu(float x) { return x * sigmoidf_(x); }
// d silu / dx = σ(x) · (1 + x · (1 − σ(x)))
MOE_HD float silu_grad(float x) {
  float s = sigmoidf_(x);
  return s * (1.0f + x * (1.0f - s));
}

}  // namespace moe::ops
