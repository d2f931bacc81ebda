#include <cstdint>

#include "core/cuda_runtime.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"
#include "ops/moe/clamped_swiglu/clamped_swiglu.h"
#include "ops/moe/clamped_swiglu/clamped_swiglu_math.h"

namespace moe::ops {

namespace {

// One output element a thread per pass (grid-stride): out[i] from the pair h13[2i], h13[2i + 1]
// (row r's pairs follow each other, so element i of [M, F] reads pair i of [M, 2F]).
template <typename T>
__global__ void clamped_swiglu_kernel(const T* __restrict__ h13, T* __restrict__ out, int64_t n, float alpha, float limit) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(clamped_swiglu_value(to_float(h13[2 * i]), to_float(h13[2 * i + 1]), alpha, limit));
}

// dh13's pair i from dh[i] and h13's pair i.
template <typename T>
__global__ void clamped_swiglu_backward_kernel(const T* __restrict__ dh, const T* __restrict__ h13, T* __restrict__ dh13, int64_t n,
                                               float alpha, float limit) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float dg, du;
    clamped_swiglu_grads(to_float(h13[2 * i]), to_float(h13[2 * i + 1]), to_float(dh[i]), alpha, limit, dg, du);
    dh13[2 * i] = from_float<T>(dg);
    dh13[2 * i + 1] = from_float<T>(du);
  }
}

}  // namespace

void clamped_swiglu_backward_cuda(const Tensor& dh, const Tensor& h13, const Tensor& dh13, float alpha, float limit, void* stream) {
  const int64_t n = dh.numel();
  dispatch_float(dh13.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    clamped_swiglu_backward_kernel<T>
        <<<grid_for(n), kThreads, 0, cudaStream_t(stream)>>>(dh.data<T>(), h13.data<T>(), dh13.data<T>(), n, alpha, limit);
  });
  cuda::check_launch("clampedSwigluBackward");
}

void clamped_swiglu_cuda(const Tensor& h13, const Tensor& out, float alpha, float limit, void* stream) {
  const int64_t n = out.numel();
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    clamped_swiglu_kernel<T><<<grid_for(n), kThreads, 0, cudaStream_t(stream)>>>(h13.data<T>(), out.data<T>(), n, alpha, limit);
  });
  cuda::check_launch("clampedSwiglu");
}

}  // namespace moe::ops
