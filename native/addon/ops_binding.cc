// Op bindings: unwrap arguments, call the op. No arithmetic and no policy here.

#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "ops/basic/activation/activation.h"
#include "ops/basic/copy/copy.h"
#include "ops/basic/elementwise/elementwise.h"
#include "ops/basic/fill/fill.h"
#include "ops/basic/matmul/matmul.h"
#include "ops/basic/random/random.h"
#include "ops/basic/reduce/reduce.h"

namespace moe::addon {

namespace {

Napi::Value fill(const Napi::CallbackInfo& info) {
  ops::fill(arg_tensor(info, 0, "fill", "out"), arg_number(info, 1, "fill", "value"));
  return info.Env().Undefined();
}

Napi::Value copy(const Napi::CallbackInfo& info) {
  ops::copy(arg_tensor(info, 0, "copy", "dst"), arg_tensor(info, 1, "copy", "src"));
  return info.Env().Undefined();
}

// binary(kind, a, b, out, alpha)
Napi::Value binary(const Napi::CallbackInfo& info) {
  int64_t kind = arg_int(info, 0, "binary", "kind");
  MOE_ARG_CHECK(kind == 0 || kind == 1, "binary", "'kind' must be 0 (add) or 1 (mul)");
  const char* op = kind == 0 ? "add" : "mul";
  ops::binary(ops::BinaryOp(kind), arg_tensor(info, 1, op, "a"), arg_tensor(info, 2, op, "b"), arg_tensor(info, 3, op, "out"),
              arg_number(info, 4, op, "alpha"));
  return info.Env().Undefined();
}

Napi::Value scale(const Napi::CallbackInfo& info) {
  ops::scale(arg_tensor(info, 0, "scale", "a"), arg_number(info, 1, "scale", "alpha"), arg_tensor(info, 2, "scale", "out"));
  return info.Env().Undefined();
}

// The activation's kind, checked against activation.h's enum.
ops::Activation arg_activation(const Napi::CallbackInfo& info, size_t index, const char* op) {
  int kind = arg_i32(info, index, op, "kind");
  MOE_ARG_CHECK(kind >= 0 && kind <= 3, op, "'kind' must be 0 (relu), 1 (silu), 2 (gelu) or 3 (gelu, tanh); received ", kind);
  return ops::Activation(kind);
}

// activation(kind, x, out)
Napi::Value activation(const Napi::CallbackInfo& info) {
  ops::Activation kind = arg_activation(info, 0, "activation");
  const char* op = ops::activation_name(kind);
  ops::activation(kind, arg_tensor(info, 1, op, "x"), arg_tensor(info, 2, op, "out"));
  return info.Env().Undefined();
}

// activationBackward(kind, dy, x, dx)
Napi::Value activation_backward(const Napi::CallbackInfo& info) {
  ops::Activation kind = arg_activation(info, 0, "activationBackward");
  const char* op = ops::activation_backward_name(kind);
  ops::activation_backward(kind, arg_tensor(info, 1, op, "dy"), arg_tensor(info, 2, op, "x"), arg_tensor(info, 3, op, "out"));
  return info.Env().Undefined();
}

// reduce(kind, a, dim, out)
Napi::Value reduce(const Napi::CallbackInfo& info) {
  int64_t kind = arg_int(info, 0, "reduce", "kind");
  MOE_ARG_CHECK(kind == 0 || kind == 1, "reduce", "'kind' must be 0 (sum) or 1 (max)");
  const char* op = kind == 0 ? "sum" : "max";
  ops::reduce(ops::ReduceOp(kind), arg_tensor(info, 1, op, "a"), arg_i32(info, 2, op, "dim"), arg_tensor(info, 3, op, "out"));
  return info.Env().Undefined();
}

// matmul(a, b, out, accumulate)
Napi::Value matmul(const Napi::CallbackInfo& info) {
  const char* op = "matmul";
  ops::matmul(arg_tensor(info, 0, op, "a"), arg_tensor(info, 1, op, "b"), arg_tensor(info, 2, op, "out"),
              arg_bool(info, 3, op, "accumulate"));
  return info.Env().Undefined();
}

// random(out, kind, p0, p1, seed, offset): seed and offset are non-negative integers below 2^53.
Napi::Value random(const Napi::CallbackInfo& info) {
  int64_t kind = arg_int(info, 1, "random", "kind");
  MOE_ARG_CHECK(kind == 0 || kind == 1, "random", "'kind' must be 0 (uniform) or 1 (normal)");
  const char* op = kind == 0 ? "rand" : "randn";
  int64_t seed = arg_int(info, 4, op, "seed"), offset = arg_int(info, 5, op, "offset");
  MOE_ARG_CHECK(seed >= 0 && offset >= 0, op, "'seed' and 'offset' must be non-negative");
  ops::RandomParams p{ops::RandomKind(kind), float(arg_number(info, 2, op, "p0")), float(arg_number(info, 3, op, "p1")), uint64_t(seed),
                      uint64_t(offset)};
  ops::random_fill(arg_tensor(info, 0, op, "out"), p);
  return info.Env().Undefined();
}

}  // namespace

static void init_ops(Napi::Env env, Napi::Object exports) {
  exports.Set("fill", Napi::Function::New(env, binding<fill>, "fill"));
  exports.Set("copy", Napi::Function::New(env, binding<copy>, "copy"));
  exports.Set("binary", Napi::Function::New(env, binding<binary>, "binary"));
  exports.Set("scale", Napi::Function::New(env, binding<scale>, "scale"));
  exports.Set("reduce", Napi::Function::New(env, binding<reduce>, "reduce"));
  exports.Set("activation", Napi::Function::New(env, binding<activation>, "activation"));
  exports.Set("activationBackward", Napi::Function::New(env, binding<activation_backward>, "activationBackward"));
  exports.Set("matmul", Napi::Function::New(env, binding<matmul>, "matmul"));
  exports.Set("random", Napi::Function::New(env, binding<random>, "random"));
}

MOE_REGISTER_BINDING(init_ops);

}  // namespace moe::addon
