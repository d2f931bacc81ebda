// dW (TN) for groups of few rows: out_e[K, N] = a_eᵀ · b_e over a group's rows_e rows is a sum of
// rows_e outer products, so with a handful of rows per group (decode: 1024 rows over 256 experts)
// each output costs a few FMAs and the product is bound by writing E·K·N outputs (7.5 GB of bf16 at
// K = 7168, N = 2048, E = 256). The tensor-core kernels spend most of that time in their epilogues
// (H200, mma.sync at 4 rows per group: DRAM 53 %, ncu 47c3e63). Here each block streams one
// [KB × NB] slab of one group's output: the group's rows of a and b sit in shared memory and every
// thread writes 8 consecutive outputs with one 16-byte streaming store (two for fp32).
//
// Groups with more than FEW_ROWS_MAX rows are left to the tensor-core kernel, launched after this
// one over every group: its blocks of the few-row groups return at once (the host does not know
// the counts; they are read on the device).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "core/cuda_runtime.h"
#include "ops/grouped_gemm/few_rows.h"

namespace moe::ops {
namespace {

constexpr int KB = 32, NB = 1024, THREADS = 256;
constexpr int VEC = 8;  // outputs per store

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

// grid: (ceil(K / KB), ceil(N / NB), E); the group's rows ≤ FEW_ROWS_MAX (others: nothing to do).
template <typename OutT>
__global__ void __launch_bounds__(THREADS) few_rows_tn_kernel(FewRowsParams p) {
  __shared__ float a_s[FEW_ROWS_MAX][KB];                        // a_e[r, k0 + k], as float
  __shared__ __align__(16) __nv_bfloat16 b_s[FEW_ROWS_MAX][NB];  // b_e[r, n0 + n]
  const int e = blockIdx.z, k0 = blockIdx.x * KB, n0 = blockIdx.y * NB;
  const int begin = min(max(p.offsets[e], 0), p.M), end = min(max(p.offsets[e + 1], begin), p.M);
  const int rows = end - begin;
  if (rows > FEW_ROWS_MAX) return;          // the tensor-core kernel's group
  if (rows == 0 && p.accumulate) return;    // dW_e += 0
  const int kb = min(KB, p.K - k0), nb = min(NB, p.N - n0);
  for (int i = threadIdx.x; i < rows * KB; i += THREADS) {
    const int r = i / KB, k = i % KB;
    a_s[r][k] = k < kb ? __bfloat162float(p.a[int64_t(begin + r) * p.K + k0 + k]) : 0.f;
  }
  // b rows in 16-byte pieces (N is a multiple of 8 and rows are 16-byte aligned: checked on the host).
  for (int i = threadIdx.x; i < rows * (NB / VEC); i += THREADS) {
    const int r = i / (NB / VEC), c = (i % (NB / VEC)) * VEC;
    if (c < nb) *reinterpret_cast<int4*>(&b_s[r][c]) = *reinterpret_cast<const int4*>(p.b + int64_t(begin + r) * p.N + n0 + c);
  }
  __syncthreads();
  OutT* out = static_cast<OutT*>(p.out) + int64_t(e) * p.K * p.N;
  // Consecutive threads take consecutive 8-column pieces of one output row: a warp writes 512
  // contiguous bytes of bf16.
  const int pieces = nb / VEC;
  for (int i = threadIdx.x; i < kb * (NB / VEC); i += THREADS) {
    const int k = i / (NB / VEC), c = i % (NB / VEC);
    if (c >= pieces) continue;
    float acc[VEC] = {};
    for (int r = 0; r < rows; ++r) {
      const float av = a_s[r][k];
      const int4 raw = *reinterpret_cast<const int4*>(&b_s[r][c * VEC]);
      const __nv_bfloat162* bv = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
      for (int j = 0; j < VEC / 2; ++j) {
        const float2 f = __bfloat1622float2(bv[j]);
        acc[2 * j] = fmaf(av, f.x, acc[2 * j]);
        acc[2 * j + 1] = fmaf(av, f.y, acc[2 * j + 1]);
      }
    }
    store_vec(out + int64_t(k0 + k) * p.N + n0 + c * VEC, acc, p.accumulate);
  }
}

}  // namespace

bool few_rows_tn_eligible(const GroupedGemm& g) {
  if (g.mode != GemmMode::TN || g.epilogue != GemmEpilogue::Store) return false;
  const int64_t M = g.a.size(0), K = g.a.size(1), N = g.b.size(1), E = g.offsets.size(0) - 1;
  if (E < 1 || K == 0 || N == 0 || K % VEC != 0 || N % VEC != 0) return false;
  auto aligned16 = [](const Tensor& t) { return (reinterpret_cast<uintptr_t>(t.raw()) & 15) == 0; };
  if (!aligned16(g.a) || !aligned16(g.b) || !aligned16(g.out)) return false;
  if (M >= (int64_t(1) << 31) || K >= (int64_t(1) << 31) || N > int64_t(65535) * NB || E > 65535) return false;
  // On average at most FEW_ROWS_AVERAGE rows per group: then most groups are few-row ones.
  return M <= FEW_ROWS_AVERAGE * E;
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
  const dim3 grid(unsigned((p.K + KB - 1) / KB), unsigned((p.N + NB - 1) / NB), unsigned(g.offsets.size(0) - 1));
  if (g.out.dtype() == DType::f32) few_rows_tn_kernel<float><<<grid, THREADS, 0, cudaStream_t(stream)>>>(p);
  else few_rows_tn_kernel<__nv_bfloat16><<<grid, THREADS, 0, cudaStream_t(stream)>>>(p);
  cuda::check_launch("groupedGemm");
}

}  // namespace moe::ops
