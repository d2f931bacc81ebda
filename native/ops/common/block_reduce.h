// Block-wide sums for the CUDA side of ops (included from .cu files only). Every thread of the block
// must call them; the result is returned to every thread. The order of additions is fixed by the
// block size, so results are deterministic from run to run.
#pragma once
#include <cuda_runtime.h>

namespace moe::ops {

template <typename T> __device__ __forceinline__ T warp_reduce_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// blockDim.x must be a multiple of 32, at most 1024. Uses 32 T of shared memory; safe to call
// repeatedly in one kernel (it synchronises before reusing the scratch).
template <typename T> __device__ T block_reduce_sum(T v) {
  __shared__ T scratch[32];
  __shared__ T total;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = warp_reduce_sum(v);
  __syncthreads();  // the previous call's readers are done with scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < warps ? scratch[lane] : T(0);
  if (warp == 0) r = warp_reduce_sum(r);
  if (threadIdx.x == 0) total = r;
  __syncthreads();
  return total;
}

}  // namespace moe::ops
