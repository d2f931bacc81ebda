#include "ops/train/sqnorm/sqnorm.h"

#include "ops/common/dispatch.h"
#include "ops/common/tensor_checks.h"

namespace moe::ops {

void sum_of_squares(const Tensor& x, const Tensor& out, bool accumulate) {
  const char* op = "sumOfSquares";
  require_tensor(x, {DType::f32, DType::bf16}, x, "x", op, "x");
  require_tensor(out, {DType::f32}, x, "x", op, "out");
  require_shape(out, {1}, op, "out", "one accumulator");
  MOE_ON_DEVICE(x, op, sum_of_squares_cpu(x, out, accumulate), sum_of_squares_cuda(x, out, accumulate, op_stream(x)));
}

}  // namespace moe::ops
