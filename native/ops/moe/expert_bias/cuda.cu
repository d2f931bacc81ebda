#include <cstdint>

#include "core/cuda_runtime.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"
#include "ops/moe/expert_bias/expert_bias.h"

namespace moe::ops {

namespace {

// Rows of gridDim.y slices per expert: block (e, s) takes expert e's rows s, s + gridDim.y, …
// (its range read from the device offsets and clamped into [0, M]), its threads the columns.
template <typename T> __global__ void expert_bias_kernel(T* rows, const T* bias, const int32_t* offsets, int64_t M, int64_t N) {
  const int64_t e = blockIdx.x;
  int64_t begin = offsets[e], end = offsets[e + 1];
  begin = begin < 0 ? 0 : (begin > M ? M : begin);
  end = end < begin ? begin : (end > M ? M : end);
  const T* b = bias + e * N;
  for (int64_t r = begin + blockIdx.y; r < end; r += gridDim.y)
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) rows[r * N + n] = from_float<T>(to_float(rows[r * N + n]) + to_float(b[n]));
}

// Block (e, c) sums expert e's rows for the columns c·blockDim.x + threadIdx.x: one thread a column,
// rows in order (the CPU's order, the same bits every run).
template <typename T>
__global__ void expert_bias_backward_kernel(const T* d_rows, const int32_t* offsets, float* d_bias, int64_t M, int64_t N, bool accumulate) {
  const int64_t e = blockIdx.x, n = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  int64_t begin = offsets[e], end = offsets[e + 1];
  begin = begin < 0 ? 0 : (begin > M ? M : begin);
  end = end < begin ? begin : (end > M ? M : end);
  float s = 0.0f;
  for (int64_t r = begin; r < end; ++r) s += to_float(d_rows[r * N + n]);
  d_bias[e * N + n] = accumulate ? d_bias[e * N + n] + s : s;
}

}  // namespace

void expert_bias_backward_cuda(const Tensor& d_rows, const Tensor& offsets, const Tensor& d_bias, bool accumulate, void* stream) {
  const int64_t M = d_rows.size(0), N = d_rows.size(1), E = d_bias.size(0);
  const unsigned column_blocks = unsigned((N + kThreads - 1) / kThreads);
  dispatch_float(d_rows.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    expert_bias_backward_kernel<T><<<dim3(unsigned(E), column_blocks), kThreads, 0, cudaStream_t(stream)>>>(
        d_rows.data<T>(), offsets.data<int32_t>(), d_bias.data<float>(), M, N, accumulate);
  });
  cuda::check_launch("expertBiasBackward");
}

void expert_bias_cuda(const Tensor& rows, const Tensor& bias, const Tensor& offsets, void* stream) {
  const int64_t M = rows.size(0), N = rows.size(1), E = bias.size(0);
  // Enough row slices per expert to fill the GPU when the rows are few per expert (decode), not more.
  const unsigned slices = unsigned(std::min<int64_t>(std::max<int64_t>((M + E - 1) / E, 1), 64));
  dispatch_float(rows.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    expert_bias_kernel<T>
        <<<dim3(unsigned(E), slices), kThreads, 0, cudaStream_t(stream)>>>(rows.data<T>(), bias.data<T>(), offsets.data<int32_t>(), M, N);
  });
  cuda::check_launch("expertBias");
}

}  // namespace moe::ops
