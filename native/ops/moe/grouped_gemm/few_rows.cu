// dW (TN) when groups have few rows: out_e[K, N] = a_eᵀ · b_e over a group's rows_e rows is a sum
// of rows_e outer products, so with a handful of rows per group (decode: 1024 rows over 256
// experts) each output costs a few FMAs and the product is bound by writing E·K·N outputs (7.5 GB
// of bf16 at K = 7168, N = 2048, E = 256). The tensor-core kernels spend most of that time in their
// epilogues (H200, mma.sync at 4 rows per group: DRAM 53 %, ncu 47c3e63).
//
// Each block streams KSTEPS slabs of [KB × NB] outputs down one column band of one group: the
// group's rows go through shared memory CHUNK rows at a time (a in fp32, b in bf16; b stays there
// across the slabs when the group has at most CHUNK rows), each thread accumulates VPT vectors of 8
// consecutive outputs in registers and writes each with one 16-byte streaming store (two for fp32).
// Any group size is handled (the chunk loop), at rows_e FMAs per output: the kernel is taken only
// when M ≤ FEW_ROWS_AVERAGE · E (grouped_gemm.cc), which bounds the total at FEW_ROWS_AVERAGE FMAs per output
// whatever the skew; a group of many rows then costs its blocks more time, not more traffic.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/cuda_runtime.h"
#include "ops/moe/grouped_gemm/few_rows.h"

