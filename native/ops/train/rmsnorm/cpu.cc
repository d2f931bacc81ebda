// RMSNorm reference loops: double accumulation, one rounding into the output dtype.
#include <cmath>
#include <vector>

#include "ops/common/convert.h"
#include "ops/train/rmsnorm/rmsnorm.h"

namespace moe::ops {

void rmsnorm_forward_cpu(const Tensor& x, const Tensor& weight, double eps, const Tensor& y, const Tensor& rstd) {
  const int64_t T = x.size(0), H = x.size(1);
  const float* w = weight.data<float>();
  float* r = rstd.data<float>();
  dispatch_float(x.dtype(), [&](auto tag) {
    using X = typename decltype(tag)::type;
    const X* px = x.data<X>();
    X* py = y.data<X>();
    for (int64_t t = 0; t < T; ++t) {
      const X* row = px + t * H;
      double ss = 0;
      for (int64_t j = 0; j < H; ++j) {
        double v = to_float(row[j]);
        ss += v * v;
      }
      const double rs = 1.0 / std::sqrt(ss / double(H) + eps);
      r[t] = float(rs);
      for (int64_t j = 0; j < H; ++j) py[t * H + j] = from_float<X>(float(double(to_float(row[j])) * rs * double(w[j])));
    }
  });
}

void rmsnorm_backward_cpu(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dx,
                          const Tensor& d_weight, bool accumulate) {
  const int64_t T = x.size(0), H = x.size(1);
  const float* w = weight.data<float>();
  const float* r = rstd.data<float>();
  std::vector<double> dw(size_t(H), 0.0);
  dispatch_float(x.dtype(), [&](auto tag) {
    using X = typename decltype(tag)::type;
    const X* px = x.data<X>();
    const X* pdy = dy.data<X>();
    X* pdx = dx.data<X>();
    for (int64_t t = 0; t < T; ++t) {
      const double rs = r[t];
      double dot = 0;  // Σ_i g_i · x̂_i
      for (int64_t j = 0; j < H; ++j) {
        const double xh = double(to_float(px[t * H + j])) * rs, g = double(to_float(pdy[t * H + j]));
        dot += g * double(w[j]) * xh;
        dw[size_t(j)] += g * xh;
      }
      const double mean = dot / double(H);
      for (int64_t j = 0; j < H; ++j) {
        const double xh = double(to_float(px[t * H + j])) * rs, g = double(to_float(pdy[t * H + j])) * double(w[j]);
        pdx[t * H + j] = from_float<X>(float(rs * (g - xh * mean)));
      }
    }
  });
  float* pdw = d_weight.data<float>();
  for (int64_t j = 0; j < H; ++j) pdw[j] = float((accumulate ? double(pdw[j]) : 0.0) + dw[size_t(j)]);
}

}  // namespace moe::ops
