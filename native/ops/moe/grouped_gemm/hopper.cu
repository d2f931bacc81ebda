// Grouped GEMM on Hopper (sm_90a): TMA, mbarriers, wgmma, warp specialisation, a persistent grid.
// All three products: NN (forward, with the fused SwiGLU epilogue), NT (dA, with dSwiGLU) and TN
// (dW, whose inner dimension is each group's rows). Shapes TMA cannot describe stay on the mma.sync
// kernel (cuda.cu). Compiled for sm_90a alone (CMake).
//
// Block: 3 warpgroups. Warpgroup 0 is the producer: one thread issues the TMA loads of a 128×64 A
// tile and a 64×256 B tile per stage into a 4-stage ring, each stage completed on a "full" mbarrier
// by the copy engine's byte count. Warpgroups 1 and 2 are consumers: each owns 64 rows of the
// 128×256 output tile and issues wgmma m64n256k16 straight from shared memory (128 fp32 accumulators
// per thread), then frees the stage on its "empty" mbarrier. Both sides walk the same sequence of
// (m-tile, n-tile) work items, so the producer runs ahead into the next tile while the consumers
// store the last one (through one of the epilogues below).
// (TN with fp32 results, training's dW: the consumers drop their tile into shared-memory boxes and
// leave its global writes to TMA tensor stores that drain during the next tile's mainloop.)
// The other ways of storing a tile that were measured and lost (Store from registers, the warp
// slices for bf16 results, the hand-off of fp32 results in two halves, the fused SwiGLU/dSwiGLU
// epilogues from registers) are steps 05-07 and 09 of the ladder in benchmarks/kernels/grouped_gemm/.
//
// Shared-memory layouts (128-byte swizzle, the pattern TMA writes and wgmma reads):
//   A   [128 rows][64 k], K-major: 128-byte rows; core matrices of 8 rows are 1024 bytes apart.
//   B   NT (K-major): [256 n][64 k], like A.
//       NN (MN-major): four [64 k][64 n] boxes side by side, 8 KiB apart along n.
//   TN  A = a_eᵀ (MN-major): two [64 k][64 m] boxes, one per consumer; B = b_e as for NN.
// NN/NT: rows past a group's end (the next group's, or past M and zero-filled by TMA) are multiplied
// but never stored. TN: the last k-tile of a group would reach into the next group's rows, so the
// consumers zero those rows in shared memory before the wgmma reads them.
// Trimmed tails (Params::trim_tails, groupedGemm.trimTails): TN's last k-tile of a group runs only
// the k16 steps that hold rows of the group, zeroing the rows past its end up to the next multiple
// of 16 (the same sums: what is skipped is products of zeroed rows). NN/NT keep computing whole
// tiles: letting the second consumer skip a group's last tile when it holds at most 64 rows ran
// slower under the power limit (benchmarks/grouped-gemm.md, v13).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <mutex>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "ops/moe/grouped_gemm/hopper.h"
#include "ops/moe/grouped_gemm/sm90.cuh"
#include "ops/moe/grouped_gemm/swiglu.h"
#include "ops/moe/grouped_gemm/tile_order.cuh"
#include "ops/moe/grouped_gemm/wgmma.cuh"

