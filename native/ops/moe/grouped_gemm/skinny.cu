// Skinny grouped GEMM, forward (NN) with one group: out[M, N] = a[M, K] · b[K, N], N ≤ 256. The
// router's logits (x[T, H] · Wr[H, E], E = 8 … 256, fp32 out) are this shape. The tile kernels give
// it ceil(M/128)·ceil(N/256) blocks: one block at T ≤ 128, E ≤ 256, so one SM streams all of x and
// Wr (H200, ncu at 54297f7: 42 µs at Mixtral's T = 64, H = 4096, E = 8; 69 µs at DeepSeek-V3's
// T = 128, H = 7168, E = 256). Here K is split across blocks as well, so that every SM streams.
//
// Tensor cores with the roles swapped (as decode.cu): b's columns are the MMA's A operand (m16 = 16
// columns; for N = 8 half of it is zeros, which costs nothing here: the kernel is bound by bytes)
// and the tokens its B operand (n8 = 8 tokens), so a block's token tile pads to 8 rows, not 16.
//
// K order inside 32-element chunks. mma.sync m16n8k16 wants, per lane (g = lane/4, t = lane%4),
// k slots (2t, 2t+1) and (2t+8, 2t+9) of its token g. The sum over k does not care which physical k
// sits in which slot as long as a and b agree, so for chunk k0 and its two MMA steps j = 0, 1:
//     slot 2t + c      ↔  k0 + 8t + 4j + c          (c = 0, 1)
//     slot 2t + 8 + c  ↔  k0 + 8t + 4j + 2 + c
// Then lane (g, t) reads its token's 8 consecutive k (k0+8t … k0+8t+7) with one 16-byte load, words
// 2j and 2j+1 being step j's B fragment: a is read straight from global memory, no shared-memory
// staging, every load a whole 16 bytes (a warp's load covers 8 tokens × 64 contiguous bytes).
// b is read as rows k0+8t+i (i = 0..7), CPL consecutive columns per lane (CPL = 2, 4 or 8: 4-, 8-
// or 16-byte loads); rows i = 4j, 4j+1 (and 4j+2, 4j+3) merged by byte permutes into the A
// fragment's (k, k+1) pairs. MMA q (q < CPL/2) has row g ↔ column n + 2q and row g+8 ↔ n + 2q + 1,
// n = CPL·g the lane's first column, so a lane's accumulators hold CPL consecutive columns of each of
// its tokens (one store per token row). A warp covers WN = 8·CPL columns: 16, 32 or 64.
//
// Work unit (one block of 4 warps): (8·TT tokens, a band of WN columns, a range of chunks). The
// block's warps take its chunks in turn (warp w: chunks c0 + w, c0 + w + 4, …), each accumulating
// its own partial sums; the warps' sums are then added in warp order through shared memory by warp
// 0. With one split the block writes `out`; with several, its fp32 partial [split][M][N] (scratch
// from the caching allocator, stream-ordered) and a finishing kernel adds the splits in split
// order. Every sum is in an order fixed by the shape and the device's SM count (the plan): two runs,
// or a graph replay, on one device give the same bits.
//
// Bytes: a is read once per band (bands = ceil(N/WN): 1 at N ≤ 64, 4 at N = 256) and b once per
// token tile (ceil(M/(8·TT)) tiles; L2 hits mostly). The plan (skinny_nn) picks CPL from N and TT from
// M, splits for a wave of resident blocks, and caps the partial sums' traffic.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "ops/moe/grouped_gemm/mma_sync.cuh"
#include "ops/moe/grouped_gemm/skinny.h"

