// Permute / unpermute kernels.
//   layout:   every row starts as padding (an init kernel), then one kernel: every block scans the E
//             segment lengths in shared memory (E ≤ 4096), block 0 writes offsets, and a grid-stride
//             loop places assignments, each claiming its row with a compare-and-swap. Up to 1024
//             assignments and 8192 rows, one block of 512 does all of it (init included) in one
//             launch.
//   gather:   one warp per destination row, the widest aligned vector (16 bytes for rows whose byte
//             length and base addresses allow it), no atomics. Reads x once per destination row:
//             with k > 1 a token's row is read k times, mostly from DRAM (the rows of one token are
//             far apart in the expert order and x is larger than L2).
//   scatter:  the same result from rowOf in token order (what permute() uses): a block per token
//             reads the token's row once (the widest aligned vector, 4 per thread in flight) and
//             writes it to each of its destination rows; further blocks zero the padding rows.
//             DRAM traffic: x once + rows once, the bytes the benchmark counts.
//   unpermute: a block per token (per column chunk of a token when there are few tokens), fp32
//             accumulation in a fixed order whatever the grid, one write per output element.
//   unpermute backward: one block per token, the rows of up to 8 of its assignments loaded at once
//             (16-byte vectors, all in flight together), dy's row read once; the gate-weight dot
//             products reduced once per 8 assignments; further blocks zero the padding rows.
// Indices that are out of range are skipped (never dereferenced); see permute.h.
#include <algorithm>
#include <climits>
#include <cub/cub.cuh>
#include <utility>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "ops/common/launch.h"
#include "ops/moe/permute/permute.h"

