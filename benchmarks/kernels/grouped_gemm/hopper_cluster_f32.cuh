// Step 10 of the grouped-GEMM ladder: training's dW (TN) with fp32 results on 128×128 tiles whose
// stores are handed off whole and written by TMA tensor stores, alone (CLUSTER = 1: the addon's
// kernel as it was at 9fa034d, TN only) or in 2-CTA clusters that share B by TMA multicast
// (CLUSTER = 2). Why (benchmarks/kernels-notes.md, "fp32 dW with its stores hidden"): at 9fa034d
// the 128-wide hand-off ran level with the warp slices (ncu on the layer's dW13: 4.96 M cycles
// against 4.88 M, tensor pipe 72.8%) with the L2 at 77.6% of its throughput, against 63.9% for the
// 128×256 tiles. Sharing B between two CTAs cuts a quarter of the operand reads from L2. Written in
// session 9; all six variants ran on the H200 (README: 10b's slowness was its remote arrive's cluster-scope release).
//
// Block: 3 warpgroups (384 threads), one block per SM, persistent. Warpgroup 0: thread 0 issues the
// TMA loads into a 5-stage ring (A: two [64 k][64 m] boxes of a_eᵀ; B: two [64 k][64 n] boxes of
// dC_e; 32 KiB a stage), threads 32-127 are the storers; warpgroups 1 and 2 are the consumers, each
// owning 64 rows of the tile (wgmma m64n128k16, 64 fp32 accumulators a thread), who drop the tile
// into the 64 KiB staging (four 128-row × 32-column boxes in the 128-byte swizzle) and go on.
//
// Work items (the same sequence in both CTAs of a cluster): u → (group, m-pair, n-tile), n fastest;
// the CTA of rank r in its cluster takes m-tile CLUSTER·pair + r. An m-tile past the group's block
// (an odd count of m-tiles) loads zeros (TMA fills what lies out of bounds) and stores nothing (the
// tensor stores clip), so both CTAs walk the same items, k-steps and ring stages.
//
// The cluster's protocol (CLUSTER = 2), beside the one-CTA kernel's:
// - Each CTA loads its own A boxes and B box r, multicast to both CTAs (mask 0b11), so each CTA's
//   full[s] completes on its own A bytes plus both B boxes: the same 32 KiB expected by its own
//   producer's arrive.expect_tx. A peer's bytes may land before that expect_tx; the phase cannot
//   complete early, as it still waits for the local producer's arrival.
// - A stage is written in both CTAs by either CTA's multicast, so it may be refilled only once
//   both CTAs' consumers have released it: empty[s] counts CONSUMERS × 2 arrivals, each consumer
//   arriving on its own CTA's barrier and, through mapa, on the peer's.
// - Cluster-wide barriers after the mbarriers' initialisation (no multicast or remote arrival
//   reaches a barrier not yet initialised) and before exit (none reaches a CTA that has exited).
// Zeroing the rows past a group's end in the last k-step (as hopper.cu's TN path) touches only this
// CTA's copy of a stage, after its full[s] and before its consumers release it.
//
// Two more pairings take 10b apart (issue 20: 10b ran at 0.415x the warp slices with all 132 SMs
// busy, so the cost is in the protocol): Pair::OwnLoads (10c) launches the same clusters and walks
// the same items, but each CTA loads all of B itself and releases only its own stages (10a's
// protocol in a cluster launch); Pair::Lockstep (10d) loads all of B itself too, but releases its
// stages in both CTAs as 10b does (10b's lockstep without the multicast). Measured: 10c level with
// the warp slices, 10d as slow as 10b; 10e and 10f (10b and 10d with the remote arrive at CTA scope,
// mbar_arrive_in) level again: the cost was the cluster-scope release, not the lockstep.
#pragma once
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "hopper_pingpong.cuh"  // wgmma_m64n128k16 and the sm90.cuh helpers

