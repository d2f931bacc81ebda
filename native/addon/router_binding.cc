// Router bindings: unwrap arguments, call the op. No arithmetic and no policy here.
#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "ops/moe/router/router.h"

namespace moe::addon {

namespace {

ops::ScoreFn arg_score(const Napi::CallbackInfo& info, size_t i, const char* op) {
  int64_t s = arg_int(info, i, op, "scoreFn");
  MOE_ARG_CHECK(s == 0 || s == 1, op, "'scoreFn' must be 0 (softmax) or 1 (sigmoid); received ", s);
  return ops::ScoreFn(s);
}

// routerForward(logits, bias|null, scoreFn, k, groups, topkGroups, normalize, routeScale,
//               indices, weights, tokensPerExpert, scores, nanRows, groupTop)
Napi::Value router_forward(const Napi::CallbackInfo& info) {
  const char* op = "router";
  ops::RouterParams p;
  p.score = arg_score(info, 2, op);
  p.k = arg_int(info, 3, op, "k");
  p.groups = arg_int(info, 4, op, "groups");
  p.topk_groups = arg_int(info, 5, op, "topkGroups");
  p.normalize = arg_bool(info, 6, op, "normalize");
  p.route_scale = float(arg_number(info, 7, op, "routeScale"));
  p.group_top = arg_int(info, 13, op, "groupTop");
  ops::router_forward(arg_tensor(info, 0, op, "logits"), arg_tensor(info, 1, op, "bias", true), p, arg_tensor(info, 8, op, "indices"),
                      arg_tensor(info, 9, op, "weights"), arg_tensor(info, 10, op, "tokensPerExpert"), arg_tensor(info, 11, op, "scores"),
                      arg_tensor(info, 12, op, "nanRows"));
  return info.Env().Undefined();
}

// routerBackward(dWeights, scores, indices, scoreFn, normalize, routeScale, dLogits, accumulate)
Napi::Value router_backward(const Napi::CallbackInfo& info) {
  const char* op = "routerBackward";
  ops::RouterParams p;
  p.score = arg_score(info, 3, op);
  p.normalize = arg_bool(info, 4, op, "normalize");
  p.route_scale = float(arg_number(info, 5, op, "routeScale"));
  ops::router_backward(arg_tensor(info, 0, op, "dWeights"), arg_tensor(info, 1, op, "scores"), arg_tensor(info, 2, op, "indices"), p,
                       arg_tensor(info, 6, op, "dLogits"), arg_bool(info, 7, op, "accumulate"));
  return info.Env().Undefined();
}

// routerBalanceLoss(scores, indices, scoreFn, seqLen, coefficient, loss, dLogits|null)
Napi::Value router_balance_loss(const Napi::CallbackInfo& info) {
  const char* op = "balanceLoss";
  ops::router_balance_loss(arg_tensor(info, 0, op, "scores"), arg_tensor(info, 1, op, "indices"), arg_score(info, 2, op),
                           arg_int(info, 3, op, "seqLen"), float(arg_number(info, 4, op, "coefficient")), arg_tensor(info, 5, op, "loss"),
                           arg_tensor(info, 6, op, "dLogits", true));
  return info.Env().Undefined();
}

// routerZLoss(logits, coefficient, loss, dLogits|null)
Napi::Value router_z_loss(const Napi::CallbackInfo& info) {
  const char* op = "zLoss";
  ops::router_z_loss(arg_tensor(info, 0, op, "logits"), float(arg_number(info, 1, op, "coefficient")), arg_tensor(info, 2, op, "loss"),
                     arg_tensor(info, 3, op, "dLogits", true));
  return info.Env().Undefined();
}

// routerExpertChoice(logits, scoreFn, capacity, routeScale, scores, slot, weights, indices|null,
//                    tokensPerExpert, expertsPerToken, nanRows)
Napi::Value router_expert_choice(const Napi::CallbackInfo& info) {
  const char* op = "router";
  ops::ExpertChoiceParams p;
  p.score = arg_score(info, 1, op);
  p.capacity = arg_int(info, 2, op, "capacity");
  p.route_scale = float(arg_number(info, 3, op, "routeScale"));
  ops::router_expert_choice(arg_tensor(info, 0, op, "logits"), p, arg_tensor(info, 4, op, "scores"), arg_tensor(info, 5, op, "slot"),
                            arg_tensor(info, 6, op, "weights"), arg_tensor(info, 7, op, "indices", true),
                            arg_tensor(info, 8, op, "tokensPerExpert"), arg_tensor(info, 9, op, "expertsPerToken"),
                            arg_tensor(info, 10, op, "nanRows"));
  return info.Env().Undefined();
}

// routerExpertChoiceBackward(dWeights, scores, slot, scoreFn, routeScale, dLogits, accumulate)
Napi::Value router_expert_choice_backward(const Napi::CallbackInfo& info) {
  const char* op = "routerBackward";
  ops::router_expert_choice_backward(arg_tensor(info, 0, op, "dWeights"), arg_tensor(info, 1, op, "scores"),
                                     arg_tensor(info, 2, op, "slot"), arg_score(info, 3, op), float(arg_number(info, 4, op, "routeScale")),
                                     arg_tensor(info, 5, op, "dLogits"), arg_bool(info, 6, op, "accumulate"));
  return info.Env().Undefined();
}

}  // namespace

static void init_router(Napi::Env env, Napi::Object exports) {
  exports.Set("routerForward", Napi::Function::New(env, binding<router_forward>, "routerForward"));
  exports.Set("routerBackward", Napi::Function::New(env, binding<router_backward>, "routerBackward"));
  exports.Set("routerBalanceLoss", Napi::Function::New(env, binding<router_balance_loss>, "routerBalanceLoss"));
  exports.Set("routerExpertChoice", Napi::Function::New(env, binding<router_expert_choice>, "routerExpertChoice"));
  exports.Set("routerExpertChoiceBackward", Napi::Function::New(env, binding<router_expert_choice_backward>, "routerExpertChoiceBackward"));
  exports.Set("routerZLoss", Napi::Function::New(env, binding<router_z_loss>, "routerZLoss"));
}

MOE_REGISTER_BINDING(init_router);

}  // namespace moe::addon
