// What the router's CUDA files share: warp reductions, the forward kernels' arguments,
// programmatic dependent launch, and the launchers the forward files define for forward.cu.
//   forward.cu          router_forward_cuda: router_init, then the fast or the generic forward
//   forward_fast.cu     router_fast_kernel (E = VPT·L for E in 8..512, groups a power of two ≤ L,
//                       a group score of its top m ≤ 2)
//   forward_generic.cu  router_forward_kernel (one warp per token, any E ≤ 1024)
//   backward.cu         router_backward_kernel
//   losses.cu           the balance loss and the z-loss
//   expert_choice.cu    expert-choice routing (its own helpers)
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace moe::ops::router_cuda {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 4;  // warps (tokens) per block in the per-token kernels

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  return v;
}
// (value, index) argmax over lane segments of `width` (a power of two ≤ 32); ties to the lower index.
// An empty candidate is (-inf, INT_MAX), which loses to everything, -inf values included.
__device__ __forceinline__ void warp_argmax(float& v, int& i, int width = 32) {
  for (int off = 1; off < width; off <<= 1) {
    float ov = __shfl_xor_sync(kFull, v, off);
    int oi = __shfl_xor_sync(kFull, i, off);
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

// What both forward kernels take: the routing problem and its outputs.
struct RouteArgs {
  const float* logits;
  const float* bias;  // may be null
  int32_t* indices;
  float* weights;
  int32_t* counts;
  float* scores;
  int32_t* nan;
  int64_t T;
  int k, G, topk_groups, m;  // m = group_score_top: a group's score sums its top m
  bool sigmoid, normalize;
  float scale;
};

// The generic kernel also needs the layout of experts over lanes.
struct FwdArgs : RouteArgs {
  int E, gs;
  bool vec;
  bool segmented;  // each lane's experts lie in one group and a group spans seg_lanes (power of two) lanes
  int seg_lanes;
};

// Programmatic dependent launch (sm_90): a kernel launched with the attribute may start before the
// kernel ahead of it in the stream finishes; griddepcontrol.wait blocks until that kernel has
// completed and its writes are visible. Both are no-ops where the launch had no such dependency.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

inline unsigned token_blocks(int64_t T) { return unsigned((T + kWarps - 1) / kWarps); }

// forward_fast.cu: E one of the fast kernel's shapes; pdl: as router_init's programmatic dependent
// where the device allows it.
void launch_fast(const RouteArgs& a, int E, int device, bool pdl, cudaStream_t stream);
// forward_generic.cu: RouteArgs, E and gs set; the generic kernel's lane layout is chosen there.
void launch_generic(FwdArgs a, cudaStream_t stream);

}  // namespace moe::ops::router_cuda
