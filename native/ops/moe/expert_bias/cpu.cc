#include <algorithm>

#include "ops/common/convert.h"
#include "ops/moe/expert_bias/expert_bias.h"

namespace moe::ops {

void expert_bias_cpu(const Tensor& rows, const Tensor& bias, const Tensor& offsets) {
  const int64_t M = rows.size(0), N = rows.size(1), E = bias.size(0);
  const int32_t* off = offsets.data<int32_t>();
  dispatch_float(rows.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* pr = rows.data<T>();
    const T* pb = bias.data<T>();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t begin = std::clamp<int64_t>(off[e], 0, M), end = std::clamp<int64_t>(off[e + 1], begin, M);
      for (int64_t r = begin; r < end; ++r)
        for (int64_t n = 0; n < N; ++n) pr[r * N + n] = from_float<T>(to_float(pr[r * N + n]) + to_float(pb[e * N + n]));
    }
  });
}

void expert_bias_backward_cpu(const Tensor& d_rows, const Tensor& offsets, const Tensor& d_bias, bool accumulate) {
  const int64_t M = d_rows.size(0), N = d_rows.size(1), E = d_bias.size(0);
  const int32_t* off = offsets.data<int32_t>();
  float* pb = d_bias.data<float>();
  dispatch_float(d_rows.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* pr = d_rows.data<T>();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t begin = std::clamp<int64_t>(off[e], 0, M), end = std::clamp<int64_t>(off[e + 1], begin, M);
      for (int64_t n = 0; n < N; ++n) {
        float s = 0.0f;
        for (int64_t r = begin; r < end; ++r) s += to_float(pr[r * N + n]);
        pb[e * N + n] = accumulate ? pb[e * N + n] + s : s;
      }
    }
  });
}

}  // namespace moe::ops
