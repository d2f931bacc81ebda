// FP8 quantisation bindings: unwrap, call the op.
#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "ops/moe/fp8/fp8.h"

namespace moe::addon {

namespace {

Napi::Value quantize_fp8(const Napi::CallbackInfo& info) {
  const char* op = "quantizeFp8";
  ops::quantize_fp8(arg_tensor(info, 0, op, "x"), arg_tensor(info, 1, op, "q"), arg_tensor(info, 2, op, "scales"));
  return info.Env().Undefined();
}

Napi::Value dequantize_fp8(const Napi::CallbackInfo& info) {
  const char* op = "dequantizeFp8";
  ops::dequantize_fp8(arg_tensor(info, 0, op, "q"), arg_tensor(info, 1, op, "scales"), arg_tensor(info, 2, op, "out"));
  return info.Env().Undefined();
}

void init_fp8(Napi::Env env, Napi::Object exports) {
  exports.Set("quantizeFp8", Napi::Function::New(env, binding<quantize_fp8>, "quantizeFp8"));
  exports.Set("dequantizeFp8", Napi::Function::New(env, binding<dequantize_fp8>, "dequantizeFp8"));
}

}  // namespace

MOE_REGISTER_BINDING(init_fp8);

}  // namespace moe::addon
