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

void init_expert_bias_activation(Napi::Env env, Napi::Object exports) {
  exports.Set("expertBias", Napi::Function::New(env, binding<expert_bias>, "expertBias"));
  exports.Set("clampedSwiglu", Napi::Function::New(env, binding<clamped_swiglu>, "clampedSwiglu"));
}

}  // namespace

MOE_REGISTER_BINDING(init_expert_bias_activation);

}  // namespace moe::addon
