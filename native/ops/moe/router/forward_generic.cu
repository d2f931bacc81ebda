// Router forward, generic path (router_forward_kernel): one warp per token, any E ≤ 1024, repeated
// warp argmax. It applies exactly the selection rule of cpu.cc (see router.h).
#include <climits>
#include <cstdint>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "core/tensor.h"
#include "ops/common/launch.h"
#include "ops/moe/router/router.h"
#include "ops/moe/router/router_cuda.cuh"

namespace moe::ops::router_cuda {

namespace {

// Local argmax over the unmasked slots of this lane (slots are in increasing expert order).
template <int VPT> __device__ __forceinline__ void local_argmax(const float (&b)[VPT], uint32_t masked, int base, float& v, int& i) {
  v = -INFINITY;
  i = INT_MAX;
#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    if (!((masked >> s) & 1u) && (i == INT_MAX || b[s] > v)) {
      v = b[s];
      i = base + s;
    }
  }
}

template <int VPT> __global__ void __launch_bounds__(kWarps * 32) router_forward_kernel(FwdArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= a.T) return;  // whole warps only: T is counted in warps
  const int E = a.E, base = lane * VPT;
  const float* row = a.logits + t * E;

  float s[VPT];
  uint32_t invalid = 0;  // slots past E
  if (a.vec && VPT >= 4) {
#pragma unroll
    for (int q = 0; q < VPT / 4; ++q) {
      if (base + 4 * q < E) {
        float4 f = *reinterpret_cast<const float4*>(row + base + 4 * q);
        s[4 * q] = f.x, s[4 * q + 1] = f.y, s[4 * q + 2] = f.z, s[4 * q + 3] = f.w;
      } else {
        s[4 * q] = s[4 * q + 1] = s[4 * q + 2] = s[4 * q + 3] = 0.f;
        invalid |= 0xfu << (4 * q);
      }
    }
  } else {
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      if (base + v < E) s[v] = row[base + v];
      else {
        s[v] = 0.f;
        invalid |= 1u << v;
      }
    }
  }
  float bv[VPT];
  bool bad = false;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    bv[v] = (a.bias && !((invalid >> v) & 1u)) ? a.bias[base + v] : 0.f;
    if (!((invalid >> v) & 1u)) bad = bad || !isfinite(s[v]) || isnan(bv[v]);
  }
  const int k = a.k;
  if (__any_sync(kFull, bad)) {
    // Bad row: counted; scores NaN, indices 0..k-1, weights NaN (the CPU reference does the same).
    if (lane == 0) {
      atomicAdd(&a.nan[0], 1);
      atomicMin(&a.nan[1], int32_t(t));
    }
    for (int e = lane; e < E; e += 32) a.scores[t * E + e] = NAN;
    for (int j = lane; j < k; j += 32) {
      a.indices[t * k + j] = j;
      a.weights[t * k + j] = NAN;
      atomicAdd(&a.counts[j], 1);
    }
    return;
  }

  // ---- scores
  if (a.sigmoid) {
#pragma unroll
    for (int v = 0; v < VPT; ++v) s[v] = 1.f / (1.f + expf(-s[v]));
  } else {
    float mx = -INFINITY;
#pragma unroll
    for (int v = 0; v < VPT; ++v)
      if (!((invalid >> v) & 1u)) mx = fmaxf(mx, s[v]);
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      s[v] = ((invalid >> v) & 1u) ? 0.f : expf(s[v] - mx);
      sum += s[v];
    }
    float inv = 1.f / warp_sum(sum);
#pragma unroll
    for (int v = 0; v < VPT; ++v) s[v] *= inv;
  }
  float* srow = a.scores + t * E;
  if (a.vec && VPT >= 4) {
#pragma unroll
    for (int q = 0; q < VPT / 4; ++q)
      if (base + 4 * q < E)
        *reinterpret_cast<float4*>(srow + base + 4 * q) = make_float4(s[4 * q], s[4 * q + 1], s[4 * q + 2], s[4 * q + 3]);
  } else {
#pragma unroll
    for (int v = 0; v < VPT; ++v)
      if (base + v < E) srow[base + v] = s[v];
  }