namespace moe::ops {

namespace hopper {
namespace {

constexpr int BM = 128, BN = 256, BK = 64, GROUP_M = 8;
constexpr int CONSUMERS = 2;                    // warpgroups of 64 output rows each
constexpr int THREADS = 128 * (1 + CONSUMERS);  // + the producer warpgroup
constexpr int A_BYTES = BM * BK * 2;            // 16 KiB
constexpr int B_BYTES = BN * BK * 2;            // 32 KiB
constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
// How a consumer warpgroup's 64×256 accumulators reach global memory, one way per epilogue and
// result type (launch() below; a template argument of the kernel, so that a way that loses can move
// to the ladder in benchmarks/kernels/grouped_gemm/ as it is):
//   WarpSlices  Store with fp32 results (accumulating or not; v6): each consumer warp stages 16×32
//               fp32 slices in its own shared memory and stores whole 16-byte row pieces.
//   TmaBoxes    TN (dW) with fp32 results (accumulating or not; v12): each consumer warpgroup drops
//               its 64×256 tile, 32 columns at a time, into TMA_BOXES boxes of its own
//               ([64 rows][32 floats], 8 KiB) taken in turn, and one of its threads sends each box
//               out by a TMA tensor store (a reduce-add when accumulating) into the [E][K][N] result.
//               A box is written again once the engine has read it out, so most of a tile's
//               128 KiB drains while the next tile's mainloop runs: the warp slices wrote all of it
//               from the consumers while every SM did the same (ladder step 12). It costs the ring a
//               stage (3 instead of 4).
//   Handoff     Store with bf16 results (never accumulating; v7), and the fused epilogues (v9):
//               the consumers drop the 128×256 product tile, in bf16, into shared memory
//               (66 KiB) and go on to the next tile's mainloop; three warps of the producer warpgroup
//               (otherwise idle) copy it to global memory meanwhile, applying the fused epilogue on
//               the way (SwiGLU: h and the saved g; dSwiGLU: dg from dh and the saved g, which they
//               fetch themselves). It costs the ring a stage (3 instead of 4).
enum class StoreVia { WarpSlices, TmaBoxes, Handoff };

constexpr int STORER_WARPS = 3;  // Handoff: warps 1-3 of the producer warpgroup
constexpr int STORER_THREADS = 32 * STORER_WARPS;

// What a block's dynamic shared memory may take: the 227 KiB opt-in (232448 bytes) less the static
// mbarriers (80 bytes, rounded up to 96); and the slack that lets the ring start on a 1024-byte
// boundary (the 128-byte swizzle's period).
constexpr int DYNAMIC_SMEM_LIMIT = 232448 - 96;
constexpr int RING_ALIGN_SLACK = 1024;

// Shared memory: the ring, then the epilogue's staging (none, per-warp slices, or the whole tile),
// then (dSwiGLU hand-off) the storers' rings of saved-g rows.
template <StoreVia VIA, GemmEpilogue EPI = GemmEpilogue::Store> struct Layout {
  static constexpr int SLICE = 32;                             // WarpSlices: columns per staged slice
  static constexpr int STAGING_LD = SLICE + 8;                 // floats per staged row: the pad spreads
                                                               // the fragment stores over the banks
  static constexpr int WARP_STAGING_FLOATS = 16 * STAGING_LD;  // 2560 bytes per warp
  // Handoff row pitch, chosen so that a warp's fragment stores hit every bank once per wavefront:
  // bf16 pairs (4 bytes) at 264 bf16 = 528 bytes (132 words ≡ 4 mod 32).
  static constexpr int TILE_LD_BF16 = BN + 8;
  // TmaBoxes: per consumer TMA_BOXES boxes of [64 rows][32 floats] in the 128-byte swizzle.
  static constexpr int TMA_BOXES = 5;
  static constexpr int TMA_BOX_BYTES = 64 * 32 * 4;
  static constexpr int STAGING_BYTES = VIA == StoreVia::WarpSlices ? CONSUMERS * 4 * WARP_STAGING_FLOATS * 4
                                       : VIA == StoreVia::TmaBoxes ? CONSUMERS * TMA_BOXES * TMA_BOX_BYTES
                                       : VIA == StoreVia::Handoff  ? BM * TILE_LD_BF16 * 2
                                                                   : 0;
  // The ring: 4 stages beside the warp slices, 3 beside the hand-off's tile, and beside the TMA boxes
  // as many as fit in the 227 KiB opt-in (3 with five boxes a consumer; 4 would with two).
  static constexpr int STAGES = VIA == StoreVia::WarpSlices ? 4
                                : VIA == StoreVia::Handoff
                                    ? 3
                                    : std::min(4, (DYNAMIC_SMEM_LIMIT - RING_ALIGN_SLACK - STAGING_BYTES) / STAGE_BYTES);
  // dSwiGLU hand-off: each storer warp's ring of G_RING_ROWS rows of the saved g, one tile row each
  // (2·BN bf16 = 1 KiB), filled by cp.async G_RING_ROWS rows ahead of the row being stored.
  static constexpr int G_RING_ROWS = 4;
  static constexpr int G_ROW_BYTES = 2 * BN * 2;
  static constexpr int G_RING_BYTES =
      VIA == StoreVia::Handoff && EPI == GemmEpilogue::DSwiGLU ? STORER_WARPS * G_RING_ROWS * G_ROW_BYTES : 0;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + STAGING_BYTES + G_RING_BYTES + RING_ALIGN_SLACK;
};
constexpr int MAX_STAGES = 4;
static_assert(Layout<StoreVia::WarpSlices>::SMEM_BYTES <= DYNAMIC_SMEM_LIMIT, "over the 227 KiB opt-in");
static_assert(Layout<StoreVia::TmaBoxes>::SMEM_BYTES <= DYNAMIC_SMEM_LIMIT, "over the 227 KiB opt-in");
static_assert(Layout<StoreVia::Handoff>::SMEM_BYTES <= DYNAMIC_SMEM_LIMIT, "over the 227 KiB opt-in");
static_assert(Layout<StoreVia::Handoff, GemmEpilogue::SwiGLU>::SMEM_BYTES <= DYNAMIC_SMEM_LIMIT, "over the 227 KiB opt-in");
static_assert(Layout<StoreVia::Handoff, GemmEpilogue::DSwiGLU>::SMEM_BYTES <= DYNAMIC_SMEM_LIMIT, "over the 227 KiB opt-in");

struct Params {
  const int32_t* offsets;     // [E+1]
  const int32_t* tile_start;  // [E+1] NN, NT: each group's first m-tile; TN: null (every group) or
                              // the prefix of the groups to compute, 1 each (the others' dW untouched)
  void* out;
  const __nv_bfloat16* aux;  // DSwiGLU: the saved g
  __nv_bfloat16* aux_out;    // SwiGLU: where to save g (may be null)
  int M, E;
  int rows, cols, inner;    // the product out[rows, cols] (per group for TN); inner: NN/NT only
  int n_tiles, tn_m_tiles;  // tiles along cols; TN: tiles along rows (per group)
  bool accumulate;
  bool trim_tails;  // TN: no wgmma on the k16 steps past a group's end (the header)
};

// mbarriers, TMA loads, shared-memory descriptors and the wgmma fences: sm90.cuh (shared with the
// ladder's ping-pong kernel, benchmarks/kernels/grouped_gemm/hopper_pingpong.cuh).
using namespace sm90;

// ---- work items -----------------------------------------------------------------------------------
// Work item t of the launch (tile_order.cuh: NN/NT in bands of GROUP_M m-tiles, TN group-major).
// TN over some groups (tile_start given): the items of the b-th group counted, b = t / per_group.
template <GemmMode MODE> __device__ __forceinline__ Tile tile_at(const Params& p, int t, int m_tiles) {
  if constexpr (MODE == GemmMode::TN) {
    if (p.tile_start != nullptr) {
      const int per_group = p.tn_m_tiles * p.n_tiles, b = t / per_group;
      int lo = 0, hi = p.E - 1;  // the first group e with tile_start[e + 1] > b: the b-th counted
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (__ldg(p.tile_start + mid + 1) > b) hi = mid;
        else lo = mid + 1;
      }
      t = lo * per_group + t % per_group;
    }
  }
  return tile_in_order<MODE == GemmMode::TN, BM, BN, BK, GROUP_M>(p, t, m_tiles);
}

// ---- epilogue -------------------------------------------------------------------------------------
// The Store epilogue of fp32 results through shared memory: each consumer warp drops its 16×256
// accumulators into its own 16×32 fp32 slice, 32 columns at a time, and reads them back as whole
// rows in 16-byte pieces, a warp instruction covering 4 rows × 32 columns. With accumulate, all of a
// slice's loads of the old values are issued before its stores (else each load waits behind the
// previous store: one memory latency per piece).
template <typename OutT>
__device__ __forceinline__ void store_tile_staged(const Params& p, const float (&d)[128], const Tile& tile, int wg_row0, uint32_t staging) {
  static_assert(sizeof(OutT) == 4, "bf16 results are handed off");
  constexpr int LD = Layout<StoreVia::WarpSlices>::STAGING_LD, SLICE = Layout<StoreVia::WarpSlices>::SLICE;
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
  // The fragment store: rows lane/4 (+8), columns 8jj + 2(lane%4) (+1) of the slice.
  const uint32_t st_addr = staging + uint32_t(((lane >> 2) * LD + (lane & 3) * 2) * 4);
  // The read-back: piece u is row lane/8 + 4u, columns 4(lane%8) .. +3 of the slice.
  const uint32_t ld_addr = staging + uint32_t(((lane >> 3) * LD + (lane & 7) * 4) * 4);
  const int row = wg_row0 + warp * 16 + (lane >> 3);  // + 4u
  const int col = tile.col0 + (lane & 7) * 4;         // + SLICE·s
  const int64_t pitch4 = int64_t(4) * p.cols;         // 4 rows
  OutT* const out = static_cast<OutT*>(p.out) + tile.out_base + int64_t(row) * p.cols + col;
#pragma unroll
  for (int s = 0; s < BN / SLICE; ++s) {
#pragma unroll
    for (int jj = 0; jj < SLICE / 8; ++jj) {
      const int j = s * (SLICE / 8) + jj;
#pragma unroll
      for (int h = 0; h < 2; ++h)
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(st_addr + uint32_t((h * 8 * LD + jj * 8) * 4)), "f"(d[j * 4 + h * 2]),
                     "f"(d[j * 4 + h * 2 + 1])
                     : "memory");
    }
    __syncwarp();
    float4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                   : "=f"(v[u].x), "=f"(v[u].y), "=f"(v[u].z), "=f"(v[u].w)
                   : "r"(ld_addr + uint32_t(4 * u * LD * 4))
                   : "memory");
    __syncwarp();                             // read back before the next slice lands
    if (col + s * SLICE >= p.cols) continue;  // cols % 8 == 0: a piece is all in or all out (lanes past it skip)
    OutT* const dst = out + s * SLICE;
    if (p.accumulate) {
      float4 old[4];
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (row + 4 * u < tile.row_end) old[u] = *reinterpret_cast<const float4*>(dst + u * pitch4);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        v[u].x += old[u].x;
        v[u].y += old[u].y;
        v[u].z += old[u].z;
        v[u].w += old[u].w;
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (row + 4 * u < tile.row_end) *reinterpret_cast<float4*>(dst + u * pitch4) = v[u];
  }
}

// TmaBoxes: this warpgroup's 64×256 accumulators leave in eight pieces of 32 columns, each through
// the next of its TMA_BOXES boxes ([64 rows][32 floats], 128 bytes a row, 16-byte chunk c of row r
// at chunk c ^ (r % 8): the 128-byte swizzle the output map names) and one tensor store of it into
// the [E][K][N] result, issued by the warpgroup's first thread (cp.reduce.async.bulk.tensor .add
// when accumulating). `sent` counts the pieces this warpgroup has sent (over its tiles): piece n goes
// to box n % TMA_BOXES once the engine has read piece n - TMA_BOXES out of it (wait_group.read
// TMA_BOXES - 1: all but the latest TMA_BOXES - 1 bulk groups, each piece being one). Rows past K and
// columns past N are not written (the map's bounds), so a partial tile needs no mask.
// A thread's pairs: row 16w + l/4 (+8), columns 8j + 2(l%4) of the tile; piece e holds j = 4e .. 4e+3,
// column group jl = j - 4e at chunk 2jl + (l%4)/2, byte 8(l%2) in it. Shared memory serves an 8-byte
// store half a warp at a time: in the half's four rows (r % 8 = 0-3 or 4-7) the swizzle moves chunks
// 2jl and 2jl + 1 only among four places, so with one jl for all lanes each bank is hit twice (four
// wavefronts a store, not two: ncu at 6169be6). Lanes of odd rows therefore write column group
// jl ^ 2 when the others write jl: the chunk's third bit then differs between neighbouring rows, the
// half's 16 pairs land in 8 distinct chunks: two wavefronts a store by the bank arithmetic (ncu not
// rerun; the ladder's st.shared-only probe went 3.005 → 2.902 ms with it, results/ladder12d-cb69f8f.txt).
__device__ __forceinline__ void consumer_bar(int consumer) {
  // Named barriers 2 and 3, one per consumer warpgroup (1 is TN's zeroing over both).
  if (consumer == 0) asm volatile("bar.sync 2, 128;\n" ::: "memory");
  else asm volatile("bar.sync 3, 128;\n" ::: "memory");
}
__device__ __forceinline__ void store_tile_tma_boxes(const Params& p, const float (&d)[128], const Tile& tile, int consumer, uint32_t boxes,
                                                     const CUtensorMap* map_out, uint32_t& sent) {
  using L = Layout<StoreVia::TmaBoxes>;
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
  const bool issuer = (threadIdx.x & 127) == 0;
#pragma unroll
  for (int e = 0; e < BN / 32; ++e, ++sent) {
    const uint32_t box = boxes + uint32_t((sent % L::TMA_BOXES) * L::TMA_BOX_BYTES);
    if (issuer) asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(L::TMA_BOXES - 1) : "memory");
    consumer_bar(consumer);  // the box's previous piece read out by the engine
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp * 16 + (lane >> 2) + 8 * h;
      const bool odd_row = (lane >> 2) & 1;
#pragma unroll
      for (int jl = 0; jl < 4; ++jl) {
        // Both candidates' registers are named at compile time: a select, not an indexed (local) array.
        const int j_even = e * 4 + jl, j_odd = e * 4 + (jl ^ 2);
        const float v0 = odd_row ? d[j_odd * 4 + h * 2] : d[j_even * 4 + h * 2];
        const float v1 = odd_row ? d[j_odd * 4 + h * 2 + 1] : d[j_even * 4 + h * 2 + 1];
        const int chunk = 2 * (odd_row ? jl ^ 2 : jl) + ((lane & 3) >> 1);
        const uint32_t at = box + uint32_t(r * 128 + ((chunk ^ (r & 7)) * 16) + (lane & 1) * 8);
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(at), "f"(v0), "f"(v1) : "memory");
      }
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the engine (async proxy) reads what st.shared wrote
    consumer_bar(consumer);
    if (issuer) {
      const uint64_t map = reinterpret_cast<uint64_t>(map_out);
      const int col = tile.col0 + 32 * e, row = tile.row0 + 64 * consumer;
      if (p.accumulate)
        asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(map),
                     "r"(box), "r"(col), "r"(row), "r"(tile.group)
                     : "memory");
      else
        asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(map), "r"(box),
                     "r"(col), "r"(row), "r"(tile.group)
                     : "memory");
      asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
    }
  }
}