namespace moe::ops {

namespace {

// ------------------------------------------------------------------------------------- layout
constexpr int kLayoutThreads = 256;
// The fused layout (kFused): one block of kLayoutFusedThreads threads does layout_init_kernel's work,
// counts invalid assignments in shared memory and writes the count once, so the layout is one
// launch instead of a memset, the init kernel and this kernel. permute_layout_cuda takes it up to
// kLayoutFusedMaxN assignments (two steps of the placement loop, whose loads and compare-and-swap
// form a dependent chain per step: T·k = 1024 for DeepSeek-V3's decode step at T = 128) and
// kLayoutFusedMaxR rows (16 steps of plain stores). 512 threads: at 1024, cub's 64-bit block scan
// needs more than the 64 registers a thread may have and spills.
constexpr int kLayoutFusedThreads = 512;
constexpr int64_t kLayoutFusedMaxN = 2 * kLayoutFusedThreads;
constexpr int64_t kLayoutFusedMaxR = 16 * kLayoutFusedThreads;

// kFused: the init and the zeroed count come first; the __syncthreads() after the scan orders
// those writes before any claim (a barrier makes a block's global writes visible to the block).
template <bool kFused>
__global__ void __launch_bounds__(kFused ? kLayoutFusedThreads : kLayoutThreads)
    layout_kernel(const int32_t* idx, const int32_t* slot, const int32_t* kept, const float* w, int64_t n, int32_t k, int32_t E,
                  int64_t cap, int64_t align, int64_t R, int32_t* offsets, int32_t* row_of, int32_t* row_token, float* row_weight,
                  int32_t* invalid) {
  constexpr int kBlock = kFused ? kLayoutFusedThreads : kLayoutThreads;  // threads per block
  extern __shared__ long long s_off[];                                   // E + 1
  using Scan = cub::BlockScan<long long, kBlock>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int32_t s_invalid;
  int32_t* const out_invalid = invalid;
  if constexpr (kFused) {
    for (int64_t r = threadIdx.x; r < R; r += kBlock) {
      row_token[r] = -1;
      row_weight[r] = 0.f;
    }
    if (threadIdx.x == 0) s_invalid = 0;
    invalid = &s_invalid;  // counted in shared memory, written once at the end
  }
  const int32_t chunk = (E + kBlock - 1) / kBlock;
  const int32_t lo = min(E, int32_t(threadIdx.x) * chunk), hi = min(E, lo + chunk);
  auto seg_len = [&](int32_t e) -> long long {
    long long len = cap >= 0 ? cap : (kept[e] > 0 ? kept[e] : 0);
    return (len + align - 1) / align * align;
  };
  long long local = 0;
  for (int32_t e = lo; e < hi; ++e) local += seg_len(e);
  long long prefix = 0, total = 0;
  Scan(scan_storage).ExclusiveSum(local, prefix, total);
  for (int32_t e = lo; e < hi; ++e) {
    s_off[e] = prefix;
    prefix += seg_len(e);
  }
  if (threadIdx.x == 0) s_off[E] = total;
  __syncthreads();
  if (blockIdx.x == 0) {
    for (int32_t e = threadIdx.x; e <= E; e += blockDim.x) offsets[e] = int32_t(min(s_off[e], (long long)INT_MAX));
    if (threadIdx.x == 0 && total != R) atomicAdd(invalid, 1);
    for (int32_t e = threadIdx.x; e < E; e += blockDim.x)
      if (kept[e] < 0 || kept[e] > s_off[e + 1] - s_off[e]) atomicAdd(invalid, 1);
  }
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  // Kept assignments: row = offsets[e] + slot, claimed with a compare-and-swap on row_token (which
  // layout_init_kernel set to -1), so a slot used twice is caught: the second claimant is skipped
  // and counted. Rows nobody claims (padding, gaps a bad slot left) keep token -1 and weight 0.
  for (int64_t i = first; i < n; i += stride) {
    int32_t s = slot[i];
    int32_t r = -1;
    if (s >= 0) {
      int32_t e = idx[i];
      bool ok = e >= 0 && e < E;
      if (ok) {
        long long limit = kept[e] < s_off[e + 1] - s_off[e] ? kept[e] : s_off[e + 1] - s_off[e];
        long long row = s_off[e] + s;
        ok = s < limit && row < R && atomicCAS(&row_token[row], -1, int32_t(i / k)) == -1;
        if (ok) r = int32_t(row);
      }
      if (!ok) atomicAdd(invalid, 1);
    }
    row_of[i] = r;
    if (r >= 0) row_weight[r] = w[i];
  }
  if constexpr (kFused) {
    __syncthreads();
    if (threadIdx.x == 0) *out_invalid = s_invalid;
  }
}

// Every row starts as padding (token -1, weight 0): the layout kernel claims the kept ones.
__global__ void layout_init_kernel(int64_t R, int32_t* row_token, float* row_weight) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < R; r += int64_t(gridDim.x) * blockDim.x) {
    row_token[r] = -1;
    row_weight[r] = 0.f;
  }
}

// ------------------------------------------------------------------------------------- gather
constexpr int kWarpsPerBlock = 8;
constexpr int kUnroll = 4;

// rows[r] = x[tok[r]] (zeros for tok < 0 or ≥ T).
template <typename V>
__global__ void gather_rows(const V* __restrict__ x, int64_t T, const int32_t* __restrict__ tok, int64_t R, int64_t row_vecs,
                            V* __restrict__ rows) {
  const int lane = threadIdx.x & 31;
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (r >= R) return;
  const int32_t t = tok[r];
  V* dst = rows + r * row_vecs;
  if (t < 0 || t >= T) {
    V z;
    memset(&z, 0, sizeof(V));
    for (int64_t i = lane; i < row_vecs; i += 32) dst[i] = z;
    return;
  }
  const V* src = x + t * row_vecs;
  int64_t i = lane;
  for (; i + 32 * (kUnroll - 1) < row_vecs; i += 32 * kUnroll) {
    V v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = src[i + 32 * u];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) dst[i + 32 * u] = v[u];
  }
  for (; i < row_vecs; i += 32) dst[i] = src[i];
}

