// Grouped GEMM on tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate), for sm_80 and sm_90,
// and grouped_gemm_cuda, which runs the kernel grouped_gemm.cc chose: this one (the portable one
// and the fallback), the wgmma/TMA kernel (hopper.cu) or its B-resident dW (hopper_b_resident.cu),
// the few-rows dW kernel (few_rows.cu) or the skinny one-group forward (skinny.cu), after the decode
// kernel (decode.cu) where that was chosen for the groups of a few rows.
//
// Block tile 128×128×64, 4 warps each computing 64×64, a 3-stage cp.async ring in shared memory
// with XOR-swizzled 16-byte chunks so ldmatrix reads are free of bank conflicts. (v1's 128×128×32
// tile with 4 stages, slower since v2, is step 01 of benchmarks/kernels/grouped_gemm/.) Each operand
// is either K-major (its inner dimension contiguous) or MN-major; ldmatrix.trans handles the latter,
// so NN, NT and TN are one kernel with two layout flags.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "core/cuda_runtime.h"
#include "ops/common/launch.h"
#include "ops/moe/grouped_gemm/decode.h"
#include "ops/moe/grouped_gemm/few_rows.h"
#include "ops/moe/grouped_gemm/grouped_gemm.h"
#include "ops/moe/grouped_gemm/hopper.h"
#include "ops/moe/grouped_gemm/hopper_b_resident.h"
#include "ops/moe/grouped_gemm/mma_sync.cuh"
#include "ops/moe/grouped_gemm/skinny.h"
#include "ops/moe/grouped_gemm/swiglu.h"