namespace moe::ops::cluster_f32 {

using namespace moe::ops::sm90;

// How the CTAs of a 2-CTA cluster share B and release stages (see above; one CTA: ignored). The
// *CtaRelease pairings are Multicast and Lockstep with the peer's stage released at CTA scope
// (mbar_arrive_in says why; 10e and 10f).
enum class Pair { Multicast, OwnLoads, Lockstep, MulticastCtaRelease, LockstepCtaRelease };

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 5, CONSUMERS = 2, THREADS = 384;
constexpr int A_BYTES = BM * BK * 2, B_BOX_BYTES = 64 * BK * 2, STAGE_BYTES = A_BYTES + 2 * B_BOX_BYTES;  // 16 + 2 × 8 KiB
constexpr int F32_BOX_BYTES = BM * 128;                                                                   // 128 rows × 32 fp32
constexpr int STAGING_BYTES = BM * BN * 4;                                                                // 64 KiB
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + STAGING_BYTES + 1024;                                   // + slack to align
constexpr int STORER_THREADS = 96;
static_assert(SMEM_BYTES + 96 <= 232448, "over the 227 KiB opt-in");

struct Params {
  const int32_t* offsets;  // [E+1]
  int M, E;
  int rows, cols;        // dW_e is [rows = K, cols = N]
  int m_tiles, n_tiles;  // of one group's [rows, cols]
  bool accumulate;
};

struct Item {
  int group, row0, col0, k_begin, k_end, k_tiles;
};
template <int CLUSTER> __device__ __forceinline__ Item item_at(const Params& p, int u, int rank) {
  const int pairs = (p.m_tiles + CLUSTER - 1) / CLUSTER, per_group = pairs * p.n_tiles;
  Item it;
  it.group = u / per_group;
  const int r = u % per_group;
  it.row0 = ((r / p.n_tiles) * CLUSTER + rank) * BM;
  it.col0 = (r % p.n_tiles) * BN;
  it.k_begin = min(max(__ldg(p.offsets + it.group), 0), p.M);
  it.k_end = min(max(__ldg(p.offsets + it.group + 1), it.k_begin), p.M);
  it.k_tiles = (it.k_end - it.k_begin + BK - 1) / BK;
  return it;
}
template <int CLUSTER> __host__ __device__ __forceinline__ int items(const Params& p) {
  return p.E * ((p.m_tiles + CLUSTER - 1) / CLUSTER) * p.n_tiles;
}

// ---- cluster primitives ---------------------------------------------------------------------------
__device__ __forceinline__ int cluster_rank() {
  int r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
// Arrives on the mbarrier at the same shared-memory offset in CTA `rank` of the cluster, with release
// semantics at cluster scope (CLUSTER_SCOPE) or the default CTA scope. With the cluster scope, 10b and
// 10d ran at half speed, ~10% of their warp samples stalled on a membar (ERRBAR and MEMBAR.ALL.CTA
// among their hottest instructions) and their HGMMAs waited twice as long (ncu, ladder10-b215a4b);
// at CTA scope they run level (ladder10-4392a81). Which instruction differs is not identified: a
// count of MEMBAR/ERRBAR in the SASS is the same for both scopes (results/sass10-membar-4392a81.txt).
// The CTA scope is enough here:
// what the arrive releases is a ring stage this thread's warpgroup has only read, through wgmma,
// whose reads wgmma.wait_group completed before the arrive; nothing it wrote has to be seen by the
// peer (CUTLASS's ClusterBarrier::arrive(cta_id) is the same plain arrive).
template <bool CLUSTER_SCOPE> __device__ __forceinline__ void mbar_arrive_in(uint64_t* bar, int rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_u32(bar)), "r"(rank));
  if constexpr (CLUSTER_SCOPE) asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
  else asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}
// A 2-D TMA load written to the same offset in every CTA of `mask`, each CTA's mbarrier at `bar`'s
// offset credited with the bytes it received.
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1, uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;\n" ::
          "r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "h"(mask)
      : "memory");
}
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, uint32_t src, int c0, int c1, int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(reinterpret_cast<uint64_t>(map)),
      "r"(src), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
}
__device__ __forceinline__ void tma_add_3d(const CUtensorMap* map, uint32_t src, int c0, int c1, int c2) {
  asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(src), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}

