// Router kernels.
// Forward, fast path (router_fast_kernel; E = VPT·L for the shapes in launch_fast, groups a power of
// two ≤ L with k/topkGroups ≤ 2): L lanes per token (32/L tokens per warp), lane l of a token owns
// experts l·VPT .. l·VPT+VPT-1 in registers, loaded as float4. A persistent grid of 8-warp blocks
// walks the tokens (the next token's logits are loaded before the current one is worked on). Per
// token: scores; each lane's two best biased scores (ties to the lower index); a group's top-2 sum
// by merging those over the group's lanes (log2 lanes-per-group shuffles); the kept groups by rank
// (one shuffle per group); then k rounds of: segment max of the lanes' heads (order-preserving
// 32-bit keys, one redux on a full warp), the lowest lane holding it wins (= the lowest expert
// index), and the winner pops its head; a lane re-scans its slots only after using both cached
// heads. Counts go to a per-block histogram in shared memory, added to tokensPerExpert once per
// block (likewise the bad-row count). The only launch before it is router_init (zeroes the counts);
// on sm_90 the forward is launched as its programmatic dependent and waits for it only before the
// block's final atomics, so the init's launch overlaps the forward's work.
// Forward, generic path (router_forward_kernel): one warp per token, any E ≤ 1024, repeated warp
// argmax. Both paths apply exactly the selection rule of cpu.cc (see router.h).
// Backward: one warp per token. Losses: a block per sequence for the balance loss, a warp per
// token for the z-loss, then one block reducing the partial sums in a fixed order (deterministic).
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "core/tensor.h"
#include "ops/common/launch.h"
#include "ops/moe/router/router.h"

namespace moe::ops {

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 4;  // warps (tokens) per block in the per-token kernels
constexpr int kMaxCudaExperts = 1024;

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
  int k, G, topk_groups, m;  // m = k / topk_groups
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

// Zeroes the counts and sets nanRows to [0, T]. The fast forward (its programmatic dependent) may
// start at once: it touches counts and nanRows only after pdl_wait().
__global__ void router_init(int32_t* counts, int E, int32_t* nan, int64_t T) {
  pdl_launch_dependents();
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < E; e += gridDim.x * blockDim.x) counts[e] = 0;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    nan[0] = 0;
    nan[1] = int32_t(T);
  }
}