namespace moe::ops {

namespace {

constexpr int BM = 128, BN = 128, BK = 64, STAGES = 3, THREADS = 128;
constexpr int TILE_ELEMS = 128 * BK;                     // one operand tile, either orientation
constexpr int SMEM_BYTES = STAGES * 2 * TILE_ELEMS * 2;  // A and B tiles, bf16: 96 KiB

// ---- shared-memory addressing (in bf16 elements) --------------------------------------------------
// K-major tile: 128 rows (m or n) × 64 k, 8 chunks of 8 per 128-byte row, chunk ^= row & 7: the 8
// rows an ldmatrix reads at one chunk column land in 8 different 16-byte bank groups.
__device__ __forceinline__ int kmajor_offset(int row, int k) {
  int chunk = (k >> 3) ^ (row & 7);
  return row * BK + chunk * 8 + (k & 7);
}
// MN-major tile: 32 rows (k) × 128 (m or n), 16 chunks per row; the low three chunk bits ^= k & 7.
__device__ __forceinline__ int mnmajor_offset(int k, int mn) {
  int chunk = (mn >> 3) ^ (k & 7);
  return k * 128 + chunk * 8 + (mn & 7);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) { return uint32_t(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  // src-size 0 zero-fills the 16 bytes: rows past a group's end and k past K read as zeros.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

struct Params {
  const __nv_bfloat16* a;
  const __nv_bfloat16* b;
  const int32_t* offsets;     // [E+1]
  const int32_t* tile_start;  // [E+1] prefix sums of m-tiles per group (NN, NT)
  void* out;
  const __nv_bfloat16* aux;  // SwiGLU: where to save g (may be null); DSwiGLU: the saved g
  __nv_bfloat16* aux_out;
  int M, E;
  int rows_dim, cols_dim, inner_dim;  // the logical product: out[rows, cols] = Σ_inner
  int64_t b_group_stride;
  bool accumulate;
};

// 8 consecutive elements starting at p, those at or past `valid` read as zero (unaligned path).
__device__ __forceinline__ void load_chunk_scalar(__nv_bfloat16* smem, const __nv_bfloat16* p, int64_t step, int valid) {
  alignas(16) __nv_bfloat16 v[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) v[e] = e < valid ? p[e * step] : __float2bfloat16_rn(0.f);
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(v);
}

// Loads one BM×BK slice of the A operand and one BK×BN slice of B into a stage.
// A operand (rows × inner): K-major when A_KMAJOR (A[row * lda + k]), else A[k * lda + row].
// B operand (inner × cols): K-major when B_KMAJOR (B[col * ldb + k]), else B[k * ldb + col].
// ALIGNED: every contiguous run is a multiple of 8 elements and 16-byte aligned, so cp.async moves
// 16-byte chunks; otherwise elements are loaded one by one (shapes like K = 300).
template <bool A_KMAJOR, bool B_KMAJOR, bool ALIGNED>
__device__ __forceinline__ void load_stage(__nv_bfloat16* sA, __nv_bfloat16* sB, const __nv_bfloat16* A, int64_t lda,
                                           const __nv_bfloat16* B, int64_t ldb, int row0, int row_end, int col0, int col_end, int k0,
                                           int k_end) {
  const int tid = threadIdx.x;
  constexpr int KCHUNKS = BK / 8;  // 16-byte chunks along k in a K-major row
#pragma unroll
  for (int i = 0; i < 128 * BK / 8 / THREADS; ++i) {
    int c = tid + i * THREADS;  // 128·BK/8 chunks of 8 elements per operand tile
    if (A_KMAJOR) {
      int r = c / KCHUNKS, kc = (c % KCHUNKS) * 8;
      bool row_ok = row0 + r < row_end;
      const __nv_bfloat16* src = A + int64_t(row0 + r) * lda + k0 + kc;
      if (ALIGNED) cp_async16(sA + kmajor_offset(r, kc), row_ok && k0 + kc < k_end ? src : A, row_ok && k0 + kc < k_end);
      else load_chunk_scalar(sA + kmajor_offset(r, kc), src, 1, row_ok ? min(8, k_end - (k0 + kc)) : 0);
    } else {
      int k = c >> 4, rc = (c & 15) * 8;
      bool k_ok = k0 + k < k_end;
      const __nv_bfloat16* src = A + int64_t(k0 + k) * lda + row0 + rc;
      if (ALIGNED) cp_async16(sA + mnmajor_offset(k, rc), k_ok && row0 + rc < row_end ? src : A, k_ok && row0 + rc < row_end);
      else load_chunk_scalar(sA + mnmajor_offset(k, rc), src, 1, k_ok ? min(8, row_end - (row0 + rc)) : 0);
    }
    if (B_KMAJOR) {
      int n = c / KCHUNKS, kc = (c % KCHUNKS) * 8;
      bool col_ok = col0 + n < col_end;
      const __nv_bfloat16* src = B + int64_t(col0 + n) * ldb + k0 + kc;
      if (ALIGNED) cp_async16(sB + kmajor_offset(n, kc), col_ok && k0 + kc < k_end ? src : B, col_ok && k0 + kc < k_end);
      else load_chunk_scalar(sB + kmajor_offset(n, kc), src, 1, col_ok ? min(8, k_end - (k0 + kc)) : 0);
    } else {
      int k = c >> 4, nc = (c & 15) * 8;
      bool k_ok = k0 + k < k_end;
      const __nv_bfloat16* src = B + int64_t(k0 + k) * ldb + col0 + nc;
      if (ALIGNED) cp_async16(sB + mnmajor_offset(k, nc), k_ok && col0 + nc < col_end ? src : B, k_ok && col0 + nc < col_end);
      else load_chunk_scalar(sB + mnmajor_offset(k, nc), src, 1, k_ok ? min(8, col_end - (col0 + nc)) : 0);
    }
  }
}

// One warp's 64×64 share of a BK slice: 4 k16 steps × (4 m16 tiles × 8 n8 tiles).
template <bool A_KMAJOR, bool B_KMAJOR>
__device__ __forceinline__ void compute_stage(float (&acc)[4][8][4], const __nv_bfloat16* sA, const __nv_bfloat16* sB, int wm, int wn) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < BK; kk += 16) {
    uint32_t af[4][4], bf[4][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      int m = wm * 64 + mt * 16;
      if (A_KMAJOR) {
        int r = m + (lane & 7) + ((lane >> 3) & 1) * 8, k = kk + (lane >> 4) * 8;
        ldmatrix_x4(af[mt], sA + kmajor_offset(r, k));
      } else {
        int k = kk + (lane & 7) + (lane >> 4) * 8, r = m + ((lane >> 3) & 1) * 8;
        ldmatrix_x4_trans(af[mt], sA + mnmajor_offset(k, r));
      }
    }
#pragma unroll
    for (int np = 0; np < 4; ++np) {  // pairs of n8 tiles: one x4 load gives b0,b1 for two tiles
      int n = wn * 64 + np * 16;
      if (B_KMAJOR) {
        int c = n + (lane & 7) + (lane >> 4) * 8, k = kk + ((lane >> 3) & 1) * 8;
        ldmatrix_x4(bf[np], sB + kmajor_offset(c, k));
      } else {
        int k = kk + (lane & 7) + ((lane >> 3) & 1) * 8, c = n + (lane >> 4) * 8;
        ldmatrix_x4_trans(bf[np], sB + mnmajor_offset(k, c));
      }
    }
#pragma unroll
    for (int mt = 0; mt < 4; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
        mma_bf16(acc[mt][nt], af[mt][0], af[mt][1], af[mt][2], af[mt][3], bf[nt >> 1][(nt & 1) * 2], bf[nt >> 1][(nt & 1) * 2 + 1]);
  }
}

__device__ __forceinline__ void store_pair(float* out, int64_t idx, float v0, float v1, bool accumulate, bool both) {
  if (accumulate) {
    v0 += out[idx];
    if (both) v1 += out[idx + 1];
  }
  out[idx] = v0;
  if (both) out[idx + 1] = v1;
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* out, int64_t idx, float v0, float v1, bool, bool both) {
  if (both && (reinterpret_cast<uintptr_t>(out + idx) & 3) == 0)
    *reinterpret_cast<__nv_bfloat162*>(out + idx) = __floats2bfloat162_rn(v0, v1);
  else {
    out[idx] = __float2bfloat16_rn(v0);
    if (both) out[idx + 1] = __float2bfloat16_rn(v1);
  }
}

// Writes the accumulators: rows [row0, row_end) × cols [col0, cols) of the product.
template <GemmEpilogue EPI, typename OutT>
__device__ __forceinline__ void epilogue(const Params& p, const float (&acc)[4][8][4], OutT* out, int row0, int row_end, int col0, int wm,
                                         int wn) {
  const int lane = threadIdx.x & 31;
  const int cols = p.cols_dim;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      int r = row0 + wm * 64 + mt * 16 + (lane >> 2) + half * 8;
      if (r >= row_end) continue;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        int c = col0 + wn * 64 + nt * 8 + (lane & 3) * 2;  // even; c+1 is its partner
        if (c >= cols) continue;
        float v0 = acc[mt][nt][half * 2], v1 = acc[mt][nt][half * 2 + 1];
        bool both = c + 1 < cols;
        if constexpr (EPI != GemmEpilogue::Store) {
          // The fused epilogues take the product as stored in bf16 (swiglu.h).
          v0 = __bfloat162float(__float2bfloat16_rn(v0));
          v1 = __bfloat162float(__float2bfloat16_rn(v1));
        }
        if constexpr (EPI == GemmEpilogue::Store) {
          store_pair(out, int64_t(r) * cols + c, v0, v1, p.accumulate, both);
        } else if constexpr (EPI == GemmEpilogue::SwiGLU) {
          // (v0, v1) = (g1, g3) of hidden unit c/2.
          __nv_bfloat16* h = reinterpret_cast<__nv_bfloat16*>(out);
          h[int64_t(r) * (cols / 2) + c / 2] = __float2bfloat16_rn(silu(v0) * v1);
          if (p.aux_out) *reinterpret_cast<__nv_bfloat162*>(p.aux_out + int64_t(r) * cols + c) = __floats2bfloat162_rn(v0, v1);
        } else {  // DSwiGLU: (v0, v1) = dh for hidden units c and c+1; g holds 4 values for them.
          const int64_t base = int64_t(r) * (2 * cols) + 2 * c;
          __nv_bfloat16* dg = reinterpret_cast<__nv_bfloat16*>(out);
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            if (u == 1 && !both) break;
            float g1 = __bfloat162float(p.aux[base + 2 * u]), g3 = __bfloat162float(p.aux[base + 2 * u + 1]);
            float dh = u == 0 ? v0 : v1;
            *reinterpret_cast<__nv_bfloat162*>(dg + base + 2 * u) = __floats2bfloat162_rn(dh * g3 * silu_grad(g1), dh * silu(g1));
          }
        }
      }
    }
}

