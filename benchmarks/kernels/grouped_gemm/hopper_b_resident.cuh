// Step 11 of the grouped-GEMM ladder: dW (TN, bf16 results) for groups of at most 128 rows (two
// k-steps: E=256's 4096 tokens × top-8, DeepSeek-V3's training step) with B resident in shared
// memory. Why (benchmarks/kernels-notes.md, "dW with few rows per group at the DRAM roof"): the
// addon's TN kernel loads a 128×256 tile's A slice (32 KiB) and B slice (64 KiB) for only two
// k-steps, then writes 64 KiB; over the E=256 shape that is ~11 GB read from L2 beside the 7.5 GB
// written, and it runs at 59% of the DRAM roof (ncu 47c3e63: DRAM 66%, L2 79%, SM 31%). Here a block
// takes one (group, n-tile), loads the group's B slice once (k-tiles × 32 KiB), and streams the
// group's m-tiles through it: A slices in, two k-steps of wgmma, the tile handed off to the storers.
// L2 reads drop to A once per tile plus B once per (group, n-tile): ~4 GB instead of ~11.
// Written in session 11 and compiled for sm_90a; not yet run on a GPU.
//
// Block: 3 warpgroups, one block per SM, persistent over the work items (group, n-tile), n fastest
// (the blocks in flight share a group's A slices through L2). Warpgroup 0: thread 0 issues the TMA
// loads (the resident B, then the A ring), threads 32-127 are the storers; warpgroups 1 and 2 are the
// consumers, each owning 64 rows of the 128×256 tile (wgmma m64n256k16, 128 fp32 accumulators a
// thread), as in the addon's Hopper kernel (hopper.cu, whose helpers and hand-off this reuses through
// hopper_epilogues.cuh).
//
// Shared memory (1024-aligned, 128-byte swizzle):
//   A ring   5 stages × 16 KiB: two [64 k][64 m] boxes of a_eᵀ, one per consumer
//   B        k-tiles × 32 KiB: per k-step four [64 k][64 n] boxes of dC_e, loaded once per item
//   staging  the 128×256 bf16 tile (528-byte rows), drained by the bulk-copy engine (as hopper.cu v10)
//
// Barriers, beside the ring's full/empty and the hand-off's tile_full/tile_empty (both as hopper.cu):
//   b_full   1 arrival (the producer's expect_tx of the item's B bytes; 0 for a group of no rows)
//   b_empty  2 arrivals (each consumer, after its last wgmma of the item has completed)
// The producer loads item n's B once b_empty's phase n−1 has completed (a fresh barrier passes parity
// 1), so it never overwrites B under a running wgmma, and is never two items ahead of the consumers;
// the consumers wait for b_full's phase n before their first wgmma of item n.
// Rows past a group's end in its last k-step (the next group's rows; TMA zero-fills rows past M):
// zeroed in B once per item (each consumer two of the four boxes, then both meet at bar 1), and in
// each consumer's own A box of every m-tile (bar 2 + consumer, its warpgroup alone), then made
// visible to the tensor cores with fence.proxy.async before the wgmma reads them.
#pragma once
#include "hopper_epilogues.cuh"

namespace moe::ops::hopper::b_resident {

constexpr int K_TILES_MAX = 2;  // groups of at most 128 rows
constexpr int A_STAGES = 5;
constexpr int A_STAGE_BYTES = 2 * BK * 128;                                    // 16 KiB
constexpr int B_K_TILE_BYTES = (BN / 64) * BK * 128;                           // 32 KiB
constexpr int STAGING_LD_BYTES = Layout<StoreVia::Handoff>::TILE_LD_BF16 * 2;  // 528
constexpr int STAGING_BYTES = BM * STAGING_LD_BYTES;
constexpr int SMEM_BYTES = A_STAGES * A_STAGE_BYTES + K_TILES_MAX * B_K_TILE_BYTES + STAGING_BYTES + 1024;
static_assert(SMEM_BYTES + 128 <= 232448, "over the 227 KiB opt-in (128: the static mbarriers)");

// A first run of a kernel that never ran: every wait is bounded (about 10 s of the SM clock, checked
// every 4096 polls), past which the block traps, so that a protocol error ends the program with a
// launch failure instead of hanging the device call. (A printf of which wait it was would be worth
// having, but its call makes the kernel spill; a debugging run can add it.)
__device__ __forceinline__ bool try_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(done)
               : "r"(smem_u32(bar)), "r"(parity)
               : "memory");
  return done != 0;
}
__device__ __forceinline__ void wait(uint64_t* bar, uint32_t parity) {
  if (try_wait(bar, parity)) return;
  const long long deadline = clock64() + 20'000'000'000LL;
  for (uint32_t polls = 1; !try_wait(bar, parity); ++polls)
    if ((polls & 4095) == 0 && clock64() > deadline) __trap();
}

