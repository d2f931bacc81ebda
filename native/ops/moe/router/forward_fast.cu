// Router forward, fast path (router_fast_kernel; E = VPT·L for the shapes in launch_fast, groups a
// power of two ≤ L with a group score of its top m ≤ 2): L lanes per token (32/L tokens per warp), lane l of a token owns
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
#include <algorithm>
#include <atomic>
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

constexpr int kFastWarps = 8;  // warps per block

// The fast kernel's arguments: G a power of two ≤ L; m (group_score_top) ∈ {1, 2} when G > 1.
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
__device__ __forceinline__ void lane_top2(const float (&bv)[VPT], const float (&s)[VPT], float lh, int ls, float& h1, int& s1, float& u1,
                                          float& h2, int& s2, float& u2) {
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
template <int VPT, int L> __global__ void __launch_bounds__(kFastWarps * 32, VPT >= 16 ? 2 : 4) router_fast_kernel(FastArgs a) {
  constexpr int E = VPT * L;
  constexpr int TPW = 32 / L;        // tokens per warp
  constexpr int NV = VPT / 4;        // float4 per lane
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
      int ahead = 0;                             // groups before this one in (score desc, group asc) order
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
  int per_sm = 0;
  cuda::check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kFastWarps * 32, 0), "router",
              "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  return std::max(1, per_sm) * cuda::multiprocessors(device);
}

// Whether this device takes the fast forward as router_init's programmatic dependent: compute
// capability 9.0 or newer, and not refused before. (Whether to ask is router.cc's choice: pdl.)
std::atomic<int> g_pdl[64];  // per device: 0 not asked yet, 1 off, 2 on
bool pdl_supported(int device) {
  if (device < 0 || device >= 64) return false;
  int v = g_pdl[device].load(std::memory_order_relaxed);
  if (v == 0) {
    int major = 0;
    cuda::check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "router", "cudaDeviceGetAttribute");
    v = major >= 9 ? 2 : 1;
    g_pdl[device].store(v, std::memory_order_relaxed);
  }
  return v == 2;
}

template <int VPT, int L> void launch_fast_shape(const FastArgs& a, int device, bool pdl, cudaStream_t stream) {
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
  if (pdl && pdl_supported(device)) {
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

}  // namespace

// The fast path's shapes: E = VPT·L, VPT a multiple of 4 (float4 rows); router.cc's fast_lanes()
// has the same list.
void launch_fast(const FastArgs& a, int E, int device, bool pdl, cudaStream_t stream) {
  switch (E) {
    case 8: launch_fast_shape<4, 2>(a, device, pdl, stream); break;
    case 16: launch_fast_shape<4, 4>(a, device, pdl, stream); break;
    case 32: launch_fast_shape<4, 8>(a, device, pdl, stream); break;
    case 64: launch_fast_shape<4, 16>(a, device, pdl, stream); break;
    case 128: launch_fast_shape<4, 32>(a, device, pdl, stream); break;
    case 256: launch_fast_shape<8, 32>(a, device, pdl, stream); break;
    case 512: launch_fast_shape<16, 32>(a, device, pdl, stream); break;
    default: MOE_INTERNAL_CHECK(false, "router: no fast kernel for E = ", E);
  }
}

}  // namespace moe::ops::router_cuda
