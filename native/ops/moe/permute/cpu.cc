// Plain loops: the oracle for the CUDA kernels and the path without a GPU. Every index is checked.
#include <algorithm>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "ops/moe/permute/permute.h"

namespace moe::ops {

namespace {
int64_t round_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

template <typename Fn> void dispatch_bf16_f32(DType d, Fn&& fn) {
  if (d == DType::bf16) fn(TypeTag<bf16>{});
  else fn(TypeTag<float>{});
}
}  // namespace

void permute_layout_cpu(const Tensor& indices, const Tensor& slot, const Tensor& kept, const Tensor& weights, int64_t capacity,
                        int64_t align, const Tensor& offsets, const Tensor& row_of, const Tensor& row_token, const Tensor& row_weight,
                        const Tensor& invalid) {
  const char* op = "permute";
  const int64_t E = kept.numel(), R = row_token.numel(), n = indices.numel(), k = indices.size(1);
  const int32_t* kp = kept.data<int32_t>();
  std::vector<int64_t> off(size_t(E + 1), 0);
  for (int64_t e = 0; e < E; ++e) {
    MOE_ARG_CHECK(kp[e] >= 0 && (capacity < 0 || kp[e] <= capacity), op, "'cap.keptPerExpert'[", e, "] = ", kp[e], " is outside [0, ",
                  capacity < 0 ? "inf" : std::to_string(capacity) + "] ('cap.capacity', padToCapacity)", capacity < 0 ? ")" : "");
    off[size_t(e + 1)] = off[size_t(e)] + round_up(capacity < 0 ? kp[e] : capacity, align);
  }
  MOE_ARG_CHECK(off[size_t(E)] == R, op, "'rowToken' has ", R, " rows but the layout needs ", off[size_t(E)], " (kept counts",
                capacity < 0 ? "" : " padded to capacity", ", align ", align, ")");
  for (int64_t e = 0; e <= E; ++e) offsets.data<int32_t>()[e] = int32_t(off[size_t(e)]);
  int32_t* tok = row_token.data<int32_t>();
  float* rw = row_weight.data<float>();
  std::fill(tok, tok + R, -1);
  std::fill(rw, rw + R, 0.f);
  std::vector<int64_t> used(size_t(E), 0);
  const int32_t* idx = indices.data<int32_t>();
  const int32_t* sl = slot.data<int32_t>();
  const float* w = weights.data<float>();
  int32_t* ro = row_of.data<int32_t>();
  for (int64_t i = 0; i < n; ++i) {
    int32_t s = sl[i];
    if (s < 0) {
      MOE_ARG_CHECK(s == -1, op, "'cap.slot'[", i / k, ",", i % k, "] = ", s, " must be -1 (dropped) or >= 0");
      ro[i] = -1;
      continue;
    }
    int32_t e = idx[i];
    MOE_ARG_CHECK(e >= 0 && e < E, op, "'indices'[", i / k, ",", i % k, "] = ", e, " is outside [0, ", E, ")");
    MOE_ARG_CHECK(s < kp[e], op, "'cap.slot'[", i / k, ",", i % k, "] = ", s, " but expert ", e, " keeps ", kp[e]);
    int64_t r = off[size_t(e)] + s;
    MOE_ARG_CHECK(tok[r] == -1, op, "'cap.slot'[", i / k, ",", i % k, "] = ", s, " of expert ", e, " is used twice");
    tok[r] = int32_t(i / k);
    rw[r] = w[i];
    ro[i] = int32_t(r);
    used[size_t(e)]++;
  }
  for (int64_t e = 0; e < E; ++e)
    MOE_ARG_CHECK(used[size_t(e)] == kp[e], op, "'cap.keptPerExpert'[", e, "] = ", kp[e], " but 'cap.slot' assigns ", used[size_t(e)],
                  " rows to expert ", e);
  invalid.data<int32_t>()[0] = 0;
}

void permute_rows_cpu(const Tensor& x, const Tensor& row_token, const Tensor& rows) {
  const int64_t T = x.size(0), R = rows.size(0), row_bytes = x.size(1) * dtype_size(x.dtype());
  const int32_t* tok = row_token.data<int32_t>();
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(rows.raw());
  for (int64_t r = 0; r < R; ++r) {
    int32_t t = tok[r];
    MOE_ARG_CHECK(t >= -1 && t < T, "permute", "'rowToken'[", r, "] = ", t, " is outside [-1, ", T, ")");
    if (t < 0) std::memset(dst + r * row_bytes, 0, size_t(row_bytes));
    else std::memcpy(dst + r * row_bytes, src + t * row_bytes, size_t(row_bytes));
  }
}

void unpermute_cpu(const Tensor& rows, const Tensor& row_of, const Tensor& weights, const Tensor& add, const Tensor& out, const char* op) {
  const int64_t T = row_of.size(0), k = row_of.size(1), R = rows.size(0), H = rows.size(1);
  const int32_t* ro = row_of.data<int32_t>();
  const float* w = weights.defined() ? weights.data<float>() : nullptr;
  for (int64_t i = 0; i < T * k; ++i)
    MOE_ARG_CHECK(ro[i] >= -1 && ro[i] < R, op, "'rowOf'[", i / k, ",", i % k, "] = ", ro[i], " is outside [-1, ", R, ")");
  dispatch_bf16_f32(rows.dtype(), [&](auto itag) {
    using I = typename decltype(itag)::type;
    dispatch_bf16_f32(out.dtype(), [&](auto otag) {
      using O = typename decltype(otag)::type;
      const I* src = rows.data<I>();
      O* dst = out.data<O>();
      const O* extra = add.defined() ? add.data<O>() : nullptr;  // add has out's dtype (permute.cc)
      std::vector<double> acc(static_cast<size_t>(H));
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t h = 0; h < H; ++h) acc[size_t(h)] = extra ? double(to_float(extra[t * H + h])) : 0.0;
        for (int64_t j = 0; j < k; ++j) {
          int32_t r = ro[t * k + j];
          if (r < 0) continue;
          double wj = w ? double(w[t * k + j]) : 1.0;
          for (int64_t h = 0; h < H; ++h) acc[size_t(h)] += wj * double(to_float(src[r * H + h]));
        }
        for (int64_t h = 0; h < H; ++h) dst[t * H + h] = from_float<O>(float(acc[size_t(h)]));
      }
    });
  });
}

