#include <vector>

#include "core/parallel.h"
#include "ops/basic/matmul/matmul.h"
#include "ops/common/convert.h"

namespace moe::ops {

// Plain loops, double accumulation: the oracle for every GEMM kernel in the project.
void matmul_cpu(const Tensor& a, const Tensor& b, const Tensor& out, bool accumulate) {
  int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  int64_t as0 = a.strides()[0], as1 = a.strides()[1], bs0 = b.strides()[0], bs1 = b.strides()[1];
  dispatch_float(a.dtype(), [&](auto itag) {
    using I = typename decltype(itag)::type;
    dispatch_float(out.dtype(), [&](auto otag) {
      using O = typename decltype(otag)::type;
      const I* pa = a.data<I>();
      const I* pb = b.data<I>();
      O* po = out.data<O>();
      // Output rows are independent: spread them over threads. Every output element sums its K
      // products in the order k = 0, 1, …, K−1 in double, whichever loop order walks memory: the
      // results are the same bits either way.
      if (bs1 == 1) {
        // b's rows contiguous: k outer, so the inner loop runs along a row of b (a column walk
        // down b, as below, misses the cache at every k).
        parallel_for(M, N * K, [&](int64_t m0, int64_t m1) {
          std::vector<double> acc(static_cast<size_t>(N));
          for (int64_t m = m0; m < m1; ++m) {
            for (int64_t n = 0; n < N; ++n) acc[size_t(n)] = accumulate ? double(to_float(po[m * N + n])) : 0.0;
            for (int64_t k = 0; k < K; ++k) {
              const double av = double(to_float(pa[m * as0 + k * as1]));
              const I* brow = pb + k * bs0;
              for (int64_t n = 0; n < N; ++n) acc[size_t(n)] += av * double(to_float(brow[n]));
            }
            for (int64_t n = 0; n < N; ++n) po[m * N + n] = from_float<O>(float(acc[size_t(n)]));
          }
        });
        return;
      }
      parallel_for(M, N * K, [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) {
          for (int64_t n = 0; n < N; ++n) {
            double acc = accumulate ? double(to_float(po[m * N + n])) : 0.0;
            for (int64_t k = 0; k < K; ++k) acc += double(to_float(pa[m * as0 + k * as1])) * double(to_float(pb[k * bs0 + n * bs1]));
            po[m * N + n] = from_float<O>(float(acc));
          }
        }
      });
    });
  });
}

}  // namespace moe::ops