// Handoff, consumer side: this warpgroup's 64 rows of the bf16 tile into shared memory as pairs:
// row 16w + l/4 (+8), columns 8j + 2(l%4).
__device__ __forceinline__ void handoff_put(const float (&d)[128], uint32_t tile_smem, int consumer) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
  const int row = consumer * 64 + warp * 16 + (lane >> 2);
  constexpr int LD = Layout<StoreVia::Handoff>::TILE_LD_BF16;
  const uint32_t base = tile_smem + uint32_t((row * LD + (lane & 3) * 2) * 2);
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      __nv_bfloat162 v = __floats2bfloat162_rn(d[j * 4 + h * 2], d[j * 4 + h * 2 + 1]);
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(base + uint32_t((h * 8 * LD + j * 8) * 2)), "r"(*reinterpret_cast<uint32_t*>(&v))
                   : "memory");
    }
  }
  // The bulk-copy engine (async proxy) reads these after the storers see tile_full.
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Handoff, storer side: the staged bf16 tile to global memory by the bulk-copy engine, one
// cp.async.bulk per row (its valid columns: cols % 8 == 0 keeps every size a multiple of 16 bytes,
// and the Hopper path's out is 16-byte aligned), rows past the tile's end (the group's, or M)
// skipped. The storer threads only issue the copies and wait until the engine has *read* the rows
// (wait_group.read), then free the staging buffer: the global writes drain in the background while
// the consumers fill it with the next tile, so several tiles' writes are in flight. (Through the
// storer warps' own 16-byte stores, the write-bound E=256 dW ran at 2.3 TB/s, 59% of the roof.)
// The consumers' plain shared-memory stores are made visible to the engine (the async proxy) by
// their fence.proxy.async before they arrive on tile_full (handoff_put).
__device__ __forceinline__ void handoff_drain(const Params& p, const Tile& tile, uint32_t tile_smem, int storer) {
  constexpr int LD_BYTES = Layout<StoreVia::Handoff>::TILE_LD_BF16 * 2;
  const int rows = min(BM, tile.row_end - tile.row0);
  const uint32_t row_bytes = uint32_t(min(BN, p.cols - tile.col0)) * 2;
  __nv_bfloat16* const out = static_cast<__nv_bfloat16*>(p.out) + tile.out_base + tile.col0;
  for (int r = storer; r < rows; r += STORER_THREADS) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(out + int64_t(tile.row0 + r) * p.cols),
                 "r"(tile_smem + uint32_t(r * LD_BYTES)), "r"(row_bytes)
                 : "memory");
  }
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}

// ---- the fused epilogues, handed off ---------------------------------------------------------------
// The consumers hand over the bf16 product exactly as for Store (handoff_put); the storers apply the
// epilogue while copying it out. Why the storers and not the consumers: the fused results do not fit
// beside the ring. SwiGLU's h (32 KiB) and g (64 KiB) per 128×256 tile, or dSwiGLU's saved g and dg
// (128 KiB each), exceed the 83 KiB that the 3-stage ring (144 KiB) leaves of the 227 KiB; the bf16
// product tile (66 KiB) is what fits, and from it the storers can make every output. The price is
// that the epilogue sees the product rounded to bf16 (the stored g; dh as an unfused GEMM would store
// it), which is what every path computes (swiglu.h).

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ __nv_bfloat162 as_bf162(uint32_t w) { return *reinterpret_cast<const __nv_bfloat162*>(&w); }
__device__ __forceinline__ uint32_t as_u32(__nv_bfloat162 v) { return *reinterpret_cast<const uint32_t*>(&v); }

