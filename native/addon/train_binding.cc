// Training-op bindings (rmsnorm, losses, AdamW, sum of squares, balance bias): unwrap arguments,
// call the op. No arithmetic and no policy here.
#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "ops/train/adamw/adamw.h"
#include "ops/train/balance/balance.h"
#include "ops/train/loss/loss.h"
#include "ops/train/rmsnorm/rmsnorm.h"
#include "ops/train/sqnorm/sqnorm.h"

namespace moe::addon {

namespace {

// rmsnormForward(x, weight, eps, y, rstd)
Napi::Value rmsnorm_forward(const Napi::CallbackInfo& info) {
  const char* op = "rmsnorm";
  ops::rmsnorm_forward(arg_tensor(info, 0, op, "x"), arg_tensor(info, 1, op, "weight"), arg_number(info, 2, op, "eps"),
                       arg_tensor(info, 3, op, "y"), arg_tensor(info, 4, op, "rstd"));
  return info.Env().Undefined();
}

// rmsnormBackward(dy, x, weight, rstd, dx, dWeight, accumulate)
Napi::Value rmsnorm_backward(const Napi::CallbackInfo& info) {
  const char* op = "rmsnormBackward";
  ops::rmsnorm_backward(arg_tensor(info, 0, op, "dy"), arg_tensor(info, 1, op, "x"), arg_tensor(info, 2, op, "weight"),
                        arg_tensor(info, 3, op, "rstd"), arg_tensor(info, 4, op, "dx"), arg_tensor(info, 5, op, "dWeight"),
                        arg_bool(info, 6, op, "accumulate"));
  return info.Env().Undefined();
}

// mseLoss(pred, target, loss, grad|null)
Napi::Value mse_loss(const Napi::CallbackInfo& info) {
  const char* op = "mseLoss";
  ops::mse_loss(arg_tensor(info, 0, op, "pred"), arg_tensor(info, 1, op, "target"), arg_tensor(info, 2, op, "loss"),
                arg_tensor(info, 3, op, "grad", true));
  return info.Env().Undefined();
}

// crossEntropyLoss(pred, target, ignoreIndex, loss, grad|null, correct)
Napi::Value cross_entropy_loss(const Napi::CallbackInfo& info) {
  const char* op = "crossEntropyLoss";
  ops::cross_entropy_loss(arg_tensor(info, 0, op, "pred"), arg_tensor(info, 1, op, "target"), arg_int(info, 2, op, "ignoreIndex"),
                          arg_tensor(info, 3, op, "loss"), arg_tensor(info, 4, op, "grad", true), arg_tensor(info, 5, op, "correct"));
  return info.Env().Undefined();
}

// adamwStep(param, grad, expAvg, expAvgSq, paramBf16|null, lr, beta1, beta2, eps, weightDecay, step, gradScale)
Napi::Value adamw_step(const Napi::CallbackInfo& info) {
  const char* op = "adamw";
  ops::AdamWParams p;
  p.lr = arg_number(info, 5, op, "lr");
  p.beta1 = arg_number(info, 6, op, "beta1");
  p.beta2 = arg_number(info, 7, op, "beta2");
  p.eps = arg_number(info, 8, op, "eps");
  p.weight_decay = arg_number(info, 9, op, "weightDecay");
  p.step = arg_int(info, 10, op, "step");
  p.grad_scale = arg_number(info, 11, op, "gradScale");
  ops::adamw_step(arg_tensor(info, 0, op, "param"), arg_tensor(info, 1, op, "grad"), arg_tensor(info, 2, op, "expAvg"),
                  arg_tensor(info, 3, op, "expAvgSq"), arg_tensor(info, 4, op, "paramBf16", true), p);
  return info.Env().Undefined();
}

// sumOfSquares(x, out, accumulate)
Napi::Value sum_of_squares(const Napi::CallbackInfo& info) {
  const char* op = "sumOfSquares";
  ops::sum_of_squares(arg_tensor(info, 0, op, "x"), arg_tensor(info, 1, op, "out"), arg_bool(info, 2, op, "accumulate"));
  return info.Env().Undefined();
}

// balanceBiasUpdate(bias, load, gamma)
Napi::Value balance_bias_update(const Napi::CallbackInfo& info) {
  const char* op = "balanceBiasUpdate";
  ops::balance_bias_update(arg_tensor(info, 0, op, "bias"), arg_tensor(info, 1, op, "load"), arg_number(info, 2, op, "gamma"));
  return info.Env().Undefined();
}

}  // namespace

static void init_train(Napi::Env env, Napi::Object exports) {
  exports.Set("rmsnormForward", Napi::Function::New(env, binding<rmsnorm_forward>, "rmsnormForward"));
  exports.Set("rmsnormBackward", Napi::Function::New(env, binding<rmsnorm_backward>, "rmsnormBackward"));
  exports.Set("mseLoss", Napi::Function::New(env, binding<mse_loss>, "mseLoss"));
  exports.Set("crossEntropyLoss", Napi::Function::New(env, binding<cross_entropy_loss>, "crossEntropyLoss"));
  exports.Set("adamwStep", Napi::Function::New(env, binding<adamw_step>, "adamwStep"));
  exports.Set("sumOfSquares", Napi::Function::New(env, binding<sum_of_squares>, "sumOfSquares"));
  exports.Set("balanceBiasUpdate", Napi::Function::New(env, binding<balance_bias_update>, "balanceBiasUpdate"));
}

MOE_REGISTER_BINDING(init_train);

}  // namespace moe::addon