// Local argmax over the unmasked slots of this lane (slots are in increasing expert order).
template <int VPT>
__device__ __forceinline__ void local_argmax(const float (&b)[VPT], uint32_t masked, int base, float& v, int& i) {
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

template <int VPT>
__global__ void __launch_bounds__(kWarps * 32) router_forward_kernel(FwdArgs a) {
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
      if (base + 4 * q < E) *reinterpret_cast<float4*>(srow + base + 4 * q) = make_float4(s[4 * q], s[4 * q + 1], s[4 * q + 2], s[4 * q + 3]);
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

// ------------------------------------------------------------------------------ fast forward
constexpr int kFastWarps = 8;  // warps per block

// The fast kernel's arguments: G a power of two ≤ L; m = k / topk_groups ∈ {1, 2} when G > 1.
using FastArgs = RouteArgs;

// Order-preserving 32-bit key of a float (a > b ⇔ key(a) > key(b) for non-NaN a, b other than
// -0.0, which never occurs here: a score is ≥ +0 and x + y is -0 only when both are -0). NaN, the
// "no candidate" head, maps to 0, below every real value (-inf included).
__device__ __forceinline__ uint32_t order_key(float f) {
  uint32_t u = __float_as_uint(f);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return f == f ? u : 0u;
}

// Max of v over the L lanes of this token's segment (L a power of two; all 32 lanes call it).
template <int L> __device__ __forceinline__ uint32_t seg_max_key(uint32_t v) {
  if constexpr (L == 32) {
    return __reduce_max_sync(kFull, v);
  } else {
#pragma unroll
    for (int off = L / 2; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(kFull, v, off));
    return v;
  }
}
template <int L> __device__ __forceinline__ float seg_max(float v) {
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  return v;
}
template <int L> __device__ __forceinline__ float seg_sum(float v) {
#pragma unroll
  for (int off = L / 2; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// The lane's first two candidates in (biased desc, slot asc) order: the best (h1, slot s1, unbiased
// score u1) and the next (h2, s2, u2); NaN where there is none. With kAfter, only candidates that
// come after (lh, ls) in that order count: the lane's heads once (lh, ls) has been taken.
template <int VPT, bool kAfter>
__device__ __forceinline__ void lane_top2(const float (&bv)[VPT], const float (&s)[VPT], float lh, int ls, float& h1, int& s1,
                                          float& u1, float& h2, int& s2, float& u2) {
  h1 = h2 = NAN;
  s1 = s2 = 0;
  u1 = u2 = 0.f;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    const float b = bv[v];
    const bool elig = !kAfter || b < lh || (b == lh && v > ls);
    if (elig && !(b <= h1)) {  // b > h1, or no h1 yet; a tie keeps the lower slot
      h2 = h1, s2 = s1, u2 = u1;
      h1 = b, s1 = v, u1 = s[v];
    } else if (elig && !(b <= h2)) {
      h2 = b, s2 = v, u2 = s[v];
    }
  }
}

// VPT experts per lane (a multiple of 4), L lanes per token: E = VPT·L. See the file comment.
// Register budget: 64 per thread (4 blocks, 32 warps per SM) up to VPT = 8, 128 for VPT = 16; no spills
// at either (ptxas -v).
template <int VPT, int L>
__global__ void __launch_bounds__(kFastWarps * 32, VPT >= 16 ? 2 : 4) router_fast_kernel(FastArgs a) {
  constexpr int E = VPT * L;
  constexpr int TPW = 32 / L;  // tokens per warp
  constexpr int NV = VPT / 4;  // float4 per lane
  __shared__ int32_t s_hist[E + 2];  // counts per expert, then bad rows and the first bad row
  const int lane = threadIdx.x & 31;
  const int sl = lane & (L - 1);  // lane within the token's segment
  const int seg_first = lane - sl;
  const unsigned seg_mask = L == 32 ? kFull : (((1u << L) - 1u) << seg_first);
  const int base = sl * VPT;  // first expert of this lane
  const int k = a.k;

  for (int i = threadIdx.x; i < E; i += blockDim.x) s_hist[i] = 0;
  if (threadIdx.x == 0) {
    s_hist[E] = 0;
    s_hist[E + 1] = INT_MAX;
  }
  __syncthreads();

  // The bias (selection only) stays in registers for all the warp's tokens. A NaN entry makes every
  // row bad (as in cpu.cc).
  float bias[VPT];
  bool bias_nan = false;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    bias[v] = a.bias ? a.bias[base + v] : 0.f;
    bias_nan = bias_nan || isnan(bias[v]);
  }
  const bool all_bad = __any_sync(kFull, bias_nan);

  // Group of this lane and the lanes per group (G == 1: one group, all kept).
  const int GL = L / a.G;
  const int my_group = sl / GL;

  const int64_t ntasks = (a.T + TPW - 1) / TPW;  // a task: the warp's TPW tokens
  const int64_t stride = int64_t(gridDim.x) * kFastWarps;
  int64_t task = int64_t(blockIdx.x) * kFastWarps + (threadIdx.x >> 5);
  float4 nxt[NV];
  auto load = [&](int64_t tk) {
    const int64_t t = tk * TPW + lane / L;
    if (tk < ntasks && t < a.T) {
      const float4* p = reinterpret_cast<const float4*>(a.logits + t * E + base);
#pragma unroll
      for (int q = 0; q < NV; ++q) nxt[q] = __ldg(p + q);
    } else {
#pragma unroll
      for (int q = 0; q < NV; ++q) nxt[q] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
  };
  load(task);
  for (; task < ntasks; task += stride) {  // uniform across the warp
    float x[VPT];
#pragma unroll
    for (int q = 0; q < NV; ++q) x[4 * q] = nxt[q].x, x[4 * q + 1] = nxt[q].y, x[4 * q + 2] = nxt[q].z, x[4 * q + 3] = nxt[q].w;
    load(task + stride);  // in flight while this token is worked on
    const int64_t t = task * TPW + lane / L;
    const bool active = t < a.T;  // a segment past the last token computes on zeros and writes nothing

    // Bad row: a non-finite logit anywhere in the segment (or a NaN bias). It is worked on as zeros,
    // so every lane stays on the same path, and written as cpu.cc writes it.
    bool lane_bad = false;
#pragma unroll
    for (int v = 0; v < VPT; ++v) lane_bad = lane_bad || !isfinite(x[v]);
    const bool bad = all_bad || (__ballot_sync(kFull, lane_bad) & seg_mask) != 0u;
    if (bad) {
#pragma unroll
      for (int v = 0; v < VPT; ++v) x[v] = 0.f;
    }

    // ---- scores (the same f32 arithmetic as the generic kernel)
    float s[VPT];
    if (a.sigmoid) {
#pragma unroll
      for (int v = 0; v < VPT; ++v) s[v] = 1.f / (1.f + expf(-x[v]));
    } else {
      float mx = x[0];
#pragma unroll
      for (int v = 1; v < VPT; ++v) mx = fmaxf(mx, x[v]);
      mx = seg_max<L>(mx);
      float sum = 0.f;
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        s[v] = expf(x[v] - mx);
        sum += s[v];
      }
      const float inv = 1.f / seg_sum<L>(sum);
#pragma unroll
      for (int v = 0; v < VPT; ++v) s[v] *= inv;
    }
    if (active) {
      float4* out = reinterpret_cast<float4*>(a.scores + t * E + base);
#pragma unroll
      for (int q = 0; q < NV; ++q)
        out[q] = bad ? make_float4(NAN, NAN, NAN, NAN) : make_float4(s[4 * q], s[4 * q + 1], s[4 * q + 2], s[4 * q + 3]);
    }
    float bv[VPT];  // biased scores: selection only
#pragma unroll
    for (int v = 0; v < VPT; ++v) bv[v] = bias[v] + s[v];

    // ---- the lane's two best candidates
    float h1, h2, u1, u2;
    int s1, s2;
    lane_top2<VPT, false>(bv, s, 0.f, 0, h1, s1, u1, h2, s2, u2);

    // ---- group-limited routing: a group's score is the sum of its top m ∈ {1, 2} biased scores;
    // the kept groups are those with fewer than topkGroups groups ahead of them.
    bool kept = true;
    if (a.G > 1) {
      float g1 = h1, g2 = h2;  // this group's two best so far (VPT ≥ 4: both exist)
      for (int off = GL / 2; off > 0; off >>= 1) {
        const float o1 = __shfl_xor_sync(kFull, g1, off), o2 = __shfl_xor_sync(kFull, g2, off);
        const float n2 = fmaxf(fminf(g1, o1), fmaxf(g2, o2));
        g1 = fmaxf(g1, o1);
        g2 = n2;
      }
      float gscore = a.m == 1 ? g1 : g1 + g2;
      if (gscore != gscore) gscore = -INFINITY;  // +inf + -inf (infinite bias entries): ranks last
      int ahead = 0;  // groups before this one in (score desc, group asc) order
      for (int g = 0; g < a.G; ++g) {
        const float o = __shfl_sync(kFull, gscore, seg_first + g * GL);
        ahead += (o > gscore || (o == gscore && g < my_group)) ? 1 : 0;
      }
      kept = ahead < a.topk_groups;
      if (!kept) h1 = h2 = NAN;
    }

    // ---- top-k: k rounds of the segment's best head
    float lh = 0.f;  // the lane's last taken candidate
    int ls = 0, taken = 0;
    int my_idx = 0;
    float my_u = 0.f, z = 0.f;
    for (int j = 0; j < k; ++j) {
      const bool stale = kept && isnan(h1) && taken < VPT;  // both cached heads used, more left
      if (__any_sync(kFull, stale)) {
        if (stale) lane_top2<VPT, true>(bv, s, lh, ls, h1, s1, u1, h2, s2, u2);
      }
      const uint32_t key = order_key(h1);
      const uint32_t best = seg_max_key<L>(key);
      const int win = __ffs(__ballot_sync(kFull, key == best) & seg_mask) - 1;  // lowest lane: lowest index
      const int e = __shfl_sync(kFull, base + s1, win);
      const float u = __shfl_sync(kFull, u1, win);
      if (lane == win) {
        lh = h1, ls = s1;
        h1 = h2, s1 = s2, u1 = u2;
        h2 = NAN;
        ++taken;
      }
      z += u;
      if (k <= L) {
        if (sl == j) my_idx = e, my_u = u;
      } else if (active && sl == (j & (L - 1))) {  // k > L: straight to memory, weights finished below
        const int idx = bad ? j : e;
        a.indices[t * k + j] = idx;
        a.weights[t * k + j] = u;
        atomicAdd(&s_hist[idx], 1);
      }
    }
    z += kRouterNormEps;
    if (active) {
      if (k <= L) {
        if (sl < k) {
          const int idx = bad ? sl : my_idx;
          a.indices[t * k + sl] = idx;
          a.weights[t * k + sl] = bad ? NAN : (a.normalize ? a.scale * (my_u / z) : a.scale * my_u);
          atomicAdd(&s_hist[idx], 1);
        }
      } else {
        for (int j = sl; j < k; j += L) {  // this lane wrote slot j above
          const float u = a.weights[t * k + j];
          a.weights[t * k + j] = bad ? NAN : (a.normalize ? a.scale * (u / z) : a.scale * u);
        }
      }
      if (bad && sl == 0) {
        atomicAdd(&s_hist[E], 1);
        atomicMin(&s_hist[E + 1], int32_t(t));
      }
    }
  }

  __syncthreads();
  pdl_wait();  // router_init has zeroed the counts and reset nanRows
  for (int i = threadIdx.x; i < E; i += blockDim.x)
    if (s_hist[i] != 0) atomicAdd(&a.counts[i], s_hist[i]);
  if (threadIdx.x == 0 && s_hist[E] > 0) {
    atomicAdd(&a.nan[0], s_hist[E]);
    atomicMin(&a.nan[1], s_hist[E + 1]);
  }
}

// Blocks of `kernel` resident on the whole device at once: the persistent grid's size.
template <typename Kernel> int resident_blocks(Kernel kernel, int device) {
  int per_sm = 0, sms = 0;
  cuda::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kFastWarps * 32, 0), "router",
              "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  cuda::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "router", "cudaDeviceGetAttribute");
  return std::max(1, per_sm) * std::max(1, sms);
}

// Whether to launch the fast forward as router_init's programmatic dependent on this device:
// compute capability 9.0 or newer, not switched off with MOE_EP_PDL=0, and not refused before.
std::atomic<int> g_pdl[64];  // per device: 0 not asked yet, 1 off, 2 on
bool pdl_enabled(int device) {
  if (device < 0 || device >= 64) return false;
  int v = g_pdl[device].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0;
    cuda::check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "router", "cudaDeviceGetAttribute");
    const char* env = std::getenv("MOE_EP_PDL");
    v = major >= 9 && !(env && std::string(env) == "0") ? 2 : 1;
    g_pdl[device].store(v, std::memory_order_relaxed);
  }
  return v == 2;
}

