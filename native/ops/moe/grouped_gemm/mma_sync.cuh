// The tensor-core step and the bf16 pair packing that the mma.sync kernels (cuda.cu, decode.cu,
// skinny.cu) share: one spelling of the inline PTX, so that the three cannot drift apart. Device
// code only.
#pragma once
#include <cuda_bf16.h>

#include <cstdint>

namespace moe::ops {

// c += A·B, mma.sync m16n8k16, bf16 in, fp32 accumulate: A (16×16, row) in a0..a3, B (16×8, col)
// in b0, b1, each register a pair of bf16, in the PTX fragment layout.
__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// (lo, hi) rounded to nearest even into one 32-bit register, lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

}  // namespace moe::ops