struct Item {
  int group, col0, k_begin, k_end, k_tiles;
};
__device__ __forceinline__ Item item_at(const Params& p, int i) {
  Item it;
  it.group = i / p.n_tiles;
  it.col0 = (i % p.n_tiles) * BN;
  it.k_begin = min(max(__ldg(p.offsets + it.group), 0), p.M);
  it.k_end = min(max(__ldg(p.offsets + it.group + 1), it.k_begin), p.M);
  it.k_tiles = (it.k_end - it.k_begin + BK - 1) / BK;  // ≤ K_TILES_MAX (checked on the host)
  return it;
}
__device__ __forceinline__ Tile tile_of(const Params& p, const Item& it, int m) {
  Tile t{};
  t.group = it.group;
  t.row0 = m * BM;
  t.row_end = p.rows;
  t.col0 = it.col0;
  t.out_base = int64_t(it.group) * p.rows * p.cols;
  return t;
}

// Zeroes rows valid..63 of `boxes` consecutive [64][64] bf16 boxes (128-byte rows: whole rows, so the
// swizzle, which permutes 16-byte chunks within a row, does not matter) by `threads` threads.
__device__ __forceinline__ void zero_rows(unsigned char* box0, int boxes, int valid, int thread, int threads) {
  const int per_box = (BK - valid) * 8;  // 16-byte chunks
  for (int i = thread; i < boxes * per_box; i += threads) {
    const int box = i / per_box, rest = i % per_box;
    *reinterpret_cast<uint4*>(box0 + box * (BK * 128) + (valid + rest / 8) * 128 + (rest % 8) * 16) = make_uint4(0, 0, 0, 0);
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The staged bf16 tile to global memory by the bulk-copy engine, a row per storer thread at a time;
// the staging is free again once the engine has read it (the writes stay in flight).
__device__ __forceinline__ void drain_bulk(const Params& p, const Tile& tile, uint32_t tile_smem, int storer) {
  const int rows = min(BM, tile.row_end - tile.row0);
  const uint32_t row_bytes = uint32_t(min(BN, p.cols - tile.col0)) * 2;
  __nv_bfloat16* const out = static_cast<__nv_bfloat16*>(p.out) + tile.out_base + tile.col0;
  for (int r = storer; r < rows; r += STORER_THREADS)
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(out + int64_t(tile.row0 + r) * p.cols),
                 "r"(tile_smem + uint32_t(r * STAGING_LD_BYTES)), "r"(row_bytes)
                 : "memory");
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}

// Two probes take the kernel's time apart (session 12: it ran at 0.56 of a cudaMemset of its bytes,
// and ncu put the consumers' largest stall on the wait for the drained staging): NoMma skips the
// wgmma (tiles of zeros, every load, hand-off and store kept: the store path's own ceiling), NoStore
// skips the bulk copies (every load and wgmma kept: the loads' and tensor cores' ceiling). Their
// outputs are not the product; only the timing is read.
enum class Probe { None, NoMma, NoStore };

template <Probe PROBE>
__global__ void __launch_bounds__(THREADS, 1)
    dw_b_resident_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b, Params p) {
  extern __shared__ unsigned char smem_raw[];
  unsigned char* ring = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* b_res = ring + A_STAGES * A_STAGE_BYTES;
  const uint32_t staging = smem_u32(b_res + K_TILES_MAX * B_K_TILE_BYTES);
  __shared__ __align__(8) uint64_t full[A_STAGES], empty[A_STAGES];
  __shared__ __align__(8) uint64_t b_full, b_empty, tile_full, tile_empty;
  const int wg = threadIdx.x >> 7;
  if (threadIdx.x == 0) {
    for (int s = 0; s < A_STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], CONSUMERS);
    }
    mbar_init(&b_full, 1);
    mbar_init(&b_empty, CONSUMERS);
    mbar_init(&tile_full, CONSUMERS * 128);
    mbar_init(&tile_empty, STORER_THREADS);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int items = p.E * p.n_tiles;

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_a)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_b)) : "memory");
      int stage = 0;
      uint32_t round = 0, item_n = 0;
      for (int i = blockIdx.x; i < items; i += gridDim.x, ++item_n) {
        const Item it = item_at(p, i);
        if (it.k_tiles > K_TILES_MAX) __trap();  // the host checks; B would overrun its region
        wait(&b_empty, (item_n & 1) ^ 1);        // the consumers are done with the previous item's B
        mbar_arrive_expect_tx(&b_full, uint32_t(it.k_tiles * B_K_TILE_BYTES));
        for (int kt = 0; kt < it.k_tiles; ++kt)
#pragma unroll
          for (int j = 0; j < BN / 64; ++j)
            tma_load_2d(b_res + kt * B_K_TILE_BYTES + j * (BK * 128), &map_b, &b_full, it.col0 + 64 * j, it.k_begin + kt * BK);
        for (int m = 0; m < p.tn_m_tiles; ++m)
          for (int kt = 0; kt < it.k_tiles; ++kt) {
            wait(&empty[stage], (round & 1) ^ 1);
            unsigned char* sa = ring + stage * A_STAGE_BYTES;
            mbar_arrive_expect_tx(&full[stage], A_STAGE_BYTES);
#pragma unroll
            for (int j = 0; j < BM / 64; ++j) tma_load_2d(sa + j * (BK * 128), &map_a, &full[stage], m * BM + 64 * j, it.k_begin + kt * BK);
            if (++stage == A_STAGES) {
              stage = 0;
              ++round;
            }
          }
      }
    } else if (threadIdx.x >= 32) {
      const int storer = threadIdx.x - 32;
      uint32_t n = 0;
      for (int i = blockIdx.x; i < items; i += gridDim.x) {
        const Item it = item_at(p, i);
        for (int m = 0; m < p.tn_m_tiles; ++m, ++n) {
          wait(&tile_full, n & 1);
          if constexpr (PROBE != Probe::NoStore) drain_bulk(p, tile_of(p, it, m), staging, storer);
          mbar_arrive(&tile_empty);
        }
      }
      asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");  // every write done before the block ends
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int consumer = wg - 1;
    const int lane128 = threadIdx.x & 127;
    float d[128];
    int stage = 0;
    uint32_t round = 0, n = 0, item_n = 0;
    for (int i = blockIdx.x; i < items; i += gridDim.x, ++item_n) {
      const Item it = item_at(p, i);
      const int valid_last = it.k_end - (it.k_begin + (it.k_tiles - 1) * BK);  // rows of the group in its last k-step
      wait(&b_full, item_n & 1);
      if (it.k_tiles > 0 && valid_last < BK) {
        zero_rows(b_res + (it.k_tiles - 1) * B_K_TILE_BYTES + 2 * consumer * (BK * 128), 2, valid_last, lane128, 128);
        asm volatile("bar.sync 1, 256;\n" ::: "memory");  // both halves zeroed before either consumer reads B
      }
      for (int m = 0; m < p.tn_m_tiles; ++m) {
        int prev = -1;
        for (int kt = 0; kt < it.k_tiles; ++kt) {
          wait(&full[stage], round & 1);
          unsigned char* sa = ring + stage * A_STAGE_BYTES + consumer * (BK * 128);  // this warpgroup's 64 rows
          if (kt == it.k_tiles - 1 && valid_last < BK) {
            zero_rows(sa, 1, valid_last, lane128, 128);
            // This warpgroup's box only (named barriers 2 and 3; immediate ids keep ptxas from reserving all 16).
            if (consumer == 0) asm volatile("bar.sync 2, 128;\n" ::: "memory");
            else asm volatile("bar.sync 3, 128;\n" ::: "memory");
          }
          const unsigned char* sb = b_res + kt * B_K_TILE_BYTES;
          if constexpr (PROBE == Probe::NoMma) {
#pragma unroll
            for (int j = 0; j < 128; ++j) d[j] = 0.f;
          } else {
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) {
              const uint64_t da = smem_desc(sa + kk * 16 * 128, BK * 128, 1024);
              const uint64_t db = smem_desc(sb + kk * 16 * 128, BK * 128, 1024);
              wgmma_m64n256k16<1, 1>(d, da, db, kt > 0 || kk > 0);
            }
            wgmma_commit();
            wgmma_wait<1>();
          }
          if (prev >= 0 && lane128 == 0) mbar_arrive(&empty[prev]);
          prev = stage;
          if (++stage == A_STAGES) {
            stage = 0;
            ++round;
          }
        }
        if constexpr (PROBE != Probe::NoMma) wgmma_wait<0>();
        if (prev >= 0 && lane128 == 0) mbar_arrive(&empty[prev]);
        // Every wgmma reading this item's B has completed: the producer may load the next item's.
        if (m == p.tn_m_tiles - 1 && lane128 == 0) mbar_arrive(&b_empty);
        if (it.k_tiles == 0) {
#pragma unroll
          for (int j = 0; j < 128; ++j) d[j] = 0.f;  // a group of no rows: dW_e = 0
        }
        wait(&tile_empty, (n & 1) ^ 1);
        handoff_put<__nv_bfloat16>(d, staging, consumer, 0);
        // The storers' reads are the bulk-copy engine's (async proxy): order the st.shared before them.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        mbar_arrive(&tile_full);
        ++n;
      }
    }
  }
}

