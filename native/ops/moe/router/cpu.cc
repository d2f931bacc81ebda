// Router reference in plain loops, in double: the oracle for the CUDA kernels and the no-GPU path.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/moe/router/router.h"

namespace moe::ops {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Index of the largest v[i] with allowed[i], ties to the lower index; -1 when none is allowed.
int64_t argmax(const std::vector<double>& v, const std::vector<char>& allowed) {
  int64_t best = -1;
  for (int64_t i = 0; i < int64_t(v.size()); ++i)
    if (allowed[size_t(i)] && (best < 0 || v[size_t(i)] > v[size_t(best)])) best = i;
  return best;
}

// scores of one row, in double.
void row_scores(const float* x, int64_t E, ScoreFn fn, double* s) {
  if (fn == ScoreFn::Softmax) {
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, double(x[e]));
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += (s[e] = std::exp(double(x[e]) - mx));
    for (int64_t e = 0; e < E; ++e) s[e] /= sum;
  } else {
    for (int64_t e = 0; e < E; ++e) s[e] = 1.0 / (1.0 + std::exp(-double(x[e])));
  }
}

}  // namespace

void router_forward_cpu(const Tensor& logits, const Tensor& bias, const RouterParams& p, const Tensor& indices, const Tensor& weights,
                        const Tensor& tokens_per_expert, const Tensor& scores, const Tensor& nan_rows) {
  const int64_t T = logits.size(0), E = logits.size(1), k = p.k, G = p.groups, gs = E / G, m = group_score_top(p);
  const float* x = logits.data<float>();
  const float* b = bias.defined() ? bias.data<float>() : nullptr;
  int32_t* idx = indices.data<int32_t>();
  float* w = weights.data<float>();
  int32_t* counts = tokens_per_expert.data<int32_t>();
  float* s_out = scores.data<float>();
  int32_t* nan = nan_rows.data<int32_t>();
  for (int64_t e = 0; e < E; ++e) counts[e] = 0;
  nan[0] = 0;
  nan[1] = int32_t(T);
  const size_t nE = size_t(E), nG = size_t(G);
  std::vector<double> s(nE), biased(nE), group_score(nG);
  std::vector<char> allowed(nE), group_allowed(nG);
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * E;
    int32_t* ir = idx + t * k;
    float* wr = w + t * k;
    bool bad = false;
    for (int64_t e = 0; e < E; ++e) bad = bad || !std::isfinite(xr[e]) || (b && std::isnan(b[e]));
    if (bad) {
      if (nan[0]++ == 0) nan[1] = int32_t(t);
      for (int64_t e = 0; e < E; ++e) s_out[t * E + e] = float(kNaN);
      for (int64_t j = 0; j < k; ++j) {
        ir[j] = int32_t(j);
        wr[j] = float(kNaN);
        counts[j]++;
      }
      continue;
    }
    row_scores(xr, E, p.score, s.data());
    for (int64_t e = 0; e < E; ++e) {
      s_out[t * E + e] = float(s[size_t(e)]);
      biased[size_t(e)] = s[size_t(e)] + (b ? double(b[e]) : 0.0);
    }
    std::fill(allowed.begin(), allowed.end(), char(1));
    if (G > 1) {
      // each group's score: the sum of its top m biased scores
      for (int64_t g = 0; g < G; ++g) {
        std::vector<char> in_group(nE, 0);
        for (int64_t e = g * gs; e < (g + 1) * gs; ++e) in_group[size_t(e)] = 1;
        double sum = 0;
        for (int64_t r = 0; r < m; ++r) {
          int64_t best = argmax(biased, in_group);
          sum += biased[size_t(best)];
          in_group[size_t(best)] = 0;
        }
        group_score[size_t(g)] = sum;
      }
      std::fill(group_allowed.begin(), group_allowed.end(), char(1));
      std::vector<char> keep(nG, 0);
      for (int64_t r = 0; r < p.topk_groups; ++r) {
        int64_t best = argmax(group_score, group_allowed);
        keep[size_t(best)] = 1;
        group_allowed[size_t(best)] = 0;
      }
      for (int64_t e = 0; e < E; ++e) allowed[size_t(e)] = keep[size_t(e / gs)];
    }
    double z = 0;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = argmax(biased, allowed);
      allowed[size_t(best)] = 0;
      ir[j] = int32_t(best);
      counts[best]++;
      z += s[size_t(best)];
    }
    z += double(kRouterNormEps);
    for (int64_t j = 0; j < k; ++j) {
      double v = s[size_t(ir[j])];
      wr[j] = float(double(p.route_scale) * (p.normalize ? v / z : v));
    }
  }
}

