// Decode grouped GEMM, forward (NN): out[rows_e, N] = a[rows_e, K] · W_e[K, N] when each group has
// a handful of rows (1..max_rows, max_rows 8, 16 or 32). With so few rows the product is a stream
// of the touched experts' weights: at T = 1 on Mixtral's shape (2 experts, H = 4096, F = 14336) the
// up projection reads 470 MB and the down projection 235 MB for ~0.1 GFLOP. The tensor-core tile
// kernels give the down projection only E_touched · H/256 = 32 output tiles, one per SM: a third
// of the GPU's bandwidth idles. Here the work is split along K as well as N, so every SM streams.
//
// Work unit (one block of 4 warps): (group, 256 columns, a range of K). A warp owns 64 columns;
// lane (g = lane/4, t = lane%4) loads 16 bytes (8 columns, 8g..8g+7) of four weight rows per 16-k
// step: k0+2t, k0+2t+1, k0+8+2t, k0+9+2t. A warp instruction thus reads four whole 128-byte lines.
// The block's 4 warps read 512 contiguous bytes of each weight row.
//
// Tensor cores, with the roles swapped: the weights are the MMA's A operand (m16 = 16 weight
// columns, k16) and the tokens its B operand (n8 = 8 tokens), so a group of ≤ 8 rows pads to 8, not
// 16. mma.sync m16n8k16's A fragment wants, per thread, pairs of consecutive k for one row; the
// loads above give 8 columns of one k row, so two loads (rows k and k+1) are merged with byte
// permutes into (W[k][n], W[k+1][n]) pairs: 8 PRMT per 32 bytes. Column pairs (8g+2j, 8g+2j+1)
// become MMA j's rows g and g+8, so a lane's accumulators hold 8 consecutive columns of each of its
// tokens (2t, 2t+1 of each 8-token tile): one 16-byte store per token row. The tokens' B fragment
// is a 32-bit load of (a[tok][k0+2t], a[tok][k0+2t+1]): a's rows are K-contiguous.
//
// Why tensor cores even for 1-2 rows: per 2 KB of weights (one warp's 16-k step over 64 columns)
// this costs 4 LDG.128 + 16 PRMT + 4 HMMA (+4 more HMMA per extra 8-token tile) + 2 token loads per
// 8-token tile, ~30 instructions; CUDA-core FMAs would need a bf16→fp32 conversion per weight and
// one FFMA per weight and row: 1024·(1 + rows)/32 = 64 (1 row) to 96 (2 rows) warp instructions,
// plus a cross-lane reduction over k. Both are far under the issue rate at the bandwidth (an SM
// receives ~18 B/clk at 4.2 TB/s over 132 SMs: 2 KB per ~110 clocks), so the choice is about
// registers and simplicity: one code path for 1..32 rows. At 32 rows (4 token tiles) it is 16 HMMA
// per 2 KB, still a quarter of mma.sync's rate at the bandwidth.
//
// Bytes in flight: each warp issues the loads of U 16-k steps before it uses any (U = 4: 16 LDG.128,
// 8 KB per warp; U = 2 at 32 rows for registers), 4 blocks per SM (≤ 128 registers): ~64-128 KB
// per SM, beyond the ~20-30 KB that latency × per-SM bandwidth asks for.
//
// Split-K: `splits` blocks share one (group, 256-column) tile along K, chosen on the host from the
// shape and the SM count (decode_nn). With splits = 1 a block finishes its outputs itself (Store,
// SwiGLU with or without g); otherwise each writes its fp32 partial [split][M][N] (scratch from the
// caching allocator, stream-ordered) and a second small kernel sums the splits in a fixed order
// (deterministic: a graph replay gives the eager result bit for bit) and runs the epilogue, which
// for SwiGLU needs the complete sums before the nonlinearity.
//
// Groups: the host knows only M and E, not the per-group counts (no host synchronisation). The grid
// covers min(E, M) groups (at most that many have rows); block b's group is the rank-th group with
// 1..max_rows rows, found by a block-wide scan of the offsets; blocks beyond the last such group
// exit. Groups of more rows are left to the tensor-core kernel (grouped_gemm_cuda).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "ops/moe/grouped_gemm/decode.h"
#include "ops/moe/grouped_gemm/mma_sync.cuh"
#include "ops/moe/grouped_gemm/swiglu.h"