template <int VPT, int L> void launch_fast_shape(const FastArgs& a, int device, cudaStream_t stream) {
  auto kernel = router_fast_kernel<VPT, L>;
  static std::atomic<int> resident[64];  // per device, for this instantiation; 0 = not asked yet
  int max_blocks = device >= 0 && device < 64 ? resident[device].load(std::memory_order_relaxed) : 0;
  if (max_blocks == 0) {
    max_blocks = resident_blocks(kernel, device);
    if (device >= 0 && device < 64) resident[device].store(max_blocks, std::memory_order_relaxed);
  }
  const int64_t warps_needed = (a.T + 32 / L - 1) / (32 / L);
  const int64_t blocks = std::min<int64_t>((warps_needed + kFastWarps - 1) / kFastWarps, max_blocks);
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(std::max<int64_t>(1, blocks)));
  cfg.blockDim = dim3(kFastWarps * 32);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  if (pdl_enabled(device)) {
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (cudaLaunchKernelEx(&cfg, kernel, a) == cudaSuccess) return;
    // Refused (a launch-configuration error, not sticky): clear it, launch plainly from now on.
    (void)cudaGetLastError();
    g_pdl[device].store(1, std::memory_order_relaxed);
  }
  cfg.attrs = nullptr;
  cfg.numAttrs = 0;
  cuda::check(cudaLaunchKernelEx(&cfg, kernel, a), "router", "cudaLaunchKernelEx");
}

