// Expert-choice routing on the GPU (the rule is in router.h; expert_choice_cpu.cc is the oracle).
//
// The selection is a top-C per column of the [T,E] scores. Each column's threshold is found by a
// radix select on a 30-bit key of the f32 score (key = bits + 1, NaN → 0: scores lie in [0, 1],
// so the order of the keys is the order of the scores, NaN lowest), 10 bits per pass; then one
// pass in token order numbers the chosen tokens. Kernels, in stream order, none waiting for the host:
//   ec_init        column states (prefix 0, need C), tokensPerExpert = C, nanRows = [0, T]
//   ec_scores      a warp per token: softmax / sigmoid scores; bad rows NaN and counted
//   ec_hist   ×3   per (tile of W columns, chunk of rows): a 1024-bucket histogram of the next 10
//                  key bits of the keys that match the column's prefix so far (16-bit counters
//                  packed in pairs in shared memory), merged into the column's global histogram
//   ec_select ×3   a warp per column: the bucket holding the need-th largest matching key; the
//                  prefix grows by that digit, `need` becomes the count still to take inside it
//   ec_count       per (tile, chunk of rows): keys above the threshold prefix and equal to it
//   ec_scan        a warp per column: exclusive sums of both over the chunks
//   ec_final       per (tile, chunk): rows in token order from registers: a key above the prefix is
//                  chosen; a key equal to it is chosen while fewer than `need` equal keys came
//                  before it (ties to the lower token); slot = chosen tokens before it
//                  = above-before + min(need, equal-before). Writes slot, weights, indices and the
//                  number of experts each row got in this tile
//   ec_token_hist  experts per token (summed over tiles) → the histogram [E+1]
// After the third pass the prefix is the whole key, so `need` counts tokens with exactly the
// threshold's score and the token-order rule breaks the tie. A column whose bucket holds exactly
// `need` keys is settled early (done): later passes skip it, and a tile of settled columns is
// not read again.
// Memory: the scores are read by 3 histogram passes, the count and the final pass (5 reads of
// [T,E] f32), after the logits are read and the scores written once; the final pass writes slot,
// weights and indices. The selection's floor is one read of the scores.
#include <algorithm>
#include <climits>
#include <cstdint>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "core/tensor.h"
#include "ops/common/launch.h"
#include "ops/moe/router/router.h"

namespace moe::ops {

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kEcWarps = 8;
constexpr int kEcThreads = kEcWarps * 32;
constexpr int kDigitBits = 10;
constexpr int kBuckets = 1 << kDigitBits;
constexpr int kKeyBits = 30;
constexpr int kPasses = kKeyBits / kDigitBits;
constexpr int kHistStride = kBuckets / 2 + 1;  // packed pairs per column, +1 word: columns on distinct banks
constexpr int kRowsPerStream = 16;             // rows each (warp, row group) of ec_count / ec_final handles
constexpr int kMaxTile = 16;                   // columns per tile (a half-warp reads 64 bytes of a row)

static_assert(kPasses * kDigitBits == kKeyBits, "the passes must cover the key");

struct ColState {
  uint32_t prefix;  // the threshold key's top `level` bits
  int32_t level;    // key bits resolved: 0, 10, 20 or 30
  int32_t need;     // tokens still to take among those whose key's top `level` bits equal prefix
  int32_t done;     // the column is settled (need equals their count, or nothing is left to resolve)
};

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  return v;
}

// Order-preserving key of a score in [0, 1] (or NaN): NaN → 0, ±0 → 1, else bits + 1 < 2^30.
// (Scores outside [0, 1] cannot come from ec_scores; they would be clamped, never out of range.)
__device__ __forceinline__ uint32_t ec_key(float s) {
  if (s != s) return 0u;
  return s <= 0.f ? 1u : min(__float_as_uint(s) + 1u, (1u << kKeyBits) - 1u);
}

