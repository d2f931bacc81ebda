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

}  // namespace moe::ops
