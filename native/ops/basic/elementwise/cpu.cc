#include "ops/basic/elementwise/elementwise.h"
#include "ops/common/convert.h"

namespace moe::ops {

void binary_cpu(BinaryOp kind, const Tensor& a, const Tensor& b, const Tensor& out, double alpha) {
  int64_t n = out.numel();
  int64_t nb = b.defined() ? b.numel() : 1;
  dispatch_dtype(out.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* pa = a.data<T>();
    const T* pb = b.defined() ? b.data<T>() : nullptr;
    T* po = out.data<T>();
    if constexpr (IsFloating<T>::value) {
      float al = float(alpha);
      for (int64_t i = 0; i < n; ++i) {
        float x = to_float(pa[i]);
        float y = pb ? to_float(pb[i % nb]) : 1.0f;
        float r = kind == BinaryOp::Add ? x + al * y : al * x * y;
        po[i] = from_float<T>(r);
      }
    } else {
      T al = T(alpha);
      for (int64_t i = 0; i < n; ++i) {
        T y = pb ? pb[i % nb] : T(1);
        po[i] = kind == BinaryOp::Add ? T(pa[i] + al * y) : T(al * pa[i] * y);
      }
    }
  });
}

}  // namespace moe::ops
