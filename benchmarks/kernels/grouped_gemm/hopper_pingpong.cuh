// The ping-pong Hopper grouped GEMM for fp32 results (sm_90a): the same TMA ring and wgmma as
// hopper.cu, but each consumer warpgroup owns a whole 128×128 output tile and the two consumers
// take the block's tiles in turn, so that one stores its fp32 tile (straight from its registers)
// while the other's mainloop keeps the tensor cores busy. Written for training's dW (TN with fp32
// results: each tile reduces over one expert's rows only, ~16 k-steps, so hopper.cu's consumers
// spend ~25% of the time storing a 128 KiB fp32 tile while no wgmma runs); NN and NT with fp32
// results take it too. The idea is CUTLASS's "KernelTmaWarpSpecializedPingpong"; this is our own code.
// Step 08 of the ladder (08-hopper-pingpong-fp32.cu). It was in the addon, behind the switch
// groupedGemm.pingpong (off), from its introduction until it measured slower than the warp slices
// (H200, cf38d04: README.md, step 08); moved here unchanged (device code and run()), with the few
// helpers of sm90.cuh and wgmma.cuh that only it used (the end of this file). It still includes the
// addon's shared sm90.cuh, tile_order.cuh and wgmma.cuh, which hopper.cu uses.
//
// Block: 3 warpgroups, 384 threads, one block per SM, persistent over the launch's tiles
// t = blockIdx.x + j·gridDim.x (j = 0 .. mine-1, `mine` the block's tile count) in the order of
// hopper.cu (TN: group-major, n fastest; NN/NT: bands of GROUP_M m-tiles sweeping the n-tiles).
//   warpgroup 0  producer: one thread loads every k-step of every tile of the block, in tile order,
//                into a 6-stage ring (A 128×64 + B 64×128 bf16 = 32 KiB per stage); setmaxnreg 40.
//   warpgroup 1  consumer 0: the block's even tiles (j = 0, 2, 4, …); setmaxnreg 232.
//   warpgroup 2  consumer 1: the block's odd tiles (j = 1, 3, …).
// A consumer's tile is two wgmma m64n128k16 per 16 k (its rows 0-63 and 64-127): 2 × 64 fp32
// accumulators per thread, the register budget of hopper.cu's 64×256 per warpgroup.
//
// Shared memory per stage (128-byte swizzle, as hopper.cu):
//   TN  A = a_eᵀ: two [64 k][64 m] boxes (MN-major), one per 64-row half; B = dC_e: two [64 k][64 n]
//       boxes side by side (MN-major, LBO 8 KiB). The four boxes are 8 KiB each, back to back.
//   NN  A: [128 rows][64 k] K-major; B = b_e: two [64 k][64 n] boxes (MN-major).
//   NT  A: [128 rows][64 n] K-major; B = b_e read as [128 k-rows][64 n] (K-major).
//
// ---- Protocol -------------------------------------------------------------------------------------
// Barriers: full[s] (count 1: the producer's arrive.expect_tx, the copy engine adds the bytes) and
// empty[s] (count 1: the one consumer thread that consumed the stage) for s < STAGES; named barriers
// BAR_ORDER + c (c = 0, 1; 256 threads: the other consumer's 128 arrive, consumer c's 128 sync):
// "consumer c may start its mainloop"; BAR_ZERO + c (128 threads: consumer c alone) after it zeroes
// rows of a stage. Barrier 0 (__syncthreads) only after the mbarrier initialisation. Nothing else.
//
// The ring's k-steps form one sequence over the block: tile 0's k-steps, then tile 1's, … Step i
// uses stage i % STAGES in round i / STAGES (phase parity round & 1). The producer walks it all;
// each consumer walks the same tiles (tile_at is a pure function of t), consumes the steps of its
// own tiles and skips (advances its stage/round by k_tiles without touching a barrier) the steps of
// the other's. So both sides agree on the (stage, round) of every step.
//   producer, step i:   wait empty[s] parity (round & 1) ^ 1 (round 0 passes on a fresh barrier;
//                        round r waits for the consumer of step i - STAGES to have released it);
//                        arrive.expect_tx(full[s], 32 KiB); the TMA loads complete full[s].
//   consumer c, tile j (j % 2 == c):
//     1. j > 0: bar.sync BAR_ORDER + c: the other consumer has issued every wgmma of tile j-1.
//     2. each k-step: wait full[s] parity round & 1; TN's last k-step of a group: zero the rows past
//        the group's end (they hold the next group's rows), fence.proxy.async, bar.sync BAR_ZERO + c;
//        wgmma ×8, commit; wait until one group is in flight; arrive empty[] of the previous step.
//     3. j + 1 < mine: bar.arrive BAR_ORDER + (1 - c): the other consumer may start tile j+1.
//     4. wait for every wgmma; arrive empty[] of the last step.
//     5. epilogue: store the tile from registers (k_tiles == 0, a group of no rows: zeros, or nothing
//        with accumulate: dW_e += 0), while the other consumer runs tile j+1's mainloop.
// Why the parities are exact (the barriers compare parities only): a consumer waits full[s] for
// round r only after every step before it was consumed: the earlier steps of its tile (program
// order) and, by (1) and induction, every step of tiles < j. So round r-1 of stage s has completed,
// and round r+1 cannot have (the producer refills s only after this consumer releases it). The
// producer waits empty[s] for round r-1's release after its own wait for round r-2's; round r's
// release needs round r's load, which comes after. So no wait is ever two phases off.
// Why the named barriers pair up: BAR_ORDER + 1 is arrived on by consumer 0 after even tiles j with
// j + 1 < mine and synced by consumer 1 before odd tiles: floor(mine / 2) each. BAR_ORDER + 0 is
// arrived on by consumer 1 after odd j with j + 1 < mine and synced by consumer 0 before even j > 0:
// floor((mine - 1) / 2) each. A consumer's next arrive on a barrier comes after its own sync on the
// other barrier, which needs the other consumer's arrive, which comes after that consumer's sync on
// the first: so arrivals and syncs alternate and no barrier instance ever gets two arrivals.
// No deadlock: tile j's mainloop needs (a) the loads of its steps, which need the releases of steps
// STAGES earlier, all in tiles <= j and released by their consumers before those consumers' stores
// (tile j's own earlier steps: released one step behind, and STAGES >= 2); (b) tile j-1's consumer
// to have issued its mainloop, which needs only tiles <= j-1. Induction on j.
// Walked on paper:
//   one tile in all (grid 1, mine 1): the producer loads tile 0; consumer 0 runs it with no order
//     barrier (j = 0, and j + 1 = mine); consumer 1 skips it and ends. No named barrier is touched.
//   mine = 3: c0 tile 0, arrive B1 | c1 sync B1, tile 1, arrive B0 | c0 sync B0, tile 2, no arrive
//     (3 = mine). B1: 1 arrive, 1 sync; B0: 1 and 1. c1 skips tile 2's steps and ends.
//   a group of no rows (TN): k_tiles 0, no steps: the producer loads nothing for it; its consumer
//     still takes its turn (1, 3) and stores zeros (or nothing with accumulate); the other skips 0 steps.
//   a block with no tiles (NN/NT: the grid is sized for the most tiles the counts could give): mine 0;
//     every loop is empty; no barrier but the initial __syncthreads is touched.
// The producer thread leaves once it has issued its last load (the consumers wait for the bytes);
// the other producer warps leave at once. Nothing after the role split waits for all 384 threads.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../../../native/ops/moe/grouped_gemm/sm90.cuh"
#include "../../../native/ops/moe/grouped_gemm/tile_order.cuh"
#include "../../../native/ops/moe/grouped_gemm/wgmma.cuh"