// ---- the hand-off (9fa034d) ---------------------------------------------------------------------------
// Consumer side: this warpgroup's 64 rows of the fp32 tile into the four swizzled boxes (chunk c of
// row r at c ^ (r % 8)); in each store the lanes with (l%4)/2 = 1 take the pair two j further on,
// so that a half-warp's 16 lanes cover all 8 chunks once.
__device__ __forceinline__ void put_f32(const float (&d)[BN / 2], uint32_t tile_smem, int consumer) {
  const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
  const int q = lane >> 2, half = (lane >> 1) & 1;
  const int row = consumer * 64 + warp * 16 + q;
  const uint32_t base = tile_smem + uint32_t(row * 128 + (lane & 1) * 8);
#pragma unroll
  for (int box = 0; box < BN / 32; ++box) {
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
#pragma unroll
      for (int second = 0; second < 2; ++second) {
        const bool far = (half ^ second) != 0;
        const int j_near = 4 * box + jj, j_far = j_near + 2;
        const int chunk = (2 * (far ? jj + 2 : jj) + half) ^ q;
        const uint32_t at = base + uint32_t(box * F32_BOX_BYTES + chunk * 16);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float x = far ? d[j_far * 4 + h * 2] : d[j_near * 4 + h * 2];
          const float y = far ? d[j_far * 4 + h * 2 + 1] : d[j_near * 4 + h * 2 + 1];
          asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(at + uint32_t(h * 8 * 128)), "f"(x), "f"(y) : "memory");
        }
      }
    }
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Storer side: one thread stores (or adds) the four boxes, then waits until they have been read.
__device__ __forceinline__ void drain_f32(const Params& p, const Item& it, const CUtensorMap* map_out, uint32_t tile_smem, int storer) {
  if (storer != 0 || (p.accumulate && it.k_tiles == 0)) return;
#pragma unroll 1
  for (int box = 0; box < BN / 32 && it.col0 + 32 * box < p.cols; ++box) {
    const uint32_t src = tile_smem + uint32_t(box * F32_BOX_BYTES);
    if (p.accumulate) tma_add_3d(map_out, src, it.col0 + 32 * box, it.row0, it.group);
    else tma_store_3d(map_out, src, it.col0 + 32 * box, it.row0, it.group);
  }
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
  asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
}

