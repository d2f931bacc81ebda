#include <cstdint>

#include "core/cuda_runtime.h"
#include "ops/basic/activation/activation.h"
#include "ops/basic/activation/activation_math.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"

namespace moe::ops {

namespace {

// Elementwise and bound by DRAM: each thread moves 16 bytes at a time (8 bf16/f16, 4 f32) where
// every pointer is 16-byte aligned, as a device copy does; a scalar loop takes the tail, and the
// whole tensor where a pointer is not aligned (a view at an odd offset).
constexpr int kVecBytes = 16;
template <typename T> constexpr int kPerVec = kVecBytes / int(sizeof(T));

struct alignas(kVecBytes) Vec {
  uint4 bits;
};

template <typename T> __device__ __forceinline__ T* lanes(Vec& v) { return reinterpret_cast<T*>(&v); }

// out = f(x): vectors [0, n_vec), then elements [n_vec · kPerVec, n).
template <typename T> __global__ void activation_kernel(Activation kind, const T* x, T* out, int64_t n_vec, int64_t n) {
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = first; i < n_vec; i += stride) {
    Vec vx = reinterpret_cast<const Vec*>(x)[i], vo;
#pragma unroll
    for (int j = 0; j < kPerVec<T>; ++j) lanes<T>(vo)[j] = from_float<T>(activation_value(kind, to_float(lanes<T>(vx)[j])));
    reinterpret_cast<Vec*>(out)[i] = vo;
  }
  for (int64_t i = n_vec * kPerVec<T> + first; i < n; i += stride) out[i] = from_float<T>(activation_value(kind, to_float(x[i])));
}

// dx = dy · f'(x), the same layout.
template <typename T>
__global__ void activation_backward_kernel(Activation kind, const T* dy, const T* x, T* dx, int64_t n_vec, int64_t n) {
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = first; i < n_vec; i += stride) {
    Vec vdy = reinterpret_cast<const Vec*>(dy)[i], vx = reinterpret_cast<const Vec*>(x)[i], vo;
#pragma unroll
    for (int j = 0; j < kPerVec<T>; ++j)
      lanes<T>(vo)[j] = from_float<T>(activation_grad(kind, to_float(lanes<T>(vdy)[j]), to_float(lanes<T>(vx)[j])));
    reinterpret_cast<Vec*>(dx)[i] = vo;
  }
  for (int64_t i = n_vec * kPerVec<T> + first; i < n; i += stride)
    dx[i] = from_float<T>(activation_grad(kind, to_float(dy[i]), to_float(x[i])));
}

bool aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0; }

// Vectors when every pointer is aligned (else none), and a grid for whichever loop is longer.
template <typename T> int64_t vectors_of(int64_t n, std::initializer_list<const void*> pointers) {
  for (const void* p : pointers)
    if (!aligned(p)) return 0;
  return n / kPerVec<T>;
}

}  // namespace

// In place (out is x, or dx is dy) is safe: each element is read before it is written, by the same
// thread (so the pointers are not __restrict__).
void activation_cuda(Activation kind, const Tensor& x, const Tensor& out, void* stream) {
  int64_t n = out.numel();
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    int64_t n_vec = vectors_of<T>(n, {x.data<T>(), out.data<T>()});
    int64_t items = std::max(n_vec, n - n_vec * kPerVec<T>);
    activation_kernel<T><<<grid_for(items), kThreads, 0, cudaStream_t(stream)>>>(kind, x.data<T>(), out.data<T>(), n_vec, n);
  });
  cuda::check_launch(activation_name(kind));
}

void activation_backward_cuda(Activation kind, const Tensor& dy, const Tensor& x, const Tensor& dx, void* stream) {
  int64_t n = dx.numel();
  dispatch_float(dx.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    int64_t n_vec = vectors_of<T>(n, {dy.data<T>(), x.data<T>(), dx.data<T>()});
    int64_t items = std::max(n_vec, n - n_vec * kPerVec<T>);
    activation_backward_kernel<T>
        <<<grid_for(items), kThreads, 0, cudaStream_t(stream)>>>(kind, dy.data<T>(), x.data<T>(), dx.data<T>(), n_vec, n);
  });
  cuda::check_launch(activation_backward_name(kind));
}

}  // namespace moe::ops