// Store epilogue through shared memory: the warps drop their fragments into a padded 128×128 tile,
// then every thread writes whole 16-byte pieces of rows, so stores are full, coalesced lines (the
// dW product of many small groups is dominated by these writes). Needs cols % 8 == 0.
template <typename OutT>
__device__ __forceinline__ void store_staged(const Params& p, const float (&acc)[4][8][4], OutT* out, unsigned char* smem_raw, int row0,
                                             int row_end, int col0, int wm, int wn) {
  constexpr int LD = 128 + 8;  // padded row, in elements
  OutT* tile = reinterpret_cast<OutT*>(smem_raw);
  const int lane = threadIdx.x & 31;
  __syncthreads();  // the main loop's last reads of shared memory are done
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        int r = wm * 64 + mt * 16 + (lane >> 2) + half * 8, c = wn * 64 + nt * 8 + (lane & 3) * 2;
        if constexpr (sizeof(OutT) == 4) {
          *reinterpret_cast<float2*>(&tile[r * LD + c]) = make_float2(acc[mt][nt][half * 2], acc[mt][nt][half * 2 + 1]);
        } else {
          *reinterpret_cast<__nv_bfloat162*>(&tile[r * LD + c]) = __floats2bfloat162_rn(acc[mt][nt][half * 2], acc[mt][nt][half * 2 + 1]);
        }
      }
  __syncthreads();
  constexpr int PER16 = 16 / sizeof(OutT);  // elements per 16-byte piece
  constexpr int PIECES = 128 / PER16;       // pieces per tile row
  for (int i = threadIdx.x; i < 128 * PIECES; i += THREADS) {
    int r = i / PIECES, c = (i % PIECES) * PER16;
    if (row0 + r >= row_end || col0 + c >= p.cols_dim) continue;
    uint4 v = *reinterpret_cast<const uint4*>(&tile[r * LD + c]);
    OutT* dst = out + int64_t(row0 + r) * p.cols_dim + col0 + c;
    if constexpr (sizeof(OutT) == 4) {
      if (p.accumulate) {
        float4 old = *reinterpret_cast<const float4*>(dst);
        float4 add = *reinterpret_cast<float4*>(&v);
        add.x += old.x;
        add.y += old.y;
        add.z += old.z;
        add.w += old.w;
        v = *reinterpret_cast<uint4*>(&add);
      }
    }
    *reinterpret_cast<uint4*>(dst) = v;
  }
}