namespace moe::ops {
namespace {

constexpr int WARPS = 4, THREADS = 32 * WARPS;
constexpr int WARP_N = 64;               // columns per warp: 8 lane quads × 8 columns
constexpr int BLOCK_N = WARPS * WARP_N;  // 256
constexpr int KSTEP = 16;                // one MMA k
constexpr int MIN_STEPS_PER_SPLIT = 16;  // 256 k rows: 128 KB of weights per block at least
// Resident blocks per SM asked of the compiler (__launch_bounds__): 4 (≤ 128 registers) with up to
// 16 tokens, 3 (≤ 168) with 32, whose 64 accumulators per lane would spill at 128.
template <int TT> constexpr int blocks_per_sm() { return TT == 4 ? 3 : 4; }
// 16-k steps whose loads each warp issues before using any: 8 KB (U = 4) or 4 KB (U = 2) per warp.
template <int TT> constexpr int unroll() { return TT == 1 ? 4 : 2; }
constexpr int FINISH_THREADS = 128;  // the finishing pass: 8 columns per thread

struct DecodeParams {
  const __nv_bfloat16* a;  // [M, K]
  const __nv_bfloat16* b;  // [E, K, N]
  const int32_t* offsets;  // [E+1]
  void* out;               // Store: [M, N] (bf16 or f32); SwiGLU: h [M, N/2] bf16
  __nv_bfloat16* aux_out;  // SwiGLU: g [M, N] bf16, or null
  float* partial;          // [splits, M, N] when splits > 1
  int M, E, K, N;
  int max_rows;  // groups of 1..max_rows rows are this kernel's
  int n_tiles;   // ceil(N / BLOCK_N)
  int splits, steps_per_split;
  bool accumulate;
};

// 16 bytes read once (no L1 allocation), zeros when !pred: predicated inside the asm, so the
// batch of loads stays branch-free and issues back to back.
__device__ __forceinline__ uint4 ld_stream(const __nv_bfloat16* p, bool pred) {
  uint4 v;
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
      " @p ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];\n}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "r"(int(pred)));
  return v;
}

__device__ __forceinline__ void group_bounds(const DecodeParams& p, int e, int& begin, int& end) {
  begin = min(max(__ldg(p.offsets + e), 0), p.M);
  end = min(max(__ldg(p.offsets + e + 1), begin), p.M);
}

// Writes 8 finished columns [n, n+8) of row m through the epilogue (v: fp32 sums).
template <GemmEpilogue EPI, typename OutT>
__device__ __forceinline__ void finish8(const DecodeParams& p, int m, int n, const float (&v)[8]) {
  if constexpr (EPI == GemmEpilogue::SwiGLU) {
    // (v[2i], v[2i+1]) = (g1, g3) of hidden unit n/2 + i; h from g as stored in bf16 (swiglu.h).
    const uint4 g = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
    const uint32_t gw[4] = {g.x, g.y, g.z, g.w};
    float hv[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const __nv_bfloat162 gp = *reinterpret_cast<const __nv_bfloat162*>(&gw[u]);
      hv[u] = silu(__low2float(gp)) * __high2float(gp);
    }
    uint2 h;
    h.x = pack_bf16(hv[0], hv[1]);
    h.y = pack_bf16(hv[2], hv[3]);
    *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(p.out) + int64_t(m) * (p.N / 2) + n / 2) = h;
    if (p.aux_out) *reinterpret_cast<uint4*>(p.aux_out + int64_t(m) * p.N + n) = g;
  } else if constexpr (sizeof(OutT) == 2) {
    const uint4 o = make_uint4(pack_bf16(v[0], v[1]), pack_bf16(v[2], v[3]), pack_bf16(v[4], v[5]), pack_bf16(v[6], v[7]));
    *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + int64_t(m) * p.N + n) = o;
  } else {
    float4* dst = reinterpret_cast<float4*>(static_cast<float*>(p.out) + int64_t(m) * p.N + n);
    float4 lo = make_float4(v[0], v[1], v[2], v[3]), hi = make_float4(v[4], v[5], v[6], v[7]);
    if (p.accumulate) {
      const float4 o0 = dst[0], o1 = dst[1];
      lo = make_float4(lo.x + o0.x, lo.y + o0.y, lo.z + o0.z, lo.w + o0.w);
      hi = make_float4(hi.x + o1.x, hi.y + o1.y, hi.z + o1.z, hi.w + o1.w);
    }
    dst[0] = lo;
    dst[1] = hi;
  }
}