namespace moe::ops {
namespace {

constexpr int WARPS = 4, THREADS = 32 * WARPS;
constexpr int CHUNK = 32;            // k per chunk: two MMA steps
constexpr int FINISH_THREADS = 128;  // the finishing pass: 8 columns of one row per thread
constexpr int MAX_SPLITS = 64;

struct SkinnyParams {
  const __nv_bfloat16* a;  // [M, K]
  const __nv_bfloat16* b;  // [K, N] (group 0 of [1, K, N])
  const int32_t* offsets;  // [2]: the group's rows
  void* out;               // [M, N] bf16 or f32
  float* partial;          // [splits, M, N] when splits > 1
  int M, K, N;
  int bands;  // ceil(N / WN)
  int splits, chunks_per_split;
  bool accumulate;
};

// Accumulator floats per lane: TT token tiles × CPL/2 MMAs × 4.
template <int CPL, int TT> constexpr int acc_count() { return TT * (CPL / 2) * 4; }
// Resident blocks per SM asked of the compiler (__launch_bounds__) and assumed by the plan: 4 (≤ 128
// registers), 3 (≤ 168) for the 64 accumulators of the widest tiles, which spill at 128.
constexpr int blocks_per_sm(int cpl, int tt) { return tt * (cpl / 2) * 4 >= 64 ? 3 : 4; }
// Chunks whose loads a warp issues before using any: as many as fit 64 registers of loads
// (b: 4·CPL words per chunk, a: 4·TT), at most 4.
constexpr int unroll(int cpl, int tt) { return 64 / (4 * cpl + 4 * tt) >= 4 ? 4 : 64 / (4 * cpl + 4 * tt) >= 2 ? 2 : 1; }

// Predicated loads (zeros when !pred), branch-free so that a batch issues back to back. a is read
// once (no L1 allocation); b is read by every token tile of the band, so it may stay in L1.
__device__ __forceinline__ uint4 ld_a(const __nv_bfloat16* p, bool pred) {
  uint4 v;
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
      " @p ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n}\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p), "r"(int(pred)));
  return v;
}
template <int CPL> __device__ __forceinline__ void ld_b(uint32_t (&w)[CPL / 2], const __nv_bfloat16* p, bool pred) {
  if constexpr (CPL == 8) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
        " @p ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n}\n"
        : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
        : "l"(p), "r"(int(pred)));
  } else if constexpr (CPL == 4) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %3, 0;\n mov.b32 %0, 0;\n mov.b32 %1, 0;\n"
        " @p ld.global.nc.v2.u32 {%0,%1}, [%2];\n}\n"
        : "=r"(w[0]), "=r"(w[1])
        : "l"(p), "r"(int(pred)));
  } else {
    static_assert(CPL == 2, "2, 4 or 8 columns per lane");
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n mov.b32 %0, 0;\n"
        " @p ld.global.nc.u32 %0, [%1];\n}\n"
        : "=r"(w[0])
        : "l"(p), "r"(int(pred)));
  }
}

// The group's rows [begin, end), clamped into [0, M] as the other kernels clamp them.
__device__ __forceinline__ void group_rows(const SkinnyParams& p, int& begin, int& end) {
  begin = min(max(__ldg(p.offsets), 0), p.M);
  end = min(max(__ldg(p.offsets + 1), begin), p.M);
}

// Writes V finished columns [n, n+V) of row m (V = 2, 4 or 8; fp32 sums) to out.
template <int V, typename OutT> __device__ __forceinline__ void store_out(const SkinnyParams& p, int m, int n, const float (&v)[V]) {
  if constexpr (sizeof(OutT) == 2) {
    uint32_t w[V / 2];
#pragma unroll
    for (int i = 0; i < V / 2; ++i) w[i] = pack_bf16(v[2 * i], v[2 * i + 1]);
    __nv_bfloat16* dst = static_cast<__nv_bfloat16*>(p.out) + int64_t(m) * p.N + n;
    if constexpr (V == 8) *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    else if constexpr (V == 4) *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
    else *reinterpret_cast<uint32_t*>(dst) = w[0];
  } else {
    float* dst = static_cast<float*>(p.out) + int64_t(m) * p.N + n;
    if constexpr (V == 2) {
      float2 s = make_float2(v[0], v[1]);
      if (p.accumulate) {
        const float2 o = *reinterpret_cast<const float2*>(dst);
        s = make_float2(s.x + o.x, s.y + o.y);
      }
      *reinterpret_cast<float2*>(dst) = s;
    } else {
#pragma unroll
      for (int i = 0; i < V; i += 4) {  // n is a multiple of 4 and N of 8: 16-byte aligned
        float4 s = make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]);
        if (p.accumulate) {
          const float4 o = *reinterpret_cast<const float4*>(dst + i);
          s = make_float4(s.x + o.x, s.y + o.y, s.z + o.z, s.w + o.w);
        }
        *reinterpret_cast<float4*>(dst + i) = s;
      }
    }
  }
}