// ---- the kernel -----------------------------------------------------------------------------------
template <int CLUSTER, Pair PAIR = Pair::Multicast>
__global__ void __launch_bounds__(THREADS, 1)
    dw_f32_kernel(const __grid_constant__ CUtensorMap map_a, const __grid_constant__ CUtensorMap map_b,
                  const __grid_constant__ CUtensorMap map_out, Params p) {
  static_assert(CLUSTER == 1 || CLUSTER == 2, "one CTA, or pairs");
  constexpr bool multicast = CLUSTER > 1 && (PAIR == Pair::Multicast || PAIR == Pair::MulticastCtaRelease);
  constexpr bool release_both = CLUSTER > 1 && PAIR != Pair::OwnLoads;  // each stage freed by both CTAs' consumers
  constexpr bool cluster_scope_release = PAIR == Pair::Multicast || PAIR == Pair::Lockstep;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* ring = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
  __shared__ __align__(8) uint64_t tile_full, tile_empty;
  const uint32_t staging = smem_u32(ring + STAGES * STAGE_BYTES);
  const int rank = CLUSTER > 1 ? cluster_rank() : 0;
  const int first = int(blockIdx.x) / CLUSTER, stride = int(gridDim.x) / CLUSTER;
  const int total = items<CLUSTER>(p);
  const int wg = threadIdx.x >> 7;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], CONSUMERS * (release_both ? CLUSTER : 1));
    }
    mbar_init(&tile_full, CONSUMERS * 128);
    mbar_init(&tile_empty, STORER_THREADS);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if constexpr (CLUSTER > 1) cluster_sync();

  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      int stage = 0;
      uint32_t round = 0;
      for (int u = first; u < total; u += stride) {
        const Item it = item_at<CLUSTER>(p, u, rank);
        for (int kt = 0; kt < it.k_tiles; ++kt) {
          mbar_wait(&empty[stage], (round & 1) ^ 1);
          unsigned char* sa = ring + stage * STAGE_BYTES;
          unsigned char* sb = sa + A_BYTES;
          mbar_arrive_expect_tx(&full[stage], STAGE_BYTES);
          const int k0 = it.k_begin + kt * BK;
#pragma unroll
          for (int j = 0; j < BM / 64; ++j) tma_load_2d(sa + j * (BK * 128), &map_a, &full[stage], it.row0 + 64 * j, k0);
          if constexpr (!multicast) {
#pragma unroll
            for (int j = 0; j < BN / 64; ++j) tma_load_2d(sb + j * B_BOX_BYTES, &map_b, &full[stage], it.col0 + 64 * j, k0);
          } else {
            tma_load_2d_multicast(sb + rank * B_BOX_BYTES, &map_b, &full[stage], it.col0 + 64 * rank, k0, uint16_t(0x3));
          }
          if (++stage == STAGES) {
            stage = 0;
            ++round;
          }
        }
      }
    } else if (threadIdx.x >= 32) {
      const int storer = threadIdx.x - 32;
      uint32_t n = 0;
      for (int u = first; u < total; u += stride, ++n) {
        const Item it = item_at<CLUSTER>(p, u, rank);
        mbar_wait(&tile_full, n & 1);
        drain_f32(p, it, &map_out, staging, storer);
        mbar_arrive(&tile_empty);
      }
      asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int consumer = wg - 1;
    float d[BN / 2];
    int stage = 0;
    uint32_t round = 0;
    uint32_t n = 0;
    // Releases a stage: in this CTA and, when both CTAs release (10b: the peer's multicast writes
    // here; 10d: the same lockstep without it), in the peer.
    auto release = [&](int s) {
      if ((threadIdx.x & 127) != 0) return;
      mbar_arrive(&empty[s]);
      if constexpr (release_both) mbar_arrive_in<cluster_scope_release>(&empty[s], rank ^ 1);
    };
    for (int u = first; u < total; u += stride) {
      const Item it = item_at<CLUSTER>(p, u, rank);
      int prev = -1;
      for (int kt = 0; kt < it.k_tiles; ++kt) {
        mbar_wait(&full[stage], round & 1);
        unsigned char* sa = ring + stage * STAGE_BYTES + consumer * (BK * 128);  // this warpgroup's A box
        unsigned char* sb = ring + stage * STAGE_BYTES + A_BYTES;
        // The group ends inside this k-step: zero the rows past its end (the next group's) in this
        // consumer's A box and its B box, then make them visible to the tensor cores.
        const int valid = it.k_end - (it.k_begin + kt * BK);
        if (valid < BK) {
          const int lane128 = threadIdx.x & 127;
          for (int i = lane128; i < (BK - valid) * 8 * 2; i += 128) {
            const int box = i / ((BK - valid) * 8), rest = i % ((BK - valid) * 8);
            unsigned char* base = box == 0 ? sa : sb + consumer * B_BOX_BYTES;
            *reinterpret_cast<uint4*>(base + (valid + rest / 8) * 128 + (rest % 8) * 16) = make_uint4(0, 0, 0, 0);
          }
          asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
          asm volatile("bar.sync 1, 256;\n" ::: "memory");
        }
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
          const uint64_t da = smem_desc(sa + kk * 16 * 128, BK * 128, 1024);
          const uint64_t db = smem_desc(sb + kk * 16 * 128, B_BOX_BYTES, 1024);
          moe::ops::hopper::wgmma_m64n128k16<1, 1>(d, da, db, kt > 0 || kk > 0);
        }
        wgmma_commit();
        wgmma_wait<1>();
        if (prev >= 0) release(prev);
        prev = stage;
        if (++stage == STAGES) {
          stage = 0;
          ++round;
        }
      }
      wgmma_wait<0>();
      if (prev >= 0) release(prev);
      if (it.k_tiles == 0) {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) d[i] = 0.f;
      }
      mbar_wait(&tile_empty, (n & 1) ^ 1);
      put_f32(d, staging, consumer);
      mbar_arrive(&tile_full);
      ++n;
    }
  }
  if constexpr (CLUSTER > 1) cluster_sync();
}