// The rank-th group (in index order) with 1..max_rows rows, or -1: a block-wide scan of the offsets,
// THREADS groups at a time. Called by every thread of the block; the result is the same for all.
__device__ int find_group(const DecodeParams& p, int rank) {
  __shared__ int warp_counts[WARPS];
  __shared__ int found;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) found = -1;
  int before_chunk = 0;  // qualifying groups before this chunk
  for (int e0 = 0; e0 < p.E; e0 += THREADS) {
    const int e = e0 + int(threadIdx.x);
    bool mine = false;
    if (e < p.E) {
      int begin, end;
      group_bounds(p, e, begin, end);
      mine = end - begin >= 1 && end - begin <= p.max_rows;
    }
    const unsigned ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();  // also orders `found = -1` before the write below
    int before = before_chunk, total = 0;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      before += w < warp ? warp_counts[w] : 0;
      total += warp_counts[w];
    }
    if (mine && before + __popc(ballot & ((1u << lane) - 1u)) == rank) found = e;
    __syncthreads();                                       // `found` visible; warp_counts read by all before the next chunk rewrites them
    if (found >= 0 || before_chunk + total > rank) break;  // the same for every thread
    before_chunk += total;
  }
  return found;
}

// grid: min(E, M) · n_tiles · splits blocks; block = (rank, n-tile, split), split fastest.
// TT: 8-token tiles (max_rows = 8·TT).
template <int TT, GemmEpilogue EPI, typename OutT, bool SPLIT>
__global__ void __launch_bounds__(THREADS, blocks_per_sm<TT>()) decode_nn_kernel(DecodeParams p) {
  constexpr int U = unroll<TT>();
  const int split = int(blockIdx.x % unsigned(p.splits));
  const int tile = int((blockIdx.x / unsigned(p.splits)) % unsigned(p.n_tiles));
  const int rank = int(blockIdx.x / unsigned(p.splits * p.n_tiles));
  const int group = find_group(p, rank);
  if (group < 0) return;  // fewer qualifying groups than the grid allows for
  int row0, row_end;
  group_bounds(p, group, row0, row_end);
  const int rows = row_end - row0;

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n = tile * BLOCK_N + warp * WARP_N + 8 * g;  // this lane's 8 columns
  const bool n_ok = n < p.N;                             // N % 8 == 0: all 8 or none
  const int steps = (p.K + KSTEP - 1) / KSTEP;
  const int step0 = split * p.steps_per_split, step1 = min(step0 + p.steps_per_split, steps);

  // Weight rows k0+2t, k0+2t+1, k0+8+2t, k0+9+2t of step k0 = 16·s, columns n..n+7.
  const int64_t N = p.N;
  const __nv_bfloat16* w = p.b + int64_t(group) * p.K * N + int64_t(step0) * KSTEP * N + int64_t(2 * t) * N + (n_ok ? n : 0);
  // Token 8·mt + g of the group (B operand column g); its k pairs (2t, 2t+1) and (8+2t, 9+2t).
  const __nv_bfloat16* tok[TT];
  bool tok_ok[TT];
#pragma unroll
  for (int mt = 0; mt < TT; ++mt) {
    tok_ok[mt] = 8 * mt + g < rows;
    tok[mt] = p.a + int64_t(row0 + (tok_ok[mt] ? 8 * mt + g : 0)) * p.K + 2 * t;
  }

  float acc[TT][4][4];
#pragma unroll
  for (int mt = 0; mt < TT; ++mt)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mt][j][q] = 0.f;

  for (int s = step0; s < step1; s += U) {
    uint4 wv[U][4];
    uint32_t bv[U][TT][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = (s + u) * KSTEP + 2 * t;  // this lane's first k of the step
      const bool step_ok = s + u < step1;
      const __nv_bfloat16* wu = w + int64_t(s - step0 + u) * KSTEP * N;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int dk = (q & 1) + 8 * (q >> 1);  // rows k, k+1, k+8, k+9
        wv[u][q] = ld_stream(wu + dk * N, step_ok && n_ok && k + dk < p.K);
      }
#pragma unroll
      for (int mt = 0; mt < TT; ++mt) {
        // K is even, so a pair is inside K or past it entirely.
        const int64_t kk = int64_t(s + u) * KSTEP;
        bv[u][mt][0] = step_ok && tok_ok[mt] && k < p.K ? __ldg(reinterpret_cast<const uint32_t*>(tok[mt] + kk)) : 0u;
        bv[u][mt][1] = step_ok && tok_ok[mt] && k + 8 < p.K ? __ldg(reinterpret_cast<const uint32_t*>(tok[mt] + kk + 8)) : 0u;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint32_t* r0 = &wv[u][0].x;  // row k:   columns (8g+2j, 8g+2j+1) in word j
      const uint32_t* r1 = &wv[u][1].x;  // row k+1
      const uint32_t* r8 = &wv[u][2].x;  // row k+8
      const uint32_t* r9 = &wv[u][3].x;  // row k+9
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        // MMA j: row g = column 8g+2j, row g+8 = column 8g+2j+1; k slots (2t, 2t+1) and (2t+8, 2t+9).
        const uint32_t a0 = __byte_perm(r0[j], r1[j], 0x5410), a1 = __byte_perm(r0[j], r1[j], 0x7632);
        const uint32_t a2 = __byte_perm(r8[j], r9[j], 0x5410), a3 = __byte_perm(r8[j], r9[j], 0x7632);
#pragma unroll
        for (int mt = 0; mt < TT; ++mt)
          if (8 * mt < rows) mma_bf16(acc[mt][j], a0, a1, a2, a3, bv[u][mt][0], bv[u][mt][1]);  // uniform
      }
    }
  }

  if (!n_ok) return;
    // Lane (g, t) holds, for tokens 8·mt + 2t + c (c = 0, 1), columns n + 2j + h in acc[mt][j][2h + c].
