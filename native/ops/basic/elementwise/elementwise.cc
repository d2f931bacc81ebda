#include "ops/basic/elementwise/elementwise.h"

#include "ops/common/checks.h"
#include "ops/common/dispatch.h"

namespace moe::ops {

namespace {
constexpr std::initializer_list<DType> kArithmetic = {DType::f32, DType::bf16, DType::f16, DType::i32, DType::i64};

bool is_suffix(const Shape& small, const Shape& big) {
  if (small.size() > big.size()) return false;
  for (size_t i = 0; i < small.size(); ++i)
    if (small[small.size() - 1 - i] != big[big.size() - 1 - i]) return false;
  return true;
}
}  // namespace

void binary(BinaryOp kind, const Tensor& a, const Tensor& b, const Tensor& out, double alpha) {
  const char* op = kind == BinaryOp::Add ? "add" : "mul";
  require_defined(a, op, "a");
  require_defined(b, op, "b");
  require_defined(out, op, "out");
  require_dtype(a, kArithmetic, op, "a");
  MOE_ARG_CHECK(b.dtype() == a.dtype(), op, "'b' ", b.describe(), " has dtype ", dtype_name(b.dtype()), " but 'a' ", a.describe(), " has ",
                dtype_name(a.dtype()), "; cast one first");
  MOE_ARG_CHECK(out.dtype() == a.dtype(), op, "'out' ", out.describe(), " has dtype ", dtype_name(out.dtype()), " but 'a' has ",
                dtype_name(a.dtype()));
  require_same_device(a, "a", b, "b", op);
  require_same_device(a, "a", out, "out", op);
  require_same_shape(a, "a", out, "out", op);
  MOE_ARG_CHECK(is_suffix(b.shape(), a.shape()), op, "'b' shape ", shape_str(b.shape()), " is neither 'a' shape ", shape_str(a.shape()),
                " nor a trailing part of it");
  require_contiguous(a, op, "a");
  require_contiguous(b, op, "b");
  require_contiguous(out, op, "out");
  if (out.numel() == 0) return;
  MOE_ON_DEVICE(out, op, binary_cpu(kind, a, b, out, alpha), binary_cuda(kind, a, b, out, alpha, op_stream(out)));
}

void scale(const Tensor& a, double alpha, const Tensor& out) {
  const char* op = "scale";
  require_defined(a, op, "a");
  require_defined(out, op, "out");
  require_dtype(a, {DType::f32, DType::bf16, DType::f16}, op, "a");
  MOE_ARG_CHECK(out.dtype() == a.dtype(), op, "'out' ", out.describe(), " has dtype ", dtype_name(out.dtype()), " but 'a' has ",
                dtype_name(a.dtype()));
  require_same_device(a, "a", out, "out", op);
  require_same_shape(a, "a", out, "out", op);
  require_contiguous(a, op, "a");
  require_contiguous(out, op, "out");
  if (out.numel() == 0) return;
  // The Mul kernels with no b compute alpha * a: one read, one write.
  MOE_ON_DEVICE(out, op, binary_cpu(BinaryOp::Mul, a, Tensor(), out, alpha),
                binary_cuda(BinaryOp::Mul, a, Tensor(), out, alpha, op_stream(out)));
}

}  // namespace moe::ops
