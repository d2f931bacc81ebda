// Argument checks for ops with several fixed-layout tensors (the training ops): one call checks a
// tensor's presence, dtype, device and contiguity, another its exact shape.
#pragma once
#include <initializer_list>

#include "ops/common/checks.h"

namespace moe::ops {

// `t` is a contiguous tensor of one of `allowed` on the device of `like` (named `like_name`).
inline void require_tensor(const Tensor& t, std::initializer_list<DType> allowed, const Tensor& like, const char* like_name, const char* op,
                           const char* arg) {
  require_defined(t, op, arg);
  require_dtype(t, allowed, op, arg);
  if (&t != &like) require_same_device(like, like_name, t, arg, op);
  require_contiguous(t, op, arg);
}

// `t` has exactly `shape`; `what` says where that shape comes from.
inline void require_shape(const Tensor& t, const Shape& shape, const char* op, const char* arg, const char* what) {
  MOE_ARG_CHECK(t.shape() == shape, op, "'", arg, "' ", t.describe(), " should have shape ", shape_str(shape), " (", what, ")");
}

}  // namespace moe::ops
