// dW (TN) with bf16 results for groups of few rows on Hopper (sm_90a): each group's dC slice stays
// resident in shared memory while the group's m-tiles of aᵀ stream through, and every finished tile
// leaves by TMA tensor stores. Chosen by grouped_gemm.cc for 32-128 rows per group on average
// (DeepSeek-V3's training step: 4096 tokens × top-8 over 256 experts, 128 rows each).
//
// Why (benchmarks/kernels-notes.md, "dW with few rows per group"): with ≤ 2 k-steps per tile, the
// general Hopper kernel (hopper.cu) rereads a 64 KiB B slice for every 32 KiB of A and writes each
// 64 KiB tile through 128 row copies; this kernel is ladder step 11t (benchmarks/kernels/grouped_gemm/
// 11-hopper-b-resident-dw.cu), which ran the E=256 dW 1.263× as fast as hopper.cu's kernel on the
// H200, bit-equal (results/ladder11-5425189.txt). Rows past a group's end are zeroed as in hopper.cu.
//
// Block: 3 warpgroups, one block per SM, persistent over the work items (item_at), n fastest (the
// blocks in flight share a group's A slices through L2). Warpgroup 0: thread 0 issues
// the TMA loads, thread 32 the tensor stores; warpgroups 1 and 2 are the consumers, each owning 64
// rows of the 128×256 tile (wgmma m64n256k16, 128 fp32 accumulators a thread).
//
// Shared memory (1024-aligned, 128-byte swizzle throughout):
//   A ring   5 stages × 16 KiB: two [64 k][64 m] boxes of a_eᵀ, one per consumer
//   B        2 k-tiles × 32 KiB: four [64 k][64 n] boxes of dC_e each
//   staging  the 128×256 bf16 tile as four [128 rows][64 columns] boxes (64 KiB), the layout the
//            output's tensor map stores from
//
// Work items and B loads. A group of at most B_RESIDENT_MAX_GROUP_ROWS = 128 rows (≤ 2 k-tiles) is
// one item per n-tile: it loads its B slice once and all its m-tiles reuse it. A larger group (a
// skewed routing: the host knows only the average) is no work here: grouped_gemm_cuda runs
// hopper.cu's kernel over those groups alone after this one. (Streaming a large group's B through
// this kernel's one B buffer, as first written, ran the E=256 Zipf dW at 0.82× hopper.cu's speed:
// H200, 91e7d0f, benchmarks/results/grouped-gemm-shapes3_13-variants-91e7d0f.json.) Both sides
// derive the same sequence of B loads from the offsets, and count them on b_full / b_empty:
//   b_full   1 arrival (the producer's expect_tx of the load's bytes; 0 bytes for a group of no rows)
//   b_empty  2 arrivals (each consumer, once every wgmma reading that load has completed)
// Beside them the A ring's full/empty and the staging's tile_full (256 consumer threads) and
// tile_empty (the storer thread, once the engine has read the staging out).
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "ops/moe/grouped_gemm/hopper.h"
#include "ops/moe/grouped_gemm/hopper_b_resident.h"
#include "ops/moe/grouped_gemm/sm90.cuh"
#include "ops/moe/grouped_gemm/wgmma.cuh"

