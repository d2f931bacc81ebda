// Loss reference loops: double arithmetic, one rounding into each output.
#include <cmath>
#include <vector>

#include "ops/common/convert.h"
#include "ops/train/loss/loss.h"

namespace moe::ops {

void mse_loss_cpu(const Tensor& pred, const Tensor& target, const Tensor& loss, const Tensor& grad) {
  const int64_t n = pred.numel();
  double acc = 0;
  dispatch_float(pred.dtype(), [&](auto ptag) {
    using P = typename decltype(ptag)::type;
    dispatch_float(target.dtype(), [&](auto ttag) {
      using Q = typename decltype(ttag)::type;
      const P* p = pred.data<P>();
      const Q* q = target.data<Q>();
      P* g = grad.defined() ? grad.data<P>() : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        const double d = double(to_float(p[i])) - double(to_float(q[i]));
        acc += d * d;
        if (g) g[i] = from_float<P>(float(2.0 * d / double(n)));
      }
    });
  });
  loss.data<float>()[0] = float(acc / double(n));
}

void cross_entropy_loss_cpu(const Tensor& pred, const Tensor& target, int64_t ignore_index, const Tensor& loss, const Tensor& grad,
                            const Tensor& correct) {
  const char* op = "crossEntropyLoss";
  const int64_t T = pred.size(0), N = pred.size(1);
  const int32_t* y = target.data<int32_t>();
  int64_t count = 0;
  for (int64_t t = 0; t < T; ++t) {
    if (y[t] == ignore_index) continue;
    MOE_ARG_CHECK(y[t] >= 0 && y[t] < N, op, "'target' row ", t, " is ", y[t], ": not a class in [0, ", N, ") and not ignoreIndex (",
                  ignore_index, ")");
    ++count;
  }
  double total = 0;
  int32_t right = 0;
  dispatch_float(pred.dtype(), [&](auto tag) {
    using P = typename decltype(tag)::type;
    const P* p = pred.data<P>();
    P* g = grad.defined() ? grad.data<P>() : nullptr;
    std::vector<double> row(static_cast<size_t>(N));
    for (int64_t t = 0; t < T; ++t) {
      const bool ignored = y[t] == ignore_index;
      double mx = -INFINITY;
      int64_t arg = 0;
      for (int64_t c = 0; c < N; ++c) {
        row[size_t(c)] = to_float(p[t * N + c]);
        if (row[size_t(c)] > mx) {
          mx = row[size_t(c)];
          arg = c;
        }
      }
      double sum = 0;
      for (int64_t c = 0; c < N; ++c) sum += std::exp(row[size_t(c)] - mx);
      const double lse = mx + std::log(sum);
      if (!ignored) {
        total += lse - row[size_t(y[t])];
        if (arg == y[t]) ++right;
      }
      if (g) {
        for (int64_t c = 0; c < N; ++c) {
          const double d = ignored ? 0.0 : (std::exp(row[size_t(c)] - lse) - (c == y[t] ? 1.0 : 0.0)) / double(count);
          g[t * N + c] = from_float<P>(float(d));
        }
      }
    }
  });
  loss.data<float>()[0] = count > 0 ? float(total / double(count)) : 0.f;
  correct.data<int32_t>()[0] = right;
}

}  // namespace moe::ops
