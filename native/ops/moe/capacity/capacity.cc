#include "ops/moe/capacity/capacity.h"

#include <climits>

#include "ops/common/checks.h"
#include "ops/common/dispatch.h"

namespace moe::ops {

void capacity(const Tensor& indices, const Tensor& weights, int64_t num_experts, int64_t capacity, DropPolicy policy, const Tensor& slot,
              const Tensor& kept, const Tensor& dropped, const Tensor& invalid) {
  const char* op = "capacity";
  require_defined(indices, op, "indices");
  require_dtype(indices, {DType::i32}, op, "indices");
  require_contiguous(indices, op, "indices");
  MOE_ARG_CHECK(indices.dim() == 2, op, "'indices' ", indices.describe(), " must be [T,k]");
  MOE_ARG_CHECK(policy == DropPolicy::Probs || policy == DropPolicy::Position, op, "'policy' must be 0 (probs) or 1 (position)");
  MOE_ARG_CHECK(num_experts >= 1 && num_experts < INT_MAX / 2, op, "'numExperts' = ", num_experts, " must be a positive integer");
  MOE_ARG_CHECK(capacity >= -1 && capacity < INT_MAX, op, "'capacity' = ", capacity, " must be -1 (unlimited) or a non-negative integer");
  MOE_ARG_CHECK(indices.numel() < INT_MAX, op, "'indices' ", indices.describe(), " has too many assignments (2^31 at most)");
  if (policy == DropPolicy::Probs || weights.defined()) {
    require_defined(weights, op, "weights");
    require_dtype(weights, {DType::f32}, op, "weights");
    require_contiguous(weights, op, "weights");
    require_same_shape(indices, "indices", weights, "weights", op);
    require_same_device(indices, "indices", weights, "weights", op);
  }
  struct Out {
    const Tensor& t;
    const char* name;
    Shape shape;
  };
  for (const Out& o :
       {Out{slot, "slot", indices.shape()}, Out{kept, "kept", {num_experts}}, Out{dropped, "dropped", {1}}, Out{invalid, "invalid", {1}}}) {
    require_defined(o.t, op, o.name);
    require_dtype(o.t, {DType::i32}, op, o.name);
    require_contiguous(o.t, op, o.name);
    require_same_device(indices, "indices", o.t, o.name, op);
    MOE_ARG_CHECK(o.t.shape() == o.shape, op, "'", o.name, "' has shape ", shape_str(o.t.shape()), "; expected ", shape_str(o.shape));
  }
  MOE_ON_DEVICE(indices, op, capacity_cpu(indices, weights, num_experts, capacity, policy, slot, kept, dropped, invalid),
                capacity_cuda(indices, weights, num_experts, capacity, policy, slot, kept, dropped, invalid, op_stream(indices)));
}

}  // namespace moe::ops
