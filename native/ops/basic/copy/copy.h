// copy: dst[i] = convert(src[i]) over matching shapes. Either side may be a strided view and the
// dtypes may differ (this is also the cast). Across devices it stages through a contiguous copy.
#pragma once
#include "core/tensor.h"

namespace moe::ops {

void copy(const Tensor& dst, const Tensor& src);

void copy_cpu(const Tensor& dst, const Tensor& src);
void copy_cuda(const Tensor& dst, const Tensor& src, void* stream);

}  // namespace moe::ops