// grid: token_tiles · splits · bands blocks, band fastest (the bands of one token tile and split
// read the same a, close in time: L2 hits), then split, then token tile.
template <int CPL, int TT, typename OutT>
__global__ void __launch_bounds__(THREADS, blocks_per_sm(CPL, TT)) skinny_nn_kernel(SkinnyParams p) {
  constexpr int U = unroll(CPL, TT), Q = CPL / 2, ACC = acc_count<CPL, TT>();
  constexpr int WN = 8 * CPL;
  __shared__ float reduce[WARPS - 1][ACC][32];  // warps 1..3's sums, lane-minor (no bank conflicts)

  const int band = int(blockIdx.x % unsigned(p.bands));
  const int rest = int(blockIdx.x / unsigned(p.bands));
  const int split = rest % p.splits, tile = rest / p.splits;
  int begin, end;
  group_rows(p, begin, end);
  const int row0 = begin + tile * 8 * TT;
  if (row0 >= end) return;  // the grid covers M rows; the group may have fewer (uniform per block)
  const int rows = min(8 * TT, end - row0);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n = band * WN + CPL * g;  // this lane's first column
  const bool n_ok = n < p.N;          // N % 8 == 0 and CPL | 8: all CPL columns or none
  const int chunks = (p.K + CHUNK - 1) / CHUNK;
  const int c0 = split * p.chunks_per_split, c1 = min(c0 + p.chunks_per_split, chunks);

  // b rows k0 + 8t + i of this lane's columns; a's rows 8·mt + g of the tile, k from k0 + 8t.
  const int64_t N = p.N;
  const __nv_bfloat16* bp = p.b + int64_t(8 * t) * N + (n_ok ? n : 0);
  // Token tile mt is rows 8·mt apart: one pointer (a predicated-off load reads nothing, so rows past
  // the group's end need no clamping).
  const __nv_bfloat16* ap = p.a + int64_t(row0 + g) * p.K + 8 * t;
  const int64_t tile_stride = int64_t(8) * p.K;

  float acc[TT][Q][4];
#pragma unroll
  for (int mt = 0; mt < TT; ++mt)
#pragma unroll
    for (int q = 0; q < Q; ++q)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[mt][q][r] = 0.f;

  for (int c = c0 + warp; c < c1; c += WARPS * U) {
    uint32_t bw[U][8][Q];
    uint4 av[U][TT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int cu = c + WARPS * u;
      const int64_t k0 = int64_t(cu) * CHUNK;
      // K % 8 == 0: this lane's 8 k are all inside K or all past it.
      const bool k_ok = cu < c1 && k0 + 8 * t < p.K;
#pragma unroll
      for (int i = 0; i < 8; ++i) ld_b<CPL>(bw[u][i], bp + (k0 + i) * N, k_ok && n_ok);
#pragma unroll
      for (int mt = 0; mt < TT; ++mt) av[u][mt] = ld_a(ap + mt * tile_stride + k0, k_ok && 8 * mt + g < rows);
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          // Rows 4j, 4j+1 (slots 2t, 2t+1) and 4j+2, 4j+3 (slots 2t+8, 2t+9); word q holds columns
          // (n+2q, n+2q+1): the low halves are MMA row g, the high halves row g+8.
          const uint32_t r0 = bw[u][4 * j][q], r1 = bw[u][4 * j + 1][q], r2 = bw[u][4 * j + 2][q], r3 = bw[u][4 * j + 3][q];
          const uint32_t a0 = __byte_perm(r0, r1, 0x5410), a1 = __byte_perm(r0, r1, 0x7632);
          const uint32_t a2 = __byte_perm(r2, r3, 0x5410), a3 = __byte_perm(r2, r3, 0x7632);
#pragma unroll
          for (int mt = 0; mt < TT; ++mt) {
            const uint32_t* x = &av[u][mt].x;                                                 // words 2j, 2j+1: step j's B fragment
            if (8 * mt < rows) mma_bf16(acc[mt][q], a0, a1, a2, a3, x[2 * j], x[2 * j + 1]);  // uniform
          }
        }
      }
  }

  // The warps' sums in warp order: warp 0 + warp 1 + warp 2 + warp 3.
  if (warp > 0) {
#pragma unroll
    for (int mt = 0; mt < TT; ++mt)
#pragma unroll
      for (int q = 0; q < Q; ++q)
#pragma unroll
        for (int r = 0; r < 4; ++r) reduce[warp - 1][(mt * Q + q) * 4 + r][lane] = acc[mt][q][r];
  }
  __syncthreads();
  if (warp > 0) return;
