// Bindings of the experts' bias and gated-activation ops (gpt-oss's experts): unwrap, call the op.
#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "ops/moe/clamped_swiglu/clamped_swiglu.h"
#include "ops/moe/expert_bias/expert_bias.h"

namespace moe::addon {

namespace {

// expertBias(rows, bias, offsets): rows += bias of each row's expert, in place.
Napi::Value expert_bias(const Napi::CallbackInfo& info) {
  const char* op = "expertBias";
  ops::expert_bias(arg_tensor(info, 0, op, "rows"), arg_tensor(info, 1, op, "bias"), arg_tensor(info, 2, op, "offsets"));
  return info.Env().Undefined();
}

// clampedSwiglu(h13, out, alpha, limit)
Napi::Value clamped_swiglu(const Napi::CallbackInfo& info) {
  const char* op = "clampedSwiglu";
  ops::clamped_swiglu(arg_tensor(info, 0, op, "h13"), arg_tensor(info, 1, op, "out"), float(arg_number(info, 2, op, "alpha")),
                      float(arg_number(info, 3, op, "limit")));
  return info.Env().Undefined();
}

// expertBiasBackward(dRows, offsets, out, accumulate)
Napi::Value expert_bias_backward(const Napi::CallbackInfo& info) {
  const char* op = "expertBiasBackward";
  ops::expert_bias_backward(arg_tensor(info, 0, op, "dRows"), arg_tensor(info, 1, op, "offsets"), arg_tensor(info, 2, op, "out"),
                            arg_bool(info, 3, op, "accumulate"));
  return info.Env().Undefined();
}

// clampedSwigluBackward(dh, h13, out, alpha, limit)
Napi::Value clamped_swiglu_backward(const Napi::CallbackInfo& info) {
  const char* op = "clampedSwigluBackward";
  ops::clamped_swiglu_backward(arg_tensor(info, 0, op, "dh"), arg_tensor(info, 1, op, "h13"), arg_tensor(info, 2, op, "out"),
                               float(arg_number(info, 3, op, "alpha")), float(arg_number(info, 4, op, "limit")));
  return info.Env().Undefined();
}

void init_expert_bias_activation(Napi::Env env, Napi::Object exports) {
  exports.Set("expertBias", Napi::Function::New(env, binding<expert_bias>, "expertBias"));
  exports.Set("clampedSwiglu", Napi::Function::New(env, binding<clamped_swiglu>, "clampedSwiglu"));
  exports.Set("expertBiasBackward", Napi::Function::New(env, binding<expert_bias_backward>, "expertBiasBackward"));
  exports.Set("clampedSwigluBackward", Napi::Function::New(env, binding<clamped_swiglu_backward>, "clampedSwigluBackward"));
}

}  // namespace

MOE_REGISTER_BINDING(init_expert_bias_activation);

}  // namespace moe::addon
