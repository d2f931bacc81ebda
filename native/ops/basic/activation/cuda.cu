#include "core/cuda_runtime.h"
#include "ops/basic/activation/activation.h"
#include "ops/basic/activation/activation_math.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"

namespace moe::ops {

template <typename T> __global__ void activation_kernel(Activation kind, const T* x, T* out, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(activation_value(kind, to_float(x[i])));
}

template <typename T> __global__ void activation_backward_kernel(Activation kind, const T* dy, const T* x, T* dx, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dx[i] = from_float<T>(activation_grad(kind, to_float(dy[i]), to_float(x[i])));
}

void activation_cuda(Activation kind, const Tensor& x, const Tensor& out, void* stream) {
  int64_t n = out.numel();
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    activation_kernel<T><<<grid_for(n), kThreads, 0, cudaStream_t(stream)>>>(kind, x.data<T>(), out.data<T>(), n);
  });
  cuda::check_launch(activation_name(kind));
}

void activation_backward_cuda(Activation kind, const Tensor& dy, const Tensor& x, const Tensor& dx, void* stream) {
  int64_t n = dx.numel();
  dispatch_float(dx.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    activation_backward_kernel<T><<<grid_for(n), kThreads, 0, cudaStream_t(stream)>>>(kind, dy.data<T>(), x.data<T>(), dx.data<T>(), n);
  });
  cuda::check_launch(activation_backward_name(kind));
}

}  // namespace moe::ops