// SwiGLU, storer side. The tile holds (g1, g3) column pairs of hidden units col0/2 .. col0/2 + 127.
// Lane l takes tile columns 8l .. 8l+7 of a row: a 16-byte piece of g (the warp writes 512 contiguous
// bytes of the saved g) and the 4 h values from it, 8 bytes (the warp writes 256 contiguous bytes of
// h: every 32-byte sector whole in one instruction, as 16-byte stores from half the lanes would).
__device__ __forceinline__ void handoff_drain_swiglu(const Params& p, const Tile& tile, uint32_t tile_smem, int storer) {
  constexpr int LD_BYTES = Layout<StoreVia::Handoff>::TILE_LD_BF16 * 2;
  const int lane = storer & 31, warp = storer >> 5;
  const int col = tile.col0 + lane * 8;
  if (col >= p.cols) return;  // cols % 8 == 0: a lane's piece is all in or all out
  __nv_bfloat16* const h = static_cast<__nv_bfloat16*>(p.out) + col / 2;
  __nv_bfloat16* const g = p.aux_out ? p.aux_out + col : nullptr;  // null: g is not saved
  const int64_t h_ld = p.cols / 2;
  const int rows = min(BM, tile.row_end - tile.row0);
#pragma unroll 2
  for (int r = warp; r < rows; r += STORER_WARPS) {
    uint4 v;
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(tile_smem + uint32_t(r * LD_BYTES + lane * 16))
                 : "memory");
    const int64_t row = tile.row0 + r;
    if (g) *reinterpret_cast<uint4*>(g + row * p.cols) = v;
    float hv[4];
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const __nv_bfloat162 gp = as_bf162(w[u]);  // (g1, g3) of hidden unit col/2 + u
      hv[u] = silu(__low2float(gp)) * __high2float(gp);
    }
    uint2 hp;
    hp.x = as_u32(__floats2bfloat162_rn(hv[0], hv[1]));
    hp.y = as_u32(__floats2bfloat162_rn(hv[2], hv[3]));
    *reinterpret_cast<uint2*>(h + row * h_ld) = hp;
  }
}

// dSwiGLU, storer side. The tile holds dh (bf16) of hidden units col0 .. col0+255; the saved g and
// dg are [rows, 2·cols] with (g1, g3) interleaved, so a tile row reads 1 KiB of g and writes 1 KiB of
// dg. Lane l takes hidden units 4l .. 4l+3 (piece 0) and 128+4l .. +3 (piece 1) of a row: 8 bytes of
// dh each from the tile, 16 bytes of g and of dg each (the warp moves 512 contiguous bytes per
// instruction). cols % 8 == 0: each piece is all in or all out (and piece 1 is out when piece 0 is).
//
// The saved g is the epilogue's one read from global memory (stored from registers, ladder step 09,
// the consumers wait for it there). Here the storers read it while the consumers run the next tile's mainloop. A load from
// DRAM takes ~1 µs and a storer thread holds 40 registers (setmaxnreg), too few to keep more than a
// row or two of g in flight in registers; so each storer warp streams its rows of g through its own
// ring of G_RING_ROWS rows in shared memory with cp.async (nothing held in registers while the copies
// fly), G_RING_ROWS rows ahead of the row being stored, and the first G_RING_ROWS rows are requested
// before the tile is even handed over (dswiglu_prefetch, right after the previous tile is out).
// Not the whole g tile in shared memory (one TMA copy per tile): 128 KiB does not fit beside the ring
// and the staging tile.
//
// Synchronisation of the ring: none beyond each thread's own cp.async groups. A lane reads back only
// the 2 × 16 bytes it copied itself, and cp.async.wait_group makes a thread's completed copies visible
// to that thread. Group j is row j: dswiglu_prefetch commits groups 0 .. R-1 (R = G_RING_ROWS; rows
// past the warp's share commit empty groups), and iteration i of the drain commits group i + R after
// its stores. So when iteration i waits with "at most R-1 groups pending", R + i groups have been
// committed and groups 0 .. i are complete: row i has landed. Every row j < n is waited for in its own
// iteration, so no copy is in flight after the drain (nor when the kernel exits). A slot is refilled
// (row i + R) only after the stores of row i, which need the values loaded from it: in-order issue
// puts the refill behind those loads (WAR), and the "memory" clobbers keep the compiler from moving it.
__device__ __forceinline__ int storer_rows(const Tile& tile, int warp) {
  const int rows = min(BM, tile.row_end - tile.row0);  // rows warp, warp + 3, … of the tile
  return rows > warp ? (rows - warp + STORER_WARPS - 1) / STORER_WARPS : 0;
}
// Where this lane's piece 0 of row i of its warp's share starts in g and in dg (the same offset in
// both: [rows, 2·cols] each), in elements: the first row's offset plus i rows of the share.
__device__ __forceinline__ int64_t dswiglu_offset(const Params& p, const Tile& tile, int storer) {
  return int64_t(tile.row0 + (storer >> 5)) * (2 * p.cols) + 2 * tile.col0 + (storer & 31) * 8;
}
__device__ __forceinline__ int64_t dswiglu_row_stride(const Params& p) { return int64_t(STORER_WARPS) * 2 * p.cols; }
// Ring slot of row i for this lane (its 16 bytes of piece 0; piece 1 is 512 bytes on).
__device__ __forceinline__ uint32_t dswiglu_slot(uint32_t g_ring, int storer, int i) {
  using L = Layout<StoreVia::Handoff, GemmEpilogue::DSwiGLU>;
  return g_ring + uint32_t(((storer >> 5) * L::G_RING_ROWS + i % L::G_RING_ROWS) * L::G_ROW_BYTES + (storer & 31) * 16);
}
__device__ __forceinline__ void dswiglu_fetch(const Params& p, uint32_t slot, int64_t offset, bool in0, bool in1) {
  if (in0) cp_async16(slot, p.aux + offset);
  if (in1) cp_async16(slot + 512, p.aux + offset + 256);
}
__device__ __forceinline__ void dswiglu_prefetch(const Params& p, const Tile& tile, uint32_t g_ring, int storer) {
  constexpr int R = Layout<StoreVia::Handoff, GemmEpilogue::DSwiGLU>::G_RING_ROWS;
  const int n = storer_rows(tile, storer >> 5);
  const int lane = storer & 31;
  const bool in0 = tile.col0 + 4 * lane < p.cols, in1 = tile.col0 + 128 + 4 * lane < p.cols;
  const int64_t offset = dswiglu_offset(p, tile, storer);
#pragma unroll
  for (int i = 0; i < R; ++i) {
    if (i < n) dswiglu_fetch(p, dswiglu_slot(g_ring, storer, i), offset + i * dswiglu_row_stride(p), in0, in1);
    cp_async_commit();
  }
}
// dg of one hidden unit, packed (dg1, dg3), from dh and the saved (g1, g3).
__device__ __forceinline__ uint32_t dswiglu_unit(float dh, uint32_t g_pair) {
  const __nv_bfloat162 g = as_bf162(g_pair);
  const float g1 = __low2float(g), g3 = __high2float(g);
  return as_u32(__floats2bfloat162_rn(dh * g3 * silu_grad(g1), dh * silu(g1)));
}
__device__ __forceinline__ void handoff_drain_dswiglu(const Params& p, const Tile& tile, uint32_t tile_smem, uint32_t g_ring, int storer) {
  using L = Layout<StoreVia::Handoff, GemmEpilogue::DSwiGLU>;
  constexpr int R = L::G_RING_ROWS, LD_BYTES = L::TILE_LD_BF16 * 2;
  const int lane = storer & 31, warp = storer >> 5;
  const int n = storer_rows(tile, warp);
  const bool in0 = tile.col0 + 4 * lane < p.cols, in1 = tile.col0 + 128 + 4 * lane < p.cols;
  if (!in0) return;                                  // then in1 is out too; this lane committed only empty groups
  int64_t offset = dswiglu_offset(p, tile, storer);  // of row i
  uint32_t dh_at = tile_smem + uint32_t(warp * LD_BYTES + lane * 8);
#pragma unroll 1
  for (int i = 0; i < n; ++i, offset += dswiglu_row_stride(p), dh_at += STORER_WARPS * LD_BYTES) {
    cp_async_wait<R - 1>();  // row i of g has landed
    const uint32_t slot = dswiglu_slot(g_ring, storer, i);
#pragma unroll
    for (int piece = 0; piece < 2; ++piece) {
      if (piece == 1 && !in1) break;
      uint32_t dh0, dh1;
      uint4 g;
      asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(dh0), "=r"(dh1) : "r"(dh_at + uint32_t(piece * 256)) : "memory");
      asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(g.x), "=r"(g.y), "=r"(g.z), "=r"(g.w)
                   : "r"(slot + uint32_t(piece * 512))
                   : "memory");
      const __nv_bfloat162 da = as_bf162(dh0), db = as_bf162(dh1);  // dh of units 4l .. 4l+3 (+128)
      uint4 dg;
      dg.x = dswiglu_unit(__low2float(da), g.x);
      dg.y = dswiglu_unit(__high2float(da), g.y);
      dg.z = dswiglu_unit(__low2float(db), g.z);
      dg.w = dswiglu_unit(__high2float(db), g.w);
      *reinterpret_cast<uint4*>(static_cast<__nv_bfloat16*>(p.out) + offset + piece * 256) = dg;
    }
    if (i + R < n) dswiglu_fetch(p, dswiglu_slot(g_ring, storer, i + R), offset + R * dswiglu_row_stride(p), in0, in1);
    cp_async_commit();
  }
}

