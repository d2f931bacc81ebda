#include "core/cuda_runtime.h"
#include "ops/basic/copy/copy.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"
#include "ops/common/strided.h"

namespace moe::ops {

template <typename D, typename S>
__global__ void copy_kernel(D* dst, StridedIndex di, bool dst_contig, const S* src, StridedIndex si, bool src_contig, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    S v = src[src_contig ? i : si.offset(i)];
    dst[dst_contig ? i : di.offset(i)] = convert<D>(v);
  }
}

void copy_cuda(const Tensor& dst, const Tensor& src, void* stream) {
  const std::string op = "copy";
  if (dst.is_contiguous() && src.is_contiguous() && dst.dtype() == src.dtype()) {
    cuda::memcpy_async(dst.raw(), src.raw(), dst.nbytes(), cuda::DeviceToDevice, stream, op);
    return;
  }
  int64_t n = dst.numel();
  dispatch_dtype(dst.dtype(), [&](auto dtag) {
    using D = typename decltype(dtag)::type;
    dispatch_dtype(src.dtype(), [&](auto stag) {
      using S = typename decltype(stag)::type;
      copy_kernel<D, S><<<grid_for(n), kThreads, 0, cudaStream_t(stream)>>>(dst.data<D>(), strided_index(dst), dst.is_contiguous(),
                                                                            src.data<S>(), strided_index(src), src.is_contiguous(), n);
    });
  });
  cuda::check_launch(op);
}

}  // namespace moe::ops