#pragma unroll
  for (int w = 0; w < WARPS - 1; ++w)
#pragma unroll
    for (int mt = 0; mt < TT; ++mt)
#pragma unroll
      for (int q = 0; q < Q; ++q)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[mt][q][r] += reduce[w][(mt * Q + q) * 4 + r][lane];

  if (!n_ok) return;
    // Lane (g, t) holds, for tokens 8·mt + 2t + c (c = 0, 1), columns n + 2q + h in acc[mt][q][2h + c].
#pragma unroll
  for (int mt = 0; mt < TT; ++mt)
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int r = 8 * mt + 2 * t + c;
      if (r >= rows) continue;
      float v[CPL];
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        v[2 * q] = acc[mt][q][c];
        v[2 * q + 1] = acc[mt][q][2 + c];
      }
      if (p.splits == 1) {
        store_out<CPL, OutT>(p, row0 + r, n, v);
      } else {
        // Read back once, from L2, by the finishing pass.
        float* dst = p.partial + (int64_t(split) * p.M + row0 + r) * N + n;
#pragma unroll
        for (int i = 0; i < CPL; i += 2) __stcg(reinterpret_cast<float2*>(dst + i), make_float2(v[i], v[i + 1]));
      }
    }
}

// After a split launch: out = Σ_split partial, splits added in order. One thread per 8 columns of a
// row; rows outside the group are left alone.
template <typename OutT> __global__ void __launch_bounds__(FINISH_THREADS) skinny_finish_kernel(SkinnyParams p) {
  const int64_t item = int64_t(blockIdx.x) * FINISH_THREADS + threadIdx.x;
  const int per_row = p.N / 8;
  const int64_t m = item / per_row;
  const int n = int(item % per_row) * 8;
  int begin, end;
  group_rows(p, begin, end);
  if (m < begin || m >= end) return;
  float v[8] = {};
  // Batches of 8 splits: their 16 loads issued together, then added in split order.
  for (int s0 = 0; s0 < p.splits; s0 += 8) {
    float4 part[8][2];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      if (s0 + u < p.splits) {
        const float4* src = reinterpret_cast<const float4*>(p.partial + (int64_t(s0 + u) * p.M + m) * p.N + n);
        part[u][0] = __ldcg(src);
        part[u][1] = __ldcg(src + 1);
      }
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      if (s0 + u < p.splits) {
        const float4 x = part[u][0], y = part[u][1];
        v[0] += x.x;
        v[1] += x.y;
        v[2] += x.z;
        v[3] += x.w;
        v[4] += y.x;
        v[5] += y.y;
        v[6] += y.z;
        v[7] += y.w;
      }
    }
  }
  store_out<8, OutT>(p, int(m), n, v);
}

// The launch's shape: CPL and TT choose the kernel; bands, token tiles and splits the grid.
struct Plan {
  int cpl, tt, bands, tiles, splits, chunks_per_split;
};

