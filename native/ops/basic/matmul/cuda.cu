#include "core/cuda_runtime.h"
#include "ops/basic/matmul/matmul.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"

namespace moe::ops {

// A shared-memory tiled GEMM: 64x64 output tile per block, 256 threads, 4x4 outputs per thread.
// Simple and stride-agnostic; it serves tests and small dense products, not the experts' FLOPs.
constexpr int kTile = 64, kTileK = 16, kMicro = 4;

template <typename I, typename O>
__global__ void matmul_kernel(const I* a, int64_t as0, int64_t as1, const I* b, int64_t bs0, int64_t bs1, O* out, int64_t M, int64_t N,
                              int64_t K, bool accumulate) {
  __shared__ float sa[kTileK][kTile + 1];
  __shared__ float sb[kTileK][kTile + 1];
  int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  int64_t row0 = int64_t(blockIdx.y) * kTile, col0 = int64_t(blockIdx.x) * kTile;
  float acc[kMicro][kMicro] = {};
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    for (int i = threadIdx.x; i < kTile * kTileK; i += blockDim.x) {
      int r = i / kTileK, c = i % kTileK;  // a tile: rows of the output, columns of K
      int64_t gr = row0 + r, gk = k0 + c;
      sa[c][r] = (gr < M && gk < K) ? to_float(a[gr * as0 + gk * as1]) : 0.0f;
      int kr = i / kTile, nc = i % kTile;  // b tile: rows of K, columns of the output
      int64_t gk2 = k0 + kr, gc = col0 + nc;
      sb[kr][nc] = (gk2 < K && gc < N) ? to_float(b[gk2 * bs0 + gc * bs1]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float av[kMicro], bv[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) av[i] = sa[kk][ty * kMicro + i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) bv[j] = sb[kk][tx * kMicro + j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    int64_t r = row0 + ty * kMicro + i;
    if (r >= M) continue;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      int64_t c = col0 + tx * kMicro + j;
      if (c >= N) continue;
      float v = acc[i][j] + (accumulate ? to_float(out[r * N + c]) : 0.0f);
      out[r * N + c] = from_float<O>(v);
    }
  }
}

void matmul_cuda(const Tensor& a, const Tensor& b, const Tensor& out, bool accumulate, void* stream) {
  int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  MOE_ARG_CHECK((M + kTile - 1) / kTile <= 65535, "matmul", "M = ", M, " is too large for the reference GEMM");
  dim3 grid(unsigned((N + kTile - 1) / kTile), unsigned((M + kTile - 1) / kTile));
  dispatch_float(a.dtype(), [&](auto itag) {
    using I = typename decltype(itag)::type;
    dispatch_float(out.dtype(), [&](auto otag) {
      using O = typename decltype(otag)::type;
      matmul_kernel<I, O><<<grid, 256, 0, cudaStream_t(stream)>>>(a.data<I>(), a.strides()[0], a.strides()[1], b.data<I>(), b.strides()[0],
                                                                  b.strides()[1], out.data<O>(), M, N, K, accumulate);
    });
  });
  cuda::check_launch("matmul");
}

}  // namespace moe::ops
