// The Hopper grouped GEMM with every way of storing a tile that was measured (steps 05-07 of the
// ladder): native/ops/grouped_gemm/hopper.cu as it was at 31c19a6 (main before issue 15), when all
// three StoreVia variants were built for every result type and chosen by environment variables
// (MOE_EP_GG_HOPPER_STAGED, MOE_EP_GG_HOPPER_HANDOFF). Device code and launch_layout unchanged;
// the host entry below (run) takes the variant as a template argument instead.
//   Registers   Store straight from the fragments (v5)
//   WarpSlices  each consumer warp stores through its own 16×32 fp32 slices (v6)
//   Handoff     the tile to shared memory, stored by the producer's idle warps (v7; fp32 in halves)
// Since issue 15 the addon keeps Handoff for bf16 results, WarpSlices for fp32 ones and Registers
// for the fused SwiGLU/dSwiGLU epilogues only. Ladder step 12 (session 13) adds a fourth way, not
// in hopper.cu at any commit:
//   ConsumerTma fp32 dW (TN) only: each consumer warpgroup drains its 64×256 tile in four quarters
//               through its own 16 KiB of staging by TMA tensor stores (4-stage ring kept)
//   ConsumerTmaDouble  the same staging as two 8 KiB boxes used in turn: eight eighths, each written
//               while the engine reads the one before (no wait for an empty staging)
//   ConsumerTmaDeep    eighths through five boxes per consumer (80 KiB of staging) beside a 3-stage
//               ring: up to 40 KiB of a consumer's tile still draining while it starts the next tile
// sm_90a only: nvcc -gencode=arch=compute_90a,code=sm_90a (as CMake builds hopper.cu).
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>

#include "common.cuh"
#include "../../../native/ops/moe/grouped_gemm/wgmma.cuh"
#include "../../../native/ops/moe/grouped_gemm/sm90.cuh"  // encode_map: the addon's tensor-map encoder

// What the copy needs from the addon's headers.
#define MOE_ARG_CHECK(cond, op, ...) CHECK(cond, "%s: a tensor map was refused", op)
#define MOE_INTERNAL_CHECK(cond, msg) CHECK(cond, "%s", msg)
namespace moe::cuda {
inline void check(cudaError_t e, const char* op, const char* what) { CHECK(e == cudaSuccess, "%s: %s: %s", op, what, cudaGetErrorString(e)); }
}  // namespace moe::cuda
namespace moe::ops {
enum class GemmMode : int { NN = 0, NT = 1, TN = 2 };
enum class GemmEpilogue : int { Store = 0, SwiGLU = 1, DSwiGLU = 2 };
__host__ __device__ inline float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
__host__ __device__ inline float silu(float x) { return x * sigmoidf_(x); }
__host__ __device__ inline float silu_grad(float x) {
  float s = sigmoidf_(x);
  return s * (1.0f + x * (1.0f - s));
}
}  // namespace moe::ops