template <bool A_KMAJOR, bool B_KMAJOR, GemmEpilogue EPI, typename OutT, bool TN, bool ALIGNED>
__global__ void __launch_bounds__(THREADS) grouped_gemm_kernel(Params p) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __nv_bfloat16* smem = reinterpret_cast<__nv_bfloat16*>(smem_raw);

  int group, row0, row_end, col0 = blockIdx.x * BN, inner_begin = 0, inner_end = p.inner_dim;
  const __nv_bfloat16 *A, *B;
  int64_t lda, ldb;
  OutT* out = static_cast<OutT*>(p.out);
  if (!TN) {
    // Blocks are numbered so that a band of GROUP_M m-tiles runs through all n-tiles together: the
    // weight columns a band needs are read from DRAM once and reused from L2 by its m-tiles (with
    // plain row-major order, a wide N re-reads all of an expert's weights for every m-tile).
    constexpr int GROUP_M = 8;
    const int pid = blockIdx.y * gridDim.x + blockIdx.x, per_band = GROUP_M * gridDim.x;
    const int band_m = (pid / per_band) * GROUP_M, band_rows = min(int(gridDim.y) - band_m, GROUP_M);
    const int tile = band_m + (pid % per_band) % band_rows;  // m-tile over all groups
    col0 = ((pid % per_band) / band_rows) * BN;
    // Find the tile's group by binary search over tile_start.
    if (tile >= p.tile_start[p.E]) return;
    int lo = 0, hi = p.E - 1;
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if (p.tile_start[mid] <= tile) lo = mid;
      else hi = mid - 1;
    }
    group = lo;
    int g_begin = min(max(p.offsets[group], 0), p.M), g_end = min(max(p.offsets[group + 1], g_begin), p.M);
    row0 = g_begin + (tile - p.tile_start[group]) * BM;
    row_end = g_end;
    const __nv_bfloat16* Bg = p.b + p.b_group_stride * group;
    A = p.a;
    lda = p.inner_dim;
    B = Bg;
    // NN: B_e is [inner, cols] (MN-major operand); NT: B_e is [cols, inner] (K-major operand).
    ldb = B_KMAJOR ? p.inner_dim : p.cols_dim;
  } else {
    // dW: one group per blockIdx.z; the inner dimension is the group's rows.
    group = blockIdx.z;
    row0 = blockIdx.y * BM;
    row_end = p.rows_dim;
    inner_begin = min(max(p.offsets[group], 0), p.M);
    inner_end = min(max(p.offsets[group + 1], inner_begin), p.M);
    A = p.a + int64_t(inner_begin) * p.rows_dim;  // a_e [rows_e, K]: operand Aᵀ is MN-major
    lda = p.rows_dim;
    B = p.b + int64_t(inner_begin) * p.cols_dim;  // b_e [rows_e, N]
    ldb = p.cols_dim;
    out += int64_t(group) * p.rows_dim * p.cols_dim;
  }
  if (row0 >= row_end) return;
  const int k_len = inner_end - inner_begin;
  const int ktiles = (k_len + BK - 1) / BK;

  const int warp = threadIdx.x >> 5, wm = warp >> 1, wn = warp & 1;
  float acc[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.f;

  auto sA = [&](int s) { return smem + s * 2 * TILE_ELEMS; };
  auto sB = [&](int s) { return smem + s * 2 * TILE_ELEMS + TILE_ELEMS; };

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_stage<A_KMAJOR, B_KMAJOR, ALIGNED>(sA(s), sB(s), A, lda, B, ldb, row0, row_end, col0, p.cols_dim, s * BK, k_len);
    cp_async_commit();
  }
  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    int next = kt + STAGES - 1;
    if (next < ktiles) {
      int s = next % STAGES;
      load_stage<A_KMAJOR, B_KMAJOR, ALIGNED>(sA(s), sB(s), A, lda, B, ldb, row0, row_end, col0, p.cols_dim, next * BK, k_len);
    }
    cp_async_commit();
    compute_stage<A_KMAJOR, B_KMAJOR>(acc, sA(kt % STAGES), sB(kt % STAGES), wm, wn);
  }
  cp_async_wait<0>();
  // The staged store needs 16-byte rows (ALIGNED: cols % 8 == 0) and a 128×136 tile in shared
  // memory (68 KiB for f32: the 96 KiB ring holds it).
  static_assert(SMEM_BYTES >= 128 * 136 * 4, "the staged store's tile fits in the ring");
  constexpr bool STAGED = EPI == GemmEpilogue::Store && ALIGNED;
  if constexpr (STAGED) store_staged<OutT>(p, acc, out, smem_raw, row0, row_end, col0, wm, wn);
  else epilogue<EPI, OutT>(p, acc, out, row0, row_end, col0, wm, wn);
}

