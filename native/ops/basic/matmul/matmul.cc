#include "ops/basic/matmul/matmul.h"

#include "ops/common/checks.h"
#include "ops/common/dispatch.h"

namespace moe::ops {

void matmul(const Tensor& a, const Tensor& b, const Tensor& out, bool accumulate) {
  const char* op = "matmul";
  require_defined(a, op, "a");
  require_defined(b, op, "b");
  require_defined(out, op, "out");
  require_dtype(a, {DType::f32, DType::bf16, DType::f16}, op, "a");
  MOE_ARG_CHECK(b.dtype() == a.dtype(), op, "'b' ", b.describe(), " has dtype ", dtype_name(b.dtype()), " but 'a' has ",
                dtype_name(a.dtype()));
  require_dtype(out, {DType::f32, DType::bf16, DType::f16}, op, "out");
  require_same_device(a, "a", b, "b", op);
  require_same_device(a, "a", out, "out", op);
  MOE_ARG_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2, op, "expects 2-D tensors, got 'a' ", a.describe(), ", 'b' ", b.describe(),
                ", 'out' ", out.describe());
  MOE_ARG_CHECK(a.size(1) == b.size(0), op, "inner dimensions differ: 'a' ", shape_str(a.shape()), " · 'b' ", shape_str(b.shape()));
  MOE_ARG_CHECK(out.size(0) == a.size(0) && out.size(1) == b.size(1), op, "'out' has shape ", shape_str(out.shape()), " but 'a' ",
                shape_str(a.shape()), " · 'b' ", shape_str(b.shape()), " is [", a.size(0), ",", b.size(1), "]");
  require_contiguous(out, op, "out");
  if (out.numel() == 0) return;
  MOE_ON_DEVICE(out, op, matmul_cpu(a, b, out, accumulate), matmul_cuda(a, b, out, accumulate, op_stream(out)));
}

}  // namespace moe::ops
