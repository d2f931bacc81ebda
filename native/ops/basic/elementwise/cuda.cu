#include "core/cuda_runtime.h"
#include "ops/basic/elementwise/elementwise.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"

namespace moe::ops {

template <typename T, typename Scalar>
__global__ void binary_kernel(BinaryOp kind, const T* a, const T* b, int64_t nb, T* out, int64_t n, Scalar alpha) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    if constexpr (IsFloating<T>::value) {
      float x = to_float(a[i]);
      float y = b ? to_float(b[i % nb]) : 1.0f;
      // __fmul_rn/__fadd_rn keep the CPU's operation order (no fused multiply-add contraction).
      float r = kind == BinaryOp::Add ? __fadd_rn(x, __fmul_rn(alpha, y)) : __fmul_rn(__fmul_rn(alpha, x), y);
      out[i] = from_float<T>(r);
    } else {
      T y = b ? b[i % nb] : T(1);
      out[i] = kind == BinaryOp::Add ? T(a[i] + alpha * y) : T(alpha * a[i] * y);
    }
  }
}

void binary_cuda(BinaryOp kind, const Tensor& a, const Tensor& b, const Tensor& out, double alpha, void* stream) {
  int64_t n = out.numel();
  int64_t nb = b.defined() ? b.numel() : 1;
  dispatch_dtype(out.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* pb = b.defined() ? b.data<T>() : nullptr;
    if constexpr (IsFloating<T>::value) {
      binary_kernel<T, float>
          <<<grid_for(n), kThreads, 0, cudaStream_t(stream)>>>(kind, a.data<T>(), pb, nb, out.data<T>(), n, float(alpha));
    } else {
      binary_kernel<T, T><<<grid_for(n), kThreads, 0, cudaStream_t(stream)>>>(kind, a.data<T>(), pb, nb, out.data<T>(), n, T(alpha));
    }
  });
  cuda::check_launch(kind == BinaryOp::Add ? "add" : "mul");
}

}  // namespace moe::ops