// The fast path's shapes: E = VPT·L, VPT a multiple of 4 (float4 rows). E must be one that
// fast_lanes() accepts.
void launch_fast(const FastArgs& a, int E, int device, cudaStream_t stream) {
  switch (E) {
    case 8: launch_fast_shape<4, 2>(a, device, stream); break;
    case 16: launch_fast_shape<4, 4>(a, device, stream); break;
    case 32: launch_fast_shape<4, 8>(a, device, stream); break;
    case 64: launch_fast_shape<4, 16>(a, device, stream); break;
    case 128: launch_fast_shape<4, 32>(a, device, stream); break;
    case 256: launch_fast_shape<8, 32>(a, device, stream); break;
    case 512: launch_fast_shape<16, 32>(a, device, stream); break;
    default: MOE_INTERNAL_CHECK(false, "router: no fast kernel for E = ", E);
  }
}

// Lanes per token in the fast path for E experts (0: no fast path; same list as launch_fast).
int fast_lanes(int64_t E) {
  switch (E) {
    case 8: return 2;
    case 16: return 4;
    case 32: return 8;
    case 64: return 16;
    case 128: case 256: case 512: return 32;
    default: return 0;
  }
}

// ---------------------------------------------------------------------------------- backward
__global__ void __launch_bounds__(kWarps * 32)
    router_backward_kernel(const float* dw, const float* scores, const int32_t* indices, int64_t T, int E, int k, bool sigmoid,
                           bool normalize, float scale, float* dx, bool accumulate) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  const float* srow = scores + t * E;
  float* drow = dx + t * E;
  // sums over the chosen experts; out-of-range indices are skipped (the CPU path rejects them)
  float z = 0.f, adot = 0.f;
  for (int j = lane; j < k; j += 32) {
    int e = indices[t * k + j];
    if (e >= 0 && e < E) {
      float sj = srow[e];
      z += sj;
      adot += dw[t * k + j] * sj;
    }
  }
  z = warp_sum(z) + kRouterNormEps;
  adot = warp_sum(adot);
  // dS for slot j, and c = Σ_e s_e·dS_e (softmax only)
  float c = 0.f;
  if (!sigmoid) {
    for (int j = lane; j < k; j += 32) {
      int e = indices[t * k + j];
      if (e >= 0 && e < E) {
        float d = normalize ? scale * (dw[t * k + j] / z - adot / (z * z)) : scale * dw[t * k + j];
        c += srow[e] * d;
      }
    }
    c = warp_sum(c);
  }
  // dense part: softmax −s_e·c on every expert; sigmoid nothing
  for (int e = lane; e < E; e += 32) {
    float g = sigmoid ? 0.f : -srow[e] * c;
    drow[e] = accumulate ? drow[e] + g : g;
  }
  __syncwarp();
  for (int j = lane; j < k; j += 32) {
    int e = indices[t * k + j];
    if (e >= 0 && e < E) {
      float d = normalize ? scale * (dw[t * k + j] / z - adot / (z * z)) : scale * dw[t * k + j];
      float se = srow[e];
      atomicAdd(&drow[e], sigmoid ? d * se * (1.f - se) : se * d);
    }
  }
}

