#include <algorithm>
#include <cstdint>
#include <type_traits>

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
// The function is a template argument, not a runtime switch: the compiler then interleaves the
// independent lanes' erff/expf chains (bf16 gelu reached 0.70× torch with the switch inside the
// loop: results/activation-75fb22b.json), and each thread issues both of its vectors' loads before
// computing either, so a warp keeps 32 bytes a thread in flight while the math runs.
constexpr int kVecBytes = 16;
constexpr int kVecsPerThread = 2;
template <typename T> constexpr int kPerVec = kVecBytes / int(sizeof(T));

struct alignas(kVecBytes) Vec {
  uint4 bits;
};

template <typename T> __device__ __forceinline__ T* lanes(Vec& v) { return reinterpret_cast<T*>(&v); }

// out = f(x): vectors [0, n_vec), then elements [n_vec · kPerVec, n). A thread takes vectors i and
// i + stride of each pass (coalesced: neighbouring threads, neighbouring vectors).
template <Activation K, typename T> __global__ void activation_kernel(const T* x, T* out, int64_t n_vec, int64_t n) {
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = first; i < n_vec; i += kVecsPerThread * stride) {
    Vec v[kVecsPerThread];
#pragma unroll
    for (int u = 0; u < kVecsPerThread; ++u)
      if (i + u * stride < n_vec) v[u] = reinterpret_cast<const Vec*>(x)[i + u * stride];
#pragma unroll
    for (int u = 0; u < kVecsPerThread; ++u) {
#pragma unroll
      for (int j = 0; j < kPerVec<T>; ++j) lanes<T>(v[u])[j] = from_float<T>(activation_value(K, to_float(lanes<T>(v[u])[j])));
      if (i + u * stride < n_vec) reinterpret_cast<Vec*>(out)[i + u * stride] = v[u];
    }
  }
  for (int64_t i = n_vec * kPerVec<T> + first; i < n; i += stride) out[i] = from_float<T>(activation_value(K, to_float(x[i])));
}

// dx = dy · f'(x), the same layout.
template <Activation K, typename T> __global__ void activation_backward_kernel(const T* dy, const T* x, T* dx, int64_t n_vec, int64_t n) {
  const int64_t first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = first; i < n_vec; i += kVecsPerThread * stride) {
    Vec vdy[kVecsPerThread], vx[kVecsPerThread];
#pragma unroll
    for (int u = 0; u < kVecsPerThread; ++u)
      if (i + u * stride < n_vec) {
        vdy[u] = reinterpret_cast<const Vec*>(dy)[i + u * stride];
        vx[u] = reinterpret_cast<const Vec*>(x)[i + u * stride];
      }
#pragma unroll
    for (int u = 0; u < kVecsPerThread; ++u) {
#pragma unroll
      for (int j = 0; j < kPerVec<T>; ++j)
        lanes<T>(vdy[u])[j] = from_float<T>(activation_grad(K, to_float(lanes<T>(vdy[u])[j]), to_float(lanes<T>(vx[u])[j])));
      if (i + u * stride < n_vec) reinterpret_cast<Vec*>(dx)[i + u * stride] = vdy[u];
    }
  }
  for (int64_t i = n_vec * kPerVec<T> + first; i < n; i += stride)
    dx[i] = from_float<T>(activation_grad(K, to_float(dy[i]), to_float(x[i])));
}

// Calls f with the kind as a compile-time constant (std::integral_constant<Activation, K>).
template <typename F> void with_activation(Activation kind, F&& f) {
  switch (kind) {
    case Activation::Relu: return f(std::integral_constant<Activation, Activation::Relu>{});
    case Activation::Silu: return f(std::integral_constant<Activation, Activation::Silu>{});
    case Activation::Gelu: return f(std::integral_constant<Activation, Activation::Gelu>{});
    case Activation::GeluTanh: return f(std::integral_constant<Activation, Activation::GeluTanh>{});
  }
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
    unsigned grid = grid_for(std::max((n_vec + kVecsPerThread - 1) / kVecsPerThread, n - n_vec * kPerVec<T>));
    with_activation(kind, [&](auto k) {
      activation_kernel<decltype(k)::value, T><<<grid, kThreads, 0, cudaStream_t(stream)>>>(x.data<T>(), out.data<T>(), n_vec, n);
    });
  });
  cuda::check_launch(activation_name(kind));
}

void activation_backward_cuda(Activation kind, const Tensor& dy, const Tensor& x, const Tensor& dx, void* stream) {
  int64_t n = dx.numel();
  dispatch_float(dx.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    int64_t n_vec = vectors_of<T>(n, {dy.data<T>(), x.data<T>(), dx.data<T>()});
    unsigned grid = grid_for(std::max((n_vec + kVecsPerThread - 1) / kVecsPerThread, n - n_vec * kPerVec<T>));
    with_activation(kind, [&](auto k) {
      activation_backward_kernel<decltype(k)::value, T>
          <<<grid, kThreads, 0, cudaStream_t(stream)>>>(dy.data<T>(), x.data<T>(), dx.data<T>(), n_vec, n);
    });
  });
  cuda::check_launch(activation_backward_name(kind));
}

}  // namespace moe::ops
