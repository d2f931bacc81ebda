// Balance-bias update: one block. Thread 0 sums the loads in index order (E is small: the number
// of experts), the same order as the CPU reference; then every thread updates its experts.
#include <cstdint>

#include "core/cuda_runtime.h"
#include "core/tensor.h"
#include "ops/common/launch.h"
#include "ops/train/balance/balance.h"

namespace moe::ops {

namespace {

template <typename L, typename Acc> __global__ void balance_kernel(float* bias, const L* load, int64_t E, float gamma) {
  __shared__ Acc sum;
  if (threadIdx.x == 0) {
    Acc s = 0;
    for (int64_t e = 0; e < E; ++e) s += Acc(load[e]);
    sum = s;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
    const Acc diff = sum - Acc(E) * Acc(load[e]);
    bias[e] += diff > 0 ? gamma : diff < 0 ? -gamma : 0.f;
  }
}

}  // namespace

void balance_bias_update_cuda(const Tensor& bias, const Tensor& load, float gamma, void* stream) {
  const int64_t E = bias.size(0);
  cudaStream_t st = cudaStream_t(stream);
  if (load.dtype() == DType::i32)
    balance_kernel<int32_t, int64_t><<<1, kThreads, 0, st>>>(bias.data<float>(), load.data<int32_t>(), E, gamma);
  else balance_kernel<float, double><<<1, kThreads, 0, st>>>(bias.data<float>(), load.data<float>(), E, gamma);
  cuda::check_launch("balanceBiasUpdate");
}

}  // namespace moe::ops