// ---- what only this kernel used of sm90.cuh and wgmma.cuh (moved with it, unchanged) --------------
namespace moe::ops::sm90 {

// ---- named barriers (bar.sync / bar.arrive with an explicit thread count) -----------------------
// Barrier 0 is __syncthreads; callers pick ids 1..15 that no other barrier of the kernel uses.
template <int ID> __device__ __forceinline__ void named_sync(int threads) {
  static_assert(ID > 0 && ID < 16, "barrier 0 is __syncthreads; 16 per block");
  asm volatile("bar.sync %0, %1;\n" ::"n"(ID), "r"(threads) : "memory");
}
template <int ID> __device__ __forceinline__ void named_arrive(int threads) {
  static_assert(ID > 0 && ID < 16, "barrier 0 is __syncthreads; 16 per block");
  asm volatile("bar.arrive %0, %1;\n" ::"n"(ID), "r"(threads) : "memory");
}

// Plain (generic-proxy) shared-memory stores that the tensor cores or the copy engine (async proxy)
// touch next: each writing thread fences before the barrier that orders them.
__device__ __forceinline__ void fence_proxy_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// TMA descriptor prefetch (was in sm90.cuh).
__device__ __forceinline__ void prefetch_tensormap(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

}  // namespace moe::ops::sm90

namespace moe::ops::hopper {

// One wgmma.mma_async m64n128k16 (bf16 × bf16 → f32): the ping-pong kernel's two 64-row halves of
// a 128×128 tile (below). Same conventions as wgmma.cuh's m64n256k16; 64 accumulators per thread.
template <int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %68, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, %66, %67;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]),
        "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
        "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
        "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]),
        "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]),
        "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "n"(TRANS_A), "n"(TRANS_B), "r"(scale_d));
}

}  // namespace moe::ops::hopper

