#include "ops/basic/activation/activation.h"
#include "ops/basic/activation/activation_math.h"
#include "ops/common/convert.h"

namespace moe::ops {

void activation_cpu(Activation kind, const Tensor& x, const Tensor& out) {
  int64_t n = out.numel();
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = x.data<T>();
    T* po = out.data<T>();
    for (int64_t i = 0; i < n; ++i) po[i] = from_float<T>(activation_value(kind, to_float(px[i])));
  });
}

void activation_backward_cpu(Activation kind, const Tensor& dy, const Tensor& x, const Tensor& dx) {
  int64_t n = dx.numel();
  dispatch_float(dx.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* pdy = dy.data<T>();
    const T* px = x.data<T>();
    T* pdx = dx.data<T>();
    for (int64_t i = 0; i < n; ++i) pdx[i] = from_float<T>(activation_grad(kind, to_float(pdy[i]), to_float(px[i])));
  });
}

}  // namespace moe::ops
