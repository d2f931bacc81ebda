#include "ops/train/balance/balance.h"

namespace moe::ops {

void balance_bias_update_cpu(const Tensor& bias, const Tensor& load, float gamma) {
  const int64_t E = bias.size(0);
  float* b = bias.data<float>();
  auto step = [&](double diff) { return diff > 0 ? gamma : diff < 0 ? -gamma : 0.f; };
  if (load.dtype() == DType::i32) {
    const int32_t* l = load.data<int32_t>();
    int64_t sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += l[e];
    for (int64_t e = 0; e < E; ++e) b[e] += step(double(sum - E * int64_t(l[e])));
  } else {
    const float* l = load.data<float>();
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += l[e];
    for (int64_t e = 0; e < E; ++e) b[e] += step(sum - double(E) * double(l[e]));
  }
}

}  // namespace moe::ops