// ---- the hand-off's barriers, on paper -----------------------------------------------------------
// The same for Store, SwiGLU and dSwiGLU: the fused epilogues add no barrier (dSwiGLU's g ring is
// private to each storer lane, above). tile_full takes 256 arrivals (every consumer thread), tile_empty
// 96 (every storer thread); both start in phase 0, and a wait for parity 1 on a fresh barrier passes.
//   consumer thread, its n-th tile (n = 0, 1, …): mainloop; wait tile_empty parity (n & 1) ^ 1;
//                    put its fragments into the staging tile; arrive tile_full.
//   storer thread, its n-th tile: [dSwiGLU: cp.async its first 4 rows of g]; wait tile_full parity
//                    n & 1; drain (read the staging tile, write global memory); arrive tile_empty.
// n = 0: the consumers' wait (parity 1) passes at once; their 256 arrivals complete tile_full phase 0;
//        the storers' wait (parity 0) passes only then; their 96 arrivals complete tile_empty phase 0.
// n = 1: the consumers' wait (parity 0 of tile_empty) passes only once every storer has read tile 0,
//        so the staging tile is never overwritten while it is read; the storers' wait (parity 1 of
//        tile_full) only once every consumer has put tile 1.
// No side gets two phases ahead (which would alias the parity): a consumer's put n+1 follows the
//        completion of tile_empty phase n, i.e. every storer's arrival for tile n; a storer's drain n+1
//        follows the completion of tile_full phase n+1, i.e. every consumer's put n+1.
// Both sides walk the same work items (tile_at(t), t = blockIdx.x, += gridDim.x), so the counts of
//        puts and drains match and nothing waits for a tile that never comes; a block with no work
//        item runs neither loop. The consumers exit after their last put; the storers drain it after
//        (shared memory lives until the block's last thread exits) with no cp.async left in flight.
// Ordering: the consumers write the staging tile with st.shared (generic proxy), ordered before the
//        storers' reads by arrive (release) and wait (acquire). Store: the storers' reads are the
//        bulk-copy engine's (async proxy), hence the consumers' fence.proxy.async before they arrive
//        (handoff_put), and the storers' cp.async.bulk.wait_group.read before they arrive on
//        tile_empty (the engine has read the rows before the consumers may overwrite them). SwiGLU,
//        dSwiGLU: the storers read with ld.shared (generic proxy), so the mbarrier alone orders both
//        ways (the fence is then not needed, and harmless); their cp.async (LDGSTS) into the g ring
//        is waited for by the thread that reads it, and the g ring is nobody else's. The async proxy
//        (TMA loads, wgmma) never touches the g ring. No named barrier is involved (the kernel's one,
//        bar 1 over 256 threads, is TN's zeroing, among the consumers only).
// The ring's full/empty barriers are untouched by the epilogue way (only its depth: 3 stages).

// ---- the mainloop's wgmmas --------------------------------------------------------------------------
// One stage's wgmmas for a warpgroup, K_STEPS of its BK/16 k16 steps, fenced and committed as a group.
// K-major operands: the next 16 k are 32 bytes along the swizzled row. MN-major: 16 rows down.
template <int K_STEPS, bool A_MN_MAJOR, bool B_MN_MAJOR>
__device__ __forceinline__ void issue_k_steps(float (&d)[128], unsigned char* sa, unsigned char* sb, bool accumulate) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < K_STEPS; ++kk) {
    const uint64_t da = A_MN_MAJOR ? smem_desc(sa + kk * 16 * 128, BK * 128, 1024) : smem_desc(sa + kk * 32, 16, 1024);
    const uint64_t db = B_MN_MAJOR ? smem_desc(sb + kk * 16 * 128, BK * 128, 1024) : smem_desc(sb + kk * 32, 16, 1024);
    wgmma_m64n256k16<A_MN_MAJOR ? 1 : 0, B_MN_MAJOR ? 1 : 0>(d, da, db, accumulate || kk > 0);
  }
  wgmma_commit();
}

