#include "core/cuda_runtime.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"
#include "ops/fp8/block.h"
#include "ops/fp8/fp8.h"

namespace moe::ops {

// One warp per 128-value block: each lane holds 4 values; the block's amax by warp shuffles.
template <typename T>
__global__ void quantize_kernel(const T* x, fp8e4m3* q, float* scales, int64_t blocks) {
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
  float s = fp8_scale_for(amax);
  if (lane == 0) scales[warp] = s;
  // The lane's 4 values as one 4-byte store where q is 4-byte aligned (a fresh tensor is; a view
  // at an odd offset takes the byte stores).
  if ((reinterpret_cast<uintptr_t>(q) & 3) == 0) {
    uint32_t packed = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) packed |= uint32_t(fp8_quantize(v[i], s).bits) << (8 * i);
    reinterpret_cast<uint32_t*>(q + warp * kFp8Block)[lane] = packed;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) q[warp * kFp8Block + lane * 4 + i] = fp8_quantize(v[i], s);
  }
  }
}

template <typename T>
__global__ void dequantize_kernel(const fp8e4m3* q, const float* scales, T* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(fp8_dequantize(q[i], scales[i / kFp8Block]));
}

void quantize_fp8_cuda(const Tensor& x, const Tensor& q, const Tensor& scales, void* stream) {
  int64_t blocks = x.numel() / kFp8Block;
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    quantize_kernel<T><<<grid_for(blocks * 32), kThreads, 0, cudaStream_t(stream)>>>(x.data<T>(), q.data<fp8e4m3>(), scales.data<float>(), blocks);
  });
  cuda::check_launch("quantizeFp8");
}

void dequantize_fp8_cuda(const Tensor& q, const Tensor& scales, const Tensor& out, void* stream) {
  int64_t n = out.numel();
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    dequantize_kernel<T><<<grid_for(n), kThreads, 0, cudaStream_t(stream)>>>(q.data<fp8e4m3>(), scales.data<float>(), out.data<T>(), n);
  });
  cuda::check_launch("dequantizeFp8");
}

}  // namespace moe::ops
