#include "ops/common/convert.h"
#include "ops/moe/clamped_swiglu/clamped_swiglu.h"
#include "ops/moe/clamped_swiglu/clamped_swiglu_math.h"

namespace moe::ops {

void clamped_swiglu_cpu(const Tensor& h13, const Tensor& out, float alpha, float limit) {
  const int64_t M = out.size(0), F = out.size(1);
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* ph = h13.data<T>();
    T* po = out.data<T>();
    for (int64_t r = 0; r < M; ++r)
      for (int64_t i = 0; i < F; ++i) {
        const T* pair = ph + r * 2 * F + 2 * i;
        po[r * F + i] = from_float<T>(clamped_swiglu_value(to_float(pair[0]), to_float(pair[1]), alpha, limit));
      }
  });
}

void clamped_swiglu_backward_cpu(const Tensor& dh, const Tensor& h13, const Tensor& dh13, float alpha, float limit) {
  const int64_t n = dh.numel();
  dispatch_float(dh13.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* pdh = dh.data<T>();
    const T* ph = h13.data<T>();
    T* pd = dh13.data<T>();
    for (int64_t i = 0; i < n; ++i) {
      float dg, du;
      clamped_swiglu_grads(to_float(ph[2 * i]), to_float(ph[2 * i + 1]), to_float(pdh[i]), alpha, limit, dg, du);
      pd[2 * i] = from_float<T>(dg);
      pd[2 * i + 1] = from_float<T>(du);
    }
  });
}

}  // namespace moe::ops