// ---- the kernel -----------------------------------------------------------------------------------
template <GemmMode MODE, GemmEpilogue EPI, typename OutT, StoreVia VIA>
__global__ void __launch_bounds__(THREADS, 1)
    grouped_gemm_wgmma_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                              const __grid_constant__ CUtensorMap map_out, Params p) {
  constexpr bool TN = MODE == GemmMode::TN;
  constexpr bool A_MN_MAJOR = TN;                    // a_eᵀ: its rows (k of a) are contiguous
  constexpr bool B_MN_MAJOR = MODE != GemmMode::NT;  // NN: b_e [inner, cols]; TN: b_e [rows_e, cols]
  static_assert(VIA != StoreVia::Handoff || sizeof(OutT) == 2, "the hand-off takes bf16 results");
  static_assert(VIA != StoreVia::WarpSlices || (sizeof(OutT) == 4 && EPI == GemmEpilogue::Store), "the warp slices take fp32 results");
  static_assert(VIA != StoreVia::TmaBoxes || (sizeof(OutT) == 4 && EPI == GemmEpilogue::Store && TN), "the TMA boxes: fp32 dW (map_out)");
  static_assert(EPI == GemmEpilogue::Store || (sizeof(OutT) == 2 && !TN), "the fused epilogues: NN/NT with bf16 results");
  using L = Layout<VIA, EPI>;
  constexpr int STAGES = L::STAGES;
  extern __shared__ unsigned char smem_raw[];
  // The 128-byte swizzle pattern repeats every 1024 bytes: the ring starts on such a boundary, so the
  // descriptors' base-offset field stays 0.
  unsigned char* ring = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __shared__ __align__(8) uint64_t full[MAX_STAGES], empty[MAX_STAGES];
  __shared__ __align__(8) uint64_t tile_full, tile_empty;  // Handoff: consumers → storers → consumers
  const uint32_t staging_smem = smem_u32(ring + STAGES * STAGE_BYTES);
  const uint32_t g_ring = staging_smem + L::STAGING_BYTES;  // dSwiGLU hand-off only

  const int wg = threadIdx.x >> 7;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);           // the producer's arrive.expect_tx; the copy engine adds the bytes
      mbar_init(&empty[s], CONSUMERS);  // one arrive per consumer warpgroup
    }
    mbar_init(&tile_full, CONSUMERS * 128);  // every consumer thread, after its part of the tile
    mbar_init(&tile_empty, STORER_THREADS);  // every storer thread, after reading the tile
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  const int m_tiles = TN ? p.tn_m_tiles : __ldg(p.tile_start + p.E);
  const int groups = TN && p.tile_start != nullptr ? __ldg(p.tile_start + p.E) : p.E;  // TN: the groups computed
  const int total = TN ? groups * p.tn_m_tiles * p.n_tiles : m_tiles * p.n_tiles;

  if (wg == 0) {
    // Producer: few registers; one thread issues every copy.
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_a)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_b)) : "memory");
      int stage = 0;
      uint32_t round = 0;
      for (int t = blockIdx.x; t < total; t += gridDim.x) {
        const Tile tile = tile_at<MODE>(p, t, m_tiles);
        for (int kt = 0; kt < tile.k_tiles; ++kt) {
          mbar_wait(&empty[stage], (round & 1) ^ 1);
          unsigned char* sa = ring + stage * STAGE_BYTES;
          unsigned char* sb = sa + A_BYTES;
          mbar_arrive_expect_tx(&full[stage], STAGE_BYTES);  // out-of-bounds parts still count: TMA zero-fills them
          const int k0 = tile.k_begin + kt * BK;
          if constexpr (TN) {
#pragma unroll
            for (int j = 0; j < BM / 64; ++j) tma_load_2d(sa + j * (BK * 128), &map_a, &full[stage], tile.row0 + 64 * j, k0);
#pragma unroll
            for (int j = 0; j < BN / 64; ++j) tma_load_2d(sb + j * (BK * 128), &map_b, &full[stage], tile.col0 + 64 * j, k0);
          } else {
            tma_load_2d(sa, &map_a, &full[stage], k0, tile.row0);
            if constexpr (MODE == GemmMode::NT) {
              tma_load_3d(sb, &map_b, &full[stage], k0, tile.col0, tile.group);
            } else {
#pragma unroll
              for (int j = 0; j < BN / 64; ++j) tma_load_3d(sb + j * (BK * 128), &map_b, &full[stage], tile.col0 + 64 * j, k0, tile.group);
            }
          }
          if (++stage == STAGES) {
            stage = 0;
            ++round;
          }
        }
      }
    } else if constexpr (VIA == StoreVia::Handoff) {
      if (threadIdx.x >= 32) {
        // Storers: walk the same tiles; each tile the consumers hand over is copied out.
        const int storer = threadIdx.x - 32;
        uint32_t n = 0;  // tiles done
        for (int t = blockIdx.x; t < total; t += gridDim.x, ++n) {
          const Tile tile = tile_at<MODE>(p, t, m_tiles);
          if constexpr (EPI == GemmEpilogue::DSwiGLU) dswiglu_prefetch(p, tile, g_ring, storer);  // g needs no tile
          mbar_wait(&tile_full, n & 1);
          if constexpr (EPI == GemmEpilogue::Store) handoff_drain(p, tile, staging_smem, storer);
          else if constexpr (EPI == GemmEpilogue::SwiGLU) handoff_drain_swiglu(p, tile, staging_smem, storer);
          else handoff_drain_dswiglu(p, tile, staging_smem, g_ring, storer);
          mbar_arrive(&tile_empty);
        }
        // Every row's global write done before the kernel ends.
        asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int consumer = wg - 1;
    float d[128];
    int stage = 0;
    uint32_t round = 0;
    uint32_t n = 0;     // Handoff: tiles handed over (the barriers' phase)
    uint32_t sent = 0;  // TmaBoxes: pieces sent (which box is next)
    for (int t = blockIdx.x; t < total; t += gridDim.x) {
      const Tile tile = tile_at<MODE>(p, t, m_tiles);
      int prev = -1;
      for (int kt = 0; kt < tile.k_tiles; ++kt) {
        mbar_wait(&full[stage], round & 1);
        unsigned char* sa = ring + stage * STAGE_BYTES + consumer * (64 * 128);  // this warpgroup's 64 rows
        unsigned char* sb = ring + stage * STAGE_BYTES + A_BYTES;
        int k_steps = BK / 16;  // the k16 steps this k-tile runs
        if constexpr (TN) {
          // The group ends inside this k-tile: zero the rows past its end (they hold the next
          // group's rows) in this consumer's A box and in its half of the B boxes, then make the
          // plain stores visible to the tensor cores (async proxy) before either consumer reads.
          // Trimmed: only up to the next multiple of 16, the rows the k16 steps still run read.
          const int valid = tile.k_end - (tile.k_begin + kt * BK);
          if (valid < BK) {
            if (p.trim_tails) k_steps = (valid + 15) / 16;
            const int zero_end = k_steps * 16, zero_rows = zero_end - valid;
            if (zero_rows > 0) {
              const int lane128 = threadIdx.x & 127;
              for (int i = lane128; i < zero_rows * 8 * 3; i += 128) {
                const int box = i / (zero_rows * 8), rest = i % (zero_rows * 8);
                unsigned char* base = box == 0 ? sa : sb + (2 * consumer + box - 1) * (BK * 128);
                *reinterpret_cast<uint4*>(base + (valid + rest / 8) * 128 + (rest % 8) * 16) = make_uint4(0, 0, 0, 0);
              }
              asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
              asm volatile("bar.sync 1, 256;\n" ::: "memory");  // both consumers (the producer is not in it)
            }
          }
        }
        // Each case a whole fence-to-commit sequence of a count known at compile time: a wgmma behind
        // a run-time guard inside one makes ptxas serialise every wgmma of the kernel (C7520).
        switch (k_steps) {
          case 1: issue_k_steps<1, A_MN_MAJOR, B_MN_MAJOR>(d, sa, sb, kt > 0); break;
          case 2: issue_k_steps<2, A_MN_MAJOR, B_MN_MAJOR>(d, sa, sb, kt > 0); break;
          case 3: issue_k_steps<3, A_MN_MAJOR, B_MN_MAJOR>(d, sa, sb, kt > 0); break;
          default: issue_k_steps<BK / 16, A_MN_MAJOR, B_MN_MAJOR>(d, sa, sb, kt > 0);
        }
        // Keep one stage's wgmmas in flight: once the previous stage's have finished, free it.
        wgmma_wait<1>();
        if (prev >= 0 && (threadIdx.x & 127) == 0) mbar_arrive(&empty[prev]);
        prev = stage;
        if (++stage == STAGES) {
          stage = 0;
          ++round;
        }
      }
      wgmma_wait<0>();
      if (prev >= 0 && (threadIdx.x & 127) == 0) mbar_arrive(&empty[prev]);
      if (tile.k_tiles == 0) {
        // TN with a group of no rows: dW_e = 0 (or unchanged when accumulating; the hand-off, which
        // the storers expect every tile through, never accumulates: see launch_layout).
        if (VIA != StoreVia::Handoff && p.accumulate) continue;
#pragma unroll
        for (int i = 0; i < 128; ++i) d[i] = 0.f;
      }
      if constexpr (VIA == StoreVia::Handoff) {
        // The storers have copied out the previous tile (a fresh barrier's first wait passes).
        mbar_wait(&tile_empty, (n & 1) ^ 1);
        handoff_put(d, staging_smem, consumer);
        mbar_arrive(&tile_full);
        ++n;
      } else if constexpr (VIA == StoreVia::WarpSlices) {
        const uint32_t staging = staging_smem + uint32_t(((threadIdx.x >> 5) - 4) * L::WARP_STAGING_FLOATS * 4);  // this warp's slice
        store_tile_staged<OutT>(p, d, tile, tile.row0 + consumer * 64, staging);
      } else {
        store_tile_tma_boxes(p, d, tile, consumer, staging_smem + uint32_t(consumer * L::TMA_BOXES * L::TMA_BOX_BYTES), &map_out, sent);
      }
    }
    if constexpr (VIA == StoreVia::TmaBoxes) {
      // The boxes must outlive the engine's reads of them, and the results land before the kernel ends.
      if ((threadIdx.x & 127) == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    }
  }
}

// ---- host side ------------------------------------------------------------------------------------
// A bf16 tensor map with 128-byte swizzle (sm90.cuh). dims/box are innermost first; strides (bytes) for dims 1..
CUtensorMap make_map(const void* base, int rank, const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                     CUtensorMapDataType type = CU_TENSOR_MAP_DATA_TYPE_BFLOAT16) {
  CUtensorMap map;
  const CUresult r = encode_map(&map, type, base, rank, dims, strides, box);
  MOE_ARG_CHECK(r == CUDA_SUCCESS, "groupedGemm", "cuTensorMapEncodeTiled failed (CUresult ", int(r), ")");
  return map;
}

struct DeviceInfo {
  bool hopper = false;
  int sms = 0;
};
DeviceInfo device_info() {
  static std::mutex mu;
  static DeviceInfo cache[64];
  static bool known[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return {};
  std::lock_guard<std::mutex> lock(mu);
  if (!known[dev]) {
    const cuda::DeviceProps props = cuda::device_props(dev);
    // sm_90a machine code runs on compute capability 9.0 only.
    cudaFuncAttributes attr{};
    const bool image =
        cudaFuncGetAttributes(&attr, grouped_gemm_wgmma_kernel<GemmMode::NN, GemmEpilogue::Store, __nv_bfloat16, StoreVia::Handoff>) ==
        cudaSuccess;
    if (!image) cudaGetLastError();  // clear only the error this call set
    cache[dev] = DeviceInfo{props.major == 9 && props.minor == 0 && image && tensor_map_encoder() != nullptr, props.multiprocessors};
    known[dev] = true;
  }
  return cache[dev];
}

template <GemmMode MODE, GemmEpilogue EPI, typename OutT, StoreVia VIA>
void launch_layout(const CUtensorMap& map_a, const CUtensorMap& map_b, const CUtensorMap& map_out, const Params& p, int sms,
                   cudaStream_t stream) {
  auto kernel = grouped_gemm_wgmma_kernel<MODE, EPI, OutT, VIA>;
  constexpr int smem = Layout<VIA, EPI>::SMEM_BYTES;
  if constexpr (VIA == StoreVia::Handoff) MOE_INTERNAL_CHECK(!p.accumulate, "the hand-off epilogue overwrites: it cannot accumulate");
  cuda::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "groupedGemm", "cudaFuncSetAttribute");
  // Persistent: at most one block per SM (the ring takes most of its shared memory), never more
  // blocks than the largest possible number of work items.
  const int64_t most_tiles = MODE == GemmMode::TN ? int64_t(p.E) * p.tn_m_tiles * p.n_tiles : (int64_t(p.M) / BM + p.E) * p.n_tiles;
  const int grid = int(std::max<int64_t>(1, std::min<int64_t>(sms, most_tiles)));
  kernel<<<grid, THREADS, smem, stream>>>(map_a, map_b, map_out, p);
}

// How the tiles are stored follows from the epilogue and the result type (see StoreVia):
// - bf16 results (never accumulated: grouped_gemm.cc asks for f32 out with accumulate): handed to
//   the producer's storer warps through shared memory while the consumers go on with the next tile
//   (H200, 250fecf, against the warp slices: balanced forward 744 vs 708 TFLOP/s, dA 731 vs 588,
//   dW 630 vs 466; 15 of 18 products faster, the rest within 2 %).
// - fp32 dW (TN): the TMA boxes (ladder step 12c; H200, 0e908c6, the layer's dW13 and dW2 against
//   the warp slices in the same rounds: 3.42 vs 3.60 ms and 1.77 vs 1.82; in ncu's cycles level:
//   benchmarks/kernels-notes.md, "fp32 dW with its stores hidden").
// - other fp32 results: warp slices (the hand-off in two halves was no faster there: balanced 440 vs 434,
//   E=8 469 vs 499; and against register-direct stores, H200, f838df1: forward 715 vs 656).
//   Handing the fp32 dW tile off whole, written by TMA tensor stores, lost as well (ncu on the
//   layer's dW13, cycles of the kernel: warp slices 4.88 M, 67d9aab; the 128×256 tile beside a
//   4-stage ring of k = 32, 6.43 M, d2f028e; 128×128 tiles beside a 5-stage ring, 4.96 M,
//   9fa034d: benchmarks/results/ncu-layer-dw13-*.csv.gz). The code is in git at 9fa034d.
// - SwiGLU, dSwiGLU (bf16 results): handed off too, the storer warps applying the epilogue (v9;
//   H200, cf38d04, the layer's shape, against from the consumers' registers: up + SwiGLU 2.89 vs
//   3.35 ms, down dA + dSwiGLU 1.42 vs 1.84; the registers way is step 09 of the ladder).
// map_out: TN with fp32 results only (the result as [E][K][N], boxes of [1][64][32]); the others
// ignore it (any map will do).
template <GemmMode MODE, GemmEpilogue EPI, typename OutT>
void launch(const CUtensorMap& map_a, const CUtensorMap& map_b, const CUtensorMap& map_out, const Params& p, int sms, cudaStream_t stream) {
  if constexpr (EPI != GemmEpilogue::Store || sizeof(OutT) == 2) {
    launch_layout<MODE, EPI, OutT, StoreVia::Handoff>(map_a, map_b, map_out, p, sms, stream);
  } else if constexpr (MODE == GemmMode::TN) {
    launch_layout<MODE, EPI, OutT, StoreVia::TmaBoxes>(map_a, map_b, map_out, p, sms, stream);
  } else {
    launch_layout<MODE, EPI, OutT, StoreVia::WarpSlices>(map_a, map_b, map_out, p, sms, stream);
  }
}

}  // namespace
}  // namespace hopper

