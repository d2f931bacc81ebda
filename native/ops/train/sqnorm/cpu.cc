#include "ops/common/convert.h"
#include "ops/train/sqnorm/sqnorm.h"

namespace moe::ops {

void sum_of_squares_cpu(const Tensor& x, const Tensor& out, bool accumulate) {
  const int64_t n = x.numel();
  double acc = 0;
  dispatch_float(x.dtype(), [&](auto tag) {
    using X = typename decltype(tag)::type;
    const X* p = x.data<X>();
    for (int64_t i = 0; i < n; ++i) {
      const double v = to_float(p[i]);
      acc += v * v;
    }
  });
  float* o = out.data<float>();
  o[0] = float((accumulate ? double(o[0]) : 0.0) + acc);
}

}  // namespace moe::ops
