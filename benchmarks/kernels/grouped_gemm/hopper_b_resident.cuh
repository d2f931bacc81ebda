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
//   staging  the 128×256 bf16 tile (528-byte rows), drained by the bulk-copy engine (as hopper.cu v10);
//            or, with the tensor-store drains (Drain, below), four swizzled [128][64] boxes, one or
//            two buffers (with two, the A ring has 2 stages)
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
constexpr int A_STAGE_BYTES = 2 * BK * 128;                                    // 16 KiB
constexpr int B_K_TILE_BYTES = (BN / 64) * BK * 128;                           // 32 KiB
constexpr int STAGING_LD_BYTES = Layout<StoreVia::Handoff>::TILE_LD_BF16 * 2;  // 528

// How a finished tile leaves shared memory (session 12: with the wgmma removed the kernel still took
// 2.49 ms against 1.65 for a cudaMemset of its bytes, so the store path is what binds):
//   RowCopies      the padded 528-byte rows, one cp.async.bulk per row from 96 storer threads
//                  (a uniform-operand instruction, so each warp issues its lanes' copies one by one);
//                  one staging buffer, 5-stage A ring.
//   TensorStores   the tile as four [128 rows][64 columns] boxes in the 128-byte swizzle (the
//                  tensor map's layout: no padding, and the put is conflict-free through the
//                  swizzle), four TMA tensor stores from one thread; one staging buffer, 5-stage ring.
//   TensorStores2  the same with two staging buffers, so the consumers put tile n+1 while tile n
//                  is still being read out; only a 2-stage A ring fits beside them (224 KiB).
enum class Drain { RowCopies, TensorStores, TensorStores2 };
template <Drain D> struct Smem {
  static constexpr int A_STAGES = D == Drain::TensorStores2 ? 2 : 5;
  static constexpr int BUFS = D == Drain::TensorStores2 ? 2 : 1;
  static constexpr int BUF_BYTES = D == Drain::RowCopies ? BM * STAGING_LD_BYTES : BM * BN * 2;  // 66 or 64 KiB
  static constexpr int BYTES = A_STAGES * A_STAGE_BYTES + K_TILES_MAX * B_K_TILE_BYTES + BUFS * BUF_BYTES + 1024;
  static_assert(BYTES + 128 <= 232448, "over the 227 KiB opt-in (128: the static mbarriers)");
};

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
__device__ __forceinline__ void drain_rows(const Params& p, const Tile& tile, uint32_t tile_smem, int storer) {
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

// TensorStores: this consumer's 64 rows of the tile into four [128][64] bf16 boxes, 128-byte swizzled
// (16-byte chunk c of row r at chunk c ^ (r % 8); the boxes 1024-aligned). A thread holds, per
// 8-column block j and half h, the pair at row (its warp's 16 rows + lane/4 + 8h), column 8j + 2(lane%4):
// chunk j % 8 of box j / 8. The 8 rows of one store have distinct r % 8, so its 32 lanes hit 32 banks.
__device__ __forceinline__ void put_swizzled(const float (&d)[128], uint32_t tile_smem, int consumer) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = consumer * 64 + warp * 16 + (lane >> 2) + 8 * h;
    const uint32_t row_base = tile_smem + uint32_t(row * 128 + (lane & 3) * 4);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      __nv_bfloat162 v = __floats2bfloat162_rn(d[j * 4 + h * 2], d[j * 4 + h * 2 + 1]);
      const uint32_t at = row_base + uint32_t((j / 8) * (BM * 128) + (((j % 8) ^ (row % 8)) * 16));
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at), "r"(*reinterpret_cast<uint32_t*>(&v)) : "memory");
    }
  }
}
// TensorStores: the four boxes to dW (a 3-D map over [E][K][N], box {64, 128, 1}); TMA clips rows
// past K and columns past N. Commits one bulk group.
__device__ __forceinline__ void store_boxes(const Params& p, const CUtensorMap* map_out, const Tile& tile, uint32_t tile_smem) {
#pragma unroll 1
  for (int b = 0; b < BN / 64 && tile.col0 + 64 * b < p.cols; ++b)
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                     reinterpret_cast<uint64_t>(map_out)),
                 "r"(tile_smem + uint32_t(b * BM * 128)), "r"(tile.col0 + 64 * b), "r"(tile.row0), "r"(tile.group)
                 : "memory");
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

// Two probes take the kernel's time apart (session 12: it ran at 0.56 of a cudaMemset of its bytes,
// and ncu put the consumers' largest stall on the wait for the drained staging): NoMma skips the
// wgmma (tiles of zeros, every load, hand-off and store kept: the store path's own ceiling), NoStore
// skips the bulk copies (every load and wgmma kept: the loads' and tensor cores' ceiling). Their
// outputs are not the product; only the timing is read.
enum class Probe { None, NoMma, NoStore };