namespace moe::ops::hopper {
namespace {

// ---- native/ops/grouped_gemm/hopper.cu at 31c19a6 (kernel, tensor maps, launch_layout) --------------

constexpr int BM = 128, BN = 256, BK = 64, GROUP_M = 8;
constexpr int CONSUMERS = 2;                    // warpgroups of 64 output rows each
constexpr int THREADS = 128 * (1 + CONSUMERS);  // + the producer warpgroup
constexpr int A_BYTES = BM * BK * 2;            // 16 KiB
constexpr int B_BYTES = BN * BK * 2;            // 32 KiB
constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
// How a consumer warpgroup's 64×256 accumulators reach global memory (the Store epilogue):
//   Registers   straight from the fragments, 4/8-byte stores (v5).
//   WarpSlices  each consumer warp stages 16×32 fp32 slices in its own shared memory and stores
//               whole 16-byte row pieces (v6; the default for fp32 results and accumulation).
//   Handoff     (v7; the default for bf16 results) results without accumulate: the consumers drop
//               the 128×256 tile into shared memory and go on to the next tile's mainloop; three
//               warps of the producer warpgroup (otherwise idle) copy it to global memory meanwhile.
//               bf16 tiles go in one piece (66 KiB), fp32 tiles in two halves of 128 columns (68 KiB
//               each: the consumers wait for the first half to be copied before they drop the
//               second). It costs the ring a stage (3 instead of 4).
// ProbeNoStore, ProbeNoStore3: probes, not ways to store: the tile is computed and never written
// (4- and 3-stage rings), to time the loads and wgmmas alone (ladder 12's --only 4 and 5). Their
// accumulators go to a store that never runs, else ptxas drops the wgmmas (kernel, below).
// ConsumerTmaDeepEvictFirst: ConsumerTmaDeep with an evict-first L2 policy on its stores (a probe: do
// the results push A and B out of L2?).
// ProbeL2Resident: ConsumerTmaDeep with every tile of a block written to the same block-private
// 128×256 slot of group 0 (132 slots: ~17 MiB, held in L2), so the results never have to reach DRAM
// (a probe, its output wrong by design: is it the DRAM writes or the path to L2 that costs?).
// ProbeBoxesNoTma: ConsumerTmaDeep's consumers doing all their work (shared-memory stores, fences,
// barriers, waits) but issuing no tensor store (is it the consumers' own time that costs?).
// ProbeHalfStores: ConsumerTmaDeep issuing only the even eighths' stores (half the bytes leave).
// ProbeBoxesNoFence, ProbeBoxesNoSync: ProbeBoxesNoTma without the proxy fence, and without the
// fence and the warpgroup's two barriers per eighth (only the shared-memory stores left).
// ConsumerTmaDeepSpread (12d): ConsumerTmaDeep with its shared-memory stores free of bank conflicts
// (lanes of odd rows write column group jl ^ 2: see store_tile_tma_boxes); ProbeSpreadNoSync:
// ProbeBoxesNoSync with that placement.
// ProbePause: the 3-stage ring, and in place of any epilogue the consumers wait Params::pause_ns per
// tile (a probe: what does a pause of known length at every tile boundary cost?).
enum class StoreVia {
  Registers,
  WarpSlices,
  Handoff,
  ConsumerTma,
  ConsumerTmaDouble,
  ConsumerTmaDeep,
  ProbeNoStore,
  ProbeNoStore3,
  ConsumerTmaDeepEvictFirst,
  ProbeL2Resident,
  ProbeBoxesNoTma,
  ProbeHalfStores,
  ProbeBoxesNoFence,
  ProbeBoxesNoSync,
  ConsumerTmaDeepSpread,
  ProbeSpreadNoSync,
  ProbePause,
  HandoffGatherA  // ladder 13: the hand-off, A's rows gathered by the producer warp (ProbeKnobs::gather_x)
};
// The hand-off's ways: the consumers drop the tile into shared memory, the storer warps copy it out.
constexpr bool handoff(StoreVia v) { return v == StoreVia::Handoff || v == StoreVia::HandoffGatherA; }
constexpr bool tma_deep_probe(StoreVia v) {
  return v == StoreVia::ConsumerTmaDeepEvictFirst || v == StoreVia::ProbeL2Resident || v == StoreVia::ProbeBoxesNoTma ||
         v == StoreVia::ProbeHalfStores || v == StoreVia::ProbeBoxesNoFence || v == StoreVia::ProbeBoxesNoSync ||
         v == StoreVia::ConsumerTmaDeepSpread || v == StoreVia::ProbeSpreadNoSync;
}
// The TMA-box probes that leave part of the consumers' work out.
constexpr bool skips_tensor_stores(StoreVia v) {
  return v == StoreVia::ProbeBoxesNoTma || v == StoreVia::ProbeBoxesNoFence || v == StoreVia::ProbeBoxesNoSync ||
         v == StoreVia::ProbeSpreadNoSync;
}
constexpr bool skips_box_sync(StoreVia v) { return v == StoreVia::ProbeBoxesNoSync || v == StoreVia::ProbeSpreadNoSync; }
constexpr bool tma_deep(StoreVia v) { return v == StoreVia::ConsumerTmaDeep || tma_deep_probe(v); }
constexpr bool by_consumer_tma(StoreVia v) {
  return v == StoreVia::ConsumerTma || v == StoreVia::ConsumerTmaDouble || v == StoreVia::ConsumerTmaDeep ||
         tma_deep_probe(v);
}

// Shared memory: the ring, then the epilogue's staging (none, per-warp slices, or the whole tile).
template <StoreVia VIA> struct Layout {
  static constexpr int STAGES = handoff(VIA) || tma_deep(VIA) || VIA == StoreVia::ProbeNoStore3 || VIA == StoreVia::ProbePause
                                    ? 3
                                    : 4;
  static constexpr int SLICE = 32;                              // WarpSlices: columns per staged slice
  static constexpr int STAGING_LD = SLICE + 8;                  // floats per staged row: the pad spreads
                                                                // the fragment stores over the banks
  static constexpr int WARP_STAGING_FLOATS = 16 * STAGING_LD;   // 2560 bytes per warp
  // Handoff row pitches, chosen so that a warp's fragment stores hit every bank once per wavefront:
  // bf16 pairs (4 bytes) at 264 bf16 = 528 bytes (132 words ≡ 4 mod 32); fp32 pairs (8 bytes, half a
  // warp per wavefront) at 136 floats = 544 bytes (≡ 8 mod 32).
  static constexpr int TILE_LD_BF16 = BN + 8;
  static constexpr int TILE_LD_F32 = BN / 2 + 8;
  // ConsumerTma: per consumer a quarter of its 64×256 fp32 tile, two [64 rows][32 floats] boxes.
  static constexpr int TMA_BOX_BYTES = 64 * 32 * 4;  // 8 KiB
  static constexpr int TMA_BOXES = tma_deep(VIA) ? 5 : 2;  // per consumer
  static constexpr int TMA_STAGING_PER_CONSUMER = TMA_BOXES * TMA_BOX_BYTES;
  static constexpr int STAGING_BYTES = VIA == StoreVia::WarpSlices    ? CONSUMERS * 4 * WARP_STAGING_FLOATS * 4
                                       : handoff(VIA)                 ? std::max(BM * TILE_LD_F32 * 4, BM * TILE_LD_BF16 * 2)
                                       : by_consumer_tma(VIA)        ? CONSUMERS * TMA_STAGING_PER_CONSUMER
                                                                      : 0;
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + STAGING_BYTES + 1024;  // + slack to align the ring
};
constexpr int MAX_STAGES = 4;
constexpr int STORER_THREADS = 96;  // Handoff: warps 1-3 of the producer warpgroup
static_assert(Layout<StoreVia::WarpSlices>::SMEM_BYTES + 240 <= 232448, "over the 227 KiB opt-in (240: the static mbarriers and work ids)");
static_assert(Layout<StoreVia::Handoff>::SMEM_BYTES + 240 <= 232448, "over the 227 KiB opt-in (240: the static mbarriers and work ids)");
static_assert(Layout<StoreVia::ConsumerTmaDouble>::SMEM_BYTES == Layout<StoreVia::ConsumerTma>::SMEM_BYTES, "the same staging");
static_assert(Layout<StoreVia::ConsumerTmaDeep>::SMEM_BYTES + 240 <= 232448, "over the 227 KiB opt-in (240: the static mbarriers and work ids)");
static_assert(Layout<StoreVia::ConsumerTma>::SMEM_BYTES + 240 <= 232448, "over the 227 KiB opt-in (240: the static mbarriers and work ids)");

// The probes' knobs (ladder 12), set on the host per run; run() copies them into Params.
//   stagger_ns, stagger_phases (--stagger-ns): block b starts (b % stagger_phases) · stagger_ns later,
//     so that the blocks' equal tiles end, and their results are written, at different moments;
//   pause_ns (--pause-ns): ProbePause's wait per tile in place of an epilogue;
//   lag_ns (--lag-ns): the second consumer warpgroup starts lag_ns late, so that the two reach each
//     tile boundary at different moments (one's epilogue under the other's wgmmas) for as long as
//     the shared ring lets them stay out of step;
//   trace (--trace): one more launch of each side with Params::trace, block 0's per-tile clock
//     marks, summarised, with the SM clock they imply (cycles over global-timer nanoseconds);
//   soak_ms (--soak-ms): after the timed rounds, each side alone back to back for soak_ms, its
//     wall-clock window printed (to line up with nvidia-smi's clock and power samples) with its
//     time a launch.
//   short_every, short_kind (--short-every, --short-kind; NN and NT): every short_every-th work item
//     (t % short_every == 0) does part of a tile's work, its result wrong by design. Kind 1, narrow:
//     both consumers on the tile's first 64 rows, each with half the columns (wgmma m64n128k16 from
//     the same stages: the addon's v14, 4bdf8cd); kind 2, half k: the tile's first half of its k-tiles
//     only, whole m64n256k16 wgmmas (the producer loads only those). Whether cutting some tiles' work
//     lowers the clock under the power limit by more than it saves (v13, v14 in grouped-gemm.md), and
//     whether the instruction shape or the tile's shorter duration does it. short_wave
//     (--short-wave 1): whole waves short instead (every short_every-th wave of gridDim.x items),
//     so every block's tiles keep the same length at the same time (session 19: single short items
//     let the blocks drift apart, and the main layer's DRAM reads doubled).
//   gather_x, gather_rows, gather_ld (ladder 13; NN only): A's rows are not read from a permuted
//     [M, K] matrix by TMA but gathered by the producer warp from x (rows of gather_ld elements; row r
//     of the product is x[gather_rows[r]], a zero row for -1 or r ≥ M): the lanes cp.async a stage's
//     128 rows in 16-byte chunks into the 128-byte swizzle and arrive on the stage's full barrier when
//     they land (cp.async.mbarrier.arrive.noinc; the barrier then counts 32 lanes beside the TMA's
//     arrive for B); the consumers fence the async proxy after each stage's wait, since cp.async writes
//     through the generic proxy and wgmma reads through the async one. The permute fused into the up
//     projection's loads (issue 20): no [M, K] copy of x's rows is written or read.
// 0 / false / null: not used.
struct ProbeKnobs {
  const __nv_bfloat16* gather_x = nullptr;
  const int32_t* gather_rows = nullptr;
  int gather_ld = 0;
  // How a gathered stage completes (ladder 13): 0 each lane's cp.async arrival on the full barrier,
  // the consumers fencing the async proxy after each wait; 1 each lane waits for its copies one stage
  // behind (cp.async.wait_group 1), fences the async proxy itself and arrives, the consumers
  // fence nothing; 2 (a probe, not memory-model safe) as 0 with no fence at all: what the fence costs;
  // 3 no cp.async: each lane issues a TMA load of one row (a box of 64 columns × 1 row of x, whose
  // tensor map run() builds in map_a) for 4 of the stage's rows, straight into the 128-byte swizzle
  // (TMA swizzles by the destination's address bits), the stage completing on its bytes alone.
  int gather_completion = 0;
  int gather_tokens = 0;  // x's rows (mode 3's tensor map; a token of -1 loads row gather_tokens: zeros)
  int stagger_ns = 0, stagger_phases = 0;
  int pause_ns = 0;
  int lag_ns = 0;
  int short_every = 0, short_kind = 0;
  bool short_wave = false;
  // Dynamic work items (ladder 12 --dynamic; the hand-off, NN and NT): each block's producer thread
  // draws its next work item from tile_counter[0] and passes it to its consumers and storers through
  // a ring of kWorkSlots ids in shared memory, instead of the static b, b + gridDim.x, …: blocks whose
  // tiles end early take the next items rather than running ahead into far ones, so the items in
  // flight stay a window of about gridDim.x consecutive ones. tile_counter[1] counts the blocks done;
  // the last one zeroes both, so the two ints are zeroed once at allocation and every launch after
  // finds them zero (stream order), with no memset in the timed launches.
  int* tile_counter = nullptr;
  bool trace = false;
  int soak_ms = 0;
};

// Params::trace, per tile: clock64 at its start (after tile_at), its first full stage, its last
// wgmma and its epilogue's end; the global timer at its start; clock64 before its tile_at.
constexpr int kTracePoints = 6;
constexpr int kTraceGlobalTimer = 4, kTraceBeforeLookup = 5;

struct Params {
  const int32_t* offsets;     // [E+1]
  const int32_t* tile_start;  // [E+1] (NN, NT)
  void* out;
  const __nv_bfloat16* aux;   // DSwiGLU: the saved g
  __nv_bfloat16* aux_out;     // SwiGLU: where to save g (may be null)
  int M, E;
  int rows, cols, inner;      // the product out[rows, cols] (per group for TN); inner: NN/NT only
  int n_tiles, tn_m_tiles;    // tiles along cols; TN: tiles along rows (per group)
  bool accumulate;
  ProbeKnobs probe;  // the host's trace and soak knobs travel unused
  // --trace: block 0's consumers record kTracePoints marks per tile into
  // trace[consumer][tile][kTracePoints] (trace_tiles tiles at most); after those, at
  // block_times(trace, trace_tiles)[2 * block + {0, 1}], every block's global timer when its first
  // consumer starts its tiles, and the latest of its consumers' and storers' ends (after their own
  // tensor stores have landed; plain stores are not waited for). Null: nothing recorded.
  long long* trace;
  int trace_tiles;
};

// The global timer (ns, whatever the SM clock does): the probes' waits and the trace's marks.
__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Where --trace keeps every block's start and end (global timer, ns): after block 0's tile marks.
__host__ __device__ inline long long* block_times(long long* trace, int trace_tiles) {
  return trace + size_t(2) * trace_tiles * kTracePoints;
}

// --trace: this block's start (which 0, one writer) or a candidate for its end (which 1: the latest
// of the writers wins).
__device__ __forceinline__ void mark_block_time(const Params& p, int which) {
  const uint64_t ns = global_ns();
  long long* slot = block_times(p.trace, p.trace_tiles) + 2 * blockIdx.x + which;
  if (which == 0) *slot = (long long)ns;
  else atomicMax(reinterpret_cast<unsigned long long*>(slot), (unsigned long long)ns);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

// The probes' waits: spin on the global timer for ns nanoseconds.
__device__ __forceinline__ void spin_ns(uint64_t ns) {
  const uint64_t t0 = global_ns();
  while (global_ns() - t0 < ns) {
  }
}

// ---- mbarriers ----------------------------------------------------------------------------------
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// Waits until the phase with the given parity has completed. A fresh barrier counts its phase
// "before the first" (parity 1) as complete, which lets the producer fill every stage once.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  while (!done) {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_u32(bar)), "r"(parity)
        : "memory");
  }
}

// ---- TMA ------------------------------------------------------------------------------------------
__device__ __forceinline__ void tma_load_2d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
                   smem_u32(dst)),
               "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
               : "memory");
}
__device__ __forceinline__ void tma_load_3d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(
          smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}

