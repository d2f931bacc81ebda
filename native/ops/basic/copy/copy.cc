#include "ops/basic/copy/copy.h"

#include "ops/common/checks.h"
#include "ops/common/dispatch.h"

namespace moe::ops {

namespace {
// A contiguous tensor with src's values in `dtype` on src's device (src itself when it already is).
Tensor contiguous_as(const Tensor& src, DType dtype, const char* op) {
  if (src.is_contiguous() && src.dtype() == dtype) return src;
  Tensor t = Tensor::empty(src.shape(), dtype, src.device(), op);
  copy(t, src);
  return t;
}
}  // namespace

void copy(const Tensor& dst, const Tensor& src) {
  const char* op = "copy";
  require_defined(dst, op, "dst");
  require_defined(src, op, "src");
  require_same_shape(dst, "dst", src, "src", op);
  require_usable_device(dst, op);
  require_usable_device(src, op);
  if (dst.numel() == 0) return;

  if (dst.device() == src.device()) {
    MOE_ON_DEVICE(dst, op, copy_cpu(dst, src), copy_cuda(dst, src, op_stream(dst)));
    return;
  }

  // Across devices: convert and compact on the source side, move the bytes, then scatter on the
  // destination side if dst is a strided view.
  Tensor packed = contiguous_as(src, dst.dtype(), op);
  Tensor landing = dst.is_contiguous() ? dst : Tensor::empty(dst.shape(), dst.dtype(), dst.device(), op);
  int64_t bytes = packed.nbytes();
  if (src.device().is_cuda()) {
    // The source's producers run on the source device's current stream: finish them first.
    void* src_stream = op_stream(src);
    if (dst.device().is_cpu()) {
      cuda::DeviceGuard g(src.device().index);
      cuda::memcpy_async(landing.raw(), packed.raw(), bytes, cuda::DeviceToHost, src_stream, op);
      cuda::stream_synchronize(src.device().index, src_stream, op);  // deliberate: the host reads next
    } else {
      cuda::stream_synchronize(src.device().index, src_stream, op);
      cuda::DeviceGuard g(dst.device().index);
      cuda::memcpy_peer_async(landing.raw(), dst.device().index, packed.raw(), src.device().index, bytes, op_stream(dst), op);
      // The temporary `packed` is freed when this returns; make sure the peer copy has read it.
      if (packed.storage() != src.storage()) cuda::stream_synchronize(dst.device().index, op_stream(dst), op);
    }
  } else {
    cuda::DeviceGuard g(dst.device().index);
    void* stream = op_stream(dst);
    cuda::memcpy_async(landing.raw(), packed.raw(), bytes, cuda::HostToDevice, stream, op);
    // Pageable host memory: the call returns once the source was staged, but a temporary must
    // outlive the transfer, so wait when we made one.
    if (packed.storage() != src.storage()) cuda::stream_synchronize(dst.device().index, stream, op);
  }
  if (landing.storage() != dst.storage()) copy(dst, landing);
}

}  // namespace moe::ops