#pragma unroll
  for (int mt = 0; mt < TT; ++mt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int r = 8 * mt + 2 * t + c;
      if (r >= rows) continue;
      float v[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        v[2 * j] = acc[mt][j][c];
        v[2 * j + 1] = acc[mt][j][2 + c];
      }
      if constexpr (SPLIT) {
        float4* dst = reinterpret_cast<float4*>(p.partial + (int64_t(split) * p.M + row0 + r) * N + n);
        __stcg(dst, make_float4(v[0], v[1], v[2], v[3]));  // read back once, from L2, by the finishing pass
        __stcg(dst + 1, make_float4(v[4], v[5], v[6], v[7]));
      } else {
        finish8<EPI, OutT>(p, row0 + r, n, v);
      }
    }
}

// The finishing pass after a split-K launch: out = epilogue(Σ_split partial), splits summed in
// order. grid: (M, ceil(N / (8·FINISH_THREADS))); a block is one row's column range, and leaves rows
// outside this kernel's groups alone.
template <GemmEpilogue EPI, typename OutT> __global__ void __launch_bounds__(FINISH_THREADS, 4) decode_finish_kernel(DecodeParams p) {
  const int m = int(blockIdx.x);
  const int n = (int(blockIdx.y) * FINISH_THREADS + int(threadIdx.x)) * 8;
  // The group of row m: the last e with offsets[e] <= m (offsets rise; clamped as the main kernel does).
  int lo = 0, hi = p.E - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (min(max(__ldg(p.offsets + mid), 0), p.M) <= m) lo = mid;
    else hi = mid - 1;
  }
  int begin, end;
  group_bounds(p, lo, begin, end);
  if (m < begin || m >= end || end - begin > p.max_rows || n >= p.N) return;
  float v[8] = {};
  for (int s = 0; s < p.splits; ++s) {
    const float4* src = reinterpret_cast<const float4*>(p.partial + (int64_t(s) * p.M + m) * p.N + n);
    const float4 x = __ldcg(src), y = __ldcg(src + 1);
    v[0] += x.x;
    v[1] += x.y;
    v[2] += x.z;
    v[3] += x.w;
    v[4] += y.x;
    v[5] += y.y;
    v[6] += y.z;
    v[7] += y.w;
  }
  finish8<EPI, OutT>(p, m, n, v);
}