// ---- wgmma ----------------------------------------------------------------------------------------
// Shared-memory matrix descriptor, 128-byte swizzle: start address, leading-dimension byte offset
// (LBO), stride-dimension byte offset (SBO), all in 16-byte units. K-major: SBO = 1024 (the next 8
// rows), LBO unused. MN-major: LBO = the next 64 elements along m/n, SBO = the next 8 rows along k.
__device__ __forceinline__ uint64_t smem_desc(const void* p, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  uint64_t d = 0;
  d |= uint64_t((smem_u32(p) & 0x3FFFF) >> 4);
  d |= uint64_t((lbo_bytes >> 4) & 0x3FFF) << 16;
  d |= uint64_t((sbo_bytes >> 4) & 0x3FFF) << 32;
  d |= uint64_t(1) << 62;  // 128-byte swizzle
  return d;
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

// ---- work items -----------------------------------------------------------------------------------
struct Tile {
  int group, row0, row_end, col0;
  int k_begin, k_end, k_tiles;  // the inner range: NN/NT all of it; TN the group's rows
  int64_t out_base;             // TN: the group's [rows, cols] block of out
};

// Work item t of the launch. NN/NT: a band of GROUP_M m-tiles (over all groups, in order) sweeps
// every n-tile, so the weight columns a band needs stay in L2 while its m-tiles use them.
// TN: group-major, so the blocks in flight share one group's rows of a and b.
template <GemmMode MODE>
__device__ __forceinline__ Tile tile_at(const Params& p, int t, int m_tiles) {
  Tile tile;
  if constexpr (MODE == GemmMode::TN) {
    const int per_group = p.tn_m_tiles * p.n_tiles;
    tile.group = t / per_group;
    tile.row0 = ((t % per_group) / p.n_tiles) * BM;
    tile.col0 = (t % p.n_tiles) * BN;
    tile.row_end = p.rows;
    tile.k_begin = min(max(__ldg(p.offsets + tile.group), 0), p.M);
    tile.k_end = min(max(__ldg(p.offsets + tile.group + 1), tile.k_begin), p.M);
    tile.out_base = int64_t(tile.group) * p.rows * p.cols;
  } else {
    const int per_band = GROUP_M * p.n_tiles;
    const int band_m = (t / per_band) * GROUP_M, band_rows = min(m_tiles - band_m, GROUP_M);
    const int m = band_m + (t % per_band) % band_rows;
    tile.col0 = ((t % per_band) / band_rows) * BN;
    int lo = 0, hi = p.E - 1;  // the group owning m-tile m: the last e with tile_start[e] <= m
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if (__ldg(p.tile_start + mid) <= m) lo = mid;
      else hi = mid - 1;
    }
    tile.group = lo;
    const int begin = min(max(__ldg(p.offsets + lo), 0), p.M);
    tile.row_end = min(max(__ldg(p.offsets + lo + 1), begin), p.M);
    tile.row0 = begin + (m - __ldg(p.tile_start + lo)) * BM;
    tile.k_begin = 0;
    tile.k_end = p.inner;
    tile.out_base = 0;
  }
  tile.k_tiles = (tile.k_end - tile.k_begin + BK - 1) / BK;
  return tile;
}

// ---- epilogue -------------------------------------------------------------------------------------
__device__ __forceinline__ void store_pair(float* out, int64_t idx, float v0, float v1, bool accumulate) {
  float2 v = make_float2(v0, v1);
  if (accumulate) {
    float2 old = *reinterpret_cast<const float2*>(out + idx);
    v.x += old.x;
    v.y += old.y;
  }
  *reinterpret_cast<float2*>(out + idx) = v;
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* out, int64_t idx, float v0, float v1, bool) {
  *reinterpret_cast<__nv_bfloat162*>(out + idx) = __floats2bfloat162_rn(v0, v1);
}

// A consumer warpgroup's 64×256 accumulators: thread (warp w, lane l) holds rows 16w + l/4 (+8) and,
// in each 8-column block j, columns 8j + 2(l%4) and the next (d[4j..4j+3]). cols % 8 == 0 here, so
// a pair is either wholly inside or wholly outside.
template <GemmEpilogue EPI, typename OutT>
__device__ __forceinline__ void store_tile(const Params& p, const float (&d)[128], const Tile& tile, int wg_row0) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
  const int cols = p.cols;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = wg_row0 + warp * 16 + (lane >> 2) + half * 8;
    if (r >= tile.row_end) continue;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const int c = tile.col0 + j * 8 + (lane & 3) * 2;
      if (c >= cols) continue;
      const float v0 = d[j * 4 + half * 2], v1 = d[j * 4 + half * 2 + 1];
      if constexpr (EPI == GemmEpilogue::Store) {
        store_pair(static_cast<OutT*>(p.out), tile.out_base + int64_t(r) * cols + c, v0, v1, p.accumulate);
      } else if constexpr (EPI == GemmEpilogue::SwiGLU) {
        // (v0, v1) = (g1, g3) of hidden unit c/2: W1 and W3 columns interleave.
        static_cast<__nv_bfloat16*>(p.out)[int64_t(r) * (cols / 2) + c / 2] = __float2bfloat16_rn(silu(v0) * v1);
        if (p.aux_out) *reinterpret_cast<__nv_bfloat162*>(p.aux_out + int64_t(r) * cols + c) = __floats2bfloat162_rn(v0, v1);
      } else {  // DSwiGLU: (v0, v1) = dh of hidden units c, c+1; the saved g holds (g1, g3) for each.
        const int64_t base = int64_t(r) * (2 * cols) + 2 * c;
        const uint2 g = *reinterpret_cast<const uint2*>(p.aux + base);  // g1(c) g3(c) g1(c+1) g3(c+1)
        const __nv_bfloat162 ga = *reinterpret_cast<const __nv_bfloat162*>(&g.x), gb = *reinterpret_cast<const __nv_bfloat162*>(&g.y);
        const float g1a = __low2float(ga), g3a = __high2float(ga), g1b = __low2float(gb), g3b = __high2float(gb);
        uint2 dg;
        *reinterpret_cast<__nv_bfloat162*>(&dg.x) = __floats2bfloat162_rn(v0 * g3a * silu_grad(g1a), v0 * silu(g1a));
        *reinterpret_cast<__nv_bfloat162*>(&dg.y) = __floats2bfloat162_rn(v1 * g3b * silu_grad(g1b), v1 * silu(g1b));
        *reinterpret_cast<uint2*>(static_cast<__nv_bfloat16*>(p.out) + base) = dg;
      }
    }
  }
}

// The Store epilogue through shared memory: each consumer warp drops its 16×256 accumulators into its
// own 16×32 fp32 slice, 32 columns at a time, and reads them back as whole rows: 16-byte (fp32) or
// 8-byte (bf16) pieces, a warp instruction covering 4 rows × 32 columns. With accumulate, all of a
// slice's loads of the old values are issued before its stores (else each load waits behind the
// previous store: one memory latency per piece).
template <typename OutT>
__device__ __forceinline__ void store_tile_staged(const Params& p, const float (&d)[128], const Tile& tile, int wg_row0, uint32_t staging) {
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
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(st_addr + uint32_t((h * 8 * LD + jj * 8) * 4)),
                     "f"(d[j * 4 + h * 2]), "f"(d[j * 4 + h * 2 + 1]) : "memory");
    }
    __syncwarp();
    float4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u)
      asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                   : "=f"(v[u].x), "=f"(v[u].y), "=f"(v[u].z), "=f"(v[u].w)
                   : "r"(ld_addr + uint32_t(4 * u * LD * 4)) : "memory");
    __syncwarp();  // read back before the next slice lands
    if (col + s * SLICE >= p.cols) continue;  // cols % 8 == 0: a piece is all in or all out (lanes past it skip)
    OutT* const dst = out + s * SLICE;
    if constexpr (sizeof(OutT) == 4) {
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
    } else {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        uint2 b;
        *reinterpret_cast<__nv_bfloat162*>(&b.x) = __floats2bfloat162_rn(v[u].x, v[u].y);
        *reinterpret_cast<__nv_bfloat162*>(&b.y) = __floats2bfloat162_rn(v[u].z, v[u].w);
        if (row + 4 * u < tile.row_end) *reinterpret_cast<uint2*>(dst + u * pitch4) = b;
      }
    }
  }
}

// Handoff, consumer side: this warpgroup's 64 rows of the tile (bf16: all 256 columns; fp32: the
// 128 columns of `half`) into the shared tile as pairs: row 16w + l/4 (+8), columns 8j + 2(l%4).
template <typename OutT>
__device__ __forceinline__ void handoff_put(const float (&d)[128], uint32_t tile_smem, int consumer, int half) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
  const int row = consumer * 64 + warp * 16 + (lane >> 2);
  if constexpr (sizeof(OutT) == 2) {
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
  } else {
    constexpr int LD = Layout<StoreVia::Handoff>::TILE_LD_F32;
    const uint32_t base = tile_smem + uint32_t((row * LD + (lane & 3) * 2) * 4);
#pragma unroll
    for (int jj = 0; jj < BN / 16; ++jj) {
      const int j = (half ? BN / 16 : 0) + jj;  // d's 8-column block; jj its place in the half
#pragma unroll
      for (int h = 0; h < 2; ++h)
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(base + uint32_t((h * 8 * LD + jj * 8) * 4)), "f"(d[j * 4 + h * 2]),
                     "f"(d[j * 4 + h * 2 + 1])
                     : "memory");
    }
  }
}