// ---- host ------------------------------------------------------------------------------------------
inline CUresult encode_map(CUtensorMap* map, CUtensorMapDataType type, const void* base, int rank, const cuuint64_t* dims,
                           const cuuint64_t* strides, const cuuint32_t* box) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (!encode) return CUDA_ERROR_NOT_FOUND;
  const cuuint32_t unit[3] = {1, 1, 1};
  return encode(map, type, cuuint32_t(rank), const_cast<void*>(base), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
}

// The launch of `clusters` clusters of CLUSTER CTAs (attr: storage for the cluster attribute).
template <int CLUSTER> cudaLaunchConfig_t launch_config(int clusters, cudaStream_t stream, cudaLaunchAttribute& attr) {
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = CLUSTER;
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(unsigned(clusters * CLUSTER));
  cfg.blockDim = dim3(THREADS);
  cfg.dynamicSmemBytes = SMEM_BYTES;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cfg;
}

// How many clusters of CLUSTER CTAs can run at once (CLUSTER = 1: the SMs), as the occupancy API
// sees this kernel with its shared memory; 0 if none fits.
template <int CLUSTER, Pair PAIR = Pair::Multicast> int resident_clusters(int sms) {
  auto kernel = dw_f32_kernel<CLUSTER, PAIR>;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES) != cudaSuccess) return 0;
  if constexpr (CLUSTER == 1) {
    return sms;
  } else {
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = launch_config<CLUSTER>(sms / CLUSTER, 0, attr);
    int resident = 0;
    if (cudaOccupancyMaxActiveClusters(&resident, kernel, &cfg) != cudaSuccess) return 0;
    return std::min(resident, sms / CLUSTER);
  }
}

// dW_e[K, N] (+)= a_eᵀ · c_e over each group's rows: a [M, K] bf16, c [M, N] bf16, out [E, K, N] fp32.
// Returns null, or why it could not run.
template <int CLUSTER, Pair PAIR = Pair::Multicast>
const char* run(const void* a, const void* c, const int32_t* offsets, float* out, int M, int E, int K, int N, bool accumulate, int sms,
                cudaStream_t stream) {
  Params p{};
  p.offsets = offsets;
  p.M = M, p.E = E, p.rows = K, p.cols = N;
  p.m_tiles = (K + BM - 1) / BM;
  p.n_tiles = (N + BN - 1) / BN;
  p.accumulate = accumulate;
  if (items<CLUSTER>(p) == 0) return nullptr;
  CUtensorMap map_a, map_b, map_out;
  const cuuint64_t a_dims[2] = {cuuint64_t(K), cuuint64_t(M)}, a_strides[1] = {cuuint64_t(K) * 2};
  const cuuint64_t b_dims[2] = {cuuint64_t(N), cuuint64_t(M)}, b_strides[1] = {cuuint64_t(N) * 2};
  const cuuint32_t box[2] = {64, BK};
  const cuuint64_t o_dims[3] = {cuuint64_t(N), cuuint64_t(K), cuuint64_t(E)}, o_strides[2] = {cuuint64_t(N) * 4, cuuint64_t(K) * N * 4};
  const cuuint32_t o_box[3] = {32, BM, 1};
  if (encode_map(&map_a, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, a, 2, a_dims, a_strides, box) != CUDA_SUCCESS ||
      encode_map(&map_b, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, c, 2, b_dims, b_strides, box) != CUDA_SUCCESS ||
      encode_map(&map_out, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, out, 3, o_dims, o_strides, o_box) != CUDA_SUCCESS)
    return "cuTensorMapEncodeTiled failed";
  // Persistent: as many clusters as can be resident at once (2-CTA clusters need two SMs of one GPC),
  // never more than there are work items.
  static const int resident = resident_clusters<CLUSTER, PAIR>(sms);  // asked once (one device per program)
  if (resident < 1) return "no cluster of this kernel fits";
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = launch_config<CLUSTER>(std::max(1, std::min(resident, items<CLUSTER>(p))), stream, attr);
  if (cudaLaunchKernelEx(&cfg, dw_f32_kernel<CLUSTER, PAIR>, map_a, map_b, map_out, p) != cudaSuccess) return "cudaLaunchKernelEx failed";
  return nullptr;
}

}  // namespace moe::ops::cluster_f32