void router_backward_cpu(const Tensor& d_weights, const Tensor& scores, const Tensor& indices, const RouterParams& p,
                         const Tensor& d_logits, bool accumulate) {
  const char* op = "routerBackward";
  const int64_t T = scores.size(0), E = scores.size(1), k = indices.size(1);
  const float* dw = d_weights.data<float>();
  const float* s = scores.data<float>();
  const int32_t* idx = indices.data<int32_t>();
  float* dx = d_logits.data<float>();
  for (int64_t i = 0; i < T * k; ++i)
    MOE_ARG_CHECK(idx[i] >= 0 && idx[i] < E, op, "'indices' holds ", idx[i], " at token ", i / k, ", slot ", i % k, "; experts are 0..",
                  E - 1);
  std::vector<double> ds(static_cast<size_t>(E));
  const double scale = p.route_scale;
  for (int64_t t = 0; t < T; ++t) {
    const float* sr = s + t * E;
    const int32_t* ir = idx + t * k;
    const float* dwr = dw + t * k;
    std::fill(ds.begin(), ds.end(), 0.0);
    if (p.normalize) {
      double z = double(kRouterNormEps), a = 0;
      for (int64_t j = 0; j < k; ++j) {
        z += sr[ir[j]];
        a += double(dwr[j]) * sr[ir[j]];
      }
      for (int64_t j = 0; j < k; ++j) ds[size_t(ir[j])] += scale * (double(dwr[j]) / z - a / (z * z));
    } else {
      for (int64_t j = 0; j < k; ++j) ds[size_t(ir[j])] += scale * double(dwr[j]);
    }
    double c = 0;
    if (p.score == ScoreFn::Softmax)
      for (int64_t e = 0; e < E; ++e) c += double(sr[e]) * ds[size_t(e)];
    for (int64_t e = 0; e < E; ++e) {
      double se = sr[e];
      double g = p.score == ScoreFn::Softmax ? se * (ds[size_t(e)] - c) : ds[size_t(e)] * se * (1.0 - se);
      float& out = dx[t * E + e];
      out = accumulate ? float(double(out) + g) : float(g);
    }
  }
}

void router_balance_loss_cpu(const Tensor& scores, const Tensor& indices, ScoreFn score, int64_t seq_len, float coef, const Tensor& loss,
                             const Tensor& d_logits) {
  const char* op = "balanceLoss";
  const int64_t T = scores.size(0), E = scores.size(1), k = indices.size(1), S = T / seq_len;
  const float* s = scores.data<float>();
  const int32_t* idx = indices.data<int32_t>();
  for (int64_t i = 0; i < T * k; ++i)
    MOE_ARG_CHECK(idx[i] >= 0 && idx[i] < E, op, "'indices' holds ", idx[i], " at token ", i / k, ", slot ", i % k, "; experts are 0..",
                  E - 1);
  const size_t nE = size_t(E);
  std::vector<double> f(nE), P(nE), inv(static_cast<size_t>(seq_len));
  double total = 0;
  // dL/dp[t,e] = coef·E/S · f_e/seqLen for the tokens of one sequence
  const double per = double(coef) * double(E) / double(S);
  for (int64_t q = 0; q < S; ++q) {
    const int64_t t0 = q * seq_len;
    std::fill(f.begin(), f.end(), 0.0);
    std::fill(P.begin(), P.end(), 0.0);
    for (int64_t t = t0; t < t0 + seq_len; ++t)
      for (int64_t j = 0; j < k; ++j) f[size_t(idx[t * k + j])] += 1.0 / double(seq_len * k);
    for (int64_t t = t0; t < t0 + seq_len; ++t) {
      double r = 1.0;
      if (score == ScoreFn::Sigmoid) {
        r = 0;
        for (int64_t e = 0; e < E; ++e) r += s[t * E + e];
      }
      inv[size_t(t - t0)] = 1.0 / r;
      for (int64_t e = 0; e < E; ++e) P[size_t(e)] += double(s[t * E + e]) / r / double(seq_len);
    }
    for (int64_t e = 0; e < E; ++e) total += per * f[size_t(e)] * P[size_t(e)];
    if (!d_logits.defined()) continue;
    float* dx = d_logits.data<float>();
    for (int64_t t = t0; t < t0 + seq_len; ++t) {
      const float* sr = s + t * E;
      // g_e = dL/dp_e; gp = Σ_e g_e·p_e
      double gp = 0;
      const double ri = inv[size_t(t - t0)];
      for (int64_t e = 0; e < E; ++e) gp += per * f[size_t(e)] / double(seq_len) * double(sr[e]) * ri;
      for (int64_t e = 0; e < E; ++e) {
        double g = per * f[size_t(e)] / double(seq_len), se = sr[e], d;
        if (score == ScoreFn::Softmax) d = se * (g - gp);
        else d = (g - gp) * ri * se * (1.0 - se);
        dx[t * E + e] = float(double(dx[t * E + e]) + d);
      }
    }
  }
  loss.data<float>()[0] = float(total);
}

void router_z_loss_cpu(const Tensor& logits, float coef, const Tensor& loss, const Tensor& d_logits) {
  const int64_t T = logits.size(0), E = logits.size(1);
  const float* x = logits.data<float>();
  double total = 0;
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * E;
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, double(xr[e]));
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += std::exp(double(xr[e]) - mx);
    double lse = mx + std::log(sum);
    total += lse * lse;
    if (d_logits.defined()) {
      float* dx = d_logits.data<float>() + t * E;
      for (int64_t e = 0; e < E; ++e) dx[e] = float(double(dx[e]) + double(coef) * 2.0 * lse * std::exp(double(xr[e]) - lse) / double(T));
    }
  }
  loss.data<float>()[0] = float(double(coef) * total / double(T));
}

}  // namespace moe::ops
