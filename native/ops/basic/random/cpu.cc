#include "core/parallel.h"
#include "ops/basic/random/sample.h"
#include "ops/common/convert.h"

namespace moe::ops {

void random_cpu(const Tensor& out, const RandomParams& params) {
  int64_t n = out.numel();
  dispatch_dtype(out.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (IsFloating<T>::value) {
      T* po = out.data<T>();
      // Each element depends on its index alone (counter-based Philox): any split gives the same values.
      parallel_for(n, 32, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) po[i] = from_float<T>(random_sample(params, i));
      });
    }
  });
}

}  // namespace moe::ops
