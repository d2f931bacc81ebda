#include <cmath>
#include <limits>

#include "ops/basic/reduce/reduce.h"
#include "ops/common/convert.h"

namespace moe::ops {

void reduce_cpu(ReduceOp kind, const Tensor& a, int64_t outer, int64_t n, int64_t inner, const Tensor& out) {
  dispatch_dtype(a.dtype(), [&](auto itag) {
    using I = typename decltype(itag)::type;
    dispatch_dtype(out.dtype(), [&](auto otag) {
      using O = typename decltype(otag)::type;
      if constexpr (IsFloating<I>::value == IsFloating<O>::value) {
        const I* pa = a.data<I>();
        O* po = out.data<O>();
        for (int64_t o = 0; o < outer; ++o) {
          for (int64_t k = 0; k < inner; ++k) {
            if constexpr (IsFloating<I>::value) {
              double acc = kind == ReduceOp::Sum ? 0.0 : -std::numeric_limits<double>::infinity();
              for (int64_t j = 0; j < n; ++j) {
                double v = to_float(pa[(o * n + j) * inner + k]);
                if (kind == ReduceOp::Sum) acc += v;
                else if (std::isnan(v) || v > acc) acc = std::isnan(acc) ? acc : v;
              }
              po[o * inner + k] = from_float<O>(float(acc));
            } else {
              int64_t acc = kind == ReduceOp::Sum ? 0 : std::numeric_limits<int64_t>::min();
              for (int64_t j = 0; j < n; ++j) {
                int64_t v = int64_t(pa[(o * n + j) * inner + k]);
                acc = kind == ReduceOp::Sum ? acc + v : std::max(acc, v);
              }
              po[o * inner + k] = O(acc);
            }
          }
        }
      }
    });
  });
}

}  // namespace moe::ops
