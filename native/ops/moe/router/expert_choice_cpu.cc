// Expert-choice routing reference in plain loops (the oracle for expert_choice.cu and the no-GPU
// path). Scores are computed in double and rounded to f32; the selection then ranks those f32
// scores, as the CUDA path does, so that both apply one rule to the values they output (router.h).
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "core/error.h"
#include "core/parallel.h"
#include "ops/moe/router/router.h"

namespace moe::ops {

void router_expert_choice_cpu(const Tensor& logits, const ExpertChoiceParams& p, const Tensor& scores, const Tensor& slot,
                              const Tensor& weights, const Tensor& indices, const Tensor& tokens_per_expert,
                              const Tensor& experts_per_token, const Tensor& nan_rows) {
  const int64_t T = logits.size(0), E = logits.size(1), C = p.capacity;
  const float* x = logits.data<float>();
  float* s = scores.data<float>();
  int32_t* sl = slot.data<int32_t>();
  float* w = weights.data<float>();
  int32_t* nan = nan_rows.data<int32_t>();
  nan[0] = 0;
  nan[1] = int32_t(T);
  std::vector<double> row(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * E;
    float* sr = s + t * E;
    bool bad = false;
    for (int64_t e = 0; e < E; ++e) bad = bad || !std::isfinite(xr[e]);
    if (bad) {  // as token choice: counted, scores NaN (ranked below every score)
      if (nan[0]++ == 0) nan[1] = int32_t(t);
      for (int64_t e = 0; e < E; ++e) sr[e] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    if (p.score == ScoreFn::Softmax) {
      double mx = -std::numeric_limits<double>::infinity(), sum = 0;
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, double(xr[e]));
      for (int64_t e = 0; e < E; ++e) sum += (row[size_t(e)] = std::exp(double(xr[e]) - mx));
      for (int64_t e = 0; e < E; ++e) sr[e] = float(row[size_t(e)] / sum);
    } else {
      for (int64_t e = 0; e < E; ++e) sr[e] = float(1.0 / (1.0 + std::exp(-double(xr[e]))));
    }
  }
  for (int64_t i = 0; i < T * E; ++i) {
    sl[i] = -1;
    w[i] = 0.f;
  }
  if (indices.defined()) {
    int32_t* idx = indices.data<int32_t>();
    for (int64_t t = 0; t < T; ++t)
      for (int64_t e = 0; e < E; ++e) idx[t * E + e] = int32_t(e);
  }
  // Per expert: the column's tokens ordered by descending score, NaN last, equal scores by
  // ascending token (a strict total order, so its first C are one set), the first C chosen and
  // numbered in token order. Experts in groups of 16 (one 64-byte line of a row) split over threads.
  constexpr int64_t kGroup = 16;
  parallel_for((E + kGroup - 1) / kGroup, T * kGroup * 8, [&](int64_t g0, int64_t g1) {
    std::vector<std::vector<std::pair<float, int64_t>>> cols(static_cast<size_t>(kGroup),
                                                             std::vector<std::pair<float, int64_t>>(size_t(T)));
    std::vector<char> chosen(static_cast<size_t>(T));
    auto ahead = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      const bool na = std::isnan(a.first), nb = std::isnan(b.first);
      if (na != nb) return nb;  // a number before NaN
      if (!na && a.first != b.first) return a.first > b.first;
      return a.second < b.second;
    };
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t e0 = g * kGroup, e1 = std::min(E, e0 + kGroup);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t e = e0; e < e1; ++e) cols[size_t(e - e0)][size_t(t)] = {s[t * E + e], t};
      for (int64_t e = e0; e < e1; ++e) {
        std::vector<std::pair<float, int64_t>>& col = cols[size_t(e - e0)];
        if (C < T) std::nth_element(col.begin(), col.begin() + C, col.end(), ahead);
        std::fill(chosen.begin(), chosen.end(), char(0));
        for (int64_t r = 0; r < C; ++r) chosen[size_t(col[size_t(r)].second)] = 1;
        int32_t n = 0;
        for (int64_t t = 0; t < T; ++t) {
          if (!chosen[size_t(t)]) continue;
          sl[t * E + e] = n++;
          w[t * E + e] = p.route_scale * s[t * E + e];  // an f32 product, as on the GPU
        }
        tokens_per_expert.data<int32_t>()[e] = int32_t(C);
      }
    }
  });
  int32_t* hist = experts_per_token.data<int32_t>();
  for (int64_t n = 0; n <= E; ++n) hist[n] = 0;
  for (int64_t t = 0; t < T; ++t) {
    int64_t n = 0;
    for (int64_t e = 0; e < E; ++e) n += sl[t * E + e] >= 0;
    hist[n]++;
  }
}

void router_expert_choice_backward_cpu(const Tensor& d_weights, const Tensor& scores, const Tensor& slot, ScoreFn score, float route_scale,
                                       const Tensor& d_logits, bool accumulate) {
  const char* op = "routerBackward";
  const int64_t T = scores.size(0), E = scores.size(1);
  const float* dw = d_weights.data<float>();
  const float* s = scores.data<float>();
  const int32_t* sl = slot.data<int32_t>();
  float* dx = d_logits.data<float>();
  for (int64_t i = 0; i < T * E; ++i)
    MOE_ARG_CHECK(sl[i] >= -1 && sl[i] < T, op, "'slot'[", i / E, ",", i % E, "] = ", sl[i], " is outside [-1, ", T, ")");
  std::vector<double> ds(static_cast<size_t>(E));
  for (int64_t t = 0; t < T; ++t) {
    const float* sr = s + t * E;
    double c = 0;
    for (int64_t e = 0; e < E; ++e) {
      ds[size_t(e)] = sl[t * E + e] >= 0 ? double(route_scale) * double(dw[t * E + e]) : 0.0;
      c += double(sr[e]) * ds[size_t(e)];
    }
    for (int64_t e = 0; e < E; ++e) {
      const double se = sr[e];
      const double g = score == ScoreFn::Softmax ? se * (ds[size_t(e)] - c) : ds[size_t(e)] * se * (1.0 - se);
      float& out = dx[t * E + e];
      out = accumulate ? float(double(out) + g) : float(g);
    }
  }
}

}  // namespace moe::ops