// -------------------------------------------------------------------------------------- losses
// One block: out[0] = scale · Σ v[i], summed in a fixed order (deterministic).
__global__ void reduce_sum_kernel(const float* v, int64_t n, double scale, float* out) {
  __shared__ double part[1024];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += v[i];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = float(scale * part[0]);
}

// Per token: inv[t] = 1 / Σ_e s[t,e] (sigmoid) or 1 (softmax). A warp per token.
__global__ void row_inverse_kernel(const float* s, int64_t T, int E, bool sigmoid, float* inv) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  float r = 0.f;
  if (sigmoid)
    for (int e = lane; e < E; e += 32) r += s[t * E + e];
  r = warp_sum(r);
  if (lane == 0) inv[t] = sigmoid ? 1.f / r : 1.f;
}

// A block per sequence: counts (shared atomics), f_e, P_e, the sequence's Σ f·P, and the gradient
// coefficient g[q,e] = coef·E/S · f_e / seqLen.
__global__ void balance_seq_kernel(const float* s, const int32_t* indices, const float* inv, int E, int k, int64_t seq_len,
                                   int64_t S, float coef, float* seq_loss, float* g) {
  extern __shared__ int counts[];
  __shared__ float part[256];
  const int64_t q = blockIdx.x, t0 = q * seq_len;
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < seq_len * k; i += blockDim.x) {
    int e = indices[t0 * k + i];
    if (e >= 0 && e < E) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  const float per = coef * float(E) / float(S);
  float acc = 0.f;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    double P = 0;  // long sums over tokens: accumulate in double
    for (int64_t t = t0; t < t0 + seq_len; ++t) P += double(s[t * E + e] * inv[t]);
    P /= double(seq_len);
    float f = float(counts[e]) / float(seq_len * k);
    acc += float(double(per) * double(f) * P);
    g[q * E + e] = per * f / float(seq_len);
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int st = blockDim.x / 2; st > 0; st >>= 1) {
    if (threadIdx.x < st) part[threadIdx.x] += part[threadIdx.x + st];
    __syncthreads();
  }
  if (threadIdx.x == 0) seq_loss[q] = part[0];
}

