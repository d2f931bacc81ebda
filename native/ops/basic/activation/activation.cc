#include "ops/basic/activation/activation.h"

#include "ops/common/checks.h"
#include "ops/common/dispatch.h"

namespace moe::ops {

const char* activation_name(Activation kind) {
  switch (kind) {
    case Activation::Relu: return "relu";
    case Activation::Silu: return "silu";
    case Activation::Gelu:
    case Activation::GeluTanh: return "gelu";
  }
  return "activation";
}

const char* activation_backward_name(Activation kind) {
  switch (kind) {
    case Activation::Relu: return "reluBackward";
    case Activation::Silu: return "siluBackward";
    case Activation::Gelu:
    case Activation::GeluTanh: return "geluBackward";
  }
  return "activationBackward";
}

namespace {
constexpr std::initializer_list<DType> kFloating = {DType::f32, DType::bf16, DType::f16};

// `t` matches `ref` (named `ref_name`) in dtype, device and shape, and is contiguous.
void require_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name, const char* op) {
  require_defined(t, op, name);
  MOE_ARG_CHECK(t.dtype() == ref.dtype(), op, "'", name, "' ", t.describe(), " has dtype ", dtype_name(t.dtype()), " but '", ref_name, "' ",
                ref.describe(), " has ", dtype_name(ref.dtype()));
  require_same_device(ref, ref_name, t, name, op);
  require_same_shape(ref, ref_name, t, name, op);
  require_contiguous(t, op, name);
}
}  // namespace

void activation(Activation kind, const Tensor& x, const Tensor& out) {
  const char* op = activation_name(kind);
  require_defined(x, op, "x");
  require_dtype(x, kFloating, op, "x");
  require_contiguous(x, op, "x");
  require_like(out, "out", x, "x", op);
  if (out.numel() == 0) return;
  MOE_ON_DEVICE(out, op, activation_cpu(kind, x, out), activation_cuda(kind, x, out, op_stream(out)));
}

void activation_backward(Activation kind, const Tensor& dy, const Tensor& x, const Tensor& dx) {
  const char* op = activation_backward_name(kind);
  require_defined(x, op, "x");
  require_dtype(x, kFloating, op, "x");
  require_contiguous(x, op, "x");
  require_like(dy, "dy", x, "x", op);
  require_like(dx, "out", x, "x", op);  // the TypeScript option that becomes dx
  if (dx.numel() == 0) return;
  MOE_ON_DEVICE(dx, op, activation_backward_cpu(kind, dy, x, dx), activation_backward_cuda(kind, dy, x, dx, op_stream(dx)));
}

}  // namespace moe::ops