// Handoff, storer side: the staged tile (or fp32 half) to global memory, one 512-byte row per warp
// instruction (16 bytes per lane), rows past the tile's end (the group's, or M) and columns past
// cols skipped.
template <typename OutT>
__device__ __forceinline__ void handoff_drain(const Params& p, const Tile& tile, uint32_t tile_smem, int storer, int half) {
  constexpr bool BF16 = sizeof(OutT) == 2;
  constexpr int LD_BYTES = BF16 ? Layout<StoreVia::Handoff>::TILE_LD_BF16 * 2 : Layout<StoreVia::Handoff>::TILE_LD_F32 * 4;
  constexpr int PER_LANE = 16 / int(sizeof(OutT));  // values per 16-byte piece
  const int lane = storer & 31, warp = storer >> 5;
  const int col = tile.col0 + (BF16 ? 0 : half * (BN / 2)) + lane * PER_LANE;
  if (col >= p.cols) return;  // cols % 8 == 0: a lane's piece is all in or all out
  OutT* const out = static_cast<OutT*>(p.out) + tile.out_base + col;
  const int rows = min(BM, tile.row_end - tile.row0);
#pragma unroll 4
  for (int r = warp; r < rows; r += STORER_THREADS / 32) {
    uint4 v;
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(tile_smem + uint32_t(r * LD_BYTES + lane * 16))
                 : "memory");
    *reinterpret_cast<uint4*>(out + int64_t(tile.row0 + r) * p.cols) = v;
  }
}

// ConsumerTma (step 12; fp32 TN): this warpgroup's 64×256 accumulators leave in four quarters of 64
// columns through its own staging (two [64 rows][32 floats] boxes in the 128-byte swizzle: 16-byte
// chunk c of row r at chunk c ^ (r % 8)), each quarter by two TMA tensor stores that the warpgroup's
// first thread issues into the [E][K][N] fp32 map; the staging is written again only once the engine
// has read the previous quarter out (wait_group.read). A thread's pairs in quarter q: row
// 16w + l/4 (+8), local column 8jl + 2(l%4): box jl/4, chunk 2(jl%4) + (l%4)/2, byte 8(l%2) in it;
// the 8 rows of a store have distinct r % 8, so it takes the least wavefronts (two).
__device__ __forceinline__ void consumer_bar(int consumer) {
  if (consumer == 0) asm volatile("bar.sync 2, 128;\n" ::: "memory");
  else asm volatile("bar.sync 3, 128;\n" ::: "memory");
}
__device__ __forceinline__ void store_tile_tma(const float (&d)[128], const Tile& tile, int consumer, uint32_t staging,
                                               const CUtensorMap* map_out) {
  constexpr int BOX = Layout<StoreVia::ConsumerTma>::TMA_BOX_BYTES;
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3, lane128 = threadIdx.x & 127;
#pragma unroll
  for (int q = 0; q < BN / 64; ++q) {
    if (lane128 == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
    consumer_bar(consumer);  // the previous quarter (or tile) read out of the staging
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp * 16 + (lane >> 2) + 8 * h;
#pragma unroll
      for (int jl = 0; jl < 8; ++jl) {
        const int j = q * 8 + jl, chunk = 2 * (jl & 3) + ((lane & 3) >> 1);
        const uint32_t at = staging + uint32_t((jl >> 2) * BOX + r * 128 + ((chunk ^ (r & 7)) * 16) + (lane & 1) * 8);
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(at), "f"(d[j * 4 + h * 2]), "f"(d[j * 4 + h * 2 + 1]) : "memory");
      }
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the engine reads what st.shared wrote
    consumer_bar(consumer);
    if (lane128 == 0) {
#pragma unroll
      for (int b = 0; b < 2; ++b)
        asm volatile(
            "cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                reinterpret_cast<uint64_t>(map_out)),
            "r"(staging + uint32_t(b * BOX)), "r"(tile.col0 + 64 * q + 32 * b), "r"(tile.row0 + 64 * consumer), "r"(tile.group)
            : "memory");
      asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
    }
  }
}

// ConsumerTmaDouble, ConsumerTmaDeep: the staging as BOXES [64 rows][32 floats] boxes taken in
// turn (2 or 5); this warpgroup's tile leaves in eight eighths of 32 columns, one tensor store each.
// The n-th eighth this warpgroup stores (counted over its tiles: `sent`) goes to box n % BOXES once
// the engine has read eighth n - BOXES out of it (wait_group.read BOXES - 1: all but the latest
// BOXES - 1 groups), so the warpgroup writes one box while the engine reads the others, and the last
// BOXES - 1 eighths of a tile still drain while the next tile's mainloop runs. Fragment placement as
// above with the eighth's four column groups j = 4e .. 4e + 3 (chunk 2·jl + (l%4)/2).
template <int BOXES, StoreVia VIA = StoreVia::ConsumerTmaDeep>
__device__ __forceinline__ void store_tile_tma_boxes(const float (&d)[128], const Tile& tile, int consumer, uint32_t staging,
                                                     const CUtensorMap* map_out, uint32_t& sent) {
  constexpr bool EVICT_FIRST = VIA == StoreVia::ConsumerTmaDeepEvictFirst, L2_RESIDENT = VIA == StoreVia::ProbeL2Resident;
  uint64_t policy = 0;
  if constexpr (EVICT_FIRST) asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  constexpr int BOX = Layout<StoreVia::ConsumerTmaDouble>::TMA_BOX_BYTES;
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3, lane128 = threadIdx.x & 127;
  // ProbeL2Resident: this block's own slot (the layer's dW13 has 56 × 16 tiles in a group).
  const int col0 = L2_RESIDENT ? int(blockIdx.x / 56 % 16) * BN : tile.col0;
  const int row0 = L2_RESIDENT ? int(blockIdx.x % 56) * BM : tile.row0;
  const int group = L2_RESIDENT ? 0 : tile.group;
#pragma unroll
  for (int e = 0; e < BN / 32; ++e, ++sent) {
    const uint32_t box = staging + uint32_t((sent % BOXES) * BOX);
    constexpr bool SYNC = !skips_box_sync(VIA), FENCE = SYNC && VIA != StoreVia::ProbeBoxesNoFence;
    if (lane128 == 0) asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(BOXES - 1) : "memory");
    if (SYNC) consumer_bar(consumer);  // eighth sent - BOXES read out of this box
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp * 16 + (lane >> 2) + 8 * h;
      // 12d: lanes of odd rows write column group jl ^ 2 (an 8-byte store is served half a warp at a
      // time; with one jl its 16 pairs fall on 4 chunks twice: two-way bank conflicts).
      constexpr bool SPREAD = VIA == StoreVia::ConsumerTmaDeepSpread || VIA == StoreVia::ProbeSpreadNoSync;
      const bool swap = SPREAD && ((lane >> 2) & 1);
#pragma unroll
      for (int jl = 0; jl < 4; ++jl) {
        const int j = e * 4 + jl, js = e * 4 + (jl ^ 2), chunk = 2 * (swap ? jl ^ 2 : jl) + ((lane & 3) >> 1);
        const float v0 = swap ? d[js * 4 + h * 2] : d[j * 4 + h * 2], v1 = swap ? d[js * 4 + h * 2 + 1] : d[j * 4 + h * 2 + 1];
        const uint32_t at = box + uint32_t(r * 128 + ((chunk ^ (r & 7)) * 16) + (lane & 1) * 8);
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(at), "f"(v0), "f"(v1) : "memory");
      }
    }
    if (FENCE) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the engine reads what st.shared wrote
    if (SYNC) consumer_bar(consumer);
    const bool issue = !skips_tensor_stores(VIA) && (VIA != StoreVia::ProbeHalfStores || e % 2 == 0);
    if (lane128 == 0 && issue) {
      if constexpr (EVICT_FIRST)
        asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group.L2::cache_hint [%0, {%2, %3, %4}], [%1], %5;\n" ::"l"(
                         reinterpret_cast<uint64_t>(map_out)),
                     "r"(box), "r"(col0 + 32 * e), "r"(row0 + 64 * consumer), "r"(group), "l"(policy)
                     : "memory");
      else
        asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                         reinterpret_cast<uint64_t>(map_out)),
                     "r"(box), "r"(col0 + 32 * e), "r"(row0 + 64 * consumer), "r"(group)
                     : "memory");
      asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
    }
  }
}