__global__ void ec_init(ColState* st, int E, int64_t T, int64_t C, int32_t* kept, int32_t* hist, int32_t* nan) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i <= E; i += stride) {
    if (i < E) {
      // C == 0 or C == T needs no pass: need 0 takes nothing, need T takes every key (all match level 0).
      st[i] = ColState{0u, 0, int32_t(C), (C == 0 || C == T) ? 1 : 0};
      kept[i] = int32_t(C);
    }
    hist[i] = 0;
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    nan[0] = 0;
    nan[1] = int32_t(T);
  }
}

// A warp per token: scores as the token-choice router writes them; a non-finite logit makes the
// row bad (NaN scores, counted).
__global__ void __launch_bounds__(kEcThreads)
    ec_scores(const float* __restrict__ logits, int64_t T, int E, bool sigmoid, float* __restrict__ scores, int32_t* nan) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kEcWarps + (threadIdx.x >> 5);
  if (t >= T) return;  // whole warps only
  const float* x = logits + t * E;
  float* s = scores + t * E;
  bool bad = false;
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) {
    const float v = x[e];
    bad = bad || !isfinite(v);
    mx = fmaxf(mx, v);
  }
  if (__any_sync(kFull, bad)) {
    if (lane == 0) {
      atomicAdd(&nan[0], 1);
      atomicMin(&nan[1], int32_t(t));
    }
    for (int e = lane; e < E; e += 32) s[e] = NAN;
    return;
  }
  if (sigmoid) {
    for (int e = lane; e < E; e += 32) s[e] = 1.f / (1.f + expf(-x[e]));
    return;
  }
  mx = warp_max(mx);
  float sum = 0.f;
  for (int e = lane; e < E; e += 32) sum += expf(x[e] - mx);
  const float inv = 1.f / warp_sum(sum);
  for (int e = lane; e < E; e += 32) s[e] = expf(x[e] - mx) * inv;  // ≤ 1: the max's term is 1 and sum ≥ 1
}

// Pass `pass` of the radix select: lanes are (row group, column) with W columns per tile, so a
// warp reads 32/W rows of W consecutive floats each step.
template <int W>
__global__ void __launch_bounds__(kEcThreads) ec_hist(const float* __restrict__ scores, int64_t T, int E, int tiles, int64_t chunk_rows,
                                                      const ColState* __restrict__ st, uint32_t* __restrict__ ghist, int pass) {
  constexpr int RPW = 32 / W;
  constexpr int kStep = kEcWarps * RPW;  // rows the block reads per step
  __shared__ uint32_t h[W * kHistStride];
  __shared__ int s_live;
  const int tile = int(blockIdx.x % unsigned(tiles));
  const int64_t chunk = blockIdx.x / unsigned(tiles);
  const int lane = threadIdx.x & 31, col = lane % W, sub = lane / W, warp = threadIdx.x >> 5;
  const int e = tile * W + col;
  if (threadIdx.x == 0) s_live = 0;
  for (int i = threadIdx.x; i < W * kHistStride; i += kEcThreads) h[i] = 0u;
  __syncthreads();
  if (threadIdx.x < W && tile * W + int(threadIdx.x) < E && !st[tile * W + threadIdx.x].done) s_live = 1;
  __syncthreads();
  if (!s_live) return;  // every column of the tile is settled: nothing to read (uniform over the block)
  if (e < E && !st[e].done) {
    const uint32_t prefix = st[e].prefix;
    const int hi_shift = kKeyBits - kDigitBits * pass;  // bits above it are resolved (30: none)
    const int lo_shift = hi_shift - kDigitBits;
    uint32_t* hc = h + col * kHistStride;
    auto add = [&](float v) {
      const uint32_t key = ec_key(v);
      if ((key >> hi_shift) == prefix) {
        const uint32_t d = (key >> lo_shift) & uint32_t(kBuckets - 1);
        atomicAdd(hc + (d >> 1), (d & 1u) ? 0x10000u : 1u);  // ≤ chunk_rows < 2^16 per counter
      }
    };
    const int64_t t1 = min(T, (chunk + 1) * chunk_rows);
    int64_t t = chunk * chunk_rows + warp * RPW + sub;
    for (; t + 3 * kStep < t1; t += 4 * kStep) {  // four loads in flight per thread
      const float v0 = scores[t * E + e], v1 = scores[(t + kStep) * E + e];
      const float v2 = scores[(t + 2 * kStep) * E + e], v3 = scores[(t + 3 * kStep) * E + e];
      add(v0);
      add(v1);
      add(v2);
      add(v3);
    }
    for (; t < t1; t += kStep) add(scores[t * E + e]);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < W * (kBuckets / 2); i += kEcThreads) {
    const int c = i / (kBuckets / 2), word = i % (kBuckets / 2);
    const int ec = tile * W + c;
    const uint32_t v = h[c * kHistStride + word];
    if (v == 0u || ec >= E) continue;
    uint32_t* g = ghist + int64_t(ec) * kBuckets + 2 * word;
    if (v & 0xffffu) atomicAdd(g, v & 0xffffu);
    if (v >> 16) atomicAdd(g + 1, v >> 16);
  }
}

