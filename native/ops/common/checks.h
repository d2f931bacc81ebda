// Argument checks shared by every op. Each names the op and the argument in its message, so a bad
// call from TypeScript reads like "add: 'b' is bf16[4,8] cpu but 'a' is f32[4,8] cpu".
#pragma once
#include <initializer_list>
#include <string>

#include "core/cuda_runtime.h"
#include "core/tensor.h"

namespace moe::ops {

inline void require_defined(const Tensor& t, const char* op, const char* arg) {
  MOE_ARG_CHECK(t.defined(), op, "'", arg, "' is not a tensor");
}

inline void require_contiguous(const Tensor& t, const char* op, const char* arg) {
  MOE_ARG_CHECK(t.is_contiguous(), op, "'", arg, "' ", t.describe(),
                " is not contiguous; this op needs a contiguous tensor (call contiguous() first)");
}

inline void require_dtype(const Tensor& t, std::initializer_list<DType> allowed, const char* op, const char* arg) {
  for (DType d : allowed)
    if (t.dtype() == d) return;
  std::string names;
  for (DType d : allowed) names += std::string(names.empty() ? "" : ", ") + dtype_name(d);
  throw_error(ErrorKind::InvalidArgument, op,
              cat("'", arg, "' ", t.describe(), " has dtype ", dtype_name(t.dtype()), "; expected one of ", names));
}

inline void require_same_device(const Tensor& a, const char* arg_a, const Tensor& b, const char* arg_b, const char* op) {
  MOE_ARG_CHECK(a.device() == b.device(), op, "'", arg_b, "' is on ", b.device().str(), " but '", arg_a, "' is on ", a.device().str(),
                "; move one with to()");
}

inline void require_same_shape(const Tensor& a, const char* arg_a, const Tensor& b, const char* arg_b, const char* op) {
  MOE_ARG_CHECK(a.shape() == b.shape(), op, "'", arg_b, "' has shape ", shape_str(b.shape()), " but '", arg_a, "' has shape ",
                shape_str(a.shape()));
}

inline void require_usable_device(const Tensor& t, const char* op) { cuda::require_device(t.device(), op); }

// The stream a CUDA op runs on: the current stream of the tensor's device.
inline void* op_stream(const Tensor& t) { return cuda::current_stream(t.device().index); }

}  // namespace moe::ops