// The probe's narrow tiles (ProbeKnobs::short_kind 1): wgmma m64n128k16 into d[0..63] (the first half
// of the m64n256 fragment, in the same order). The addon does not ship it (v14 was reverted).
template <int TRANS_B>
__device__ __forceinline__ void probe_wgmma_m64n128k16(float (&d)[128], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %67, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, %66;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "n"(TRANS_B), "r"(scale_d));
}
// Ladder 13's producer (ProbeKnobs::gather_x; NN): the whole warp walks the work items. Lane 0
// issues B's TMA loads and the expect_tx for B's bytes alone. The stage's 128 A rows go 4 at a time,
// 8 lanes to a row, lane l copying 16-byte chunk c = l % 8 of row 4·j + l / 8 (j = 0..31): each
// warp instruction reads 4 whole 128-byte row pieces (coalesced), and writes chunk c of row r to
// chunk c ^ (r % 8) of its 128-byte row (the 128-byte swizzle TMA would write). A row's token is
// loaded once per tile by the lane r % 32 and passed round by a shuffle. Every lane arrives on the
// full barrier once its copies land. Rows past M, tokens -1 and columns past the inner dimension are
// zero-filled (a source size of 0), as TMA zero-fills what lies outside its box.
template <GemmMode MODE, int STAGES>
__device__ __forceinline__ void gather_producer(const Params& p, const CUtensorMap& map_x, const CUtensorMap& map_b, unsigned char* ring,
                                                uint64_t* full, uint64_t* empty, int m_tiles, int total) {
  // Mode 1 arrives for a stage only after issuing the next: with 2 stages its empty wait would need
  // the arrival it has not made yet.
  static_assert(STAGES >= 3, "gather_completion 1 needs 3 stages or more");
  const int lane = threadIdx.x & 31, chunk = lane & 7, quad = lane >> 3;
  const bool by_rows = p.probe.gather_completion == 3;
  if (lane == 0) asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_b)) : "memory");
  if (lane == 0 && by_rows) asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_x)) : "memory");
  const int ld = p.probe.gather_ld;
  int stage = 0, prev_stage = -1;  // prev_stage: mode 1's stage whose arrival is still to come
  uint32_t round = 0;
  for (int t = blockIdx.x; t < total; t += gridDim.x) {
    const Tile tile = tile_at<MODE>(p, t, m_tiles);
    int token[4];  // rows lane + 32·i of the tile
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = tile.row0 + lane + 32 * i;
      token[i] = row < p.M ? __ldg(p.probe.gather_rows + row) : -1;
    }
    for (int kt = 0; kt < tile.k_tiles; ++kt) {
      mbar_wait(&empty[stage], (round & 1) ^ 1);
      unsigned char* sa = ring + stage * STAGE_BYTES;
      unsigned char* sb = sa + A_BYTES;
      const int k0 = tile.k_begin + kt * BK;
      if (lane == 0) {
        mbar_arrive_expect_tx(&full[stage], by_rows ? A_BYTES + B_BYTES : B_BYTES);
#pragma unroll
        for (int j = 0; j < BN / 64; ++j) tma_load_3d(sb + j * (BK * 128), &map_b, &full[stage], tile.col0 + 64 * j, k0, tile.group);
      }
      if (by_rows) {
        __syncwarp();  // the bytes expected before any row's bytes land
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = lane + 32 * i;
          tma_load_2d(sa + r * 128, &map_x, &full[stage], k0, token[i] >= 0 ? token[i] : p.probe.gather_tokens);
        }
      } else {
        const bool column_in = k0 + 8 * chunk < p.inner;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int jj = 0; jj < 8; ++jj) {
            const int r = 32 * i + 4 * jj + quad;  // this lane's row: the token lane r % 32 holds
            const int tok = __shfl_sync(0xffffffffu, token[i], 4 * jj + quad);
            const uint32_t bytes = tok >= 0 && column_in ? 16u : 0u;
            const __nv_bfloat16* src = bytes ? p.probe.gather_x + (size_t(tok) * ld + k0 + 8 * chunk) : p.probe.gather_x;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(sa) + uint32_t(r * 128 + ((chunk ^ (r & 7)) << 4))),
                         "l"(src), "r"(bytes)
                         : "memory");
          }
        }
        if (p.probe.gather_completion == 1) {
          // This stage's copies as one group; the previous stage's have landed once at most one group
          // is pending: fence them into the async proxy (wgmma reads through it), then arrive.
          asm volatile("cp.async.commit_group;\n" ::: "memory");
          if (prev_stage >= 0) {
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            mbar_arrive(&full[prev_stage]);
          }
          prev_stage = stage;
        } else {
          asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(&full[stage])) : "memory");
        }
      }
      if (++stage == STAGES) {
        stage = 0;
        ++round;
      }
    }
  }
  // No copy (nor its barrier arrival) left in flight when the warp exits; mode 1's last stage arrives here.
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  if (prev_stage >= 0) {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    mbar_arrive(&full[prev_stage]);
  }
}

// The probe's rule: is work item t a short one, and of which kind (0: a whole tile).
__device__ __forceinline__ int probe_short_kind(const ProbeKnobs& k, int t) {
  // short_wave: whole waves (every short_every-th run of gridDim.x work items, as the blocks take
  // them: block b's i-th item is b + i·gridDim.x) instead of single items: the blocks stay in step.
  const int unit = k.short_wave ? t / int(gridDim.x) : t;
  return k.short_every > 0 && unit % k.short_every == 0 ? k.short_kind : 0;
}
// The k-tiles work item t runs (producer and consumers alike): half of them for a kind-2 short tile.
__device__ __forceinline__ int probe_k_tiles(const ProbeKnobs& k, int t, int k_tiles) {
  return probe_short_kind(k, t) == 2 ? (k_tiles + 1) / 2 : k_tiles;
}

// The work items a role of the block walks (ProbeKnobs::tile_counter): static, item i is
// blockIdx.x + i·gridDim.x; dynamic, the producer thread draws each from the counter and publishes it
// in slot i % kWorkSlots, which every consumer and storer warp reads and releases (one arrival a warp).
// Past the last item the id is `total` (every role stops there). With dynamic items, --trace's
// "epilogue end to next lookup" includes the wait for the next id.
// Any number of slots is free of deadlock (a reader releases item i - kWorkSlots having needed only
// loads the producer issued before it blocks); 8 lets the producer run as far ahead as its ring.
constexpr int kWorkSlots = 8;
struct WorkItems {
  int* ids;  // shared: kWorkSlots ids
  uint64_t* filled;
  uint64_t* released;
  int* counter;  // null: static
  __device__ __forceinline__ int produce(int i, int total) const {
    if (counter == nullptr) return int(blockIdx.x) + i * int(gridDim.x);
    const int slot = i % kWorkSlots;
    mbar_wait(&released[slot], ((i / kWorkSlots) & 1) ^ 1);
    const int t = min(atomicAdd(counter, 1), total);
    if (t == total) {
      // This block's last draw. The last block to get here zeroes both counters for the next launch:
      // every other block's draws come before its count (the fence), so none can follow the reset.
      __threadfence();
      if (atomicAdd(counter + 1, 1) == int(gridDim.x) - 1) {
        atomicExch(counter, 0);
        atomicExch(counter + 1, 0);
      }
    }
    *reinterpret_cast<volatile int*>(ids + slot) = t;
    mbar_arrive(&filled[slot]);  // release: the id is visible to the threads that acquire the phase
    return t;
  }
  __device__ __forceinline__ int consume(int i) const {
    if (counter == nullptr) return int(blockIdx.x) + i * int(gridDim.x);
    const int slot = i % kWorkSlots;
    mbar_wait(&filled[slot], (i / kWorkSlots) & 1);
    const int t = *reinterpret_cast<volatile int*>(ids + slot);
    __syncwarp();  // every lane's read before its warp releases the slot
    if ((threadIdx.x & 31) == 0) mbar_arrive(&released[slot]);
    return t;
  }
};