// A warp per column: lane l holds digits 32l .. 32l+31; suffix sums over the lanes find the digit
// whose bucket holds the need-th largest matching key. Zeroes the histogram for the next pass.
__global__ void __launch_bounds__(kEcThreads) ec_select(uint32_t* __restrict__ ghist, ColState* __restrict__ st, int E, int pass) {
  const int lane = threadIdx.x & 31;
  const int e = blockIdx.x * kEcWarps + (threadIdx.x >> 5);
  if (e >= E) return;
  const ColState s = st[e];
  if (s.done) return;  // its histogram was never written
  uint32_t* h = ghist + int64_t(e) * kBuckets + lane * 32;
  uint32_t c[32];
  uint32_t sum = 0;
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    c[i] = h[i];
    sum += c[i];
  }
#pragma unroll
  for (int i = 0; i < 32; ++i) h[i] = 0u;
  uint32_t incl = sum;  // Σ over lanes ≥ this one: the counts at or above this lane's digits
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const uint32_t v = __shfl_down_sync(kFull, incl, off);
    if (lane + off < 32) incl += v;
  }
  const uint32_t above = incl - sum;
  const uint32_t need = uint32_t(s.need);
  const bool mine = above < need && need <= incl;
  uint32_t digit = 0, rest = 0, count = 0;
  if (mine) {
    uint32_t a = above;
    bool found = false;
#pragma unroll
    for (int i = 31; i >= 0; --i) {
      if (!found && a + c[i] >= need) {
        found = true;
        digit = uint32_t(lane * 32 + i);
        rest = need - a;
        count = c[i];
      }
      if (!found) a += c[i];
    }
  }
  const unsigned who = __ballot_sync(kFull, mine);
  // No lane can miss: the histogram counts every matching key and at least `need` match. Were the
  // scores changed under the kernels, the column takes none of the remaining keys (need 0).
  const int src = who ? __ffs(who) - 1 : 0;
  digit = __shfl_sync(kFull, digit, src);
  rest = who ? __shfl_sync(kFull, rest, src) : 0u;
  count = __shfl_sync(kFull, count, src);
  if (lane == 0) {
    const int level = kDigitBits * (pass + 1);
    st[e] = ColState{(s.prefix << kDigitBits) | digit, level, int32_t(rest), (rest == count || level == kKeyBits) ? 1 : 0};
  }
}

// The rows of stream (warp, row group) `stream` in chunk `chunk` of ec_count / ec_final.
template <int W> struct Streams {
  static constexpr int RPW = 32 / W;
  static constexpr int S = kEcWarps * RPW;           // streams per block
  static constexpr int kChunk = S * kRowsPerStream;  // rows per chunk
};