// ------------------------------------------------------------------------------------ scatter
constexpr int kScatterThreads = 128;
constexpr int kScatterUnroll = 4;   // vectors per thread in flight
constexpr int kPadRowsPerWarp = 8;  // padding blocks: rows checked per warp
constexpr int kPadRowsPerBlock = kPadRowsPerWarp * kScatterThreads / 32;

// Blocks [0, T): block t copies x[t] to rows[r] for each r = row_of[t, j] in [0, R) with
// tok[r] == t (so it writes nothing that the gather would write differently), reading x[t] once.
// Blocks [T, T + ceil(R / kPadRowsPerBlock)): zeros into the rows whose tok is not in [0, T).
// With row_of and tok from permute_layout this equals the gather exactly: every row whose tok is a
// token is some (tok, j)'s row_of.
template <typename V>
__global__ void __launch_bounds__(kScatterThreads, 2048 / kScatterThreads)  // full occupancy: ≤ 32 registers
    scatter_rows(const V* __restrict__ x, int64_t T, int32_t k, const int32_t* __restrict__ row_of, const int32_t* __restrict__ tok,
                 int64_t R, int64_t row_vecs, V* __restrict__ rows) {
  extern __shared__ int32_t s_dst[];  // k destination rows of this token, -1 for none
  const int64_t b = blockIdx.x;
  if (b < T) {
    const V* src = x + b * row_vecs;
    V v[kScatterUnroll];
    auto load = [&](int64_t c0) {
#pragma unroll
      for (int u = 0; u < kScatterUnroll; ++u) {
        const int64_t c = c0 + int64_t(u) * kScatterThreads;
        if (c < row_vecs) v[u] = src[c];
      }
    };
    int64_t c0 = threadIdx.x;
    load(c0);  // the first vectors are in flight while the destinations are read
    for (int32_t j = threadIdx.x; j < k; j += blockDim.x) {
      const int32_t r = row_of[b * k + j];
      s_dst[j] = (r >= 0 && r < R && tok[r] == int32_t(b)) ? r : -1;
    }
    __syncthreads();
    for (;;) {
      for (int32_t j = 0; j < k; ++j) {
        const int32_t r = s_dst[j];
        if (r < 0) continue;
        V* dst = rows + int64_t(r) * row_vecs;
#pragma unroll
        for (int u = 0; u < kScatterUnroll; ++u) {
          const int64_t c = c0 + int64_t(u) * kScatterThreads;
          if (c < row_vecs) dst[c] = v[u];
        }
      }
      c0 += int64_t(kScatterThreads) * kScatterUnroll;
      if (c0 >= row_vecs) break;
      load(c0);
    }
  } else {
    const int lane = threadIdx.x & 31;
    const int64_t first = (b - T) * kPadRowsPerBlock + int64_t(threadIdx.x >> 5) * kPadRowsPerWarp;
    bool pad = false;
    if (lane < kPadRowsPerWarp && first + lane < R) {
      const int32_t t = tok[first + lane];
      pad = t < 0 || t >= T;
    }
    unsigned todo = __ballot_sync(0xffffffffu, pad);
    V z;
    memset(&z, 0, sizeof(V));
    while (todo != 0u) {
      const int i = __ffs(todo) - 1;
      todo &= todo - 1u;
      V* dst = rows + (first + i) * row_vecs;
      for (int64_t c = lane; c < row_vecs; c += 32) dst[c] = z;
    }
  }
}

