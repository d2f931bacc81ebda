// Sum of squares: B blocks write one fp32 partial each; one block adds them in double, in order,
// into out (no atomics, no host sync).
#include <cstdint>

#include "core/cuda_runtime.h"
#include "core/tensor.h"
#include "ops/common/block_reduce.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"
#include "ops/train/sqnorm/sqnorm.h"

namespace moe::ops {

namespace {

constexpr int64_t kMaxPartials = 1024;

template <typename X> __global__ void sqnorm_partial_kernel(const X* x, int64_t n, float* partial) {
  float acc = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float v = to_float(x[i]);
    acc += v * v;
  }
  acc = block_reduce_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void sqnorm_finish_kernel(const float* partial, int64_t B, float* out, bool accumulate) {
  double acc = 0;
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) acc += partial[b];
  acc = block_reduce_sum(acc);
  if (threadIdx.x == 0) out[0] = float((accumulate ? double(out[0]) : 0.0) + acc);
}

}  // namespace

void sum_of_squares_cuda(const Tensor& x, const Tensor& out, bool accumulate, void* stream) {
  const char* op = "sumOfSquares";
  const int64_t n = x.numel();
  cudaStream_t st = cudaStream_t(stream);
  const int64_t B = std::min<int64_t>(kMaxPartials, (n + kThreads * 8 - 1) / (kThreads * 8));
  Tensor partial;
  if (B > 0) {
    partial = Tensor::empty({B}, DType::f32, x.device(), op);  // scratch, stream-ordered
    dispatch_float(x.dtype(), [&](auto tag) {
      using X = typename decltype(tag)::type;
      sqnorm_partial_kernel<X><<<unsigned(B), kThreads, 0, st>>>(x.data<X>(), n, partial.data<float>());
    });
    cuda::check_launch(op);
  }
  sqnorm_finish_kernel<<<1, 1024, 0, st>>>(B > 0 ? partial.data<float>() : nullptr, B, out.data<float>(), accumulate);
  cuda::check_launch(op);
}

}  // namespace moe::ops