// ---- the kernel -----------------------------------------------------------------------------------
template <GemmMode MODE, GemmEpilogue EPI, typename OutT, StoreVia VIA>
__global__ void __launch_bounds__(THREADS, 1)
    grouped_gemm_wgmma_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                              const __grid_constant__ CUtensorMap map_out, Params p) {
  constexpr bool TN = MODE == GemmMode::TN;
  constexpr bool A_MN_MAJOR = TN;                     // a_eᵀ: its rows (k of a) are contiguous
  constexpr bool B_MN_MAJOR = MODE != GemmMode::NT;  // NN: b_e [inner, cols]; TN: b_e [rows_e, cols]
  static_assert(VIA == StoreVia::Registers || EPI == GemmEpilogue::Store, "staged epilogues store plain results");
  static_assert(!by_consumer_tma(VIA) || (TN && sizeof(OutT) == 4), "ConsumerTma: fp32 dW only (its map is [E][K][N])");
  constexpr int STAGES = Layout<VIA>::STAGES;
  constexpr int HANDOFFS = sizeof(OutT) == 4 ? 2 : 1;  // Handoff: pieces per tile (fp32: two halves)
  extern __shared__ unsigned char smem_raw[];
  // The 128-byte swizzle pattern repeats every 1024 bytes: the ring starts on such a boundary, so the
  // descriptors' base-offset field stays 0.
  unsigned char* ring = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __shared__ __align__(8) uint64_t full[MAX_STAGES], empty[MAX_STAGES];
  __shared__ __align__(8) uint64_t tile_full, tile_empty;  // Handoff: consumers → storers → consumers
  __shared__ __align__(8) uint64_t work_filled[kWorkSlots], work_released[kWorkSlots];  // dynamic work items
  __shared__ int work_ids[kWorkSlots];
  const WorkItems work{work_ids, work_filled, work_released, p.probe.tile_counter};
  const uint32_t staging_smem = smem_u32(ring + STAGES * STAGE_BYTES);

  const int wg = threadIdx.x >> 7;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      // The producer's arrive.expect_tx (the copy engine adds the bytes); gathering, also one
      // cp.async arrival from each lane of the producer warp.
      mbar_init(&full[s], VIA == StoreVia::HandoffGatherA && MODE == GemmMode::NN && p.probe.gather_completion != 3 ? 1 + 32 : 1);
      mbar_init(&empty[s], CONSUMERS);  // one arrive per consumer warpgroup
    }
    mbar_init(&tile_full, CONSUMERS * 128);  // every consumer thread, after its part of the tile
    mbar_init(&tile_empty, STORER_THREADS);  // every storer thread, after reading the tile
    for (int s = 0; s < kWorkSlots; ++s) {
      mbar_init(&work_filled[s], 1);                                           // the producer thread
      mbar_init(&work_released[s], CONSUMERS * 4 + (handoff(VIA) ? STORER_THREADS / 32 : 0));  // every reader warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (p.probe.stagger_ns > 0 && p.probe.stagger_phases > 1)
    spin_ns(uint64_t(blockIdx.x % p.probe.stagger_phases) * uint64_t(p.probe.stagger_ns));

  const int m_tiles = TN ? p.tn_m_tiles : __ldg(p.tile_start + p.E);
  const int total = TN ? p.E * p.tn_m_tiles * p.n_tiles : m_tiles * p.n_tiles;

  if (wg == 0) {
    // Producer: few registers; one thread issues every copy (gathering: the whole warp, below, on 56
    // registers, the consumers then on 224). setmaxnreg.inc waits for registers the CTA's pool holds,
    // and the pool is what the launch gave it (168 · 384 = 64512; launch_layout checks the 168):
    // 40 · 128 + 232 · 256 and 56 · 128 + 224 · 256 both add up to it. (48/232 would leave the
    // consumers 1024 short, waiting for ever.)
    if constexpr (VIA == StoreVia::HandoffGatherA && MODE == GemmMode::NN) asm volatile("setmaxnreg.dec.sync.aligned.u32 56;\n");
    else asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    // Ladder 13: the whole warp gathers A; the storers as ever.
    constexpr bool gathered = VIA == StoreVia::HandoffGatherA && MODE == GemmMode::NN;  // run() launches it for NN only
    if (gathered && threadIdx.x < 32) {
      if constexpr (gathered) gather_producer<MODE, STAGES>(p, map_a, map_b, ring, full, empty, m_tiles, total);
    } else if (!gathered && threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_a)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_b)) : "memory");
      int stage = 0;
      uint32_t round = 0;
      for (int i = 0;; ++i) {
        const int t = work.produce(i, total);
        if (t >= total) break;
        const Tile tile = tile_at<MODE>(p, t, m_tiles);
        const int k_tiles = TN ? tile.k_tiles : probe_k_tiles(p.probe, t, tile.k_tiles);
        for (int kt = 0; kt < k_tiles; ++kt) {
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
    } else if constexpr (handoff(VIA)) {
      if (threadIdx.x >= 32) {
        // Storers: walk the same tiles; each piece the consumers hand over is copied out.
        const int storer = threadIdx.x - 32;
        uint32_t n = 0;  // pieces done
        for (int i = 0;; ++i) {
          const int t = work.consume(i);
          if (t >= total) break;
          const Tile tile = tile_at<MODE>(p, t, m_tiles);
          for (int half = 0; half < HANDOFFS; ++half, ++n) {
            mbar_wait(&tile_full, n & 1);
            handoff_drain<OutT>(p, tile, staging_smem, storer, half);
            mbar_arrive(&tile_empty);
          }
        }
        if (p.trace != nullptr && storer == 0) mark_block_time(p, 1);
      }
    }
  } else {
    if constexpr (VIA == StoreVia::HandoffGatherA && MODE == GemmMode::NN) asm volatile("setmaxnreg.inc.sync.aligned.u32 224;\n");
    else asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int consumer = wg - 1;
    float d[128];
    int stage = 0;
    uint32_t round = 0;
    uint32_t n = 0;           // Handoff: pieces handed over (the barriers' phase)
    uint32_t boxes_sent = 0;  // ConsumerTmaDouble/Deep: eighths stored (which box is next)
    if (consumer == 1 && p.probe.lag_ns > 0) spin_ns(uint64_t(p.probe.lag_ns));
    const bool tracing = p.trace != nullptr && blockIdx.x == 0 && (threadIdx.x & 127) == 0;
    int traced = 0;  // tiles recorded
    auto mark = [&](int point) {
      if (!tracing || traced >= p.trace_tiles) return;
      long long* marks = p.trace + (size_t(consumer) * p.trace_tiles + traced) * kTracePoints;
      marks[point] = clock64();
      if (point == 0) marks[kTraceGlobalTimer] = (long long)global_ns();
    };
    if (p.trace != nullptr && consumer == 0 && (threadIdx.x & 127) == 0) mark_block_time(p, 0);
    for (int i = 0;; ++i) {
      const int t = work.consume(i);
      if (t >= total) break;
      mark(kTraceBeforeLookup);
      const Tile tile = tile_at<MODE>(p, t, m_tiles);
      const bool narrow = !TN && probe_short_kind(p.probe, t) == 1;
      const int k_tiles = TN ? tile.k_tiles : probe_k_tiles(p.probe, t, tile.k_tiles);
      int prev = -1;
      mark(0);
      for (int kt = 0; kt < k_tiles; ++kt) {
        mbar_wait(&full[stage], round & 1);
        // Gathered A (ladder 13): the producer's cp.async wrote it through the generic proxy.
        if constexpr (VIA == StoreVia::HandoffGatherA && MODE == GemmMode::NN)
          if (p.probe.gather_completion == 0) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        if (kt == 0) mark(1);
        unsigned char* sa = ring + stage * STAGE_BYTES + consumer * (64 * 128);  // this warpgroup's 64 rows
        unsigned char* sb = ring + stage * STAGE_BYTES + A_BYTES;
        if (narrow) {
          // Narrow: both consumers on the first 64 rows, each with its half of B's 256 columns (16 KiB
          // into the stage's B in both layouts). Its own fence-to-commit sequence (C7520).
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < BK / 16; ++kk) {
            const uint64_t da = smem_desc(ring + stage * STAGE_BYTES + kk * 32, 16, 1024);
            unsigned char* half_b = sb + consumer * (B_BYTES / 2);
            const uint64_t db = B_MN_MAJOR ? smem_desc(half_b + kk * 16 * 128, BK * 128, 1024) : smem_desc(half_b + kk * 32, 16, 1024);
            probe_wgmma_m64n128k16<B_MN_MAJOR ? 1 : 0>(d, da, db, kt > 0 || kk > 0);
          }
          wgmma_commit();
        } else {
          if constexpr (TN) {
            // The group ends inside this k-tile: zero the rows past its end (they hold the next
            // group's rows) in this consumer's A box and in its half of the B boxes, then make the
            // plain stores visible to the tensor cores (async proxy) before either consumer reads.
            const int valid = tile.k_end - (tile.k_begin + kt * BK);
            if (valid < BK) {
              const int lane128 = threadIdx.x & 127;
              for (int i = lane128; i < (BK - valid) * 8 * 3; i += 128) {
                const int box = i / ((BK - valid) * 8), rest = i % ((BK - valid) * 8);
                unsigned char* base = box == 0 ? sa : sb + (2 * consumer + box - 1) * (BK * 128);
                *reinterpret_cast<uint4*>(base + (valid + rest / 8) * 128 + (rest % 8) * 16) = make_uint4(0, 0, 0, 0);
              }
              asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
              asm volatile("bar.sync 1, 256;\n" ::: "memory");  // both consumers (the producer is not in it)
            }
          }
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < BK / 16; ++kk) {
            // K-major: the next 16 k are 32 bytes along the swizzled row. MN-major: 16 rows down.
            const uint64_t da = A_MN_MAJOR ? smem_desc(sa + kk * 16 * 128, BK * 128, 1024) : smem_desc(sa + kk * 32, 16, 1024);
            const uint64_t db = B_MN_MAJOR ? smem_desc(sb + kk * 16 * 128, BK * 128, 1024) : smem_desc(sb + kk * 32, 16, 1024);
            wgmma_m64n256k16<A_MN_MAJOR ? 1 : 0, B_MN_MAJOR ? 1 : 0>(d, da, db, kt > 0 || kk > 0);
          }
          wgmma_commit();
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
      mark(2);
      if (prev >= 0 && (threadIdx.x & 127) == 0) mbar_arrive(&empty[prev]);
      if (tile.k_tiles == 0) {
        // TN with a group of no rows: dW_e = 0 (or unchanged when accumulating; the hand-off, which
        // the storers expect every tile through, never accumulates: see launch_layout).
        if (!handoff(VIA) && p.accumulate) continue;
#pragma unroll
        for (int i = 0; i < 128; ++i) d[i] = 0.f;
      }
      if constexpr (handoff(VIA)) {
        for (int half = 0; half < HANDOFFS; ++half, ++n) {
          // The storers have copied out the previous piece (a fresh barrier's first wait passes).
          mbar_wait(&tile_empty, (n & 1) ^ 1);
          handoff_put<OutT>(d, staging_smem, consumer, half);
          mbar_arrive(&tile_full);
        }
      } else if constexpr (VIA == StoreVia::WarpSlices) {
        const uint32_t staging = staging_smem + uint32_t(((threadIdx.x >> 5) - 4) * Layout<VIA>::WARP_STAGING_FLOATS * 4);  // this warp's slice
        store_tile_staged<OutT>(p, d, tile, tile.row0 + consumer * 64, staging);
      } else if constexpr (VIA == StoreVia::ConsumerTmaDouble || tma_deep(VIA)) {
        store_tile_tma_boxes<Layout<VIA>::TMA_BOXES, VIA>(d, tile, consumer, staging_smem + uint32_t(consumer * Layout<VIA>::TMA_STAGING_PER_CONSUMER),
                                                     &map_out, boxes_sent);
      } else if constexpr (VIA == StoreVia::ProbePause || VIA == StoreVia::ProbeNoStore || VIA == StoreVia::ProbeNoStore3) {
        if constexpr (VIA == StoreVia::ProbePause) spin_ns(uint64_t(p.probe.pause_ns));
        // ptxas drops wgmmas whose results nothing reads: at d211733 and before, these probes ran one
        // HGMMA of each k-step's four (their SASS: results/sass-ladder12-hgmma-d211733.txt). A store
        // under a condition that never holds at run time (rows < 0) keeps all four.
        if (p.rows < 0) {
          float* sink = static_cast<float*>(p.out) + size_t(threadIdx.x) * 128;
#pragma unroll
          for (int i = 0; i < 128; ++i) sink[i] = d[i];
        }
      } else if constexpr (VIA == StoreVia::ConsumerTma) {
        store_tile_tma(d, tile, consumer, staging_smem + uint32_t(consumer * Layout<VIA>::TMA_STAGING_PER_CONSUMER), &map_out);
      } else {
        store_tile<EPI, OutT>(p, d, tile, tile.row0 + consumer * 64);
      }
      mark(3);
      ++traced;
    }
    if constexpr (by_consumer_tma(VIA)) {
      // The staging must outlive the engine's reads, and the writes land before the kernel ends.
      if ((threadIdx.x & 127) == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    }
    if (p.trace != nullptr && (threadIdx.x & 127) == 0) mark_block_time(p, 1);
  }
}