// Per (tile, chunk): keys above the column's threshold prefix and equal to it.
template <int W>
__global__ void __launch_bounds__(kEcThreads)
    ec_count(const float* __restrict__ scores, int64_t T, int E, int tiles, const ColState* __restrict__ st, int2* __restrict__ cnt) {
  using Sx = Streams<W>;
  __shared__ int s_gt[W], s_eq[W];
  const int tile = int(blockIdx.x % unsigned(tiles));
  const int64_t chunk = blockIdx.x / unsigned(tiles);
  const int lane = threadIdx.x & 31, col = lane % W, sub = lane / W, warp = threadIdx.x >> 5;
  const int e = tile * W + col;
  if (threadIdx.x < W) s_gt[threadIdx.x] = s_eq[threadIdx.x] = 0;
  __syncthreads();
  if (e < E) {
    const ColState s = st[e];
    const int shift = kKeyBits - s.level;
    const int64_t r0 = chunk * Sx::kChunk + int64_t(warp * Sx::RPW + sub) * kRowsPerStream;
    float v[kRowsPerStream];
#pragma unroll
    for (int i = 0; i < kRowsPerStream; ++i) v[i] = r0 + i < T ? scores[(r0 + i) * E + e] : NAN;
    int gt = 0, eq = 0;
#pragma unroll
    for (int i = 0; i < kRowsPerStream; ++i) {
      if (r0 + i >= T) continue;
      const uint32_t hi = ec_key(v[i]) >> shift;
      gt += hi > s.prefix;
      eq += hi == s.prefix;
    }
    if (gt) atomicAdd(&s_gt[col], gt);
    if (eq) atomicAdd(&s_eq[col], eq);
  }
  __syncthreads();
  if (threadIdx.x < W && tile * W + int(threadIdx.x) < E)
    cnt[chunk * E + tile * W + threadIdx.x] = make_int2(s_gt[threadIdx.x], s_eq[threadIdx.x]);
}

// A warp per column: cnt[c][e] ← the sums of cnt[c'][e] over chunks c' < c (in place).
__global__ void __launch_bounds__(kEcThreads) ec_scan(int2* __restrict__ cnt, int64_t chunks, int E) {
  const int lane = threadIdx.x & 31;
  const int e = blockIdx.x * kEcWarps + (threadIdx.x >> 5);
  if (e >= E) return;
  int carry_gt = 0, carry_eq = 0;
  for (int64_t c0 = 0; c0 < chunks; c0 += 32) {
    const int64_t c = c0 + lane;
    const int2 v = c < chunks ? cnt[c * E + e] : make_int2(0, 0);
    int gt = v.x, eq = v.y;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const int g = __shfl_up_sync(kFull, gt, off), q = __shfl_up_sync(kFull, eq, off);
      if (lane >= off) {
        gt += g;
        eq += q;
      }
    }
    if (c < chunks) cnt[c * E + e] = make_int2(carry_gt + gt - v.x, carry_eq + eq - v.y);
    carry_gt += __shfl_sync(kFull, gt, 31);
    carry_eq += __shfl_sync(kFull, eq, 31);
  }
}