namespace moe::ops::pingpong {

enum class Mode : int { NN = 0, NT = 1, TN = 2 };

constexpr int BM = 128, BN = 128, BK = 64, GROUP_M = 8;  // a consumer's tile and k-step
constexpr int CONSUMERS = 2;
constexpr int THREADS = 128 * (1 + CONSUMERS);
constexpr int STAGES = 6;
constexpr int A_BYTES = BM * BK * 2;  // 16 KiB
constexpr int B_BYTES = BN * BK * 2;  // 16 KiB
constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
constexpr int BOX_BYTES = 64 * 128;                      // one [64][64] bf16 box (128-byte rows)
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;  // + slack to align the ring to 1024 bytes
static_assert(SMEM_BYTES + 2 * STAGES * 8 <= 232448, "over the 227 KiB opt-in");
// Named barrier ids (0 is __syncthreads).
constexpr int BAR_ZERO = 1;   // + consumer: that consumer's 128 threads, after zeroing rows of a stage
constexpr int BAR_ORDER = 3;  // + consumer c: "c may start its mainloop" (ids 3, 4)

struct Params {
  const int32_t* offsets;     // [E+1]
  const int32_t* tile_start;  // [E+1] (NN, NT): prefix of ceil(rows_e / 128)
  float* out;
  int M, E;
  int rows, cols, inner;    // the product out[rows, cols] (per group for TN); inner: NN/NT only
  int n_tiles, tn_m_tiles;  // tiles along cols; TN: tiles along rows (per group)
  int accumulate;
};

using sm90::Tile;
using sm90::tile_in_order;

// Work item t, in hopper.cu's order (tile_order.cuh) with 128-column tiles.
template <Mode MODE> __device__ __forceinline__ Tile tile_at(const Params& p, int t, int m_tiles) {
  return tile_in_order<MODE == Mode::TN, BM, BN, BK, GROUP_M>(p, t, m_tiles);
}

__device__ __forceinline__ void advance(int& stage, uint32_t& round, int steps) {
  stage += steps;
  round += uint32_t(stage / STAGES);
  stage %= STAGES;
}

// A consumer's 128×128 tile from its registers: half h (rows 64h..), thread (warp w, lane l) holds
// rows 16w + l/4 (+8) and, in each 8-column block j, columns 8j + 2(l%4) and the next
// (d_h[4j + 2i], d_h[4j + 2i + 1] for row + 8i). cols % 8 == 0: a block is all in or all out. Each
// warp instruction writes 8 rows × 32 bytes (whole sectors).
__device__ __forceinline__ void store_tile(const Params& p, const Tile& tile, const float (&d0)[64], const float (&d1)[64]) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
  float* const out = p.out + tile.out_base;
  const int c0 = tile.col0 + 2 * (lane & 3);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float(&d)[64] = h ? d1 : d0;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int r = tile.row0 + 64 * h + 16 * warp + (lane >> 2) + 8 * i;
      if (r >= tile.row_end) continue;
      float* const row = out + int64_t(r) * p.cols + c0;
      if (p.accumulate) {
        // The old values a few blocks at a time, loads before stores (else each load waits behind
        // the previous store); four at a time keeps within the 168 registers ptxas allots.
#pragma unroll
        for (int j0 = 0; j0 < BN / 8; j0 += 4) {
          float2 old[4];
#pragma unroll
          for (int j = j0; j < j0 + 4; ++j)
            if (c0 + 8 * j < p.cols) old[j - j0] = *reinterpret_cast<const float2*>(row + 8 * j);
#pragma unroll
          for (int j = j0; j < j0 + 4; ++j)
            if (c0 + 8 * j < p.cols)
              *reinterpret_cast<float2*>(row + 8 * j) = make_float2(old[j - j0].x + d[4 * j + 2 * i], old[j - j0].y + d[4 * j + 2 * i + 1]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
          if (c0 + 8 * j < p.cols) *reinterpret_cast<float2*>(row + 8 * j) = make_float2(d[4 * j + 2 * i], d[4 * j + 2 * i + 1]);
      }
    }
  }
}

