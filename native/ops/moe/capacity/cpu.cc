// Plain loops: the oracle for the CUDA kernels and the path without a GPU.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"
#include "ops/moe/capacity/capacity.h"

namespace moe::ops {

void capacity_cpu(const Tensor& indices, const Tensor& weights, int64_t num_experts, int64_t capacity, DropPolicy policy,
                  const Tensor& slot, const Tensor& kept, const Tensor& dropped, const Tensor& invalid) {
  const char* op = "capacity";
  const int64_t n = indices.numel(), k = indices.shape()[1];
  const int32_t* idx = indices.data<int32_t>();
  std::vector<std::vector<int64_t>> per_expert(static_cast<size_t>(num_experts));  // assignments in (t, j) order
  for (int64_t i = 0; i < n; ++i) {
    int32_t e = idx[i];
    MOE_ARG_CHECK(e >= 0 && e < num_experts, op, "'indices'[", i / k, ",", i % k, "] = ", e, " is outside [0, ", num_experts,
                  ") (numExperts = ", num_experts, ")");
    per_expert[size_t(e)].push_back(i);
  }
  int32_t* s = slot.data<int32_t>();
  std::fill(s, s + n, -1);
  int64_t total_dropped = 0;
  const float* w = weights.defined() ? weights.data<float>() : nullptr;
  auto rank_weight = [&](int64_t i) {
    float v = w[i];
    return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v;
  };
  for (int64_t e = 0; e < num_experts; ++e) {
    std::vector<int64_t>& list = per_expert[size_t(e)];
    int64_t keep = capacity < 0 ? int64_t(list.size()) : std::min<int64_t>(capacity, int64_t(list.size()));
    if (policy == DropPolicy::Probs && keep < int64_t(list.size())) {
      std::stable_sort(list.begin(), list.end(), [&](int64_t a, int64_t b) { return rank_weight(a) > rank_weight(b); });
      list.resize(size_t(keep));
      std::sort(list.begin(), list.end());  // kept ones are numbered in (t, j) order
    } else {
      list.resize(size_t(keep));
    }
    for (int64_t r = 0; r < keep; ++r) s[list[size_t(r)]] = int32_t(r);
    kept.data<int32_t>()[e] = int32_t(keep);
  }
  int64_t kept_total = 0;
  for (int64_t e = 0; e < num_experts; ++e) kept_total += kept.data<int32_t>()[e];
  total_dropped = n - kept_total;
  dropped.data<int32_t>()[0] = int32_t(total_dropped);
  invalid.data<int32_t>()[0] = 0;
}

}  // namespace moe::ops
