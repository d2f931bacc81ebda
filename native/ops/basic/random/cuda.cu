#include "core/cuda_runtime.h"
#include "ops/basic/random/sample.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"

namespace moe::ops {

template <typename T> __global__ void random_kernel(T* out, int64_t n, RandomParams p) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(random_sample(p, i));
}

void random_cuda(const Tensor& out, const RandomParams& params, void* stream) {
  int64_t n = out.numel();
  dispatch_dtype(out.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (IsFloating<T>::value) random_kernel<T><<<grid_for(n), kThreads, 0, cudaStream_t(stream)>>>(out.data<T>(), n, params);
  });
  cuda::check_launch(params.kind == RandomKind::Uniform ? "rand" : "randn");
}

}  // namespace moe::ops
