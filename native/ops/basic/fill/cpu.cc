#include <cstring>

#include "ops/basic/fill/fill.h"
#include "ops/common/strided.h"

namespace moe::ops {

void fill_pattern_cpu(const Tensor& out, uint64_t pattern) {
  auto* p = static_cast<unsigned char*>(out.raw());
  int64_t elem = dtype_size(out.dtype()), n = out.numel();
  StridedIndex idx = strided_index(out);
  bool contiguous = out.is_contiguous();
  for (int64_t i = 0; i < n; ++i) std::memcpy(p + (contiguous ? i : idx.offset(i)) * elem, &pattern, size_t(elem));
}

}  // namespace moe::ops
