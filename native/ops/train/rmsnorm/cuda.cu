// RMSNorm kernels. Forward: one block per row (grid-stride over rows), a block-wide sum of squares,
// then y. Backward: B blocks (B = min(T, 256), fixed by T alone), each taking rows b, b+B, ...:
// per row a block-wide Σ g·x̂, then dx; each thread owns the same columns for every row and adds
// dy·x̂ into its block's row of a partial-sum scratch [B,H]. A second kernel sums the B partials of
// each column in order (no float atomics: the same inputs give the same bits on every run).
#include <climits>
#include <cstdint>

#include "core/cuda_runtime.h"
#include "core/tensor.h"
#include "ops/common/block_reduce.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"
#include "ops/train/rmsnorm/rmsnorm.h"

namespace moe::ops {

namespace {

constexpr int64_t kMaxPartials = 256;

int row_threads(int64_t H) {
  if (H >= 4096) return 512;
  if (H >= 1024) return 256;
  if (H >= 256) return 128;
  return 64;
}

template <typename X>
__global__ void rmsnorm_forward_kernel(const X* x, const float* w, int64_t T, int64_t H, float eps, X* y, float* rstd) {
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const X* row = x + t * H;
    float ss = 0.f;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const float v = to_float(row[j]);
      ss += v * v;
    }
    ss = block_reduce_sum(ss);
    const float rs = rsqrtf(ss / float(H) + eps);
    if (threadIdx.x == 0) rstd[t] = rs;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) y[t * H + j] = from_float<X>(to_float(row[j]) * rs * w[j]);
  }
}

template <typename X>
__global__ void rmsnorm_backward_kernel(const X* dy, const X* x, const float* w, const float* rstd, int64_t T, int64_t H, X* dx,
                                        float* partial) {
  float* mine = partial + int64_t(blockIdx.x) * H;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) mine[j] = 0.f;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const float rs = rstd[t];
    const X* xr = x + t * H;
    const X* dyr = dy + t * H;
    float dot = 0.f;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) dot += to_float(dyr[j]) * w[j] * (to_float(xr[j]) * rs);
    const float mean = block_reduce_sum(dot) / float(H);
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const float xh = to_float(xr[j]) * rs, d = to_float(dyr[j]);
      dx[t * H + j] = from_float<X>(rs * (d * w[j] - xh * mean));
      mine[j] += d * xh;
    }
  }
}

// dWeight[j] (+)= Σ_b partial[b,j], b in order.
__global__ void column_sum_kernel(const float* partial, int64_t B, int64_t H, float* out, bool accumulate) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < H; j += int64_t(gridDim.x) * blockDim.x) {
    float acc = 0.f;
    for (int64_t b = 0; b < B; ++b) acc += partial[b * H + j];
    out[j] = accumulate ? out[j] + acc : acc;
  }
}

}  // namespace

void rmsnorm_forward_cuda(const Tensor& x, const Tensor& weight, double eps, const Tensor& y, const Tensor& rstd, void* stream) {
  const int64_t T = x.size(0), H = x.size(1);
  const unsigned blocks = unsigned(std::min<int64_t>(T, INT_MAX));
  dispatch_float(x.dtype(), [&](auto tag) {
    using X = typename decltype(tag)::type;
    rmsnorm_forward_kernel<X><<<blocks, row_threads(H), 0, cudaStream_t(stream)>>>(x.data<X>(), weight.data<float>(), T, H, float(eps),
                                                                                   y.data<X>(), rstd.data<float>());
  });
  cuda::check_launch("rmsnorm");
}

void rmsnorm_backward_cuda(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dx,
                           const Tensor& d_weight, bool accumulate, void* stream) {
  const char* op = "rmsnormBackward";
  const int64_t T = x.size(0), H = x.size(1);
  cudaStream_t st = cudaStream_t(stream);
  const int64_t B = std::max<int64_t>(1, std::min(T, kMaxPartials));
  // scratch: partial dWeight [B,H] (stream-ordered, released when this returns)
  Tensor partial = Tensor::empty({B, H}, DType::f32, x.device(), op);
  if (T > 0) {
    dispatch_float(x.dtype(), [&](auto tag) {
      using X = typename decltype(tag)::type;
      rmsnorm_backward_kernel<X><<<unsigned(B), row_threads(H), 0, st>>>(dy.data<X>(), x.data<X>(), weight.data<float>(),
                                                                         rstd.data<float>(), T, H, dx.data<X>(), partial.data<float>());
    });
    cuda::check_launch(op);
  } else {
    cuda::check(cudaMemsetAsync(partial.raw(), 0, size_t(H) * sizeof(float), st), op, "cudaMemsetAsync");
  }
  column_sum_kernel<<<grid_for(H), kThreads, 0, st>>>(partial.data<float>(), T > 0 ? B : 1, H, d_weight.data<float>(), accumulate);
  cuda::check_launch(op);
}

}  // namespace moe::ops
