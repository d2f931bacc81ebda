// Capacity binding: unwrap arguments, call the op. No arithmetic and no policy here.
#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "ops/moe/capacity/capacity.h"

namespace moe::addon {

namespace {

// capacity(indices, weights | null, numExperts, capacity (-1: unlimited), policy (0 probs, 1 position),
//          slot, kept, dropped, invalid)
Napi::Value capacity(const Napi::CallbackInfo& info) {
  const char* op = "capacity";
  int64_t policy = arg_int(info, 4, op, "policy");
  MOE_ARG_CHECK(policy == 0 || policy == 1, op, "'policy' must be 0 (probs) or 1 (position)");
  ops::capacity(arg_tensor(info, 0, op, "indices"), arg_tensor(info, 1, op, "weights", true), arg_int(info, 2, op, "numExperts"),
                arg_int(info, 3, op, "capacity"), ops::DropPolicy(policy), arg_tensor(info, 5, op, "slot"), arg_tensor(info, 6, op, "kept"),
                arg_tensor(info, 7, op, "dropped"), arg_tensor(info, 8, op, "invalid"));
  return info.Env().Undefined();
}

}  // namespace

static void init_capacity(Napi::Env env, Napi::Object exports) {
  exports.Set("capacity", Napi::Function::New(env, binding<capacity>, "capacity"));
}

MOE_REGISTER_BINDING(init_capacity);

}  // namespace moe::addon