namespace moe::ops {
namespace {

constexpr int KB = 32, NB = 256, THREADS = 256;
constexpr int KSTEPS = 8;                     // slabs of KB output rows per block (b is reused)
constexpr int VEC = 8;                        // outputs per store
constexpr int CHUNK = 8;                      // rows in shared memory at a time
constexpr int ROW_VECS = NB / VEC;            // 32: one warp covers one output row of the slab
constexpr int VPT = KB * ROW_VECS / THREADS;  // 4 vectors per thread
static_assert(ROW_VECS == 32 && VPT * THREADS == KB * ROW_VECS, "one warp per slab row, whole vectors per thread");

struct FewRowsParams {
  const __nv_bfloat16* a;  // [M, K]
  const __nv_bfloat16* b;  // [M, N]
  const int32_t* offsets;  // [E+1]
  void* out;               // [E, K, N]
  int M, K, N;
  bool accumulate;
};

__device__ __forceinline__ void store_vec(__nv_bfloat16* p, const float (&v)[VEC], bool) {
  alignas(16) __nv_bfloat162 h[VEC / 2];
#pragma unroll
  for (int i = 0; i < VEC / 2; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  __stcs(reinterpret_cast<int4*>(p), *reinterpret_cast<const int4*>(h));  // evict-first: written once
}
__device__ __forceinline__ void store_vec(float* p, const float (&v)[VEC], bool accumulate) {
  float4 lo = make_float4(v[0], v[1], v[2], v[3]), hi = make_float4(v[4], v[5], v[6], v[7]);
  if (accumulate) {
    const float4 o0 = reinterpret_cast<const float4*>(p)[0], o1 = reinterpret_cast<const float4*>(p)[1];
    lo = make_float4(lo.x + o0.x, lo.y + o0.y, lo.z + o0.z, lo.w + o0.w);
    hi = make_float4(hi.x + o1.x, hi.y + o1.y, hi.z + o1.z, hi.w + o1.w);
  }
  __stcs(reinterpret_cast<float4*>(p), lo);
  __stcs(reinterpret_cast<float4*>(p) + 1, hi);
}

// grid: (ceil(K / (KB·KSTEPS)), ceil(N / NB), E). A block walks KSTEPS slabs of KB output rows down
// one column band of one group; a group of at most CHUNK rows keeps its b rows in shared memory
// across them. Thread t owns vectors t + THREADS·j (j < VPT): column piece t % 32 of slab rows
// t / 32 + 8·j, so each warp's store is 512 contiguous bytes.
template <typename OutT> __global__ void __launch_bounds__(THREADS) few_rows_tn_kernel(FewRowsParams p) {
  __shared__ float a_s[CHUNK][KB];                        // a_e[r, k0 + k], as float
  __shared__ __align__(16) __nv_bfloat16 b_s[CHUNK][NB];  // b_e[r, n0 + n]
  const int e = blockIdx.z, n0 = blockIdx.y * NB;
  const int begin = min(max(p.offsets[e], 0), p.M), end = min(max(p.offsets[e + 1], begin), p.M);
  if (end == begin && p.accumulate) return;  // dW_e += 0
  const bool one_chunk = end - begin <= CHUNK;
  const int nb = min(NB, p.N - n0);
  const int col = threadIdx.x % ROW_VECS, row0 = threadIdx.x / ROW_VECS;
  OutT* out = static_cast<OutT*>(p.out) + int64_t(e) * p.K * p.N;
  for (int step = 0; step < KSTEPS; ++step) {
    const int k0 = (blockIdx.x * KSTEPS + step) * KB;
    if (k0 >= p.K) break;  // the same for every thread
    const int kb = min(KB, p.K - k0);
    float acc[VPT][VEC] = {};
    for (int r0 = begin; r0 < end; r0 += CHUNK) {  // the same trip count for every thread
      const int rows = min(CHUNK, end - r0);
      __syncthreads();  // the previous chunk has been read
      {
        const int r = threadIdx.x / KB, k = threadIdx.x % KB;  // THREADS == CHUNK·KB: one value each
        a_s[r][k] = r < rows && k < kb ? __bfloat162float(p.a[int64_t(r0 + r) * p.K + k0 + k]) : 0.f;
        if (!one_chunk || step == 0) {
          // One 16-byte piece each (N is a multiple of 8, rows 16-byte aligned: checked on the host).
          const int br = threadIdx.x / ROW_VECS, bc = (threadIdx.x % ROW_VECS) * VEC;
          int4 v = make_int4(0, 0, 0, 0);
          if (br < rows && bc < nb) v = *reinterpret_cast<const int4*>(p.b + int64_t(r0 + br) * p.N + n0 + bc);
          *reinterpret_cast<int4*>(&b_s[br][bc]) = v;
        }
      }
      __syncthreads();
      for (int r = 0; r < rows; ++r) {
        const int4 raw = *reinterpret_cast<const int4*>(&b_s[r][col * VEC]);
        const __nv_bfloat162* bv = reinterpret_cast<const __nv_bfloat162*>(&raw);
        float bf[VEC];
#pragma unroll
        for (int j = 0; j < VEC / 2; ++j) {
          const float2 f = __bfloat1622float2(bv[j]);
          bf[2 * j] = f.x;
          bf[2 * j + 1] = f.y;
        }
#pragma unroll
        for (int v = 0; v < VPT; ++v) {
          const float av = a_s[r][row0 + v * (THREADS / ROW_VECS)];
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[v][j] = fmaf(av, bf[j], acc[v][j]);
        }
      }
    }
    if (col * VEC < nb) {
#pragma unroll
      for (int v = 0; v < VPT; ++v) {
        const int k = row0 + v * (THREADS / ROW_VECS);
        if (k < kb) store_vec(out + int64_t(k0 + k) * p.N + n0 + col * VEC, acc[v], p.accumulate);
      }
    }
  }
}

}  // namespace

bool few_rows_tn_fits(const GroupedGemm& g) {
  if (g.mode != GemmMode::TN || g.epilogue != GemmEpilogue::Store) return false;
  const int64_t M = g.a.size(0), K = g.a.size(1), N = g.b.size(1), E = g.offsets.size(0) - 1;
  if (E < 1 || K == 0 || N == 0 || K % VEC != 0 || N % VEC != 0) return false;
  auto aligned16 = [](const Tensor& t) { return (reinterpret_cast<uintptr_t>(t.raw()) & 15) == 0; };
  if (!aligned16(g.a) || !aligned16(g.b) || !aligned16(g.out)) return false;
  return M < (int64_t(1) << 31) && K < (int64_t(1) << 31) && N <= int64_t(65535) * NB && E <= 65535;
}

void few_rows_tn(const GroupedGemm& g, void* stream) {
  FewRowsParams p{};
  p.a = g.a.data<__nv_bfloat16>();
  p.b = g.b.data<__nv_bfloat16>();
  p.offsets = g.offsets.data<int32_t>();
  p.out = g.out.raw();
  p.M = int(g.a.size(0));
  p.K = int(g.a.size(1));
  p.N = int(g.b.size(1));
  p.accumulate = g.accumulate;
  const dim3 grid(unsigned((p.K + KB * KSTEPS - 1) / (KB * KSTEPS)), unsigned((p.N + NB - 1) / NB), unsigned(g.offsets.size(0) - 1));
  if (g.out.dtype() == DType::f32) few_rows_tn_kernel<float><<<grid, THREADS, 0, cudaStream_t(stream)>>>(p);
  else few_rows_tn_kernel<__nv_bfloat16><<<grid, THREADS, 0, cudaStream_t(stream)>>>(p);
  cuda::check_launch("groupedGemm");
}

}  // namespace moe::ops