bool grouped_gemm_hopper_fits(const GroupedGemm& g) {
  // TMA needs 16-byte row pitches: every row length a multiple of 8 bf16.
  const bool tn = g.mode == GemmMode::TN;
  const int64_t K = tn ? g.a.size(1) : g.b.size(1), N = tn ? g.b.size(1) : g.b.size(2);
  const int64_t inner = g.mode == GemmMode::NN ? K : N;
  auto aligned16 = [](const Tensor& t) { return !t.defined() || (reinterpret_cast<uintptr_t>(t.raw()) & 15) == 0; };
  if (K % 8 != 0 || N % 8 != 0 || K == 0 || N == 0 || (!tn && inner == 0)) return false;
  // A tensor map needs every dimension > 0: no rows at all (TN with M = 0 still writes dW = 0) or
  // no groups (NN/NT with E = 0) stay on the mma.sync kernel, which handles both.
  if (g.a.size(0) == 0 || g.offsets.size(0) < 2) return false;
  if (!aligned16(g.a) || !aligned16(g.b) || !aligned16(g.out) || !aligned16(g.aux)) return false;
  if (g.a.size(0) >= (int64_t(1) << 31) || K >= (int64_t(1) << 31) || N >= (int64_t(1) << 31)) return false;
  return hopper::device_info().hopper;
}