namespace moe::ops {

namespace b_resident {
namespace {

using namespace sm90;

constexpr int BM = 128, BN = 256, BK = 64;
constexpr int CONSUMERS = 2, THREADS = 128 * (1 + CONSUMERS);
constexpr int B_K_TILES = 2;  // k-tiles of B in shared memory at once: a group of ≤ 128 rows in one load
constexpr int A_STAGES = 5;
constexpr int A_STAGE_BYTES = BM * BK * 2;   // 16 KiB
constexpr int B_K_TILE_BYTES = BN * BK * 2;  // 32 KiB
constexpr int OUT_BOX_BYTES = BM * 64 * 2;   // 16 KiB: [128 rows][64 columns] bf16
constexpr int STAGING_BYTES = BM * BN * 2;   // 64 KiB
constexpr int SMEM_BYTES = A_STAGES * A_STAGE_BYTES + B_K_TILES * B_K_TILE_BYTES + STAGING_BYTES + 1024;  // + slack to align
static_assert(SMEM_BYTES + 128 <= 232448, "over the 227 KiB opt-in (128: the static mbarriers)");

struct Params {
  const int32_t* offsets;  // [E+1]
  int M, E;
  int cols;              // dW_e is [K, cols = N]
  int m_tiles, n_tiles;  // of one group's [rows, cols]
};

// Every wait is bounded: about 10 s of the SM clock (checked every 4096 polls), past which the block
// traps, so that a protocol error fails the launch (a CUDA error the op reports) instead of hanging
// the process. Written so before its first run (as the ladder's 11t), kept since: it costs a clock
// read every 4096 polls.
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

static_assert(B_K_TILES * BK == B_RESIDENT_MAX_GROUP_ROWS, "the groups this kernel takes are those whose B fits");

struct Item {
  int group, col0, k_begin, k_end, k_tiles;
  bool work;  // the group's B fits (≤ B_K_TILES k-tiles): all its m-tiles here; otherwise hopper.cu's
};
// Index i of E × n_tiles (n fastest).
__device__ __forceinline__ Item item_at(const Params& p, int i) {
  Item it;
  it.group = i / p.n_tiles;
  it.col0 = (i % p.n_tiles) * BN;
  it.k_begin = min(max(__ldg(p.offsets + it.group), 0), p.M);
  it.k_end = min(max(__ldg(p.offsets + it.group + 1), it.k_begin), p.M);
  it.k_tiles = (it.k_end - it.k_begin + BK - 1) / BK;
  it.work = it.k_tiles <= B_K_TILES;
  return it;
}

// Zeroes rows valid..63 of `boxes` consecutive [64][64] bf16 boxes (128-byte rows: whole rows, so the
// swizzle, which permutes 16-byte chunks within a row, does not matter) by 128 threads, then orders
// those generic-proxy stores before the tensor cores' (async-proxy) reads.
__device__ __forceinline__ void zero_rows(unsigned char* box0, int boxes, int valid, int thread) {
  const int per_box = (BK - valid) * 8;  // 16-byte chunks
  for (int i = thread; i < boxes * per_box; i += 128) {
    const int box = i / per_box, rest = i % per_box;
    *reinterpret_cast<uint4*>(box0 + box * (BK * 128) + (valid + rest / 8) * 128 + (rest % 8) * 16) = make_uint4(0, 0, 0, 0);
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// This consumer's 64 rows of the tile into the four staging boxes in the 128-byte swizzle (16-byte
// chunk c of row r at chunk c ^ (r % 8); the boxes 1024-aligned). A thread holds, per 8-column block
// j and half h, the pair at row (its warp's 16 rows + lane/4 + 8h), column 8j + 2(lane%4): chunk
// j % 8 of box j / 8. The 8 rows of one store have distinct r % 8, so its 32 lanes hit 32 banks.
__device__ __forceinline__ void put_tile(const float (&d)[128], uint32_t staging, int consumer) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = consumer * 64 + warp * 16 + (lane >> 2) + 8 * h;
    const uint32_t row_base = staging + uint32_t(row * 128 + (lane & 3) * 4);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      __nv_bfloat162 v = __floats2bfloat162_rn(d[j * 4 + h * 2], d[j * 4 + h * 2 + 1]);
      const uint32_t at = row_base + uint32_t((j / 8) * OUT_BOX_BYTES + (((j % 8) ^ (row % 8)) * 16));
      asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at), "r"(*reinterpret_cast<uint32_t*>(&v)) : "memory");
    }
  }
  // The storer's reads are the bulk-copy engine's (async proxy): order these stores before them.
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// The four staging boxes to dW_e (a 3-D map over [E][K][N], box {64, 128, 1}; TMA clips the rows past
// K and the columns past N), as one bulk group.
__device__ __forceinline__ void store_tile(const Params& p, const CUtensorMap* map_out, int group, int row0, int col0, uint32_t staging) {
#pragma unroll 1
  for (int b = 0; b < BN / 64 && col0 + 64 * b < p.cols; ++b)
    asm volatile(
        "cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(reinterpret_cast<uint64_t>(map_out)),
        "r"(staging + uint32_t(b * OUT_BOX_BYTES)), "r"(col0 + 64 * b), "r"(row0), "r"(group)
        : "memory");
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

__global__ void __launch_bounds__(THREADS, 1)
    dw_b_resident_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                         const __grid_constant__ CUtensorMap map_out, Params p) {
  extern __shared__ unsigned char smem_raw[];
  unsigned char* ring = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* b_res = ring + A_STAGES * A_STAGE_BYTES;
  const uint32_t staging = smem_u32(b_res + B_K_TILES * B_K_TILE_BYTES);
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
    mbar_init(&tile_empty, 1);
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
      uint32_t round = 0, b_loads = 0;
      // The item's B slice (its k_tiles, at most B_K_TILES), once the consumers released the last.
      auto load_b = [&](const Item& it) {
        wait(&b_empty, (b_loads & 1) ^ 1);
        mbar_arrive_expect_tx(&b_full, uint32_t(it.k_tiles * B_K_TILE_BYTES));
        for (int kt = 0; kt < it.k_tiles; ++kt)
#pragma unroll
          for (int j = 0; j < BN / 64; ++j)
            tma_load_2d(b_res + kt * B_K_TILE_BYTES + j * (BK * 128), &map_b, &b_full, it.col0 + 64 * j, it.k_begin + kt * BK);
        ++b_loads;
      };
      auto load_a = [&](const Item& it, int m, int kt) {
        wait(&empty[stage], (round & 1) ^ 1);
        unsigned char* sa = ring + stage * A_STAGE_BYTES;
        mbar_arrive_expect_tx(&full[stage], A_STAGE_BYTES);
#pragma unroll
        for (int j = 0; j < BM / 64; ++j) tma_load_2d(sa + j * (BK * 128), &map_a, &full[stage], m * BM + 64 * j, it.k_begin + kt * BK);
        if (++stage == A_STAGES) {
          stage = 0;
          ++round;
        }
      };
      for (int i = blockIdx.x; i < items; i += gridDim.x) {
        const Item it = item_at(p, i);
        if (!it.work) continue;
        load_b(it);
        for (int m = 0; m < p.m_tiles; ++m)
          for (int kt = 0; kt < it.k_tiles; ++kt) load_a(it, m, kt);
      }
    } else if (threadIdx.x == 32) {
      asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&map_out)) : "memory");
      uint32_t n = 0;
      for (int i = blockIdx.x; i < items; i += gridDim.x) {
        const Item it = item_at(p, i);
        if (!it.work) continue;
        for (int m = 0; m < p.m_tiles; ++m, ++n) {
          wait(&tile_full, n & 1);
          store_tile(p, &map_out, it.group, m * BM, it.col0, staging);
          // The staging is free once the engine has read it; the writes themselves stay in flight.
          asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
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
    uint32_t round = 0, n = 0, b_uses = 0;
    // Waits for the item's B slice; zeroes the rows past the group's end in its last k-tile, each
    // consumer two of that k-tile's four boxes, both then meeting.
    auto acquire_b = [&](const Item& it, int valid_last) {
      wait(&b_full, b_uses & 1);
      if (it.k_tiles > 0 && valid_last < BK) {
        zero_rows(b_res + (it.k_tiles - 1) * B_K_TILE_BYTES + 2 * consumer * (BK * 128), 2, valid_last, lane128);
        asm volatile("bar.sync 1, 256;\n" ::: "memory");  // both halves zeroed before either consumer reads B
      }
    };
    // Every wgmma reading B's current load has completed: the producer may load the next.
    auto release_b = [&] {
      if (lane128 == 0) mbar_arrive(&b_empty);
      ++b_uses;
    };
    for (int i = blockIdx.x; i < items; i += gridDim.x) {
      const Item it = item_at(p, i);
      const int valid_last = it.k_end - (it.k_begin + (it.k_tiles - 1) * BK);  // rows of the group in its last k-step
      if (!it.work) continue;
      acquire_b(it, valid_last);
      for (int m = 0; m < p.m_tiles; ++m) {
        int prev = -1;
        for (int kt = 0; kt < it.k_tiles; ++kt) {
          wait(&full[stage], round & 1);
          unsigned char* sa = ring + stage * A_STAGE_BYTES + consumer * (BK * 128);  // this warpgroup's 64 rows
          if (kt == it.k_tiles - 1 && valid_last < BK) {
            zero_rows(sa, 1, valid_last, lane128);
            // This warpgroup's box only (named barriers 2 and 3; immediate ids keep ptxas from reserving all 16).
            if (consumer == 0) asm volatile("bar.sync 2, 128;\n" ::: "memory");
            else asm volatile("bar.sync 3, 128;\n" ::: "memory");
          }
          const unsigned char* sb = b_res + kt * B_K_TILE_BYTES;
          wgmma_fence();
#pragma unroll
          for (int kk = 0; kk < BK / 16; ++kk) {
            const uint64_t da = smem_desc(sa + kk * 16 * 128, BK * 128, 1024);
            const uint64_t db = smem_desc(sb + kk * 16 * 128, BK * 128, 1024);
            hopper::wgmma_m64n256k16<1, 1>(d, da, db, kt > 0 || kk > 0);
          }
          wgmma_commit();
          wgmma_wait<1>();
          if (prev >= 0 && lane128 == 0) mbar_arrive(&empty[prev]);
          prev = stage;
          if (++stage == A_STAGES) {
            stage = 0;
            ++round;
          }
        }
        wgmma_wait<0>();
        if (prev >= 0 && lane128 == 0) mbar_arrive(&empty[prev]);
        if (m == p.m_tiles - 1) release_b();
        if (it.k_tiles == 0) {
#pragma unroll
          for (int j = 0; j < 128; ++j) d[j] = 0.f;  // a group of no rows: dW_e = 0
        }
        wait(&tile_empty, (n & 1) ^ 1);
        put_tile(d, staging, consumer);
        mbar_arrive(&tile_full);
        ++n;
      }
    }
  }
}

}  // namespace
}  // namespace b_resident

