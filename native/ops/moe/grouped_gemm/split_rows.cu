// The two small kernels around a row-split dW (split_rows.h): the split offsets, and the sum of the
// partials.
#include <cuda_runtime.h>

#include <cstdint>

#include "core/cuda_runtime.h"
#include "ops/moe/grouped_gemm/split_rows.h"

namespace moe::ops {
namespace {

constexpr int SUM_THREADS = 256;

// One thread: the group's range from the device, then every cut (splits ≤ a few dozen).
__global__ void split_row_offsets_kernel(const int32_t* group_offsets, int64_t rows, int splits, int32_t* offsets) {
  int64_t begin = group_offsets[0], end = group_offsets[1];
  begin = begin < 0 ? 0 : (begin > rows ? rows : begin);
  end = end < begin ? begin : (end > rows ? rows : end);
  const int64_t len = end - begin;
  offsets[0] = int32_t(begin);
  for (int s = 1; s < splits; ++s) offsets[s] = int32_t(begin + (len * s / splits) / SPLIT_ROWS_ALIGN * SPLIT_ROWS_ALIGN);
  offsets[splits] = int32_t(end);
}

// Four floats a thread, the splits added in order (then out, when accumulating, last).
__global__ void __launch_bounds__(SUM_THREADS)
    sum_row_splits_kernel(const float* partial, int splits, int64_t count, float* out, bool accumulate) {
  const int64_t i = (int64_t(blockIdx.x) * SUM_THREADS + threadIdx.x) * 4;
  if (i >= count) return;
  float4 s = __ldcs(reinterpret_cast<const float4*>(partial + i));
  for (int k = 1; k < splits; ++k) {
    const float4 p = __ldcs(reinterpret_cast<const float4*>(partial + int64_t(k) * count + i));
    s.x += p.x;
    s.y += p.y;
    s.z += p.z;
    s.w += p.w;
  }
  float4* dst = reinterpret_cast<float4*>(out + i);
  if (accumulate) {
    const float4 o = *dst;
    s = make_float4(o.x + s.x, o.y + s.y, o.z + s.z, o.w + s.w);
  }
  *dst = s;
}

}  // namespace

void split_row_offsets(const Tensor& group_offsets, int64_t rows, const Tensor& offsets, void* stream) {
  const int splits = int(offsets.size(0) - 1);
  split_row_offsets_kernel<<<1, 1, 0, cudaStream_t(stream)>>>(group_offsets.data<int32_t>(), rows, splits, offsets.data<int32_t>());
  cuda::check_launch("groupedGemm");
}

void sum_row_splits(const Tensor& partial, int splits, const Tensor& out, bool accumulate, void* stream) {
  const int64_t count = out.numel();
  const unsigned blocks = unsigned((count / 4 + SUM_THREADS - 1) / SUM_THREADS);
  sum_row_splits_kernel<<<blocks, SUM_THREADS, 0, cudaStream_t(stream)>>>(partial.data<float>(), splits, count, out.data<float>(),
                                                                          accumulate);
  cuda::check_launch("groupedGemm");
}

}  // namespace moe::ops
