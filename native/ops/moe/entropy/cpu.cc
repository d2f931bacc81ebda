#include <cmath>

#include "ops/moe/entropy/entropy.h"

namespace moe::ops {

void mean_row_entropy_cpu(const Tensor& scores, const Tensor& out) {
  const int64_t T = scores.size(0), E = scores.size(1);
  const float* s = scores.data<float>();
  double total = 0;
  for (int64_t t = 0; t < T; ++t) {
    double sum = 0;
    bool finite = true;
    for (int64_t e = 0; e < E; ++e) {
      sum += s[t * E + e];
      finite = finite && std::isfinite(s[t * E + e]);
    }
    // A NaN or infinite score: the mean says so rather than hiding the row. Tested per score, not on
    // the sum, whose overflow would differ between this double sum and the kernel's float one.
    if (!finite) {
      total += std::nan("");
      continue;
    }
    if (!(sum > 0)) continue;
    double h = 0;
    for (int64_t e = 0; e < E; ++e) {
      double p = s[t * E + e] / sum;
      if (p > 0) h -= p * std::log(p);
    }
    total += h;
  }
  out.data<float>()[0] = T > 0 ? float(total / double(T)) : 0.0f;
}

}  // namespace moe::ops
