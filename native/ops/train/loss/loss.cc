#include "ops/train/loss/loss.h"

#include <climits>

#include "ops/common/dispatch.h"
#include "ops/common/tensor_checks.h"

namespace moe::ops {

namespace {
constexpr std::initializer_list<DType> kPred = {DType::f32, DType::bf16};

void check_pred(const Tensor& pred, const char* op) {
  require_tensor(pred, kPred, pred, "pred", op, "pred");
  MOE_ARG_CHECK(pred.dim() == 2, op, "'pred' ", pred.describe(), " must be 2-D [rows, classes or features]");
}

void check_outputs(const Tensor& pred, const Tensor& loss, const Tensor& grad, const char* op) {
  require_tensor(loss, {DType::f32}, pred, "pred", op, "loss");
  require_shape(loss, {1}, op, "loss", "one value");
  if (grad.defined()) {
    require_tensor(grad, {pred.dtype()}, pred, "pred", op, "grad");
    require_shape(grad, pred.shape(), op, "grad", "like 'pred'");
  }
}
}  // namespace

void mse_loss(const Tensor& pred, const Tensor& target, const Tensor& loss, const Tensor& grad) {
  const char* op = "mseLoss";
  check_pred(pred, op);
  require_tensor(target, kPred, pred, "pred", op, "target");
  require_shape(target, pred.shape(), op, "target", "like 'pred'");
  check_outputs(pred, loss, grad, op);
  MOE_ARG_CHECK(pred.numel() > 0, op, "'pred' ", pred.describe(), " is empty: the mean of no elements is undefined");
  MOE_ON_DEVICE(pred, op, mse_loss_cpu(pred, target, loss, grad), mse_loss_cuda(pred, target, loss, grad, op_stream(pred)));
}

void cross_entropy_loss(const Tensor& pred, const Tensor& target, int64_t ignore_index, const Tensor& loss, const Tensor& grad,
                        const Tensor& correct) {
  const char* op = "crossEntropyLoss";
  check_pred(pred, op);
  const int64_t T = pred.size(0), N = pred.size(1);
  MOE_ARG_CHECK(N >= 1, op, "'pred' ", pred.describe(), " has no classes");
  MOE_ARG_CHECK(N <= INT_MAX, op, "'pred' ", pred.describe(), " has more than ", INT_MAX, " classes");
  MOE_ARG_CHECK(ignore_index >= INT_MIN && ignore_index <= INT_MAX, op, "'ignoreIndex' = ", ignore_index, " is not an i32");
  require_tensor(target, {DType::i32}, pred, "pred", op, "target");
  require_shape(target, {T}, op, "target", "one class index per row of 'pred'");
  check_outputs(pred, loss, grad, op);
  require_tensor(correct, {DType::i32}, pred, "pred", op, "correct");
  require_shape(correct, {1}, op, "correct", "one count");
  MOE_ON_DEVICE(pred, op, cross_entropy_loss_cpu(pred, target, ignore_index, loss, grad, correct),
                cross_entropy_loss_cuda(pred, target, ignore_index, loss, grad, correct, op_stream(pred)));
}

}  // namespace moe::ops