// A warp per token: dLogits += ∂loss/∂logits from g = ∂loss/∂p.
__global__ void balance_grad_kernel(const float* s, const float* inv, const float* g, int64_t T, int E, int64_t seq_len,
                                    bool sigmoid, float* dx) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  const float* srow = s + t * E;
  const float* grow = g + (t / seq_len) * E;
  const float ri = inv[t];
  float gp = 0.f;
  for (int e = lane; e < E; e += 32) gp += grow[e] * srow[e] * ri;
  gp = warp_sum(gp);
  for (int e = lane; e < E; e += 32) {
    float se = srow[e];
    float d = sigmoid ? (grow[e] - gp) * ri * se * (1.f - se) : se * (grow[e] - gp);
    dx[t * E + e] += d;
  }
}

// A warp per token: lse²[t], and dLogits += coef·2·lse·softmax/T.
__global__ void z_loss_kernel(const float* x, int64_t T, int E, float coef, float* lse2, float* dx) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  const float* row = x + t * E;
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) mx = fmaxf(mx, row[e]);
  mx = warp_max(mx);
  float sum = 0.f;
  for (int e = lane; e < E; e += 32) sum += expf(row[e] - mx);
  const float lse = mx + logf(warp_sum(sum));
  if (lane == 0) lse2[t] = lse * lse;
  if (dx) {
    const float c = coef * 2.f * lse / float(T);
    for (int e = lane; e < E; e += 32) dx[t * E + e] += c * expf(row[e] - lse);
  }
}

unsigned token_blocks(int64_t T) { return unsigned((T + kWarps - 1) / kWarps); }

}  // namespace

void router_forward_cuda(const Tensor& logits, const Tensor& bias, const RouterParams& p, const Tensor& indices,
                         const Tensor& weights, const Tensor& tokens_per_expert, const Tensor& scores, const Tensor& nan_rows,
                         void* stream) {
  const char* op = "router";
  const int64_t T = logits.size(0), E = logits.size(1);
  MOE_ARG_CHECK(E <= kMaxCudaExperts, op, "'logits' ", logits.describe(), " has ", E, " experts; the CUDA router handles up to ",
                kMaxCudaExperts);
  MOE_ARG_CHECK(T <= int64_t(INT_MAX) * kWarps && T < INT_MAX, op, "'logits' ", logits.describe(), " has too many tokens");
  cudaStream_t st = cudaStream_t(stream);
  router_init<<<grid_for(E), kThreads, 0, st>>>(tokens_per_expert.data<int32_t>(), int(E), nan_rows.data<int32_t>(), T);
  cuda::check_launch(op);
  if (T == 0) return;
  FwdArgs a{};
  a.logits = logits.data<float>();
  a.bias = bias.defined() ? bias.data<float>() : nullptr;
  a.indices = indices.data<int32_t>();
  a.weights = weights.data<float>();
  a.counts = tokens_per_expert.data<int32_t>();
  a.scores = scores.data<float>();
  a.nan = nan_rows.data<int32_t>();
  a.T = T;
  a.E = int(E);
  a.k = int(p.k);
  a.G = int(p.groups);
  a.topk_groups = int(p.topk_groups);
  a.m = int(p.k / p.topk_groups);
  a.gs = int(E / p.groups);
  a.sigmoid = p.score == ScoreFn::Sigmoid;
  a.normalize = p.normalize;
  a.scale = p.route_scale;

  // Fast path: a shape it has, 16-byte aligned rows, and groups it can split over its lanes.
  // MOE_EP_ROUTER_FAST=0 forces the generic kernel (for comparisons).
  static const bool fast_allowed = [] {
    const char* env = std::getenv("MOE_EP_ROUTER_FAST");
    return !(env && std::string(env) == "0");
  }();
  const int L = fast_allowed ? fast_lanes(E) : 0;
  const bool pow2_groups = (p.groups & (p.groups - 1)) == 0;
  const bool fast = L > 0 && reinterpret_cast<uintptr_t>(a.logits) % 16 == 0 && reinterpret_cast<uintptr_t>(a.scores) % 16 == 0 &&
                    (p.groups == 1 || (pow2_groups && p.groups <= L && p.k / p.topk_groups <= 2));
  if (fast) {
    launch_fast(static_cast<const RouteArgs&>(a), int(E), logits.device().index, st);
    cuda::check_launch(op);
    return;
  }

  int vpt = 1;
  while (32 * vpt < E) vpt *= 2;
  a.vec = E % 4 == 0 && (reinterpret_cast<uintptr_t>(a.logits) % 16 == 0) && (reinterpret_cast<uintptr_t>(a.scores) % 16 == 0);
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
  cuda::check_launch(op);
}

