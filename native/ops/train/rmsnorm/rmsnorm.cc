#include "ops/train/rmsnorm/rmsnorm.h"

#include <cmath>

#include "ops/common/dispatch.h"
#include "ops/common/tensor_checks.h"

namespace moe::ops {

namespace {
constexpr std::initializer_list<DType> kActivation = {DType::f32, DType::bf16};

void check_rows(const Tensor& x, const char* op) {
  require_tensor(x, kActivation, x, "x", op, "x");
  MOE_ARG_CHECK(x.dim() == 2, op, "'x' ", x.describe(), " must be 2-D [tokens, hidden]");
  MOE_ARG_CHECK(x.size(1) >= 1, op, "'x' ", x.describe(), " has an empty hidden dimension");
}
}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, const Tensor& y, const Tensor& rstd) {
  const char* op = "rmsnorm";
  check_rows(x, op);
  const int64_t T = x.size(0), H = x.size(1);
  MOE_ARG_CHECK(std::isfinite(eps) && eps >= 0, op, "'eps' = ", eps, " must be finite and non-negative");
  require_tensor(weight, {DType::f32}, x, "x", op, "weight");
  require_shape(weight, {H}, op, "weight", "one per hidden unit");
  require_tensor(y, {x.dtype()}, x, "x", op, "y");
  require_shape(y, x.shape(), op, "y", "like 'x'");
  require_tensor(rstd, {DType::f32}, x, "x", op, "rstd");
  require_shape(rstd, {T}, op, "rstd", "one per row of 'x'");
  if (T == 0) return;
  MOE_ON_DEVICE(x, op, rmsnorm_forward_cpu(x, weight, eps, y, rstd), rmsnorm_forward_cuda(x, weight, eps, y, rstd, op_stream(x)));
}

void rmsnorm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dx, const Tensor& d_weight,
                      bool accumulate) {
  const char* op = "rmsnormBackward";
  check_rows(x, op);
  const int64_t T = x.size(0), H = x.size(1);
  require_tensor(dy, {x.dtype()}, x, "x", op, "dy");
  require_shape(dy, x.shape(), op, "dy", "like 'x'");
  require_tensor(weight, {DType::f32}, x, "x", op, "weight");
  require_shape(weight, {H}, op, "weight", "one per hidden unit");
  require_tensor(rstd, {DType::f32}, x, "x", op, "rstd");
  require_shape(rstd, {T}, op, "rstd", "one per row of 'x', from the forward");
  require_tensor(dx, {x.dtype()}, x, "x", op, "dx");
  require_shape(dx, x.shape(), op, "dx", "like 'x'");
  require_tensor(d_weight, {DType::f32}, x, "x", op, "dWeight");
  require_shape(d_weight, {H}, op, "dWeight", "like 'weight'");
  MOE_ON_DEVICE(x, op, rmsnorm_backward_cpu(dy, x, weight, rstd, dx, d_weight, accumulate),
                rmsnorm_backward_cuda(dy, x, weight, rstd, dx, d_weight, accumulate, op_stream(x)));
}

}  // namespace moe::ops
