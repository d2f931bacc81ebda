#include "ops/basic/reduce/reduce.h"

#include "ops/common/checks.h"
#include "ops/common/dispatch.h"

namespace moe::ops {

void reduce(ReduceOp kind, const Tensor& a, int dim, const Tensor& out) {
  const char* op = kind == ReduceOp::Sum ? "sum" : "max";
  require_defined(a, op, "a");
  require_defined(out, op, "out");
  require_dtype(a, {DType::f32, DType::bf16, DType::f16, DType::i32, DType::i64}, op, "a");
  if (dtype_is_floating(a.dtype())) require_dtype(out, {DType::f32, DType::bf16, DType::f16}, op, "out");
  else require_dtype(out, {DType::i32, DType::i64}, op, "out");
  require_same_device(a, "a", out, "out", op);
  require_contiguous(a, op, "a");
  require_contiguous(out, op, "out");
  int d = normalize_dim(dim, a.dim(), op, "dim");
  Shape expected = a.shape();
  expected.erase(expected.begin() + d);
  MOE_ARG_CHECK(out.shape() == expected, op, "'out' has shape ", shape_str(out.shape()), "; reducing ", a.describe(), " over dimension ", d,
                " gives ", shape_str(expected));
  int64_t outer = 1, inner = 1, n = a.shape()[size_t(d)];
  for (int i = 0; i < d; ++i) outer *= a.shape()[size_t(i)];
  for (int i = d + 1; i < a.dim(); ++i) inner *= a.shape()[size_t(i)];
  MOE_ARG_CHECK(kind != ReduceOp::Max || n > 0 || out.numel() == 0, op, "cannot take the max over dimension ", d, " of ", a.describe(),
                ": it is empty");
  if (out.numel() == 0) return;
  MOE_ON_DEVICE(out, op, reduce_cpu(kind, a, outer, n, inner, out), reduce_cuda(kind, a, outer, n, inner, out, op_stream(out)));
}

}  // namespace moe::ops