void router_backward_cuda(const Tensor& d_weights, const Tensor& scores, const Tensor& indices, const RouterParams& p,
                          const Tensor& d_logits, bool accumulate, void* stream) {
  const int64_t T = scores.size(0), E = scores.size(1), k = indices.size(1);
  router_backward_kernel<<<token_blocks(T), kWarps * 32, 0, cudaStream_t(stream)>>>(
      d_weights.data<float>(), scores.data<float>(), indices.data<int32_t>(), T, int(E), int(k), p.score == ScoreFn::Sigmoid,
      p.normalize, p.route_scale, d_logits.data<float>(), accumulate);
  cuda::check_launch("routerBackward");
}

void router_balance_loss_cuda(const Tensor& scores, const Tensor& indices, ScoreFn score, int64_t seq_len, float coef,
                              const Tensor& loss, const Tensor& d_logits, void* stream) {
  const char* op = "balanceLoss";
  const int64_t T = scores.size(0), E = scores.size(1), k = indices.size(1), S = T / seq_len;
  MOE_ARG_CHECK(E * 4 <= 48 * 1024, op, "'scores' ", scores.describe(), " has too many experts for the CUDA balance loss");
  MOE_ARG_CHECK(S <= INT_MAX, op, "too many sequences");
  cudaStream_t st = cudaStream_t(stream);
  // scratch: inv [T], seq_loss [S], g [S,E] (stream-ordered, released when this returns)
  Tensor scratch = Tensor::empty({T + S + S * E}, DType::f32, scores.device(), op);
  float* inv = scratch.data<float>();
  float* seq_loss = inv + T;
  float* g = seq_loss + S;
  const bool sigmoid = score == ScoreFn::Sigmoid;
  row_inverse_kernel<<<token_blocks(T), kWarps * 32, 0, st>>>(scores.data<float>(), T, int(E), sigmoid, inv);
  cuda::check_launch(op);
  balance_seq_kernel<<<unsigned(S), 256, size_t(E) * sizeof(int), st>>>(scores.data<float>(), indices.data<int32_t>(), inv,
                                                                        int(E), int(k), seq_len, S, coef, seq_loss, g);
  cuda::check_launch(op);
  reduce_sum_kernel<<<1, 1024, 0, st>>>(seq_loss, S, 1.0, loss.data<float>());
  cuda::check_launch(op);
  if (d_logits.defined()) {
    balance_grad_kernel<<<token_blocks(T), kWarps * 32, 0, st>>>(scores.data<float>(), inv, g, T, int(E), seq_len, sigmoid,
                                                                 d_logits.data<float>());
    cuda::check_launch(op);
  }
}

void router_z_loss_cuda(const Tensor& logits, float coef, const Tensor& loss, const Tensor& d_logits, void* stream) {
  const char* op = "zLoss";
  const int64_t T = logits.size(0), E = logits.size(1);
  cudaStream_t st = cudaStream_t(stream);
  Tensor lse2 = Tensor::empty({T}, DType::f32, logits.device(), op);
  z_loss_kernel<<<token_blocks(T), kWarps * 32, 0, st>>>(logits.data<float>(), T, int(E), coef, lse2.data<float>(),
                                                         d_logits.defined() ? d_logits.data<float>() : nullptr);
  cuda::check_launch(op);
  reduce_sum_kernel<<<1, 1024, 0, st>>>(lse2.data<float>(), T, double(coef) / double(T), loss.data<float>());
  cuda::check_launch(op);
}

}  // namespace moe::ops
