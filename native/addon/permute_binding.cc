// Permute / unpermute bindings: unwrap arguments, call the op. No arithmetic and no policy here.
#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "ops/moe/permute/permute.h"

namespace moe::addon {

namespace {

// permuteLayout(indices, slot, kept, weights, capacity (-1: no padding to capacity), align,
//               offsets, rowOf, rowToken, rowWeight, invalid)
Napi::Value permute_layout(const Napi::CallbackInfo& info) {
  const char* op = "permute";
  ops::permute_layout(arg_tensor(info, 0, op, "indices"), arg_tensor(info, 1, op, "slot"), arg_tensor(info, 2, op, "kept"),
                      arg_tensor(info, 3, op, "weights"), arg_int(info, 4, op, "capacity"), arg_int(info, 5, op, "align"),
                      arg_tensor(info, 6, op, "offsets"), arg_tensor(info, 7, op, "rowOf"), arg_tensor(info, 8, op, "rowToken"),
                      arg_tensor(info, 9, op, "rowWeight"), arg_tensor(info, 10, op, "invalid"));
  return info.Env().Undefined();
}

// permuteRows(x, rowToken, rows, rowOf?)   rowOf: the layout's [T,k] rows, for the token-order copy
Napi::Value permute_rows(const Napi::CallbackInfo& info) {
  const char* op = "permute";
  ops::permute_rows(arg_tensor(info, 0, op, "x"), arg_tensor(info, 1, op, "rowToken"), arg_tensor(info, 2, op, "rows"),
                    arg_tensor(info, 3, op, "rowOf", true));
  return info.Env().Undefined();
}

// unpermute(rows, rowOf, weights, out)
Napi::Value unpermute(const Napi::CallbackInfo& info) {
  const char* op = "unpermute";
  ops::unpermute(arg_tensor(info, 0, op, "rows"), arg_tensor(info, 1, op, "rowOf"), arg_tensor(info, 2, op, "weights"),
                 arg_tensor(info, 3, op, "out"));
  return info.Env().Undefined();
}

// unpermuteBackward(dy, rows, weights, rowOf, rowToken, dRows, dWeights)
Napi::Value unpermute_backward(const Napi::CallbackInfo& info) {
  const char* op = "unpermuteBackward";
  ops::unpermute_backward(arg_tensor(info, 0, op, "dy"), arg_tensor(info, 1, op, "rows"), arg_tensor(info, 2, op, "weights"),
                          arg_tensor(info, 3, op, "rowOf"), arg_tensor(info, 4, op, "rowToken"), arg_tensor(info, 5, op, "dRows"),
                          arg_tensor(info, 6, op, "dWeights"));
  return info.Env().Undefined();
}

// permuteBackward(dRows, rowOf, dx, add?)   add: [T,H] summed into dx with the rows
Napi::Value permute_backward(const Napi::CallbackInfo& info) {
  const char* op = "permuteBackward";
  ops::permute_backward(arg_tensor(info, 0, op, "dRows"), arg_tensor(info, 1, op, "rowOf"), arg_tensor(info, 2, op, "dx"),
                        arg_tensor(info, 3, op, "add", true));
  return info.Env().Undefined();
}

}  // namespace

static void init_permute(Napi::Env env, Napi::Object exports) {
  exports.Set("permuteLayout", Napi::Function::New(env, binding<permute_layout>, "permuteLayout"));
  exports.Set("permuteRows", Napi::Function::New(env, binding<permute_rows>, "permuteRows"));
  exports.Set("unpermute", Napi::Function::New(env, binding<unpermute>, "unpermute"));
  exports.Set("unpermuteBackward", Napi::Function::New(env, binding<unpermute_backward>, "unpermuteBackward"));
  exports.Set("permuteBackward", Napi::Function::New(env, binding<permute_backward>, "permuteBackward"));
}

MOE_REGISTER_BINDING(init_permute);

}  // namespace moe::addon