template <Probe PROBE, Drain D>
__global__ void __launch_bounds__(THREADS, 1)
    dw_b_resident_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                         const __grid_constant__ CUtensorMap map_out, Params p) {
  constexpr int A_STAGES = Smem<D>::A_STAGES, BUFS = Smem<D>::BUFS;
  constexpr bool ROWS = D == Drain::RowCopies;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* ring = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* b_res = ring + A_STAGES * A_STAGE_BYTES;
  const uint32_t staging0 = smem_u32(b_res + K_TILES_MAX * B_K_TILE_BYTES);  // buffer i at staging0 + i·BUF_BYTES
  __shared__ __align__(8) uint64_t full[A_STAGES], empty[A_STAGES];
  __shared__ __align__(8) uint64_t b_full, b_empty, tile_full[BUFS], tile_empty[BUFS];
  const int wg = threadIdx.x >> 7;
  if (threadIdx.x == 0) {
    for (int s = 0; s < A_STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], CONSUMERS);
    }
    mbar_init(&b_full, 1);
    mbar_init(&b_empty, CONSUMERS);
    for (int i = 0; i < BUFS; ++i) {
      mbar_init(&tile_full[i], CONSUMERS * 128);
      mbar_init(&tile_empty[i], ROWS ? STORER_THREADS : 1);  // TensorStores: one storer thread
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  const int items = p.E * p.n_tiles;

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_a)) : "memory");
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_b)) : "memory");
      if constexpr (!ROWS) asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_out)) : "memory");
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
    } else if (ROWS && threadIdx.x >= 32) {
      const int storer = threadIdx.x - 32;
      uint32_t n = 0;
      for (int i = blockIdx.x; i < items; i += gridDim.x) {
        const Item it = item_at(p, i);
        for (int m = 0; m < p.tn_m_tiles; ++m, ++n) {
          wait(&tile_full[0], n & 1);
          if constexpr (PROBE != Probe::NoStore) drain_rows(p, tile_of(p, it, m), staging0, storer);
          mbar_arrive(&tile_empty[0]);
        }
      }
      asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");  // every write done before the block ends
    } else if (!ROWS && threadIdx.x == 32) {
      // Tile n sits in buffer n % BUFS. With two buffers, buffer (n-1) % 2 is freed once the engine
      // has read all but the newest bulk group (wait_group.read 1), so tile n's stores are issued
      // before tile n-1's have been read out.
      uint32_t n = 0;
      for (int i = blockIdx.x; i < items; i += gridDim.x) {
        const Item it = item_at(p, i);
        for (int m = 0; m < p.tn_m_tiles; ++m, ++n) {
          const int buf = int(n % BUFS);
          wait(&tile_full[buf], (n / BUFS) & 1);
          if constexpr (PROBE != Probe::NoStore) store_boxes(p, &map_out, tile_of(p, it, m), staging0 + uint32_t(buf * Smem<D>::BUF_BYTES));
          if constexpr (BUFS == 1) {
            asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
            mbar_arrive(&tile_empty[0]);
          } else {
            asm volatile("cp.async.bulk.wait_group.read 1;\n" ::: "memory");
            if (n > 0) mbar_arrive(&tile_empty[buf ^ 1]);
          }
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
        const int buf = int(n % BUFS);
        wait(&tile_empty[buf], ((n / BUFS) & 1) ^ 1);
        const uint32_t staging = staging0 + uint32_t(buf * Smem<D>::BUF_BYTES);
        if constexpr (ROWS) handoff_put<__nv_bfloat16>(d, staging, consumer, 0);
        else put_swizzled(d, staging, consumer);
        // The storers' reads are the bulk-copy engine's (async proxy): order the st.shared before them.
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        mbar_arrive(&tile_full[buf]);
        ++n;
      }
    }
  }
}

// dW_e[K, N] = a_eᵀ · c_e (bf16 results, overwritten): a [M, K], c [M, N], out [E, K, N]. Every group
// must have at most K_TILES_MAX·64 rows. PROBE: the kernel's probes (not the product).
template <Probe PROBE = Probe::None, Drain D = Drain::RowCopies> void run(const ladder::Problem& pr, const ladder::Inputs& in, __nv_bfloat16* out, int sms) {
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
  // dW as [E][K][N] (innermost first), boxes of 64 columns × 128 rows of one group; unused by RowCopies.
  const cuuint64_t o_dims[3] = {cuuint64_t(pr.N), cuuint64_t(pr.K), cuuint64_t(pr.E)};
  const cuuint64_t o_strides[2] = {cuuint64_t(pr.N) * 2, cuuint64_t(pr.K) * pr.N * 2};
  const cuuint32_t o_box[3] = {64, BM, 1};
  const CUtensorMap map_out = make_map(out, 3, o_dims, o_strides, o_box);
  static const bool attr_set = [] {
    CHECK_CUDA(cudaFuncSetAttribute(dw_b_resident_kernel<PROBE, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem<D>::BYTES));
    return true;
  }();
  (void)attr_set;
  const int items = p.E * p.n_tiles;
  const int grid = std::max(1, std::min(sms, items));
  dw_b_resident_kernel<PROBE, D><<<grid, THREADS, Smem<D>::BYTES>>>(map_a, map_b, map_out, p);
}

}  // namespace moe::ops::hopper::b_resident