bool grouped_gemm_b_resident_fits(const GroupedGemm& g) {
  // E ≤ 8192: the prefix of the large groups (grouped_gemm_cuda) is counted in one block's shared memory.
  return g.mode == GemmMode::TN && g.epilogue == GemmEpilogue::Store && g.out.dtype() == DType::bf16 && !g.accumulate &&
         g.offsets.size(0) - 1 <= 8192 && grouped_gemm_hopper_fits(g);
}

void grouped_gemm_b_resident(const GroupedGemm& g, void* stream_ptr) {
  using namespace b_resident;
  const int64_t M = g.a.size(0), E = g.offsets.size(0) - 1, K = g.a.size(1), N = g.b.size(1);
  Params p{};
  p.offsets = g.offsets.data<int32_t>();
  p.M = int(M);
  p.E = int(E);
  p.cols = int(N);
  p.m_tiles = int((K + BM - 1) / BM);
  p.n_tiles = int((N + BN - 1) / BN);
  const int64_t items = E * int64_t(p.n_tiles);
  // With no m-tiles (K = 0) an item would never free B; grouped_gemm_hopper_fits refuses K = 0 and
  // N = 0 already.
  if (items == 0 || p.m_tiles == 0) return;
  // The index space and the blocks' strides through it stay within int.
  MOE_ARG_CHECK(items + 4096 < (int64_t(1) << 31), "groupedGemm", "dW of ", E, " groups of [", K, ", ", N,
                "]: too many tiles for the B-resident kernel");
  // a [M, K] and dC [M, N], both read as [64 rows][64 columns] boxes (as hopper.cu's TN path); dW as
  // [E][K][N], stored as [1][128][64] boxes.
  const cuuint64_t a_dims[2] = {cuuint64_t(K), cuuint64_t(M)}, a_strides[1] = {cuuint64_t(K) * 2};
  const cuuint64_t b_dims[2] = {cuuint64_t(N), cuuint64_t(M)}, b_strides[1] = {cuuint64_t(N) * 2};
  const cuuint32_t box[2] = {64, BK};
  const cuuint64_t o_dims[3] = {cuuint64_t(N), cuuint64_t(K), cuuint64_t(E)}, o_strides[2] = {cuuint64_t(N) * 2, cuuint64_t(K * N) * 2};
  const cuuint32_t o_box[3] = {64, BM, 1};
  auto make_map = [](const void* base, int rank, const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* bx) {
    CUtensorMap map;
    const CUresult r = encode_bf16_map(&map, base, rank, dims, strides, bx);
    MOE_ARG_CHECK(r == CUDA_SUCCESS, "groupedGemm", "cuTensorMapEncodeTiled failed (CUresult ", int(r), ")");
    return map;
  };
  const CUtensorMap map_a = make_map(g.a.raw(), 2, a_dims, a_strides, box);
  const CUtensorMap map_b = make_map(g.b.raw(), 2, b_dims, b_strides, box);
  const CUtensorMap map_out = make_map(g.out.raw(), 3, o_dims, o_strides, o_box);
  cuda::check(cudaFuncSetAttribute(dw_b_resident_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES), "groupedGemm",
              "cudaFuncSetAttribute");
  int dev = 0;
  cuda::check(cudaGetDevice(&dev), "groupedGemm", "cudaGetDevice");
  const int sms = cuda::device_props(dev).multiprocessors;
  const int grid = int(std::max<int64_t>(1, std::min<int64_t>(sms, items)));
  dw_b_resident_kernel<<<grid, THREADS, SMEM_BYTES, cudaStream_t(stream_ptr)>>>(map_a, map_b, map_out, p);
  cuda::check_launch("groupedGemm");
}

}  // namespace moe::ops
