#include "core/cuda_runtime.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"
#include "ops/moe/fp8/block.h"
#include "ops/moe/fp8/block_cuda.cuh"
#include "ops/moe/fp8/fp8.h"

namespace moe::ops {

// Four consecutive values as one load (8 bytes of bf16, 16 of f32) and one store; other types
// (f16, which dispatch_float also instantiates but the op refuses) element by element.
template <typename T> struct Vec4 {
  static __device__ __forceinline__ void load(const T* p, float* v) {
    for (int i = 0; i < 4; ++i) v[i] = to_float(p[i]);
  }
  static __device__ __forceinline__ void store(T* p, const float* v) {
    for (int i = 0; i < 4; ++i) p[i] = from_float<T>(v[i]);
  }
};
template <> struct Vec4<bf16> {
  static __device__ __forceinline__ void load(const bf16* p, float* v) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    v[0] = bits_float(raw.x << 16), v[1] = bits_float(raw.x & 0xffff0000u);
    v[2] = bits_float(raw.y << 16), v[3] = bits_float(raw.y & 0xffff0000u);
  }
  static __device__ __forceinline__ void store(bf16* p, const float* v) {
    const uint32_t a = uint32_t(bf16_from_float(v[0]).bits) | (uint32_t(bf16_from_float(v[1]).bits) << 16);
    const uint32_t b = uint32_t(bf16_from_float(v[2]).bits) | (uint32_t(bf16_from_float(v[3]).bits) << 16);
    *reinterpret_cast<uint2*>(p) = make_uint2(a, b);
  }
};
template <> struct Vec4<float> {
  static __device__ __forceinline__ void load(const float* p, float* v) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
  }
  static __device__ __forceinline__ void store(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

// Whether every pointer allows the four-value accesses (fresh tensors do; a view at an odd offset
// takes the one-value kernels).
template <typename T> bool vec4_aligned(const T* dense, const void* q) {
  return (reinterpret_cast<uintptr_t>(dense) % (4 * sizeof(T))) == 0 && (reinterpret_cast<uintptr_t>(q) & 3) == 0;
}

// One warp per 128-value block: each lane holds 4 consecutive values; the block's amax by warp
// shuffles; each lane stores its 4 e4m3 bytes as one word.
template <typename T> __global__ void quantize_kernel(const T* x, fp8e4m3* q, float* scales, int64_t blocks) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; warp < blocks; warp += warps) {
    float v[4];
    Vec4<T>::load(x + warp * kFp8Block + lane * 4, v);
    float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float s = fp8_scale_for(amax);
    if (lane == 0) scales[warp] = s;
    reinterpret_cast<uint32_t*>(q + warp * kFp8Block)[lane] = fp8x4_quantize(v, s);
  }
}

// The same, one value per lane access (unaligned views).
template <typename T> __global__ void quantize_unaligned_kernel(const T* x, fp8e4m3* q, float* scales, int64_t blocks) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t warp = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) >> 5; warp < blocks; warp += warps) {
    const T* src = x + warp * kFp8Block;
    float v[4], amax = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[i] = to_float(src[lane * 4 + i]);
      amax = fmaxf(amax, fabsf(v[i]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float s = fp8_scale_for(amax);
    if (lane == 0) scales[warp] = s;
    const uint32_t packed = fp8x4_quantize(v, s);
#pragma unroll
    for (int i = 0; i < 4; ++i) q[warp * kFp8Block + lane * 4 + i] = fp8e4m3{uint8_t(packed >> (8 * i))};
  }
}

// A thread per 4 values (one word of e4m3 bytes, one scale).
template <typename T> __global__ void dequantize_kernel(const fp8e4m3* q, const float* scales, T* out, int64_t quads) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < quads; i += int64_t(gridDim.x) * blockDim.x) {
    float v[4];
    fp8x4_dequantize(reinterpret_cast<const uint32_t*>(q)[i], scales[(i * 4) / kFp8Block], v);
    Vec4<T>::store(out + i * 4, v);
  }
}

template <typename T> __global__ void dequantize_unaligned_kernel(const fp8e4m3* q, const float* scales, T* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(fp8_dequantize(q[i], scales[i / kFp8Block]));
}

void quantize_fp8_cuda(const Tensor& x, const Tensor& q, const Tensor& scales, void* stream) {
  int64_t blocks = x.numel() / kFp8Block;
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = x.data<T>();
    fp8e4m3* pq = q.data<fp8e4m3>();
    if (vec4_aligned(px, pq))
      quantize_kernel<T><<<grid_for(blocks * 32), kThreads, 0, cudaStream_t(stream)>>>(px, pq, scales.data<float>(), blocks);
    else quantize_unaligned_kernel<T><<<grid_for(blocks * 32), kThreads, 0, cudaStream_t(stream)>>>(px, pq, scales.data<float>(), blocks);
  });
  cuda::check_launch("quantizeFp8");
}

void dequantize_fp8_cuda(const Tensor& q, const Tensor& scales, const Tensor& out, void* stream) {
  int64_t n = out.numel();
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* po = out.data<T>();
    const fp8e4m3* pq = q.data<fp8e4m3>();
    if (vec4_aligned<T>(po, pq))
      dequantize_kernel<T><<<grid_for(n / 4), kThreads, 0, cudaStream_t(stream)>>>(pq, scales.data<float>(), po, n / 4);
    else dequantize_unaligned_kernel<T><<<grid_for(n), kThreads, 0, cudaStream_t(stream)>>>(pq, scales.data<float>(), po, n);
  });
  cuda::check_launch("dequantizeFp8");
}

}  // namespace moe::ops