#pragma unroll
  for (int v = 0; v < VPT; ++v) bv[v] += s[v];  // biased scores: selection only

  // ---- group-limited routing: mask the experts outside the kept groups
  uint32_t masked = invalid;
  if (a.G > 1) {
    const int G = a.G, m = a.m, gs = a.gs;
    float gscore = -INFINITY;  // this lane's group's score (segmented) or group `lane`'s (generic)
    int gid = INT_MAX;
    if (a.segmented) {
      const int g = base / gs;
      uint32_t taken = invalid;
      float sum = 0.f;
      for (int r = 0; r < m; ++r) {
        float v;
        int i;
        local_argmax<VPT>(bv, taken, base, v, i);
        warp_argmax(v, i, a.seg_lanes);
        sum += v;
        if (i != INT_MAX && i / VPT == lane) taken |= 1u << (i - base);
      }
      if (g < G) {
        gscore = sum;
        gid = g;
      }
    } else {
      for (int g = 0; g < G; ++g) {
        uint32_t taken = invalid;
#pragma unroll
        for (int v = 0; v < VPT; ++v)
          if ((base + v) / gs != g) taken |= 1u << v;
        float sum = 0.f;
        for (int r = 0; r < m; ++r) {
          float v;
          int i;
          local_argmax<VPT>(bv, taken, base, v, i);
          warp_argmax(v, i);
          sum += v;
          if (i / VPT == lane) taken |= 1u << (i - base);
        }
        if (lane == g) {
          gscore = sum;
          gid = g;
        }
      }
    }
    uint32_t keep = 0;
    for (int r = 0; r < a.topk_groups; ++r) {
      float v = ((keep >> (gid & 31)) & 1u) || gid == INT_MAX ? -INFINITY : gscore;
      int i = ((keep >> (gid & 31)) & 1u) || gid == INT_MAX ? INT_MAX : gid;
      warp_argmax(v, i);
      keep |= 1u << i;
    }
#pragma unroll
    for (int v = 0; v < VPT; ++v)
      if (!((keep >> (((base + v) / gs) & 31)) & 1u) || base + v >= E) masked |= 1u << v;
  }

  // ---- top-k by repeated warp argmax. The unbiased score of a winner is read back from the
  // scores row this warp just wrote (an L1 hit), which keeps s[] out of local memory.
  __syncwarp();
  int my_idx = 0;
  for (int j = 0; j < k; ++j) {
    float v;
    int i;
    local_argmax<VPT>(bv, masked, base, v, i);
    warp_argmax(v, i);
    if (lane == i / VPT) masked |= 1u << (i - base);
    if (k <= 32) {
      if (lane == j) my_idx = i;
    } else if (lane == 0) {  // k > 32: straight to memory, weights finished below
      a.indices[t * k + j] = i;
      atomicAdd(&a.counts[i], 1);
    }
  }
  if (k <= 32) {
    const float my_s = lane < k ? srow[my_idx] : 0.f;
    const float z = warp_sum(my_s) + kRouterNormEps;
    if (lane < k) {
      a.indices[t * k + lane] = my_idx;
      a.weights[t * k + lane] = a.normalize ? a.scale * (my_s / z) : a.scale * my_s;
      atomicAdd(&a.counts[my_idx], 1);
    }
  } else {
    __syncwarp();
    float z = 0.f;
    for (int j = lane; j < k; j += 32) z += srow[a.indices[t * k + j]];
    z = warp_sum(z) + kRouterNormEps;
    for (int j = lane; j < k; j += 32) {
      const float sj = srow[a.indices[t * k + j]];
      a.weights[t * k + j] = a.normalize ? a.scale * (sj / z) : a.scale * sj;
    }
  }
}

template <int VPT> void launch_forward(const FwdArgs& a, cudaStream_t stream) {
  const unsigned blocks = unsigned((a.T + kWarps - 1) / kWarps);
  router_forward_kernel<VPT><<<blocks, kWarps * 32, 0, stream>>>(a);
}

}  // namespace

void launch_generic(FwdArgs a, cudaStream_t st) {
  int vpt = 1;
  while (32 * vpt < a.E) vpt *= 2;
  a.vec = a.E % 4 == 0 && (reinterpret_cast<uintptr_t>(a.logits) % 16 == 0) && (reinterpret_cast<uintptr_t>(a.scores) % 16 == 0);
  const int lanes_per_group = a.gs / vpt;
  a.segmented = a.gs % vpt == 0 && lanes_per_group >= 1 && lanes_per_group <= 32 && (lanes_per_group & (lanes_per_group - 1)) == 0;
  a.seg_lanes = a.segmented ? lanes_per_group : 32;
  switch (vpt) {
    case 1: launch_forward<1>(a, st); break;
    case 2: launch_forward<2>(a, st); break;
    case 4: launch_forward<4>(a, st); break;
    case 8: launch_forward<8>(a, st); break;
    case 16: launch_forward<16>(a, st); break;
    default: launch_forward<32>(a, st); break;
  }
}

}  // namespace moe::ops::router_cuda