// dW_e[K, N] = a_eᵀ · c_e (bf16 results, overwritten): a [M, K], c [M, N], out [E, K, N]. Every group
// must have at most K_TILES_MAX·64 rows. PROBE: the kernel's probes (not the product).
template <Probe PROBE = Probe::None> void run(const ladder::Problem& pr, const ladder::Inputs& in, __nv_bfloat16* out, int sms) {
  for (int e = 0; e < pr.E; ++e)
    CHECK(pr.offsets[e + 1] - pr.offsets[e] <= K_TILES_MAX * BK, "group %d has %d rows; B-resident takes at most %d", e,
          pr.offsets[e + 1] - pr.offsets[e], K_TILES_MAX * BK);
  Params p{};
  p.offsets = in.doffsets;
  p.out = out;
  p.M = pr.M;
  p.E = pr.E;
  p.rows = pr.K;
  p.cols = pr.N;
  p.n_tiles = (pr.N + BN - 1) / BN;
  p.tn_m_tiles = (pr.K + BM - 1) / BM;
  const cuuint64_t a_dims[2] = {cuuint64_t(pr.K), cuuint64_t(pr.M)}, a_strides[1] = {cuuint64_t(pr.K) * 2};
  const cuuint64_t b_dims[2] = {cuuint64_t(pr.N), cuuint64_t(pr.M)}, b_strides[1] = {cuuint64_t(pr.N) * 2};
  const cuuint32_t box[2] = {64, BK};
  const CUtensorMap map_a = make_map(in.da, 2, a_dims, a_strides, box);
  const CUtensorMap map_b = make_map(in.dc, 2, b_dims, b_strides, box);
  static const bool attr_set = [] {
    CHECK_CUDA(cudaFuncSetAttribute(dw_b_resident_kernel<PROBE>, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES));
    return true;
  }();
  (void)attr_set;
  const int items = p.E * p.n_tiles;
  const int grid = std::max(1, std::min(sms, items));
  dw_b_resident_kernel<PROBE><<<grid, THREADS, SMEM_BYTES>>>(map_a, map_b, p);
}

}  // namespace moe::ops::hopper::b_resident