// Per (tile, chunk): the chosen tokens, numbered in token order (see the file comment).
template <int W>
__global__ void __launch_bounds__(kEcThreads)
    ec_final(const float* __restrict__ scores, int64_t T, int E, int tiles, const ColState* __restrict__ st,
             const int2* __restrict__ before, float scale, int32_t* __restrict__ slot, float* __restrict__ weights,
             int32_t* __restrict__ indices, uint8_t* __restrict__ part) {
  using Sx = Streams<W>;
  __shared__ int s_gt[Sx::S * W], s_eq[Sx::S * W];
  const int tile = int(blockIdx.x % unsigned(tiles));
  const int64_t chunk = blockIdx.x / unsigned(tiles);
  const int lane = threadIdx.x & 31, col = lane % W, sub = lane / W, warp = threadIdx.x >> 5;
  const int e = tile * W + col;
  const int stream = warp * Sx::RPW + sub;
  const int64_t r0 = chunk * Sx::kChunk + int64_t(stream) * kRowsPerStream;
  const bool valid = e < E;
  const ColState s = valid ? st[e] : ColState{0u, 0, 0, 1};
  const int shift = kKeyBits - s.level;
  float v[kRowsPerStream];
#pragma unroll
  for (int i = 0; i < kRowsPerStream; ++i) v[i] = valid && r0 + i < T ? scores[(r0 + i) * E + e] : NAN;
  int gt = 0, eq = 0;
#pragma unroll
  for (int i = 0; i < kRowsPerStream; ++i) {
    if (!valid || r0 + i >= T) continue;
    const uint32_t hi = ec_key(v[i]) >> shift;
    gt += hi > s.prefix;
    eq += hi == s.prefix;
  }
  s_gt[stream * W + col] = gt;
  s_eq[stream * W + col] = eq;
  __syncthreads();
  if (threadIdx.x < W) {  // a thread per column: exclusive sums over the streams, after the chunks before
    const int c = threadIdx.x;
    const int ec = tile * W + c;
    const int2 b = ec < E ? before[chunk * E + ec] : make_int2(0, 0);
    int g = b.x, q = b.y;
    for (int k = 0; k < Sx::S; ++k) {
      const int a = s_gt[k * W + c], bq = s_eq[k * W + c];
      s_gt[k * W + c] = g;
      s_eq[k * W + c] = q;
      g += a;
      q += bq;
    }
  }
  __syncthreads();
  int gt_before = s_gt[stream * W + col], eq_before = s_eq[stream * W + col];
  const unsigned group = (W == 32 ? kFull : ((1u << W) - 1u)) << (sub * W);
#pragma unroll
  for (int i = 0; i < kRowsPerStream; ++i) {
    const int64_t t = r0 + i;
    bool chosen = false;
    if (valid && t < T) {
      const uint32_t hi = ec_key(v[i]) >> shift;
      const bool above = hi > s.prefix, tie = hi == s.prefix;
      chosen = above || (tie && eq_before < s.need);
      const int64_t at = t * E + e;
      slot[at] = chosen ? gt_before + min(s.need, eq_before) : -1;
      weights[at] = chosen ? scale * v[i] : 0.f;
      if (indices) indices[at] = e;
      gt_before += above;
      eq_before += tie;
    }
    const unsigned ballot = __ballot_sync(kFull, chosen);  // every lane: i and the row group's t agree
    if (col == 0 && t < T) part[int64_t(tile) * T + t] = uint8_t(__popc(ballot & group));
  }
}

// Experts per token (the tiles' counts summed) into the histogram [E+1].
__global__ void ec_token_hist(const uint8_t* __restrict__ part, int64_t T, int tiles, int E, int32_t* __restrict__ hist) {
  extern __shared__ int32_t s_hist[];  // E + 1
  for (int i = threadIdx.x; i <= E; i += blockDim.x) s_hist[i] = 0;
  __syncthreads();
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < T; t += int64_t(gridDim.x) * blockDim.x) {
    int n = 0;
    for (int k = 0; k < tiles; ++k) n += part[int64_t(k) * T + t];
    atomicAdd(&s_hist[n], 1);
  }
  __syncthreads();
  for (int i = threadIdx.x; i <= E; i += blockDim.x)
    if (s_hist[i]) atomicAdd(&hist[i], s_hist[i]);
}

// A warp per token: dS = scale·dW where chosen, then softmax's Jacobian or s(1-s).
__global__ void __launch_bounds__(kEcThreads)
    ec_backward(const float* __restrict__ dw, const float* __restrict__ scores, const int32_t* __restrict__ slot, int64_t T, int E,
                bool sigmoid, float scale, float* dx, bool accumulate) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kEcWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  const float* s = scores + t * E;
  const float* g = dw + t * E;
  const int32_t* sl = slot + t * E;
  float* d = dx + t * E;
  float c = 0.f;
  if (!sigmoid) {
    for (int e = lane; e < E; e += 32) c += sl[e] >= 0 ? s[e] * (scale * g[e]) : 0.f;
    c = warp_sum(c);
  }
  for (int e = lane; e < E; e += 32) {
    const float ds = sl[e] >= 0 ? scale * g[e] : 0.f, se = s[e];
    const float v = sigmoid ? ds * se * (1.f - se) : se * (ds - c);
    d[e] = accumulate ? d[e] + v : v;
  }
}