// tile_start[e] = Σ_{g<e} ceil(rows_g / BM), from the device-side offsets: one block, E ≤ 8192 (the
// counts in its shared memory). Groups of at most skip_rows rows count nothing (the decode kernel, or
// the B-resident one, computes them). With one_each a group counts 1 instead of its m-tiles (TN: the
// groups hopper.cu's kernel computes beside the B-resident kernel).
__global__ void tile_starts_kernel(const int32_t* offsets, int E, int M, int skip_rows, bool one_each, int32_t* tile_start) {
  extern __shared__ int32_t counts[];
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int b = min(max(offsets[e], 0), M), end = min(max(offsets[e + 1], b), M);
    counts[e] = end - b <= skip_rows ? 0 : one_each ? 1 : (end - b + BM - 1) / BM;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int e = 0; e < E; ++e) {
      tile_start[e] = acc;
      acc += counts[e];
    }
    tile_start[E] = acc;
  }
}

// In TN mode a group with no rows runs no k-iteration and stores zeros (or adds zero): dW_e = 0.
template <bool TN, bool A_KMAJOR, bool B_KMAJOR, GemmEpilogue EPI, typename OutT>
void launch(const Params& p, int rows, int cols, int E, int M, bool aligned, cudaStream_t stream) {
  auto kernel = aligned ? grouped_gemm_kernel<A_KMAJOR, B_KMAJOR, EPI, OutT, TN, true>
                        : grouped_gemm_kernel<A_KMAJOR, B_KMAJOR, EPI, OutT, TN, false>;
  // Above 48 KiB of dynamic shared memory needs an opt-in (per device, so set on every launch: ~1 µs).
  cuda::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES), "groupedGemm", "cudaFuncSetAttribute");
  dim3 grid(unsigned((cols + BN - 1) / BN), TN ? unsigned((rows + BM - 1) / BM) : unsigned((M + BM - 1) / BM + E), TN ? unsigned(E) : 1u);
  kernel<<<grid, THREADS, SMEM_BYTES, stream>>>(p);
}

}  // namespace

