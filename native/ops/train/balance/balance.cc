#include "ops/train/balance/balance.h"

#include <cmath>

#include "ops/common/dispatch.h"
#include "ops/common/tensor_checks.h"

namespace moe::ops {

void balance_bias_update(const Tensor& bias, const Tensor& load, double gamma) {
  const char* op = "balanceBiasUpdate";
  require_tensor(bias, {DType::f32}, bias, "bias", op, "bias");
  MOE_ARG_CHECK(bias.dim() == 1 && bias.size(0) >= 1, op, "'bias' ", bias.describe(), " must be 1-D [experts], not empty");
  require_tensor(load, {DType::i32, DType::f32}, bias, "bias", op, "load");
  require_shape(load, bias.shape(), op, "load", "one count per expert, like 'bias'");
  MOE_ARG_CHECK(std::isfinite(gamma), op, "'gamma' = ", gamma, " must be finite");
  MOE_ON_DEVICE(bias, op, balance_bias_update_cpu(bias, load, float(gamma)),
                balance_bias_update_cuda(bias, load, float(gamma), op_stream(bias)));
}

}  // namespace moe::ops