// The widest of 16/8/4/2/1 bytes dividing the row length and every base address.
int vector_bytes(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  for (int v : {16, 8, 4, 2}) {
    bool ok = row_bytes % v == 0;
    for (const void* p : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % v == 0;
    if (ok) return v;
  }
  return 1;
}

// Calls go(TypeTag<V>{}) with V the unsigned type of `bytes` bytes (uint4 for 16).
template <typename Go> void with_vector_type(int bytes, Go&& go) {
  switch (bytes) {
    case 16: go(TypeTag<uint4>{}); break;
    case 8: go(TypeTag<uint2>{}); break;
    case 4: go(TypeTag<uint32_t>{}); break;
    case 2: go(TypeTag<uint16_t>{}); break;
    default: go(TypeTag<uint8_t>{}); break;
  }
}

void launch_gather(const void* x, int64_t T, const int32_t* tok, int64_t R, int64_t row_bytes, void* rows, cudaStream_t stream) {
  if (R == 0 || row_bytes == 0) return;
  int vb = vector_bytes(row_bytes, {x, rows});
  unsigned blocks = unsigned((R + kWarpsPerBlock - 1) / kWarpsPerBlock);
  auto go = [&](auto tag) {
    using V = typename decltype(tag)::type;
    gather_rows<V><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(static_cast<const V*>(x), T, tok, R, row_bytes / int64_t(sizeof(V)),
                                                               static_cast<V*>(rows));
  };
  with_vector_type(vb, go);
}

// The scatter handles up to this many destinations per token (its shared-memory list).
constexpr int64_t kScatterMaxK = 4096;

void launch_scatter(const void* x, int64_t T, int32_t k, const int32_t* row_of, const int32_t* tok, int64_t R, int64_t row_bytes,
                    void* rows, cudaStream_t stream) {
  if (R == 0 || row_bytes == 0) return;
  int vb = vector_bytes(row_bytes, {x, rows});
  const int64_t blocks = T + (R + kPadRowsPerBlock - 1) / kPadRowsPerBlock;
  const size_t smem = size_t(std::max<int32_t>(k, 1)) * sizeof(int32_t);
  auto go = [&](auto tag) {
    using V = typename decltype(tag)::type;
    scatter_rows<V><<<unsigned(blocks), kScatterThreads, smem, stream>>>(static_cast<const V*>(x), T, k, row_of, tok, R,
                                                                         row_bytes / int64_t(sizeof(V)), static_cast<V*>(rows));
  };
  with_vector_type(vb, go);
}

// ---------------------------------------------------------------------------------- unpermute
constexpr int kTokenThreads = 128;

template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

template <typename T, int N> __device__ void load_float(const T* p, float (&f)[N]) {
  Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) f[i] = to_float(pk.v[i]);
}
template <typename T, int N> __device__ void store_float(T* p, const float (&f)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_float<T>(f[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// out[t] = add[t] + Σ_j w[t,j]·rows[row_of[t,j]] (add optional), N elements per access. Block b
// handles token b / chunks and the columns [c·chunk, (c+1)·chunk) ∩ [0, H) with c = b % chunks
// (chunks = 1, chunk ≥ H: one block per token). Each element's sum is the same whatever the grid:
// acc = add (or 0), then acc += w[t,j]·row for j = 0, 1, …, k-1 in that order, skipping dropped
// ones; the rows of up to kUnpermuteTile assignments are loaded together before they are added,
// which changes when loads are issued, not the order of the additions.
constexpr int kUnpermuteTile = 8;
template <typename I, typename O, int N>
__global__ void __launch_bounds__(kTokenThreads)
    unpermute_kernel(const I* __restrict__ rows, int64_t R, int64_t H, const int32_t* __restrict__ row_of, const float* __restrict__ w,
                     int32_t k, const O* __restrict__ add, O* __restrict__ out, int64_t chunk, int32_t chunks) {
  extern __shared__ int32_t s_row[];  // k rows, then k weights
  float* s_w = reinterpret_cast<float*>(s_row + k);
  const int64_t t = blockIdx.x / unsigned(chunks);
  const int64_t h_begin = int64_t(blockIdx.x % unsigned(chunks)) * chunk;
  const int64_t h_end = h_begin + chunk < H ? h_begin + chunk : H;
  for (int32_t j = threadIdx.x; j < k; j += blockDim.x) {
    int32_t r = row_of[t * k + j];
    s_row[j] = (r >= 0 && r < R) ? r : -1;
    s_w[j] = w ? w[t * k + j] : 1.f;
  }
  __syncthreads();
  for (int64_t h = h_begin + int64_t(threadIdx.x) * N; h < h_end; h += int64_t(blockDim.x) * N) {
    float acc[N] = {};
    if (add) load_float<O, N>(add + t * H + h, acc);
    for (int32_t j0 = 0; j0 < k; j0 += kUnpermuteTile) {
      // The tile's rows are the same for every thread (shared memory), so these branches are uniform.
      Pack<I, N> x[kUnpermuteTile];
#pragma unroll
      for (int u = 0; u < kUnpermuteTile; ++u) {
        const int32_t j = j0 + u;
        const int32_t r = j < k ? s_row[j] : -1;
        if (r >= 0) x[u] = *reinterpret_cast<const Pack<I, N>*>(rows + int64_t(r) * H + h);
      }
#pragma unroll
      for (int u = 0; u < kUnpermuteTile; ++u) {
        const int32_t j = j0 + u;
        if (j >= k || s_row[j] < 0) continue;
        const float wj = s_w[j];
#pragma unroll
        for (int i = 0; i < N; ++i) acc[i] += wj * to_float(x[u].v[i]);
      }
    }
    store_float<O, N>(out + t * H + h, acc);
  }
}

// Column chunks per token. With at least kUnpermuteTargetBlocks tokens, one block per token (chunks
// = 1). With fewer, H is cut into chunks of whole block steps (kTokenThreads·N elements, so every
// access stays N-aligned) until about kUnpermuteTargetBlocks blocks run, at most one step per block:
// e.g. T = 128, H = 7168 bf16 (N = 8): 7 chunks of 1024 columns, 896 blocks; T = 64, H = 4096: 256.
// 1024 blocks of 128 threads ≈ 8 per SM on a 132-SM H200 (half its thread slots), and each thread
// keeps up to kUnpermuteTile 16-byte loads in flight. The grid never changes a result (see above).
constexpr int64_t kUnpermuteTargetBlocks = 1024;
struct UnpermuteGrid {
  int64_t chunk;   // columns per block
  int64_t chunks;  // blocks per token
};
UnpermuteGrid unpermute_grid(int64_t T, int64_t H, int N) {
  const int64_t step = int64_t(kTokenThreads) * N;
  const int64_t steps = (H + step - 1) / step;
  const int64_t want = (kUnpermuteTargetBlocks + T - 1) / T;
  int64_t chunks = std::max<int64_t>(1, std::min(steps, want));
  const int64_t per = (steps + chunks - 1) / chunks;  // steps per block
  chunks = (steps + per - 1) / per;
  return chunks <= 1 ? UnpermuteGrid{H, 1} : UnpermuteGrid{per * step, chunks};
}

// ------------------------------------------------------------------------ unpermute backward
// Assignments of a token whose rows are loaded together: their loads are all in flight before the
// first is used (a thread holds kBackwardTile 16-byte vectors), which is what keeps DRAM busy.
constexpr int kBackwardTile = 8;
constexpr int kTokenWarps = kTokenThreads / 32;
constexpr int kPadRowsPerTokenBlock = kPadRowsPerWarp * kTokenWarps;

// Blocks [0, T): token t. For its assignments j (a tile of kBackwardTile at a time; one tile for
// k ≤ 8) and each N-element slice of H: dy[t]'s slice is loaded once, the tile's row slices all
// at once, then d_rows[row_of[t,j]] = w[t,j]·dy[t] is stored and <dy[t], rows[row_of[t,j]]> summed
// per thread in fp32. The dot products are summed by warp shuffles and then over the block's warps
// through shared memory: two barriers per tile, none per assignment.
// Blocks [T, …): kPadRowsPerTokenBlock rows each; those whose row_token is not a token (padding)
// get zeros in d_rows.
template <typename G, typename I, typename O, int N>
__global__ void __launch_bounds__(kTokenThreads)
    unpermute_backward_kernel(const G* __restrict__ dy, const I* __restrict__ rows, int64_t T, int64_t R, int64_t H,
                              const int32_t* __restrict__ row_of, const int32_t* __restrict__ row_token, const float* __restrict__ w,
                              int32_t k, O* __restrict__ d_rows, float* __restrict__ d_w) {
  __shared__ float s_dot[kBackwardTile][kTokenWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = blockIdx.x;
  if (b >= T) {
    const int64_t first = (b - T) * kPadRowsPerTokenBlock + int64_t(warp) * kPadRowsPerWarp;
    bool pad = false;
    if (lane < kPadRowsPerWarp && first + lane < R) {
      const int32_t tok = row_token[first + lane];
      pad = tok < 0 || tok >= T;
    }
    unsigned todo = __ballot_sync(0xffffffffu, pad);
    const float zero[N] = {};
    while (todo != 0u) {
      const int i = __ffs(todo) - 1;
      todo &= todo - 1u;
      O* dst = d_rows + (first + i) * H;
      for (int64_t h = int64_t(lane) * N; h < H; h += 32 * N) store_float<O, N>(dst + h, zero);
    }
    return;
  }
  const int64_t t = b;
  const G* g_row = dy + t * H;
  for (int32_t j0 = 0; j0 < k; j0 += kBackwardTile) {
    // The tile's rows and weights: the same for every thread, so every branch on them is uniform.
    int32_t r[kBackwardTile];
    float wj[kBackwardTile];
#pragma unroll
    for (int u = 0; u < kBackwardTile; ++u) {
      const int32_t j = j0 + u;
      const int32_t rr = j < k ? row_of[t * k + j] : -1;
      // A row this token does not own is left to its owner (or to the padding blocks): no row is
      // written twice, even for a malformed layout.
      r[u] = (rr >= 0 && rr < R && row_token[rr] == int32_t(t)) ? rr : -1;
      wj[u] = r[u] >= 0 ? w[t * k + j] : 0.f;
    }
    float dot[kBackwardTile] = {};
    for (int64_t h = int64_t(threadIdx.x) * N; h < H; h += int64_t(kTokenThreads) * N) {
      Pack<I, N> x[kBackwardTile];
#pragma unroll
      for (int u = 0; u < kBackwardTile; ++u)
        if (r[u] >= 0) x[u] = *reinterpret_cast<const Pack<I, N>*>(rows + int64_t(r[u]) * H + h);
      float g[N];
      load_float<G, N>(g_row + h, g);
#pragma unroll
      for (int u = 0; u < kBackwardTile; ++u) {
        if (r[u] < 0) continue;
        float d[N];
#pragma unroll
        for (int i = 0; i < N; ++i) {
          dot[u] += g[i] * to_float(x[u].v[i]);
          d[i] = wj[u] * g[i];
        }
        store_float<O, N>(d_rows + int64_t(r[u]) * H + h, d);
      }
    }
#pragma unroll
    for (int u = 0; u < kBackwardTile; ++u) {
      float s = dot[u];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      if (lane == 0) s_dot[u][warp] = s;
    }
    __syncthreads();
    if (threadIdx.x < kBackwardTile && j0 + int32_t(threadIdx.x) < k) {
      float s = 0.f;  // 0 for a dropped assignment (its partial sums are all 0)
#pragma unroll
      for (int v = 0; v < kTokenWarps; ++v) s += s_dot[threadIdx.x][v];
      d_w[t * k + j0 + threadIdx.x] = s;
    }
    if (j0 + kBackwardTile < k) __syncthreads();  // s_dot is reused by the next tile
  }
}

template <typename Fn> void dispatch_bf16_f32(DType d, Fn&& fn) {
  if (d == DType::bf16) fn(TypeTag<bf16>{});
  else fn(TypeTag<float>{});
}

// Elements per access: the most (16 bytes of the widest type at most) that divide H and keep every
// base address aligned.
int pack_elems(int64_t H, int max_elems, std::initializer_list<std::pair<const void*, int64_t>> ptrs) {
  for (int n = max_elems; n > 1; n /= 2) {
    bool ok = H % n == 0;
    for (auto [p, size] : ptrs) ok = ok && reinterpret_cast<uintptr_t>(p) % uintptr_t(size * n) == 0;
    if (ok) return n;
  }
  return 1;
}

template <typename Fn> void dispatch_pack(int n, Fn&& fn) {
  switch (n) {
    case 8: fn(std::integral_constant<int, 8>{}); break;
    case 4: fn(std::integral_constant<int, 4>{}); break;
    case 2: fn(std::integral_constant<int, 2>{}); break;
    default: fn(std::integral_constant<int, 1>{}); break;
  }
}

}  // namespace

void permute_layout_cuda(const Tensor& indices, const Tensor& slot, const Tensor& kept, const Tensor& weights, int64_t capacity,
                         int64_t align, const Tensor& offsets, const Tensor& row_of, const Tensor& row_token, const Tensor& row_weight,
                         const Tensor& invalid, void* stream_ptr) {
  const std::string op = "permute";
  cudaStream_t stream = cudaStream_t(stream_ptr);
  const int64_t n = indices.numel(), E = kept.numel(), R = row_token.numel();
  // The one place that picks the layout's launches: the fused single block for a serving step's
  // few assignments and rows; otherwise the memset, the init kernel and a grid of blocks.
  const bool fused = n <= kLayoutFusedMaxN && R <= kLayoutFusedMaxR;
  const size_t smem = size_t(E + 1) * sizeof(long long);
  const int32_t k = int32_t(indices.size(1));
  if (fused) {
    layout_kernel<true><<<1, kLayoutFusedThreads, smem, stream>>>(
        indices.data<int32_t>(), slot.data<int32_t>(), kept.data<int32_t>(), weights.data<float>(), n, k, int32_t(E), capacity, align, R,
        offsets.data<int32_t>(), row_of.data<int32_t>(), row_token.data<int32_t>(), row_weight.data<float>(), invalid.data<int32_t>());
  } else {
    cuda::memset_async(invalid.raw(), 0, 4, stream, op);
    layout_init_kernel<<<grid_for(R, kLayoutThreads), kLayoutThreads, 0, stream>>>(R, row_token.data<int32_t>(), row_weight.data<float>());
    cuda::check_launch(op);
    layout_kernel<false><<<grid_for(std::max<int64_t>(n, R), kLayoutThreads), kLayoutThreads, smem, stream>>>(
        indices.data<int32_t>(), slot.data<int32_t>(), kept.data<int32_t>(), weights.data<float>(), n, k, int32_t(E), capacity, align, R,
        offsets.data<int32_t>(), row_of.data<int32_t>(), row_token.data<int32_t>(), row_weight.data<float>(), invalid.data<int32_t>());
  }
  cuda::check_launch(op);
}

void permute_rows_cuda(const Tensor& x, const Tensor& row_token, const Tensor& rows, const Tensor& row_of, void* stream) {
  const int64_t T = x.size(0), R = rows.size(0), row_bytes = x.size(1) * dtype_size(x.dtype());
  if (row_of.defined() && row_of.size(1) <= kScatterMaxK && T + (R + kPadRowsPerBlock - 1) / kPadRowsPerBlock < INT_MAX) {
    launch_scatter(x.raw(), T, int32_t(row_of.size(1)), row_of.data<int32_t>(), row_token.data<int32_t>(), R, row_bytes, rows.raw(),
                   cudaStream_t(stream));
  } else {
    launch_gather(x.raw(), T, row_token.data<int32_t>(), R, row_bytes, rows.raw(), cudaStream_t(stream));
  }
  cuda::check_launch("permute");
}

void unpermute_cuda(const Tensor& rows, const Tensor& row_of, const Tensor& weights, const Tensor& add, const Tensor& out, const char* op,
                    void* stream) {
  const int64_t T = row_of.size(0), k = row_of.size(1), R = rows.size(0), H = rows.size(1);
  if (T == 0 || H == 0) return;
  size_t smem = size_t(k) * 8;
  MOE_ARG_CHECK(smem <= 48 * 1024, op, "k = ", k, " experts per token is more than the CUDA kernel handles (6144)");
  dispatch_bf16_f32(rows.dtype(), [&](auto itag) {
    using I = typename decltype(itag)::type;
    dispatch_bf16_f32(out.dtype(), [&](auto otag) {
      using O = typename decltype(otag)::type;
      int n = pack_elems(
          H, int(16 / sizeof(I)),
          {{rows.raw(), int64_t(sizeof(I))}, {out.raw(), int64_t(sizeof(O))}, {add.defined() ? add.raw() : nullptr, int64_t(sizeof(O))}});
      dispatch_pack(n, [&](auto ntag) {
        constexpr int N = decltype(ntag)::value;
        if constexpr (N * sizeof(I) <= 16) {
          const UnpermuteGrid g = unpermute_grid(T, H, N);
          // T < 2^31 (rowOf's numel is checked); chunks > 1 only when T < kUnpermuteTargetBlocks.
          unpermute_kernel<I, O, N><<<unsigned(T * g.chunks), kTokenThreads, smem, cudaStream_t(stream)>>>(
              rows.data<I>(), R, H, row_of.data<int32_t>(), weights.defined() ? weights.data<float>() : nullptr, int32_t(k),
              add.defined() ? add.data<O>() : nullptr, out.data<O>(), g.chunk, int32_t(g.chunks));
        }
      });
    });
  });
  cuda::check_launch(op);
}

void unpermute_backward_cuda(const Tensor& dy, const Tensor& rows, const Tensor& weights, const Tensor& row_of, const Tensor& row_token,
                             const Tensor& d_rows, const Tensor& d_weights, void* stream_ptr) {
  const char* op = "unpermuteBackward";
  cudaStream_t stream = cudaStream_t(stream_ptr);
  const int64_t T = row_of.size(0), k = row_of.size(1), R = rows.size(0), H = rows.size(1);
  // One block per token, then the blocks that zero the padding rows of d_rows.
  const int64_t blocks = T + (R + kPadRowsPerTokenBlock - 1) / kPadRowsPerTokenBlock;
  if (blocks == 0) return;
  MOE_ARG_CHECK(blocks < INT_MAX, op, "'rowOf' ", row_of.describe(), " and 'rows' ", rows.describe(), " need more than 2^31 blocks");
  dispatch_bf16_f32(dy.dtype(), [&](auto gtag) {
    using G = typename decltype(gtag)::type;
    dispatch_bf16_f32(rows.dtype(), [&](auto itag) {
      using I = typename decltype(itag)::type;
      dispatch_bf16_f32(d_rows.dtype(), [&](auto otag) {
        using O = typename decltype(otag)::type;
        constexpr int kMax = int(16 / (sizeof(G) > sizeof(I) ? sizeof(G) : sizeof(I)));
        int n = pack_elems(H, kMax, {{dy.raw(), int64_t(sizeof(G))}, {rows.raw(), int64_t(sizeof(I))}, {d_rows.raw(), int64_t(sizeof(O))}});
        dispatch_pack(n, [&](auto ntag) {
          constexpr int N = decltype(ntag)::value;
          if constexpr (N <= kMax) {
            unpermute_backward_kernel<G, I, O, N><<<unsigned(blocks), kTokenThreads, 0, stream>>>(
                dy.data<G>(), rows.data<I>(), T, R, H, row_of.data<int32_t>(), row_token.data<int32_t>(), weights.data<float>(), int32_t(k),
                d_rows.data<O>(), d_weights.data<float>());
          }
        });
      });
    });
  });
  cuda::check_launch(op);
}

}  // namespace moe::ops