template <Mode MODE>
__global__ void __launch_bounds__(THREADS, 1)
    grouped_gemm_pingpong_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b, Params p) {
  using namespace sm90;
  using moe::ops::hopper::wgmma_m64n128k16;
  constexpr bool TN = MODE == Mode::TN;
  constexpr bool A_MN_MAJOR = TN;                // a_eᵀ: its rows (k of a) are contiguous
  constexpr bool B_MN_MAJOR = MODE != Mode::NT;  // NN: b_e [inner, cols]; TN: dC_e [rows_e, cols]
  extern __shared__ unsigned char smem_raw[];
  // The 128-byte swizzle pattern repeats every 1024 bytes: the ring starts on such a boundary, so the
  // descriptors' base-offset field stays 0.
  unsigned char* ring = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];

  const int wg = threadIdx.x >> 7;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);   // the producer's arrive.expect_tx; the copy engine adds the bytes
      mbar_init(&empty[s], 1);  // the consuming warpgroup's thread 0: each stage has one consumer
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  const int m_tiles = TN ? p.tn_m_tiles : __ldg(p.tile_start + p.E);
  const int total = TN ? p.E * p.tn_m_tiles * p.n_tiles : m_tiles * p.n_tiles;
  const int mine = int(blockIdx.x) < total ? (total - 1 - int(blockIdx.x)) / int(gridDim.x) + 1 : 0;  // this block's tiles

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      prefetch_tensormap(&map_a);
      prefetch_tensormap(&map_b);
      int stage = 0;
      uint32_t round = 0;
      for (int j = 0; j < mine; ++j) {
        const Tile tile = tile_at<MODE>(p, int(blockIdx.x) + j * int(gridDim.x), m_tiles);
        for (int kt = 0; kt < tile.k_tiles; ++kt) {
          mbar_wait(&empty[stage], (round & 1) ^ 1);
          unsigned char* sa = ring + stage * STAGE_BYTES;
          unsigned char* sb = sa + A_BYTES;
          mbar_arrive_expect_tx(&full[stage], STAGE_BYTES);  // out-of-bounds parts still count: TMA zero-fills them
          const int k0 = tile.k_begin + kt * BK;
          if constexpr (TN) {
#pragma unroll
            for (int h = 0; h < BM / 64; ++h) tma_load_2d(sa + h * BOX_BYTES, &map_a, &full[stage], tile.row0 + 64 * h, k0);
#pragma unroll
            for (int h = 0; h < BN / 64; ++h) tma_load_2d(sb + h * BOX_BYTES, &map_b, &full[stage], tile.col0 + 64 * h, k0);
          } else {
            tma_load_2d(sa, &map_a, &full[stage], k0, tile.row0);
            if constexpr (MODE == Mode::NT) {
              tma_load_3d(sb, &map_b, &full[stage], k0, tile.col0, tile.group);
            } else {
#pragma unroll
              for (int h = 0; h < BN / 64; ++h) tma_load_3d(sb + h * BOX_BYTES, &map_b, &full[stage], tile.col0 + 64 * h, k0, tile.group);
            }
          }
          advance(stage, round, 1);
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int consumer = wg - 1;
    const int tid = threadIdx.x & 127;
    float d0[64], d1[64];
    int stage = 0;
    uint32_t round = 0;
    for (int j = 0; j < mine; ++j) {
      const Tile tile = tile_at<MODE>(p, int(blockIdx.x) + j * int(gridDim.x), m_tiles);
      if ((j & 1) != consumer) {  // the other consumer's tile: skip its steps
        advance(stage, round, tile.k_tiles);
        continue;
      }
      if (j > 0) {  // (1)
        if (consumer == 0) named_sync<BAR_ORDER + 0>(2 * 128);
        else named_sync<BAR_ORDER + 1>(2 * 128);
      }
      // Zeroed here (the first wgmma overwrites them anyway, scale-d 0) so that the accumulators
      // are dead from the last tile's store until now: the wgmma operands read them ("+f"), so
      // otherwise they would stay live through tile_at and the skipped tiles, and spill.
#pragma unroll
      for (int i = 0; i < 64; ++i) d0[i] = d1[i] = 0.f;
      int prev = -1;
      for (int kt = 0; kt < tile.k_tiles; ++kt) {  // (2)
        mbar_wait(&full[stage], round & 1);
        unsigned char* sa = ring + stage * STAGE_BYTES;
        unsigned char* sb = sa + A_BYTES;
        if constexpr (TN) {
          // The group ends inside this k-step: zero its rows past the end (the next group's rows,
          // or TMA's zeros past M) in all four boxes, A and B, so that no product of another
          // group's values (or of 0 · inf) reaches the sum.
          const int valid = tile.k_end - (tile.k_begin + kt * BK);
          if (valid < BK) {
            const int per_box = (BK - valid) * 8;  // 16-byte pieces past the end in one box
            for (int i = tid; i < 4 * per_box; i += 128) {
              const int box = i / per_box, rest = i % per_box;
              *reinterpret_cast<uint4*>(sa + box * BOX_BYTES + (valid + rest / 8) * 128 + (rest % 8) * 16) = make_uint4(0, 0, 0, 0);
            }
            fence_proxy_async_smem();                          // plain stores before the tensor cores' reads
            if (consumer == 0) named_sync<BAR_ZERO + 0>(128);  // this warpgroup alone owns the stage
            else named_sync<BAR_ZERO + 1>(128);
          }
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          // K-major: the next 16 k are 32 bytes along the swizzled row. MN-major: 16 rows down.
          const uint64_t db = B_MN_MAJOR ? smem_desc(sb + kk * 16 * 128, BOX_BYTES, 1024) : smem_desc(sb + kk * 32, 16, 1024);
          const uint64_t da0 = A_MN_MAJOR ? smem_desc(sa + kk * 16 * 128, BOX_BYTES, 1024) : smem_desc(sa + kk * 32, 16, 1024);
          const uint64_t da1 =
              A_MN_MAJOR ? smem_desc(sa + BOX_BYTES + kk * 16 * 128, BOX_BYTES, 1024) : smem_desc(sa + 64 * 128 + kk * 32, 16, 1024);
          wgmma_m64n128k16<A_MN_MAJOR ? 1 : 0, B_MN_MAJOR ? 1 : 0>(d0, da0, db, kt > 0 || kk > 0);
          wgmma_m64n128k16<A_MN_MAJOR ? 1 : 0, B_MN_MAJOR ? 1 : 0>(d1, da1, db, kt > 0 || kk > 0);
        }
        wgmma_commit();
        // Keep one step's wgmmas in flight: once the previous step's have finished, free its stage.
        wgmma_wait<1>();
        if (prev >= 0 && tid == 0) mbar_arrive(&empty[prev]);
        prev = stage;
        advance(stage, round, 1);
      }
      if (j + 1 < mine) {  // (3)
        if (consumer == 0) named_arrive<BAR_ORDER + 1>(2 * 128);
        else named_arrive<BAR_ORDER + 0>(2 * 128);
      }
      wgmma_wait<0>();  // (4)
      if (prev >= 0 && tid == 0) mbar_arrive(&empty[prev]);
      // (5) TN, a group of no rows (k_tiles 0): dW_e = 0 (d is zero), or unchanged with accumulate.
      if (tile.k_tiles == 0 && p.accumulate) continue;
      store_tile(p, tile, d0, d1);
    }
  }
}