// ---- host side ------------------------------------------------------------------------------------
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
      f = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A bf16 tensor map with 128-byte swizzle. dims/box are innermost first; strides (bytes) for dims 1..
CUtensorMap make_map(const void* base, int rank, const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box) {
  CUtensorMap map;
  const cuuint32_t unit[3] = {1, 1, 1};
  CUresult r = encode_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, cuuint32_t(rank), const_cast<void*>(base), dims, strides, box, unit,
                           CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                           CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MOE_ARG_CHECK(r == CUDA_SUCCESS, "groupedGemm", "cuTensorMapEncodeTiled failed (CUresult ", int(r), ")");
  return map;
}


template <GemmMode MODE, GemmEpilogue EPI, typename OutT, StoreVia VIA>
void launch_layout(const CUtensorMap& map_a, const CUtensorMap& map_b, const Params& p, int sms, cudaStream_t stream,
                   const CUtensorMap* map_out = nullptr) {
  auto kernel = grouped_gemm_wgmma_kernel<MODE, EPI, OutT, VIA>;
  constexpr int smem = Layout<VIA>::SMEM_BYTES;
  if constexpr (handoff(VIA)) MOE_INTERNAL_CHECK(!p.accumulate, "the hand-off epilogue overwrites: it cannot accumulate");
  cuda::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "groupedGemm", "cudaFuncSetAttribute");
  // The setmaxnreg splits (the kernel) add up to 168 registers a thread at launch: any other count
  // would leave the consumers' setmaxnreg.inc waiting for ever, or waste registers.
  cudaFuncAttributes attr{};
  cuda::check(cudaFuncGetAttributes(&attr, kernel), "groupedGemm", "cudaFuncGetAttributes");
  MOE_INTERNAL_CHECK(attr.numRegs == 168, "the kernel must be compiled to 168 registers a thread (its setmaxnreg splits assume it)");
  // Persistent: at most one block per SM (the ring takes most of its shared memory), never more
  // blocks than the largest possible number of work items.
  const int64_t most_tiles = MODE == GemmMode::TN ? int64_t(p.E) * p.tn_m_tiles * p.n_tiles : (int64_t(p.M) / BM + p.E) * p.n_tiles;
  const int grid = int(std::max<int64_t>(1, std::min<int64_t>(sms, most_tiles)));
  if constexpr (by_consumer_tma(VIA)) MOE_INTERNAL_CHECK(map_out != nullptr, "ConsumerTma needs the output's tensor map");
  kernel<<<grid, THREADS, smem, stream>>>(map_a, map_b, map_out ? *map_out : map_b, p);  // others ignore map_out
}
// ---- end of the copy -------------------------------------------------------------------------------

// ConsumerTma's output map: fp32 [E][K][N] (dW), boxes of [1][64 rows][32 floats], 128-byte swizzle.
CUtensorMap make_out_map_f32(void* base, int64_t E, int64_t K, int64_t N) {
  CUtensorMap map;
  const cuuint64_t dims[3] = {cuuint64_t(N), cuuint64_t(K), cuuint64_t(E)}, strides[2] = {cuuint64_t(N) * 4, cuuint64_t(K * N) * 4};
  const cuuint32_t box[3] = {32, 64, 1};
  const CUresult r = moe::ops::sm90::encode_map(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, base, 3, dims, strides, box);
  MOE_ARG_CHECK(r == CUDA_SUCCESS, "groupedGemm", "cuTensorMapEncodeTiled failed (CUresult ", int(r), ")");
  return map;
}

}  // namespace

// One Store product (`a` for NN and TN, `c` for NT; bf16 or fp32 results, overwritten) with the
// given way of storing the tiles; tile_start: the NN/NT m-tiles (ladder::tile_starts(p, BM)).
template <StoreVia VIA, typename OutT>
void run(ladder::Mode m, const ladder::Problem& pr, const ladder::Inputs& in, const int32_t* tile_start, OutT* out, int sms,
         const ProbeKnobs& probe = {}, long long* trace = nullptr, int trace_tiles = 0) {
  CHECK(VIA != StoreVia::HandoffGatherA || (m == ladder::Mode::NN && probe.gather_x != nullptr && probe.gather_rows != nullptr &&
                                             probe.gather_ld >= pr.K && probe.short_every == 0),
        "HandoffGatherA (ladder 13) runs NN with ProbeKnobs::gather_x, gather_rows and gather_ld >= K, and no short tiles");
  CHECK(probe.tile_counter == nullptr || (VIA == StoreVia::Handoff && m != ladder::Mode::TN),
        "dynamic work items (ProbeKnobs::tile_counter) run the hand-off, NN or NT");
  Params p{};
  p.probe = probe;
  p.trace = trace;
  p.trace_tiles = trace_tiles;
  p.offsets = in.doffsets;
  p.tile_start = tile_start;
  p.out = out;
  p.M = pr.M;
  p.E = pr.E;
  p.accumulate = false;
  const int64_t M = pr.M, E = pr.E, K = pr.K, N = pr.N;
  if (m == ladder::Mode::TN) {
    p.rows = int(K);
    p.cols = int(N);
    p.n_tiles = int((N + BN - 1) / BN);
    p.tn_m_tiles = int((K + BM - 1) / BM);
    const cuuint64_t a_dims[2] = {cuuint64_t(K), cuuint64_t(M)}, a_strides[1] = {cuuint64_t(K) * 2};
    const cuuint64_t b_dims[2] = {cuuint64_t(N), cuuint64_t(M)}, b_strides[1] = {cuuint64_t(N) * 2};
    const cuuint32_t box[2] = {64, BK};
    const CUtensorMap map_a = make_map(in.da, 2, a_dims, a_strides, box);
    const CUtensorMap map_b = make_map(in.dc, 2, b_dims, b_strides, box);
    if constexpr (by_consumer_tma(VIA)) {
      static_assert(sizeof(OutT) == 4, "ConsumerTma: fp32 results");
      const CUtensorMap map_out = make_out_map_f32(out, E, K, N);
      launch_layout<GemmMode::TN, GemmEpilogue::Store, OutT, VIA>(map_a, map_b, p, sms, 0, &map_out);
    } else {
      launch_layout<GemmMode::TN, GemmEpilogue::Store, OutT, VIA>(map_a, map_b, p, sms, 0);
    }
    return;
  }
  if constexpr (by_consumer_tma(VIA)) {
    CHECK(false, "ConsumerTma runs dW (TN) only");
  } else {
    const bool nt = m == ladder::Mode::NT;
    p.rows = int(M);
    p.cols = int(nt ? K : N);
    p.inner = int(nt ? N : K);
    p.n_tiles = (p.cols + BN - 1) / BN;
    const cuuint64_t a_dims[2] = {cuuint64_t(p.inner), cuuint64_t(M)}, a_strides[1] = {cuuint64_t(p.inner) * 2};
    const cuuint32_t a_box[2] = {BK, BM};
    CUtensorMap map_a = make_map(nt ? in.dc : in.da, 2, a_dims, a_strides, a_box);
    if (VIA == StoreVia::HandoffGatherA && probe.gather_completion == 3) {
      // Ladder 13's row loads: x [gather_tokens, K] (rows gather_ld apart), one row a box.
      CHECK(probe.gather_tokens > 0, "gather_completion 3 needs ProbeKnobs::gather_tokens");
      const cuuint64_t x_dims[2] = {cuuint64_t(K), cuuint64_t(probe.gather_tokens)}, x_strides[1] = {cuuint64_t(probe.gather_ld) * 2};
      const cuuint32_t x_box[2] = {BK, 1};
      map_a = make_map(const_cast<__nv_bfloat16*>(probe.gather_x), 2, x_dims, x_strides, x_box);
    }
    const cuuint64_t b_dims[3] = {cuuint64_t(N), cuuint64_t(K), cuuint64_t(E)}, b_strides[2] = {cuuint64_t(N) * 2, cuuint64_t(N * K) * 2};
    const cuuint32_t b_box_nn[3] = {64, BK, 1}, b_box_nt[3] = {BK, BN, 1};
    const CUtensorMap map_b = make_map(in.db, 3, b_dims, b_strides, nt ? b_box_nt : b_box_nn);
    if (nt) launch_layout<GemmMode::NT, GemmEpilogue::Store, OutT, VIA>(map_a, map_b, p, sms, 0);
    else launch_layout<GemmMode::NN, GemmEpilogue::Store, OutT, VIA>(map_a, map_b, p, sms, 0);
  }
}

