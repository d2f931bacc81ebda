#include <algorithm>
#include <vector>

#include "core/parallel.h"
#include "ops/common/convert.h"
#include "ops/moe/grouped_gemm/grouped_gemm.h"
#include "ops/moe/grouped_gemm/swiglu.h"

namespace moe::ops {

namespace {

// Reads group boundaries and checks them: the CPU path can afford to (the GPU path clamps).
std::vector<int64_t> read_offsets(const GroupedGemm& g, int64_t M) {
  const int32_t* o = g.offsets.data<int32_t>();
  int64_t n = g.offsets.size(0);
  std::vector<int64_t> off(static_cast<size_t>(n));
  for (int64_t e = 0; e < n; ++e) {
    off[size_t(e)] = o[e];
    MOE_ARG_CHECK(o[e] >= 0 && o[e] <= M && (e == 0 || o[e] >= o[e - 1]), "groupedGemm", "'offsets' must rise from 0 to at most ", M,
                  "; entry ", e, " is ", o[e], e > 0 ? cat(" after ", o[e - 1]) : std::string());
  }
  MOE_ARG_CHECK(off[0] == 0, "groupedGemm", "'offsets' must start at 0, got ", off[0]);
  return off;
}

template <typename T> float ld(const T* p, int64_t i) { return to_float(p[i]); }

// Writes one finished row of the product through the epilogue.
template <typename O> void write_row(const GroupedGemm& g, int64_t m, int64_t cols, const std::vector<float>& row) {
  if (g.epilogue == GemmEpilogue::Store) {
    O* out = g.out.data<O>() + m * cols;
    for (int64_t c = 0; c < cols; ++c) out[c] = from_float<O>(row[size_t(c)] + (g.accumulate ? to_float(out[c]) : 0.0f));
  } else if (g.epilogue == GemmEpilogue::SwiGLU) {
    // g stored in out's dtype (bf16 on the GPU), and h from g as stored, saved or not (swiglu.h).
    O* h = g.out.data<O>() + m * (cols / 2);
    O* saved = g.aux.defined() ? g.aux.data<O>() + m * cols : nullptr;
    for (int64_t i = 0; i < cols / 2; ++i) {
      const O g1 = from_float<O>(row[size_t(2 * i)]), g3 = from_float<O>(row[size_t(2 * i + 1)]);
      h[i] = from_float<O>(silu(to_float(g1)) * to_float(g3));
      if (saved) {
        saved[2 * i] = g1;
        saved[2 * i + 1] = g3;
      }
    }
  } else {  // DSwiGLU: row holds dh [cols], taken as stored in out's dtype; g is read as stored
    const O* gs = g.aux.data<O>() + m * 2 * cols;
    O* dg = g.out.data<O>() + m * 2 * cols;
    for (int64_t i = 0; i < cols; ++i) {
      float g1 = to_float(gs[2 * i]), g3 = to_float(gs[2 * i + 1]), dh = to_float(from_float<O>(row[size_t(i)]));
      dg[2 * i] = from_float<O>(dh * g3 * silu_grad(g1));
      dg[2 * i + 1] = from_float<O>(dh * silu(g1));
    }
  }
}

template <typename T, typename O> void run(const GroupedGemm& g) {
  const int64_t M = g.a.size(0), E = g.offsets.size(0) - 1;
  auto off = read_offsets(g, M);
  const T* A = g.a.data<T>();
  const T* B = g.b.data<T>();
  if (g.mode == GemmMode::TN) {
    // out_e[i, n] = Σ_t a[t, i] · b[t, n], accumulated in double over blocks of i so the inner loop
    // runs along contiguous rows (the reference also serves large shapes in the GPU tests).
    const int64_t K = g.a.size(1), N = g.b.size(1);
    constexpr int64_t kBlock = 16;
    O* out = g.out.data<O>();
    const int64_t blocks = (K + kBlock - 1) / kBlock;
    // Work items (group, block of i) are independent: spread them over threads.
    parallel_for(E * blocks, (M / std::max<int64_t>(E, 1) + 1) * kBlock * N, [&](int64_t begin, int64_t end) {
      std::vector<double> acc(static_cast<size_t>(kBlock * N));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t e = item / blocks, i0 = (item % blocks) * kBlock;
        const int64_t ib = std::min(kBlock, K - i0);
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t t = off[size_t(e)]; t < off[size_t(e) + 1]; ++t)
          for (int64_t i = 0; i < ib; ++i) {
            const double av = ld(A, t * K + i0 + i);
            double* row = acc.data() + i * N;
            for (int64_t n = 0; n < N; ++n) row[n] += av * double(ld(B, t * N + n));
          }
        for (int64_t i = 0; i < ib; ++i)
          for (int64_t n = 0; n < N; ++n) {
            int64_t idx = (e * K + i0 + i) * N + n;
            out[idx] = from_float<O>(float(acc[size_t(i * N + n)] + (g.accumulate ? double(to_float(out[idx])) : 0.0)));
          }
      }
    });
    return;
  }
  const int64_t K = g.b.size(1), N = g.b.size(2);
  const bool nt = g.mode == GemmMode::NT;
  const int64_t inner = nt ? N : K, cols = nt ? K : N;
  // Rows are independent: each thread takes a contiguous range of grouped rows.
  std::vector<int32_t> group_of(static_cast<size_t>(off[size_t(E)]));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t m = off[size_t(e)]; m < off[size_t(e) + 1]; ++m) group_of[size_t(m)] = int32_t(e);
  parallel_for(off[size_t(E)], inner * cols, [&](int64_t begin, int64_t end) {
    std::vector<float> row(static_cast<size_t>(cols));
    std::vector<double> acc(static_cast<size_t>(cols));
    for (int64_t m = begin; m < end; ++m) {
      const T* Be = B + int64_t(group_of[size_t(m)]) * K * N;
      if (nt) {  // b_e rows are contiguous along the inner dimension
        for (int64_t c = 0; c < cols; ++c) {
          double dot = 0;
          for (int64_t k = 0; k < inner; ++k) dot += double(ld(A, m * inner + k)) * double(ld(Be, c * N + k));
          row[size_t(c)] = float(dot);
        }
      } else {  // k outer, so the inner loop walks a contiguous row of b_e
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t k = 0; k < inner; ++k) {
          const double av = ld(A, m * inner + k);
          for (int64_t c = 0; c < cols; ++c) acc[size_t(c)] += av * double(ld(Be, k * N + c));
        }
        for (int64_t c = 0; c < cols; ++c) row[size_t(c)] = float(acc[size_t(c)]);
      }
      write_row<O>(g, m, cols, row);
    }
  });
}

}  // namespace

void grouped_gemm_cpu(const GroupedGemm& g) {
  dispatch_float(g.a.dtype(), [&](auto itag) {
    using T = typename decltype(itag)::type;
    dispatch_float(g.out.dtype(), [&](auto otag) {
      using O = typename decltype(otag)::type;
      run<T, O>(g);
    });
  });
}

}  // namespace moe::ops