template <int TT, GemmEpilogue EPI, typename OutT> void launch(const DecodeParams& p, unsigned blocks, cudaStream_t stream) {
  if (p.splits == 1) {
    decode_nn_kernel<TT, EPI, OutT, false><<<blocks, THREADS, 0, stream>>>(p);
    cuda::check_launch("groupedGemm");
    return;
  }
  decode_nn_kernel<TT, EPI, OutT, true><<<blocks, THREADS, 0, stream>>>(p);
  cuda::check_launch("groupedGemm");
  const dim3 grid(unsigned(p.M), unsigned((p.N + 8 * FINISH_THREADS - 1) / (8 * FINISH_THREADS)));
  decode_finish_kernel<EPI, OutT><<<grid, FINISH_THREADS, 0, stream>>>(p);
  cuda::check_launch("groupedGemm");
}

template <int TT> void launch_epilogue(const GroupedGemm& g, const DecodeParams& p, unsigned blocks, cudaStream_t stream) {
  if (g.epilogue == GemmEpilogue::SwiGLU) launch<TT, GemmEpilogue::SwiGLU, __nv_bfloat16>(p, blocks, stream);
  else if (g.out.dtype() == DType::f32) launch<TT, GemmEpilogue::Store, float>(p, blocks, stream);
  else launch<TT, GemmEpilogue::Store, __nv_bfloat16>(p, blocks, stream);
}

}  // namespace

bool decode_nn_fits(const GroupedGemm& g) {
  if (g.mode != GemmMode::NN || (g.epilogue != GemmEpilogue::Store && g.epilogue != GemmEpilogue::SwiGLU)) return false;
  if (g.a.dtype() != DType::bf16 || g.b.dtype() != DType::bf16) return false;
  if (g.epilogue == GemmEpilogue::SwiGLU && (g.out.dtype() != DType::bf16 || (g.aux.defined() && g.aux.dtype() != DType::bf16)))
    return false;
  const int64_t M = g.a.size(0), K = g.b.size(1), N = g.b.size(2), E = g.offsets.size(0) - 1;
  if (M < 1 || E < 1 || K < 2 || N < 8 || K % 2 != 0 || N % 8 != 0) return false;
  auto aligned = [](const Tensor& t, uintptr_t bytes) { return !t.defined() || (reinterpret_cast<uintptr_t>(t.raw()) & (bytes - 1)) == 0; };
  if (!aligned(g.a, 4) || !aligned(g.b, 16) || !aligned(g.out, 16) || !aligned(g.aux, 16)) return false;
  // Grid: min(E, M)·n_tiles·splits blocks (splits ≤ 64) and M finishing rows; indices in int.
  const int64_t n_tiles = (N + BLOCK_N - 1) / BLOCK_N;
  return M < (int64_t(1) << 31) && K < (int64_t(1) << 31) && N < (int64_t(1) << 31) && std::min(E, M) * n_tiles * 64 < (int64_t(1) << 31);
}