// - CPL from N: the narrowest warp band that covers N (16, 32 columns), else bands of 64.
// - TT: the fewest 8-token tiles that cover M (at most 4 with 64-column bands, 8 otherwise: ≤ 64
//   accumulators per lane), then halved while the grid, even split as far as it goes, would not give
//   every SM two blocks (small M is bound by latency: more blocks with fewer bytes each).
// - splits: as many as one wave of resident blocks takes (blocks_per_sm per SM, rounded down), but
//   at least one full batch of U chunks per warp (splits ≤ chunks ÷ 4U), the partial sums' traffic
//   (8·splits·M·N bytes, written and read back) at most the bytes streamed (2·M·K + 2·K·N), and at
//   most MAX_SPLITS; chunks per split a multiple of 4 (every warp of a block the same number of
//   chunks, but in the last split).
// E.g. 132 SMs: Mixtral T = 64 (K 4096, N 8): CPL 2, TT 1 (U 4), 8 tiles × 8 splits of 16 chunks,
// 64 blocks (each warp's 4 chunks in one batch); T = 256: 32 tiles × 8 splits, 256 blocks;
// DeepSeek-V3 T = 128 (K 7168, N 256): CPL 8, TT 4 (U 1), 4 tiles × 4 bands × 19 splits of 12
// chunks, 304 blocks; T = 4096 (K 7168, N 32): CPL 4, TT 8 (U 1), 64 tiles × 6 splits of 40 chunks,
// 384 blocks.
Plan make_plan(int64_t M, int64_t K, int64_t N, int sms) {
  Plan pl{};
  pl.cpl = N <= 16 ? 2 : N <= 32 ? 4 : 8;
  pl.bands = int((N + 8 * pl.cpl - 1) / (8 * pl.cpl));
  const int64_t chunks = (K + CHUNK - 1) / CHUNK;
  // At least one full batch of loads (U chunks) per warp: fewer would add blocks, partial sums and
  // finishing work without taking a round trip off any warp.
  auto most_splits = [&](int t) { return std::clamp<int64_t>(chunks / (WARPS * unroll(pl.cpl, t)), 1, MAX_SPLITS); };
  const int max_tt = pl.cpl == 8 ? 4 : 8;
  int tt = 1;
  while (tt < max_tt && 8 * tt < M) tt *= 2;
  auto tiles = [&](int t) { return (M + 8 * t - 1) / (8 * t); };
  while (tt > 1 && tiles(tt) * pl.bands * most_splits(tt) < 2 * int64_t(sms)) tt /= 2;
  pl.tt = tt;
  const int64_t base = tiles(tt) * pl.bands, target = int64_t(blocks_per_sm(pl.cpl, tt)) * sms;
  int64_t splits = std::max<int64_t>(1, target / base);  // rounded down: one wave, no tail of a few blocks
  splits = std::min(splits, most_splits(tt));
  splits = std::min(splits, std::max<int64_t>(1, (2 * M * K + 2 * K * N) / (8 * M * N)));
  splits = std::clamp<int64_t>(splits, 1, MAX_SPLITS);
  int64_t per_split = (chunks + splits - 1) / splits;
  per_split = (per_split + WARPS - 1) / WARPS * WARPS;
  pl.splits = int((chunks + per_split - 1) / per_split);
  pl.chunks_per_split = int(per_split);
  pl.tiles = int(tiles(tt));
  return pl;
}

template <int CPL, int TT, typename OutT> void launch(const SkinnyParams& p, unsigned blocks, cudaStream_t stream) {
  skinny_nn_kernel<CPL, TT, OutT><<<blocks, THREADS, 0, stream>>>(p);
  cuda::check_launch("groupedGemm");
  if (p.splits > 1) {
    const int64_t items = int64_t(p.M) * (p.N / 8);
    skinny_finish_kernel<OutT><<<unsigned((items + FINISH_THREADS - 1) / FINISH_THREADS), FINISH_THREADS, 0, stream>>>(p);
    cuda::check_launch("groupedGemm");
  }
}

