#include <cstring>

#include "ops/basic/copy/copy.h"
#include "ops/common/convert.h"
#include "ops/common/strided.h"

namespace moe::ops {

void copy_cpu(const Tensor& dst, const Tensor& src) {
  if (dst.is_contiguous() && src.is_contiguous() && dst.dtype() == src.dtype()) {
    std::memcpy(dst.raw(), src.raw(), size_t(dst.nbytes()));
    return;
  }
  StridedIndex di = strided_index(dst), si = strided_index(src);
  int64_t n = dst.numel();
  dispatch_dtype(dst.dtype(), [&](auto dtag) {
    using D = typename decltype(dtag)::type;
    dispatch_dtype(src.dtype(), [&](auto stag) {
      using S = typename decltype(stag)::type;
      D* d = dst.data<D>();
      const S* s = src.data<S>();
      for (int64_t i = 0; i < n; ++i) d[di.offset(i)] = convert<D>(s[si.offset(i)]);
    });
  });
}

}  // namespace moe::ops