void decode_nn(const GroupedGemm& g, int max_rows, void* stream_ptr) {
  const int64_t M = g.a.size(0), E = g.offsets.size(0) - 1, K = g.b.size(1), N = g.b.size(2);
  MOE_INTERNAL_CHECK(max_rows == 8 || max_rows == 16 || max_rows == 32, "groupedGemm: decode kernel rows ", max_rows);
  cudaStream_t stream = cudaStream_t(stream_ptr);
  DecodeParams p{};
  p.a = g.a.data<__nv_bfloat16>();
  p.b = g.b.data<__nv_bfloat16>();
  p.offsets = g.offsets.data<int32_t>();
  p.out = g.out.raw();
  p.aux_out = g.epilogue == GemmEpilogue::SwiGLU && g.aux.defined() ? g.aux.data<__nv_bfloat16>() : nullptr;
  p.M = int(M);
  p.E = int(E);
  p.K = int(K);
  p.N = int(N);
  p.max_rows = max_rows;
  p.n_tiles = int((N + BLOCK_N - 1) / BLOCK_N);
  p.accumulate = g.accumulate;

  // Splits along K: enough blocks for blocks_per_sm per SM (one full wave of resident blocks, each
  // with its loads in flight) over the groups that can have rows (min(E, M): exact at T = 1, an
  // upper bound otherwise), but
  //   - at least MIN_STEPS_PER_SPLIT 16-k steps per block (the per-block fixed costs stay small),
  //   - partial sums (written and read back: 8·splits·M·N bytes) at most ~1/16 of the weights
  //     streamed (2·G·K·N bytes): splits ≤ G·K / (64·M),
  //   - at most 64, and steps per split a multiple of the unroll (no idle half batches but the last).
  // E.g. H200 (132 SMs), Mixtral T = 1: down (K = 14336, N = 4096, 2 groups) 17 splits of 848 k
  // rows, 544 blocks; up (K = 4096, N = 28672) 3 splits, 672 blocks. T = 8: up 1 split (896
  // blocks), down 5.
  const int U = max_rows == 8 ? unroll<1>() : unroll<2>();
  const int per_sm = max_rows == 32 ? blocks_per_sm<4>() : blocks_per_sm<1>();
  const int64_t G = std::min(E, M), steps = (K + KSTEP - 1) / KSTEP, base = G * p.n_tiles;
  const int64_t target = int64_t(per_sm) * cuda::multiprocessors(g.a.device().index);
  int64_t splits = base >= target ? 1 : (target + base - 1) / base;
  splits = std::min(splits, std::max<int64_t>(1, steps / MIN_STEPS_PER_SPLIT));
  splits = std::min(splits, std::max<int64_t>(1, G * K / (64 * M)));
  splits = std::clamp<int64_t>(splits, 1, 64);
  int64_t per_split = (steps + splits - 1) / splits;
  per_split = (per_split + U - 1) / U * U;
  splits = (steps + per_split - 1) / per_split;
  p.splits = int(splits);
  p.steps_per_split = int(per_split);

  Tensor partial;
  if (splits > 1) {
    // Freed when this function returns; the caching allocator hands it out again only on this
    // stream, after the kernels queued here (as grouped_gemm_cuda's tile_start).
    partial = Tensor::empty({splits * M * N}, DType::f32, g.a.device(), "groupedGemm");
    p.partial = partial.data<float>();
  }
  const unsigned blocks = unsigned(base * splits);
  switch (max_rows) {
    case 8: launch_epilogue<1>(g, p, blocks, stream); break;
    case 16: launch_epilogue<2>(g, p, blocks, stream); break;
    default: launch_epilogue<4>(g, p, blocks, stream); break;
  }
}

}  // namespace moe::ops