void unpermute_backward_cpu(const Tensor& dy, const Tensor& rows, const Tensor& weights, const Tensor& row_of, const Tensor& row_token,
                            const Tensor& d_rows, const Tensor& d_weights) {
  const char* op = "unpermuteBackward";
  const int64_t T = row_of.size(0), k = row_of.size(1), R = rows.size(0), H = rows.size(1);
  const int32_t* ro = row_of.data<int32_t>();
  const int32_t* tok = row_token.data<int32_t>();
  const float* w = weights.data<float>();
  float* dw = d_weights.data<float>();
  for (int64_t i = 0; i < T * k; ++i) {
    int32_t r = ro[i];
    MOE_ARG_CHECK(r >= -1 && r < R, op, "'rowOf'[", i / k, ",", i % k, "] = ", r, " is outside [-1, ", R, ")");
    MOE_ARG_CHECK(r < 0 || tok[r] == i / k, op, "'rowOf'[", i / k, ",", i % k, "] = ", r, " but 'rowToken'[", r, "] = ", tok[r]);
  }
  dispatch_bf16_f32(dy.dtype(), [&](auto gtag) {
    using G = typename decltype(gtag)::type;
    dispatch_bf16_f32(rows.dtype(), [&](auto itag) {
      using I = typename decltype(itag)::type;
      dispatch_bf16_f32(d_rows.dtype(), [&](auto otag) {
        using O = typename decltype(otag)::type;
        const G* g = dy.data<G>();
        const I* x = rows.data<I>();
        O* dr = d_rows.data<O>();
        for (int64_t r = 0; r < R * H; ++r) dr[r] = from_float<O>(0.f);  // padding (and unreferenced) rows
        for (int64_t t = 0; t < T; ++t)
          for (int64_t j = 0; j < k; ++j) {
            int32_t r = ro[t * k + j];
            double dot = 0;
            if (r >= 0) {
              for (int64_t h = 0; h < H; ++h) {
                double gv = double(to_float(g[t * H + h]));
                dot += gv * double(to_float(x[r * H + h]));
                dr[r * H + h] = from_float<O>(float(double(w[t * k + j]) * gv));
              }
            }
            dw[t * k + j] = float(dot);
          }
      });
    });
  });
}

}  // namespace moe::ops