constexpr int kTileRows = BM;

}  // namespace moe::ops::hopper

namespace ladder {

using Probe = moe::ops::hopper::ProbeKnobs;

// --trace: block 0's per-tile clock marks (Params::trace) summarised per consumer: medians over its
// tiles (the first two left out) of the wait for the tile's first stage, the mainloop, the epilogue
// and the whole tile, and the median distance between the consumers' mainloop ends (0: in step).
inline void print_trace(const std::vector<long long>& tr, int tiles) {
  auto median = [](std::vector<long long> v) {
    if (v.empty()) return 0LL;
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  using moe::ops::hopper::kTraceBeforeLookup;
  using moe::ops::hopper::kTraceGlobalTimer;
  using moe::ops::hopper::kTracePoints;
  auto at = [&](int c, int t, int i) { return tr[(size_t(c) * tiles + t) * kTracePoints + i]; };
  int n = 0;
  while (n < tiles && at(0, n, 3) != 0 && at(1, n, 3) != 0) ++n;
  std::printf("  trace, block 0, %d tiles (cycles, medians over tiles 2..%d):\n", n, n - 1);
  for (int c = 0; c < 2; ++c) {
    std::vector<long long> lookup, wait, main, epi, rest, whole;
    for (int t = 2; t < n; ++t) {
      lookup.push_back(at(c, t, 0) - at(c, t, kTraceBeforeLookup));
      wait.push_back(at(c, t, 1) - at(c, t, 0));
      main.push_back(at(c, t, 2) - at(c, t, 1));
      epi.push_back(at(c, t, 3) - at(c, t, 2));
      if (t + 1 < n) {
        rest.push_back(at(c, t + 1, kTraceBeforeLookup) - at(c, t, 3));
        whole.push_back(at(c, t + 1, 0) - at(c, t, 0));
      }
    }
    std::printf("    consumer %d: tile_at %lld, first-stage wait %lld, mainloop %lld, epilogue %lld, epilogue end to next tile %lld, tile %lld\n",
                c, median(lookup), median(wait), median(main), median(epi), median(rest), median(whole));
  }
  std::vector<long long> lag;
  for (int t = 2; t < n; ++t) lag.push_back(at(1, t, 2) - at(0, t, 2));
  std::printf("    consumer 1's mainloop ends after consumer 0's by %lld (median; tile 2: %lld, last: %lld)\n", median(lag),
              n > 2 ? lag.front() : 0LL, n > 2 ? lag.back() : 0LL);
  // The SM clock over the traced tiles: the global timer ticks in ns whatever the clock does.
  if (n > 3) {
    const long long cycles = at(0, n - 1, 0) - at(0, 2, 0), ns = at(0, n - 1, kTraceGlobalTimer) - at(0, 2, kTraceGlobalTimer);
    std::printf("    SM clock over tiles 2..%d: %lld cycles in %.1f us = %.3f GHz\n", n - 1, cycles, ns * 1e-3, ns > 0 ? double(cycles) / ns : 0.0);
  }
}

// Every block's time from its first tile to its last consumer's or storer's end, against the launch's span (the
// first start to the last end): a persistent grid with tiles dealt out in turn ends with its slowest
// block, so a wide spread is time a work queue would win back.
inline void print_block_times(const long long* times, int blocks) {
  std::vector<double> us;
  long long first = 0, last = 0;
  for (int b = 0; b < blocks; ++b) {
    const long long start = times[2 * b], end = times[2 * b + 1];
    if (start == 0 || end == 0) continue;  // a block that did not run (grid smaller than the SMs)
    us.push_back((end - start) * 1e-3);
    first = first == 0 ? start : std::min(first, start);
    last = std::max(last, end);
  }
  if (us.empty()) return;
  std::sort(us.begin(), us.end());
  std::printf("    blocks (%zu): from the first tile to the last end %.1f us median, %.1f min, %.1f max; the launch's span %.1f us\n", us.size(),
              us[us.size() / 2], us.front(), us.back(), (last - first) * 1e-3);
}

// One launch of `variant` with block 0's trace on, summarised (print_trace).
template <moe::ops::hopper::StoreVia VIA, typename OutT>
void trace_once(const char* label, Mode m, const Problem& pr, const Inputs& in, const int32_t* tile_start, OutT* out, int sms,
                const Probe& probe) {
  using moe::ops::hopper::kTracePoints;
  constexpr int TRACE_TILES = 512;
  long long* dtrace = nullptr;
  const size_t n = size_t(2) * TRACE_TILES * kTracePoints + size_t(2) * sms;  // + every block's start and end
  CHECK_CUDA(cudaMalloc(&dtrace, n * sizeof(long long)));
  CHECK_CUDA(cudaMemset(dtrace, 0, n * sizeof(long long)));
  moe::ops::hopper::run<VIA>(m, pr, in, tile_start, out, sms, probe, dtrace, TRACE_TILES);
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<long long> tr(n);
  CHECK_CUDA(cudaMemcpy(tr.data(), dtrace, n * sizeof(long long), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaFree(dtrace));
  std::printf("  [%s]\n", label);
  print_trace(tr, TRACE_TILES);
  print_block_times(moe::ops::hopper::block_times(tr.data(), TRACE_TILES), sms);
}

// --soak-ms: `launch` back to back for about soak_ms, in batches of 10; prints the wall-clock
// window (ms since the epoch, as nvidia-smi's samples can be matched to it) and the time a launch.
inline void soak(const char* label, int soak_ms, const std::function<void()>& launch) {
  using clock = std::chrono::system_clock;
  const auto epoch_ms = [](clock::time_point t) {
    return (long long)std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
  };
  const auto t0 = clock::now();
  int launches = 0;
  while (std::chrono::duration_cast<std::chrono::milliseconds>(clock::now() - t0).count() < soak_ms) {
    for (int i = 0; i < 10; ++i) launch();
    CHECK_CUDA(cudaDeviceSynchronize());
    launches += 10;
  }
  const auto t1 = clock::now();
  const double ms = std::chrono::duration<double, std::milli>(t1 - t0).count();
  std::printf("  soak [%s]: %d launches, %.3f ms a launch, wall clock %lld..%lld ms since the epoch\n", label, launches,
              ms / launches, epoch_ms(t0), epoch_ms(t1));
}
// Runs one product with two ways of storing its tiles (case 0: the one the addon ships for this
// result type; `other`: the ladder's step), checks both and times them interleaved. other_probe:
// the probes' knobs for the other side only (case 0 runs plain). Returns the other side's relative
// error against case 0 (0: the same bits).
template <moe::ops::hopper::StoreVia CASE0, moe::ops::hopper::StoreVia OTHER, typename OutT>
double compare(Mode m, const Problem& pr, const Inputs& in, const int32_t* tile_start, int sms, const Args& args, const char* case0,
             const char* other, Probe other_probe = {}) {
  using moe::ops::hopper::run;
  const size_t n = out_elems(pr, m);
  OutT *o0 = nullptr, *o1 = nullptr;
  CHECK_CUDA(cudaMalloc(&o0, n * sizeof(OutT)));
  CHECK_CUDA(cudaMalloc(&o1, n * sizeof(OutT)));
  CHECK_CUDA(cudaMemset(o0, 0, n * sizeof(OutT)));
  CHECK_CUDA(cudaMemset(o1, 0, n * sizeof(OutT)));
  run<CASE0>(m, pr, in, tile_start, o0, sms);
  run<OTHER>(m, pr, in, tile_start, o1, sms, other_probe);
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> r0 = to_host_floats(o0, n), r1 = to_host_floats(o1, n);
  const auto ms = time_interleaved({[&] { run<CASE0>(m, pr, in, tile_start, o0, sms); }, [&] { run<OTHER>(m, pr, in, tile_start, o1, sms, other_probe); }},
                                   args.rounds, args.repeats);
  std::printf("%s, %s results\n", mode_name(m), sizeof(OutT) == 2 ? "bf16" : "fp32");
  report(case0, pr, ms[0], check_against_cpu(pr, in, m, r0), 0.0);
  const double vs_case0 = rel_err(r1, r0);
  report(other, pr, ms[1], check_against_cpu(pr, in, m, r1), vs_case0);
  if (other_probe.trace) {
    trace_once<CASE0>(case0, m, pr, in, tile_start, o0, sms, Probe{});
    trace_once<OTHER>(other, m, pr, in, tile_start, o1, sms, other_probe);
  }
  if (other_probe.soak_ms > 0) {
    soak(case0, other_probe.soak_ms, [&] { run<CASE0>(m, pr, in, tile_start, o0, sms); });
    soak(other, other_probe.soak_ms, [&] { run<OTHER>(m, pr, in, tile_start, o1, sms, other_probe); });
  }
  CHECK_CUDA(cudaFree(o0));
  CHECK_CUDA(cudaFree(o1));
  return vs_case0;
}

}  // namespace ladder