template <typename OutT> void launch_plan(const Plan& pl, const SkinnyParams& p, unsigned blocks, cudaStream_t stream) {
  switch (pl.cpl * 16 + pl.tt) {
    case 2 * 16 + 1: return launch<2, 1, OutT>(p, blocks, stream);
    case 2 * 16 + 2: return launch<2, 2, OutT>(p, blocks, stream);
    case 2 * 16 + 4: return launch<2, 4, OutT>(p, blocks, stream);
    case 2 * 16 + 8: return launch<2, 8, OutT>(p, blocks, stream);
    case 4 * 16 + 1: return launch<4, 1, OutT>(p, blocks, stream);
    case 4 * 16 + 2: return launch<4, 2, OutT>(p, blocks, stream);
    case 4 * 16 + 4: return launch<4, 4, OutT>(p, blocks, stream);
    case 4 * 16 + 8: return launch<4, 8, OutT>(p, blocks, stream);
    case 8 * 16 + 1: return launch<8, 1, OutT>(p, blocks, stream);
    case 8 * 16 + 2: return launch<8, 2, OutT>(p, blocks, stream);
    case 8 * 16 + 4: return launch<8, 4, OutT>(p, blocks, stream);
    default: MOE_INTERNAL_CHECK(false, "groupedGemm: skinny kernel CPL ", pl.cpl, " TT ", pl.tt);
  }
}

}  // namespace

bool skinny_nn_fits(const GroupedGemm& g) {
  if (g.mode != GemmMode::NN || g.epilogue != GemmEpilogue::Store || g.offsets.size(0) != 2) return false;
  if (g.a.dtype() != DType::bf16 || g.b.dtype() != DType::bf16) return false;
  if (g.out.dtype() != DType::bf16 && g.out.dtype() != DType::f32) return false;
  const int64_t M = g.a.size(0), K = g.b.size(1), N = g.b.size(2);
  if (M < 1 || K < 8 || N < 8 || K % 8 != 0 || N % 8 != 0 || N > SKINNY_MAX_N) return false;
  auto aligned = [](const Tensor& t) { return (reinterpret_cast<uintptr_t>(t.raw()) & 15) == 0; };
  if (!aligned(g.a) || !aligned(g.b) || !aligned(g.out)) return false;
  // Grid: ceil(M/8)·bands·MAX_SPLITS blocks at most, and M·N/8 finishing threads in blocks of
  // FINISH_THREADS; grid sizes below 2^31.
  const int64_t bands = (N + 63) / 64;
  return M < (int64_t(1) << 31) && K < (int64_t(1) << 31) && (M + 7) / 8 * bands * MAX_SPLITS < (int64_t(1) << 31) &&
         M * (N / 8) / FINISH_THREADS < (int64_t(1) << 30);
}

void skinny_nn(const GroupedGemm& g, void* stream_ptr) {
  const int64_t M = g.a.size(0), K = g.b.size(1), N = g.b.size(2);
  cudaStream_t stream = cudaStream_t(stream_ptr);
  const Plan pl = make_plan(M, K, N, cuda::multiprocessors(g.a.device().index));
  SkinnyParams p{};
  p.a = g.a.data<__nv_bfloat16>();
  p.b = g.b.data<__nv_bfloat16>();
  p.offsets = g.offsets.data<int32_t>();
  p.out = g.out.raw();
  p.M = int(M);
  p.K = int(K);
  p.N = int(N);
  p.bands = pl.bands;
  p.splits = pl.splits;
  p.chunks_per_split = pl.chunks_per_split;
  p.accumulate = g.accumulate;

  Tensor partial;
  if (pl.splits > 1) {
    // Freed when this function returns; the caching allocator hands it out again only on this
    // stream, after the kernels queued here (as decode.cu's partial sums).
    partial = Tensor::empty({int64_t(pl.splits) * M * N}, DType::f32, g.a.device(), "groupedGemm");
    p.partial = partial.data<float>();
  }
  const unsigned blocks = unsigned(int64_t(pl.tiles) * pl.splits * pl.bands);
  if (g.out.dtype() == DType::f32) launch_plan<float>(pl, p, blocks, stream);
  else launch_plan<__nv_bfloat16>(pl, p, blocks, stream);
}

}  // namespace moe::ops