int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

struct Plan {
  int tiles;
  int64_t hist_chunk_rows, hist_chunks, chunks;
};

template <int W>
void launch_selection(const Plan& pl, const float* scores, int64_t T, int E, ColState* st, uint32_t* ghist, int2* cnt, float scale,
                      int32_t* slot, float* weights, int32_t* indices, uint8_t* part, cudaStream_t stream) {
  const char* op = "router";
  const unsigned select_blocks = unsigned((E + kEcWarps - 1) / kEcWarps);
  for (int pass = 0; pass < kPasses; ++pass) {
    ec_hist<W><<<unsigned(pl.tiles * pl.hist_chunks), kEcThreads, 0, stream>>>(scores, T, E, pl.tiles, pl.hist_chunk_rows, st, ghist, pass);
    cuda::check_launch(op);
    ec_select<<<select_blocks, kEcThreads, 0, stream>>>(ghist, st, E, pass);
    cuda::check_launch(op);
  }
  const unsigned blocks = unsigned(pl.tiles * pl.chunks);
  ec_count<W><<<blocks, kEcThreads, 0, stream>>>(scores, T, E, pl.tiles, st, cnt);
  cuda::check_launch(op);
  ec_scan<<<select_blocks, kEcThreads, 0, stream>>>(cnt, pl.chunks, E);
  cuda::check_launch(op);
  ec_final<W><<<blocks, kEcThreads, 0, stream>>>(scores, T, E, pl.tiles, st, cnt, scale, slot, weights, indices, part);
  cuda::check_launch(op);
}

template <int W> int64_t chunk_rows() { return Streams<W>::kChunk; }
template <int W> int64_t hist_step() { return int64_t(kEcWarps) * (32 / W); }

}  // namespace

