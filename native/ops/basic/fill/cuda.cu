#include "core/cuda_runtime.h"
#include "ops/basic/fill/fill.h"
#include "ops/common/launch.h"
#include "ops/common/strided.h"

namespace moe::ops {

template <typename T> __global__ void fill_kernel(T* out, int64_t n, T value, StridedIndex idx, bool contiguous) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[contiguous ? i : idx.offset(i)] = value;
}

template <typename T> static void launch(const Tensor& out, uint64_t pattern, void* stream) {
  T v;
  memcpy(&v, &pattern, sizeof v);
  int64_t n = out.numel();
  fill_kernel<T>
      <<<grid_for(n), kThreads, 0, cudaStream_t(stream)>>>(static_cast<T*>(out.raw()), n, v, strided_index(out), out.is_contiguous());
}

void fill_pattern_cuda(const Tensor& out, uint64_t pattern, void* stream) {
  switch (dtype_size(out.dtype())) {
    case 1: launch<uint8_t>(out, pattern, stream); break;
    case 2: launch<uint16_t>(out, pattern, stream); break;
    case 4: launch<uint32_t>(out, pattern, stream); break;
    default: launch<uint64_t>(out, pattern, stream); break;
  }
  cuda::check_launch("fill");
}

}  // namespace moe::ops
