#include "ops/common/convert.h"
#include "ops/random/sample.h"

namespace moe::ops {

void random_cpu(const Tensor& out, const RandomParams& params) {
  int64_t n = out.numel();
  dispatch_dtype(out.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (IsFloating<T>::value) {
      T* po = out.data<T>();
      for (int64_t i = 0; i < n; ++i) po[i] = from_float<T>(random_sample(params, i));
    }
  });
}

}  // namespace moe::ops
