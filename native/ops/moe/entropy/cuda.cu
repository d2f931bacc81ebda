#include "core/cuda_runtime.h"
#include "ops/common/launch.h"
#include "ops/moe/entropy/entropy.h"

namespace moe::ops {

// One warp per row: the row sum, then −Σ p·ln p; each block adds its rows' entropies into a
// per-block partial (no float atomics: a second pass adds the partials in a fixed order).
constexpr int kWarps = 8;

__global__ void row_entropy_kernel(const float* s, int64_t T, int64_t E, float* partial) {
  __shared__ float warp_sum[kWarps];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float acc = 0.f;
  for (int64_t t = int64_t(blockIdx.x) * kWarps + warp; t < T; t += int64_t(gridDim.x) * kWarps) {
    const float* row = s + t * E;
    float sum = 0.f;
    bool finite = true;
    for (int64_t e = lane; e < E; e += 32) {
      sum += row[e];
      finite = finite && isfinite(row[e]);
    }
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if (!__all_sync(0xffffffffu, finite)) {  // a NaN or infinite score, as on the CPU (per score, not the sum)
      acc += __int_as_float(0x7fc00000);
      continue;
    }
    if (!(sum > 0.f)) continue;
    float h = 0.f;
    for (int64_t e = lane; e < E; e += 32) {
      float p = row[e] / sum;
      if (p > 0.f) h -= p * logf(p);
    }
    for (int o = 16; o > 0; o >>= 1) h += __shfl_xor_sync(0xffffffffu, h, o);
    acc += h;
  }
  if (lane == 0) warp_sum[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    float b = 0.f;
    for (int w = 0; w < kWarps; ++w) b += warp_sum[w];
    partial[blockIdx.x] = b;
  }
}

// The partials' sum in a fixed order (the same bits every run): thread i adds partials i, i + 256, …
// in double, then a tree over the threads. With one thread walking them (512 at T = 4096) the
// layer's entropy phase took 0.0187 ms on an H100, 0.0094 with this pass (benchmarks/README.md,
// "Measured (H100) at 7787ce4").
constexpr int kFinishThreads = 256;

__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const float* partial, int n, int64_t T, float* out) {
  __shared__ double sums[kFinishThreads];
  double total = 0;
  for (int i = int(threadIdx.x); i < n; i += kFinishThreads) total += partial[i];
  sums[threadIdx.x] = total;
  __syncthreads();
  for (int half = kFinishThreads / 2; half > 0; half >>= 1) {
    if (int(threadIdx.x) < half) sums[threadIdx.x] += sums[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = T > 0 ? float(sums[0] / double(T)) : 0.f;
}

void mean_row_entropy_cuda(const Tensor& scores, const Tensor& out, void* stream) {
  const int64_t T = scores.size(0), E = scores.size(1);
  const int blocks = int(std::max<int64_t>(1, std::min<int64_t>((T + kWarps - 1) / kWarps, 1024)));
  Tensor partial = Tensor::empty({blocks}, DType::f32, scores.device(), "routerEntropy");
  row_entropy_kernel<<<blocks, kWarps * 32, 0, cudaStream_t(stream)>>>(scores.data<float>(), T, E, partial.data<float>());
  finish_kernel<<<1, kFinishThreads, 0, cudaStream_t(stream)>>>(partial.data<float>(), blocks, T, out.data<float>());
  cuda::check_launch("routerEntropy");
}

}  // namespace moe::ops