void router_expert_choice_cuda(const Tensor& logits, const ExpertChoiceParams& p, const Tensor& scores, const Tensor& slot,
                               const Tensor& weights, const Tensor& indices, const Tensor& tokens_per_expert,
                               const Tensor& experts_per_token, const Tensor& nan_rows, void* stream) {
  const char* op = "router";
  const int64_t T = logits.size(0), C = p.capacity;
  const int E = int(logits.size(1));
  cudaStream_t st = cudaStream_t(stream);
  int W = 1;
  while (W < E && W < kMaxTile) W *= 2;
  const int tiles = (E + W - 1) / W;
  Plan pl{};
  pl.tiles = tiles;
  const int64_t step = W == 16  ? hist_step<16>()
                       : W == 8 ? hist_step<8>()
                       : W == 4 ? hist_step<4>()
                       : W == 2 ? hist_step<2>()
                                : hist_step<1>();
  const int64_t rows = W == 16  ? chunk_rows<16>()
                       : W == 8 ? chunk_rows<8>()
                       : W == 4 ? chunk_rows<4>()
                       : W == 2 ? chunk_rows<2>()
                                : chunk_rows<1>();
  pl.chunks = std::max<int64_t>(1, (T + rows - 1) / rows);
  // Histogram chunks: about 4 blocks per SM over all tiles, each at most 65535 rows (16-bit counters).
  const int64_t want = std::max<int64_t>(1, (4 * int64_t(cuda::multiprocessors(logits.device().index)) + tiles - 1) / tiles);
  int64_t hrows = align_up(std::max<int64_t>(1, (T + want - 1) / want), step);
  hrows = std::min<int64_t>(hrows, 65535 / step * step);
  pl.hist_chunk_rows = hrows;
  pl.hist_chunks = std::max<int64_t>(1, (T + hrows - 1) / hrows);
  MOE_ARG_CHECK(int64_t(tiles) * std::max(pl.chunks, pl.hist_chunks) < int64_t(INT_MAX), op, "'logits' ", logits.describe(),
                " is too large for the CUDA expert-choice router");

  // Scratch (stream-ordered, released when this returns): histograms, column states, chunk sums,
  // experts per (tile, token).
  const int64_t hist_bytes = align_up(int64_t(E) * kBuckets * 4, 256);
  const int64_t state_bytes = align_up(int64_t(E) * int64_t(sizeof(ColState)), 256);
  const int64_t cnt_bytes = align_up(pl.chunks * E * int64_t(sizeof(int2)), 256);
  const int64_t part_bytes = align_up(int64_t(tiles) * std::max<int64_t>(T, 1), 256);
  Tensor scratch = Tensor::empty({hist_bytes + state_bytes + cnt_bytes + part_bytes}, DType::u8, logits.device(), op);
  uint8_t* base = static_cast<uint8_t*>(scratch.raw());
  uint32_t* ghist = reinterpret_cast<uint32_t*>(base);
  ColState* state = reinterpret_cast<ColState*>(base + hist_bytes);
  int2* cnt = reinterpret_cast<int2*>(base + hist_bytes + state_bytes);
  uint8_t* part = base + hist_bytes + state_bytes + cnt_bytes;

  cuda::memset_async(ghist, 0, size_t(hist_bytes), st, op);
  int32_t* hist = experts_per_token.data<int32_t>();
  ec_init<<<grid_for(E + 1), kThreads, 0, st>>>(state, E, T, C, tokens_per_expert.data<int32_t>(), hist, nan_rows.data<int32_t>());
  cuda::check_launch(op);
  if (T == 0) return;
  const float* s = scores.data<float>();
  ec_scores<<<unsigned((T + kEcWarps - 1) / kEcWarps), kEcThreads, 0, st>>>(logits.data<float>(), T, E, p.score == ScoreFn::Sigmoid,
                                                                            scores.data<float>(), nan_rows.data<int32_t>());
  cuda::check_launch(op);
  int32_t* idx = indices.defined() ? indices.data<int32_t>() : nullptr;
  int32_t* sl = slot.data<int32_t>();
  float* w = weights.data<float>();
  switch (W) {
    case 16: launch_selection<16>(pl, s, T, E, state, ghist, cnt, p.route_scale, sl, w, idx, part, st); break;
    case 8: launch_selection<8>(pl, s, T, E, state, ghist, cnt, p.route_scale, sl, w, idx, part, st); break;
    case 4: launch_selection<4>(pl, s, T, E, state, ghist, cnt, p.route_scale, sl, w, idx, part, st); break;
    case 2: launch_selection<2>(pl, s, T, E, state, ghist, cnt, p.route_scale, sl, w, idx, part, st); break;
    default: launch_selection<1>(pl, s, T, E, state, ghist, cnt, p.route_scale, sl, w, idx, part, st); break;
  }
  const unsigned hist_blocks = unsigned(std::min<int64_t>(std::max<int64_t>(1, (T + kThreads - 1) / kThreads), 1024));
  ec_token_hist<<<hist_blocks, kThreads, size_t(E + 1) * sizeof(int32_t), st>>>(part, T, tiles, E, hist);
  cuda::check_launch(op);
}

void router_expert_choice_backward_cuda(const Tensor& d_weights, const Tensor& scores, const Tensor& slot, ScoreFn score, float route_scale,
                                        const Tensor& d_logits, bool accumulate, void* stream) {
  const int64_t T = scores.size(0), E = scores.size(1);
  MOE_ARG_CHECK(E < INT_MAX, "routerBackward", "'scores' ", scores.describe(), " has too many experts");
  ec_backward<<<unsigned((T + kEcWarps - 1) / kEcWarps), kEcThreads, 0, cudaStream_t(stream)>>>(
      d_weights.data<float>(), scores.data<float>(), slot.data<int32_t>(), T, int(E), score == ScoreFn::Sigmoid, route_scale,
      d_logits.data<float>(), accumulate);
  cuda::check_launch("routerBackward");
}

}  // namespace moe::ops