void grouped_gemm_cuda(const GroupedGemm& g, GemmChoice choice, void* stream_ptr) {
  const GemmKernel kernel = choice.kernel;
  const std::string op = "groupedGemm";
  MOE_ARG_CHECK(g.a.dtype() == DType::bf16, op, "the CUDA grouped GEMM takes bf16 operands; 'a' is ", g.a.describe());
  if (g.epilogue != GemmEpilogue::Store) {
    // The fused epilogues store bf16 pairs: their outputs must sit on 4-byte boundaries.
    for (const Tensor* t : {&g.out, &g.aux})
      MOE_ARG_CHECK(!t->defined() || (t->dtype() == DType::bf16 && (reinterpret_cast<uintptr_t>(t->raw()) & 3) == 0), op,
                    "the fused SwiGLU epilogues write bf16 into 4-byte-aligned tensors; got ", t->describe());
  }
  cudaStream_t stream = cudaStream_t(stream_ptr);
  if (kernel == GemmKernel::Skinny) {
    skinny_nn(g, stream);
    return;
  }
  if (choice.decode_rows > 0) {
    // The groups of 1..decode_rows rows; the tile kernel below takes the larger ones, if any can be.
    decode_nn(g, choice.decode_rows, stream);
    if (g.a.size(0) <= choice.decode_rows) return;
  }
  if (kernel == GemmKernel::FewRows) {
    few_rows_tn(g, stream);
    return;
  }
  if (kernel == GemmKernel::HopperBResident) {
#if MOE_EP_WITH_HOPPER
    // The groups of at most B_RESIDENT_MAX_GROUP_ROWS rows; then hopper.cu's kernel over the larger
    // ones of a skewed routing, if any (the host does not know: with none, its blocks find no work).
    grouped_gemm_b_resident(g, stream);
    const int E = int(g.offsets.size(0) - 1);
    Tensor large = Tensor::empty({E + 1}, DType::i32, g.a.device(), op);
    tile_starts_kernel<<<1, 256, E * sizeof(int32_t), stream>>>(g.offsets.data<int32_t>(), E, int(g.a.size(0)), B_RESIDENT_MAX_GROUP_ROWS,
                                                                true, large.data<int32_t>());
    cuda::check_launch(op);
    grouped_gemm_hopper(g, large.data<int32_t>(), choice.trim_tails, stream);
    return;  // `large` is freed here: the caching allocator reuses it only after the kernels queued on this stream
#else
    MOE_INTERNAL_CHECK(false, "groupedGemm: the B-resident Hopper kernel was chosen in a build without it");
#endif
  }
  const int M = int(g.a.size(0)), E = int(g.offsets.size(0) - 1);
  Params p{};
  p.a = g.a.data<__nv_bfloat16>();
  p.b = g.b.data<__nv_bfloat16>();
  p.offsets = g.offsets.data<int32_t>();
  p.out = g.out.raw();
  p.aux = g.aux.defined() ? g.aux.data<__nv_bfloat16>() : nullptr;
  p.aux_out = (g.epilogue == GemmEpilogue::SwiGLU && g.aux.defined()) ? g.aux.data<__nv_bfloat16>() : nullptr;
  p.M = M;
  p.E = E;
  p.accumulate = g.accumulate;

  int64_t K = g.mode == GemmMode::TN ? g.a.size(1) : g.b.size(1), N = g.mode == GemmMode::TN ? g.b.size(1) : g.b.size(2);
  // 16-byte copies need rows of a multiple of 8 elements on 16-byte boundaries (MoE sizes are);
  // anything else takes the element-by-element loader.
  auto aligned16 = [](const Tensor& t) { return t.defined() ? (reinterpret_cast<uintptr_t>(t.raw()) & 15) == 0 : true; };
  const bool aligned = K % 8 == 0 && N % 8 == 0 && aligned16(g.a) && aligned16(g.b) && aligned16(g.out);

  Tensor tile_start;
  if (g.mode != GemmMode::TN) {
    tile_start = Tensor::empty({E + 1}, DType::i32, g.a.device(), op);
    MOE_ARG_CHECK(E <= 8192, op, "at most 8192 groups, got ", E);
    tile_starts_kernel<<<1, 256, E * sizeof(int32_t), stream>>>(p.offsets, E, M, choice.decode_rows, false, tile_start.data<int32_t>());
    cuda::check_launch(op);
    p.tile_start = tile_start.data<int32_t>();
  }
  if (kernel == GemmKernel::Hopper) {
#if MOE_EP_WITH_HOPPER
    grouped_gemm_hopper(g, p.tile_start, choice.trim_tails, stream);  // tile_start: null for TN, which needs none
    return;
#else
    MOE_INTERNAL_CHECK(false, "groupedGemm: the Hopper kernel was chosen in a build without it");
#endif
  }

  auto out_f32 = g.out.dtype() == DType::f32;
  switch (g.mode) {
    case GemmMode::NN:
      p.rows_dim = M;
      p.cols_dim = int(N);
      p.inner_dim = int(K);
      p.b_group_stride = K * N;
      if (g.epilogue == GemmEpilogue::SwiGLU)
        launch<false, true, false, GemmEpilogue::SwiGLU, __nv_bfloat16>(p, M, int(N), E, M, aligned, stream);
      else if (out_f32) launch<false, true, false, GemmEpilogue::Store, float>(p, M, int(N), E, M, aligned, stream);
      else launch<false, true, false, GemmEpilogue::Store, __nv_bfloat16>(p, M, int(N), E, M, aligned, stream);
      break;
    case GemmMode::NT:
      // out[M, K] = a[M, N] · b_eᵀ: the product's cols are K, its inner dimension N.
      p.rows_dim = M;
      p.cols_dim = int(K);
      p.inner_dim = int(N);
      p.b_group_stride = K * N;
      if (g.epilogue == GemmEpilogue::DSwiGLU)
        launch<false, true, true, GemmEpilogue::DSwiGLU, __nv_bfloat16>(p, M, int(K), E, M, aligned, stream);
      else if (out_f32) launch<false, true, true, GemmEpilogue::Store, float>(p, M, int(K), E, M, aligned, stream);
      else launch<false, true, true, GemmEpilogue::Store, __nv_bfloat16>(p, M, int(K), E, M, aligned, stream);
      break;
    case GemmMode::TN:
      p.rows_dim = int(K);
      p.cols_dim = int(N);
      p.inner_dim = 0;
      p.b_group_stride = 0;
      if (out_f32) launch<true, false, false, GemmEpilogue::Store, float>(p, int(K), int(N), E, M, aligned, stream);
      else launch<true, false, false, GemmEpilogue::Store, __nv_bfloat16>(p, int(K), int(N), E, M, aligned, stream);
      break;
  }
  cuda::check_launch(op);
  // tile_start is freed here; the caching allocator reuses it only on this same stream, after the
  // kernels queued before that reuse, so the GEMM has read it by then.
}

}  // namespace moe::ops
