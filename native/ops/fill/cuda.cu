#include "core/cuda_runtime.h"
#include "ops/common/launch.h"
#include "ops/fill/fill.h"

namespace moe::ops {

template <typename T>
__global__ void fill_kernel(T* out, int64_t n, T value) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) out[i] = value;
}

template <typename T>
static void launch(void* out, int64_t n, uint64_t pattern, void* stream) {
  T v;
  memcpy(&v, &pattern, sizeof v);
  fill_kernel<T><<<grid_for(n), kThreads, 0, cudaStream_t(stream)>>>(static_cast<T*>(out), n, v);
}

void fill_pattern_cuda(void* out, int64_t numel, int64_t elem_size, uint64_t pattern, void* stream) {
  if (numel == 0) return;
  switch (elem_size) {
    case 1: launch<uint8_t>(out, numel, pattern, stream); break;
    case 2: launch<uint16_t>(out, numel, pattern, stream); break;
    case 4: launch<uint32_t>(out, numel, pattern, stream); break;
    default: launch<uint64_t>(out, numel, pattern, stream); break;
  }
  cuda::check_launch("fill");
}

}  // namespace moe::ops