void grouped_gemm_hopper(const GroupedGemm& g, const int32_t* tile_start, bool trim_tails, void* stream_ptr) {
  using namespace hopper;
  const int64_t M = g.a.size(0), E = g.offsets.size(0) - 1;
  Params p{};
  p.offsets = g.offsets.data<int32_t>();
  p.tile_start = tile_start;
  p.out = g.out.raw();
  p.aux = g.aux.defined() ? g.aux.data<__nv_bfloat16>() : nullptr;
  p.aux_out = (g.epilogue == GemmEpilogue::SwiGLU && g.aux.defined()) ? g.aux.data<__nv_bfloat16>() : nullptr;
  p.M = int(M);
  p.E = int(E);
  p.accumulate = g.accumulate && g.epilogue == GemmEpilogue::Store;  // the fused epilogues always overwrite
  p.trim_tails = trim_tails;
  cudaStream_t stream = cudaStream_t(stream_ptr);
  const int sms = device_info().sms;
  const bool f32 = g.out.dtype() == DType::f32;

  if (g.mode == GemmMode::TN) {
    // out_e[K, N] = a_eᵀ · b_e over the group's rows: a [M, K] and b [M, N], both read as
    // [64 rows][64 columns] boxes.
    const int64_t K = g.a.size(1), N = g.b.size(1);
    p.rows = int(K);
    p.cols = int(N);
    p.n_tiles = int((N + BN - 1) / BN);
    p.tn_m_tiles = int((K + BM - 1) / BM);
    const cuuint64_t a_dims[2] = {cuuint64_t(K), cuuint64_t(M)}, a_strides[1] = {cuuint64_t(K) * 2};
    const cuuint64_t b_dims[2] = {cuuint64_t(N), cuuint64_t(M)}, b_strides[1] = {cuuint64_t(N) * 2};
    const cuuint32_t box[2] = {64, BK};
    const CUtensorMap map_a = make_map(g.a.raw(), 2, a_dims, a_strides, box);
    const CUtensorMap map_b = make_map(g.b.raw(), 2, b_dims, b_strides, box);
    if (p.E * int64_t(p.tn_m_tiles) * p.n_tiles == 0) return;
    if (f32) {
      const cuuint64_t o_dims[3] = {cuuint64_t(N), cuuint64_t(K), cuuint64_t(E)}, o_strides[2] = {cuuint64_t(N) * 4, cuuint64_t(K * N) * 4};
      const cuuint32_t o_box[3] = {32, 64, 1};
      const CUtensorMap map_out = make_map(g.out.raw(), 3, o_dims, o_strides, o_box, CU_TENSOR_MAP_DATA_TYPE_FLOAT32);
      launch<GemmMode::TN, GemmEpilogue::Store, float>(map_a, map_b, map_out, p, sms, stream);
    } else {
      launch<GemmMode::TN, GemmEpilogue::Store, __nv_bfloat16>(map_a, map_b, map_b, p, sms, stream);
    }
    cuda::check_launch("groupedGemm");
    return;
  }

  const bool nt = g.mode == GemmMode::NT;
  const int64_t K = g.b.size(1), N = g.b.size(2);
  p.rows = int(M);
  p.cols = int(nt ? K : N);  // NN: out[M, N] = a[M, K]·b_e; NT: out[M, K] = a[M, N]·b_eᵀ
  p.inner = int(nt ? N : K);
  p.n_tiles = (p.cols + BN - 1) / BN;

  // A: [M, inner] rows, boxes of 128 rows × 64 along inner.
  const cuuint64_t a_dims[2] = {cuuint64_t(p.inner), cuuint64_t(M)}, a_strides[1] = {cuuint64_t(p.inner) * 2};
  const cuuint32_t a_box[2] = {BK, BM};
  const CUtensorMap map_a = make_map(g.a.raw(), 2, a_dims, a_strides, a_box);
  // B: [E, K, N] with N innermost. NN reads [64 k][64 n] boxes; NT reads [256 k-rows][64 n] boxes
  // (its rows are the product's columns, its N the product's inner dimension).
  const cuuint64_t b_dims[3] = {cuuint64_t(N), cuuint64_t(K), cuuint64_t(E)}, b_strides[2] = {cuuint64_t(N) * 2, cuuint64_t(N * K) * 2};
  const cuuint32_t b_box_nn[3] = {64, BK, 1}, b_box_nt[3] = {BK, BN, 1};
  const CUtensorMap map_b = make_map(g.b.raw(), 3, b_dims, b_strides, nt ? b_box_nt : b_box_nn);

  if (!nt) {
    if (g.epilogue == GemmEpilogue::SwiGLU) launch<GemmMode::NN, GemmEpilogue::SwiGLU, __nv_bfloat16>(map_a, map_b, map_b, p, sms, stream);
    else if (f32) launch<GemmMode::NN, GemmEpilogue::Store, float>(map_a, map_b, map_b, p, sms, stream);
    else launch<GemmMode::NN, GemmEpilogue::Store, __nv_bfloat16>(map_a, map_b, map_b, p, sms, stream);
  } else {
    if (g.epilogue == GemmEpilogue::DSwiGLU)
      launch<GemmMode::NT, GemmEpilogue::DSwiGLU, __nv_bfloat16>(map_a, map_b, map_b, p, sms, stream);
    else if (f32) launch<GemmMode::NT, GemmEpilogue::Store, float>(map_a, map_b, map_b, p, sms, stream);
    else launch<GemmMode::NT, GemmEpilogue::Store, __nv_bfloat16>(map_a, map_b, map_b, p, sms, stream);
  }
  cuda::check_launch("groupedGemm");
}

}  // namespace moe::ops