// ---- host -----------------------------------------------------------------------------------------
// One product with fp32 results (out overwritten, or added to with accumulate):
//   TN  out [E, K, N] = per group a_eᵀ · b_e   a [M, K], b [M, N]
//   NN  out [M, N]    = a · b_e                a [M, K], b [E, K, N]
//   NT  out [M, K]    = a · b_eᵀ               a [M, N], b [E, K, N]
// offsets [E+1] and (NN, NT) tile_start [E+1] on the device. The caller has checked what TMA needs
// (K, N multiples of 8, 16-byte aligned pointers, M > 0, sizes below 2^31). Returns null once the
// kernel is queued, else what failed (the launch's own error is left for cudaGetLastError).
struct Problem {
  Mode mode;
  const void* a;
  const void* b;
  const int32_t* offsets;
  const int32_t* tile_start;
  float* out;
  int64_t M, E, K, N;
  bool accumulate;
};

template <Mode MODE>
inline const char* launch(const CUtensorMap& map_a, const CUtensorMap& map_b, const Params& p, int sms, cudaStream_t stream) {
  auto kernel = grouped_gemm_pingpong_kernel<MODE>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES) != cudaSuccess)
    return "cudaFuncSetAttribute (max dynamic shared memory) failed";
  // Persistent: one block per SM at most, never more blocks than the most tiles there can be.
  const int64_t most_tiles = MODE == Mode::TN ? int64_t(p.E) * p.tn_m_tiles * p.n_tiles : (int64_t(p.M) / BM + p.E) * p.n_tiles;
  const int grid = int(std::max<int64_t>(1, std::min<int64_t>(sms, most_tiles)));
  kernel<<<grid, THREADS, SMEM_BYTES, stream>>>(map_a, map_b, p);
  return nullptr;
}

