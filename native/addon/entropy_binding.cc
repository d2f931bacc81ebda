// Router entropy binding: unwrap, call the op.
#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "ops/moe/entropy/entropy.h"

namespace moe::addon {

namespace {

Napi::Value router_entropy(const Napi::CallbackInfo& info) {
  ops::mean_row_entropy(arg_tensor(info, 0, "routerEntropy", "scores"), arg_tensor(info, 1, "routerEntropy", "out"));
  return info.Env().Undefined();
}

void init_entropy(Napi::Env env, Napi::Object exports) {
  exports.Set("routerEntropy", Napi::Function::New(env, binding<router_entropy>, "routerEntropy"));
}

}  // namespace

MOE_REGISTER_BINDING(init_entropy);

}  // namespace moe::addon