inline const char* run(const Problem& q, int sms, cudaStream_t stream) {
  Params p{};
  p.offsets = q.offsets;
  p.tile_start = q.tile_start;
  p.out = q.out;
  p.M = int(q.M);
  p.E = int(q.E);
  p.accumulate = q.accumulate ? 1 : 0;
  const cuuint64_t M = cuuint64_t(q.M), K = cuuint64_t(q.K), N = cuuint64_t(q.N), E = cuuint64_t(q.E);
  CUtensorMap map_a, map_b;
  if (q.mode == Mode::TN) {
    // a [M, K] and b [M, N], both read as [64 rows][64 columns] boxes.
    p.rows = int(q.K);
    p.cols = int(q.N);
    p.n_tiles = int((q.N + BN - 1) / BN);
    p.tn_m_tiles = int((q.K + BM - 1) / BM);
    if (int64_t(p.E) * p.tn_m_tiles * p.n_tiles == 0) return nullptr;
    const cuuint64_t a_dims[2] = {K, M}, a_strides[1] = {K * 2};
    const cuuint64_t b_dims[2] = {N, M}, b_strides[1] = {N * 2};
    const cuuint32_t box[2] = {64, BK};
    if (sm90::encode_bf16_map(&map_a, q.a, 2, a_dims, a_strides, box) != CUDA_SUCCESS ||
        sm90::encode_bf16_map(&map_b, q.b, 2, b_dims, b_strides, box) != CUDA_SUCCESS)
      return "cuTensorMapEncodeTiled failed";
    return launch<Mode::TN>(map_a, map_b, p, sms, stream);
  }
  const bool nt = q.mode == Mode::NT;
  p.rows = int(q.M);
  p.cols = int(nt ? q.K : q.N);  // NN: out[M, N] = a[M, K]·b_e; NT: out[M, K] = a[M, N]·b_eᵀ
  p.inner = int(nt ? q.N : q.K);
  p.n_tiles = (p.cols + BN - 1) / BN;
  if (p.E == 0) return nullptr;
  // A: [M, inner] rows, boxes of 128 rows × 64 along inner. B: [E, K, N], N innermost: NN reads
  // [64 k][64 n] boxes, NT [128 k-rows][64 n] boxes (its rows are the product's columns).
  const cuuint64_t a_dims[2] = {cuuint64_t(p.inner), M}, a_strides[1] = {cuuint64_t(p.inner) * 2};
  const cuuint32_t a_box[2] = {BK, BM};
  const cuuint64_t b_dims[3] = {N, K, E}, b_strides[2] = {N * 2, N * K * 2};
  const cuuint32_t b_box_nn[3] = {64, BK, 1}, b_box_nt[3] = {BK, BN, 1};
  if (sm90::encode_bf16_map(&map_a, q.a, 2, a_dims, a_strides, a_box) != CUDA_SUCCESS ||
      sm90::encode_bf16_map(&map_b, q.b, 3, b_dims, b_strides, nt ? b_box_nt : b_box_nn) != CUDA_SUCCESS)
    return "cuTensorMapEncodeTiled failed";
  return nt ? launch<Mode::NT>(map_a, map_b, p, sms, stream) : launch<Mode::NN>(map_a, map_b, p, sms, stream);
}

}  // namespace moe::ops::pingpong
