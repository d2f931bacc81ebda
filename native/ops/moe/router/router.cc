#include "ops/moe/router/router.h"

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>

#include "ops/common/checks.h"
#include "ops/common/dispatch.h"

namespace moe::ops {

namespace {

std::atomic<RouterOptions> g_options{RouterOptions{}};

#if MOE_EP_WITH_CUDA
// Lanes per token in the fast forward for E experts (0: it has no kernel for E; forward_fast.cu's
// launch_fast has the same list).
int fast_lanes(int64_t E) {
  switch (E) {
    case 8: return 2;
    case 16: return 4;
    case 32: return 8;
    case 64: return 16;
    case 128:
    case 256:
    case 512: return 32;
    default: return 0;
  }
}

// The one place the CUDA forward kernel is chosen: the fast one for a shape it has, 16-byte aligned
// rows, and groups it can split over its lanes (unless switched off); the generic one otherwise.
RouterForwardKernel select_forward_kernel(const Tensor& logits, const Tensor& scores, const RouterParams& p, const RouterOptions& o) {
  const int L = o.fast ? fast_lanes(logits.size(1)) : 0;
  const bool pow2_groups = (p.groups & (p.groups - 1)) == 0;
  const bool fast = L > 0 && reinterpret_cast<uintptr_t>(logits.data<float>()) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(scores.data<float>()) % 16 == 0 &&
                    (p.groups == 1 || (pow2_groups && p.groups <= L && group_score_top(p) <= 2));
  return fast ? RouterForwardKernel::Fast : RouterForwardKernel::Generic;
}
#endif

void require_2d(const Tensor& t, int64_t rows, int64_t cols, const char* op, const char* arg, const char* expect) {
  MOE_ARG_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, "'", arg, "' ", t.describe(), " should have shape [", rows, ",",
                cols, "] (", expect, ")");
}

void require_1d(const Tensor& t, int64_t n, const char* op, const char* arg, const char* expect) {
  MOE_ARG_CHECK(t.dim() == 1 && t.size(0) == n, op, "'", arg, "' ", t.describe(), " should have shape [", n, "] (", expect, ")");
}

void require_tensor(const Tensor& t, DType dtype, const Tensor& like, const char* like_name, const char* op, const char* arg) {
  require_defined(t, op, arg);
  require_dtype(t, {dtype}, op, arg);
  require_same_device(like, like_name, t, arg, op);
  require_contiguous(t, op, arg);
}

void check_score(ScoreFn s, const char* op) {
  MOE_ARG_CHECK(s == ScoreFn::Softmax || s == ScoreFn::Sigmoid, op, "'scoreFn' must be 0 (softmax) or 1 (sigmoid)");
}

}  // namespace

void set_router_options(const RouterOptions& options) { g_options.store(options); }
RouterOptions router_options() { return g_options.load(); }

void router_forward(const Tensor& logits, const Tensor& bias, const RouterParams& p, const Tensor& indices, const Tensor& weights,
                    const Tensor& tokens_per_expert, const Tensor& scores, const Tensor& nan_rows) {
  const char* op = "router";
  require_tensor(logits, DType::f32, logits, "logits", op, "logits");
  MOE_ARG_CHECK(logits.dim() == 2, op, "'logits' ", logits.describe(), " must be 2-D [tokens, experts]");
  const int64_t T = logits.size(0), E = logits.size(1);
  MOE_ARG_CHECK(E >= 1, op, "'logits' ", logits.describe(), " has no experts");
  check_score(p.score, op);
  MOE_ARG_CHECK(p.k >= 1 && p.k <= E, op, "'k' = ", p.k, " must be in [1, ", E, "] (the number of experts)");
  MOE_ARG_CHECK(p.groups >= 1 && p.groups <= kRouterMaxGroups, op, "'groups' = ", p.groups, " must be in [1, ", kRouterMaxGroups, "]");
  MOE_ARG_CHECK(E % p.groups == 0, op, "'groups' = ", p.groups, " does not divide the ", E, " experts");
  MOE_ARG_CHECK(p.topk_groups >= 1 && p.topk_groups <= p.groups, op, "'topkGroups' = ", p.topk_groups, " must be in [1, ", p.groups,
                "] ('groups')");
  MOE_ARG_CHECK(p.group_top >= 0, op, "'groupTop' = ", p.group_top, " must be 0 (k/topkGroups) or positive");
  MOE_ARG_CHECK(p.group_top > 0 || p.k % p.topk_groups == 0, op, "'k' = ", p.k, " is not divisible by 'topkGroups' = ", p.topk_groups,
                " (with 'groupTop' 0, a group scores its top k/topkGroups)");
  MOE_ARG_CHECK(group_score_top(p) <= E / p.groups, op, "a group's score sums its top ", group_score_top(p),
                " biased scores ('groupTop') but a group has only ", E / p.groups, " experts");
  MOE_ARG_CHECK(p.k <= p.topk_groups * (E / p.groups), op, "'k' = ", p.k, " is more than the ", p.topk_groups * (E / p.groups),
                " experts of the 'topkGroups' = ", p.topk_groups, " groups a token keeps");
  MOE_ARG_CHECK(std::isfinite(p.route_scale), op, "'routeScale' = ", p.route_scale, " must be finite");
  if (bias.defined()) {
    require_tensor(bias, DType::f32, logits, "logits", op, "bias");
    require_1d(bias, E, op, "bias", "one entry per expert");
  }
  require_tensor(indices, DType::i32, logits, "logits", op, "indices");
  require_2d(indices, T, p.k, op, "indices", "[tokens, k]");
  require_tensor(weights, DType::f32, logits, "logits", op, "weights");
  require_2d(weights, T, p.k, op, "weights", "[tokens, k]");
  require_tensor(tokens_per_expert, DType::i32, logits, "logits", op, "tokensPerExpert");
  require_1d(tokens_per_expert, E, op, "tokensPerExpert", "one count per expert");
  require_tensor(scores, DType::f32, logits, "logits", op, "scores");
  require_2d(scores, T, E, op, "scores", "like 'logits'");
  require_tensor(nan_rows, DType::i32, logits, "logits", op, "nanRows");
  require_1d(nan_rows, 2, op, "nanRows", "[count, first bad row]");
  [[maybe_unused]] const RouterOptions o = router_options();  // (read by the CUDA branch)
  MOE_ON_DEVICE(logits, op, router_forward_cpu(logits, bias, p, indices, weights, tokens_per_expert, scores, nan_rows),
                router_forward_cuda(logits, bias, p, indices, weights, tokens_per_expert, scores, nan_rows,
                                    select_forward_kernel(logits, scores, p, o), o.pdl, op_stream(logits)));
}

void router_backward(const Tensor& d_weights, const Tensor& scores, const Tensor& indices, const RouterParams& p, const Tensor& d_logits,
                     bool accumulate) {
  const char* op = "routerBackward";
  require_tensor(scores, DType::f32, scores, "scores", op, "scores");
  MOE_ARG_CHECK(scores.dim() == 2 && scores.size(1) >= 1, op, "'scores' ", scores.describe(), " must be 2-D [tokens, experts]");
  const int64_t T = scores.size(0), E = scores.size(1);
  check_score(p.score, op);
  require_tensor(indices, DType::i32, scores, "scores", op, "indices");
  MOE_ARG_CHECK(indices.dim() == 2 && indices.size(0) == T && indices.size(1) >= 1 && indices.size(1) <= E, op, "'indices' ",
                indices.describe(), " should be [", T, ", k] with 1 ≤ k ≤ ", E);
  const int64_t k = indices.size(1);
  require_tensor(d_weights, DType::f32, scores, "scores", op, "dWeights");
  require_2d(d_weights, T, k, op, "dWeights", "like 'indices'");
  require_tensor(d_logits, DType::f32, scores, "scores", op, "dLogits");
  require_2d(d_logits, T, E, op, "dLogits", "like 'scores'");
  MOE_ARG_CHECK(std::isfinite(p.route_scale), op, "'routeScale' = ", p.route_scale, " must be finite");
  if (T == 0) return;
  MOE_ON_DEVICE(scores, op, router_backward_cpu(d_weights, scores, indices, p, d_logits, accumulate),
                router_backward_cuda(d_weights, scores, indices, p, d_logits, accumulate, op_stream(scores)));
}

void router_balance_loss(const Tensor& scores, const Tensor& indices, ScoreFn score, int64_t seq_len, float coef, const Tensor& loss,
                         const Tensor& d_logits) {
  const char* op = "balanceLoss";
  require_tensor(scores, DType::f32, scores, "scores", op, "scores");
  MOE_ARG_CHECK(scores.dim() == 2 && scores.size(1) >= 1 && scores.size(0) >= 1, op, "'scores' ", scores.describe(),
                " must be 2-D [tokens, experts] with at least one token");
  const int64_t T = scores.size(0), E = scores.size(1);
  check_score(score, op);
  require_tensor(indices, DType::i32, scores, "scores", op, "indices");
  MOE_ARG_CHECK(indices.dim() == 2 && indices.size(0) == T && indices.size(1) >= 1 && indices.size(1) <= E, op, "'indices' ",
                indices.describe(), " should be [", T, ", k] with 1 ≤ k ≤ ", E);
  MOE_ARG_CHECK(seq_len >= 1 && T % seq_len == 0, op, "'seqLen' = ", seq_len, " must divide the ", T, " tokens");
  MOE_ARG_CHECK(std::isfinite(coef), op, "'coefficient' = ", coef, " must be finite");
  require_tensor(loss, DType::f32, scores, "scores", op, "loss");
  require_1d(loss, 1, op, "loss", "one value");
  if (d_logits.defined()) {
    require_tensor(d_logits, DType::f32, scores, "scores", op, "dLogits");
    require_2d(d_logits, T, E, op, "dLogits", "like 'scores'");
  }
  MOE_ON_DEVICE(scores, op, router_balance_loss_cpu(scores, indices, score, seq_len, coef, loss, d_logits),
                router_balance_loss_cuda(scores, indices, score, seq_len, coef, loss, d_logits, op_stream(scores)));
}

void router_z_loss(const Tensor& logits, float coef, const Tensor& loss, const Tensor& d_logits) {
  const char* op = "zLoss";
  require_tensor(logits, DType::f32, logits, "logits", op, "logits");
  MOE_ARG_CHECK(logits.dim() == 2 && logits.size(1) >= 1 && logits.size(0) >= 1, op, "'logits' ", logits.describe(),
                " must be 2-D [tokens, experts] with at least one token");
  MOE_ARG_CHECK(std::isfinite(coef), op, "'coefficient' = ", coef, " must be finite");
  require_tensor(loss, DType::f32, logits, "logits", op, "loss");
  require_1d(loss, 1, op, "loss", "one value");
  if (d_logits.defined()) {
    require_tensor(d_logits, DType::f32, logits, "logits", op, "dLogits");
    require_2d(d_logits, logits.size(0), logits.size(1), op, "dLogits", "like 'logits'");
  }
  MOE_ON_DEVICE(logits, op, router_z_loss_cpu(logits, coef, loss, d_logits),
                router_z_loss_cuda(logits, coef, loss, d_logits, op_stream(logits)));
}

void router_expert_choice(const Tensor& logits, const ExpertChoiceParams& p, const Tensor& scores, const Tensor& slot,
                          const Tensor& weights, const Tensor& indices, const Tensor& tokens_per_expert, const Tensor& experts_per_token,
                          const Tensor& nan_rows) {
  const char* op = "router";
  require_tensor(logits, DType::f32, logits, "logits", op, "logits");
  MOE_ARG_CHECK(logits.dim() == 2, op, "'logits' ", logits.describe(), " must be 2-D [tokens, experts]");
  const int64_t T = logits.size(0), E = logits.size(1);
  MOE_ARG_CHECK(E >= 1, op, "'logits' ", logits.describe(), " has no experts");
  MOE_ARG_CHECK(T < INT_MAX, op, "'logits' ", logits.describe(), " has too many tokens (2^31 - 1 at most)");
  check_score(p.score, op);
  MOE_ARG_CHECK(p.capacity >= 0 && p.capacity <= T, op, "'capacity' = ", p.capacity, " must be in [0, ", T,
                "] (each expert takes at most all ", T, " tokens)");
  MOE_ARG_CHECK(std::isfinite(p.route_scale), op, "'routeScale' = ", p.route_scale, " must be finite");
  require_tensor(scores, DType::f32, logits, "logits", op, "scores");
  require_2d(scores, T, E, op, "scores", "like 'logits'");
  require_tensor(slot, DType::i32, logits, "logits", op, "slot");
  require_2d(slot, T, E, op, "slot", "like 'logits'");
  require_tensor(weights, DType::f32, logits, "logits", op, "weights");
  require_2d(weights, T, E, op, "weights", "like 'logits'");
  if (indices.defined()) {
    require_tensor(indices, DType::i32, logits, "logits", op, "indices");
    require_2d(indices, T, E, op, "indices", "like 'logits'");
  }
  require_tensor(tokens_per_expert, DType::i32, logits, "logits", op, "tokensPerExpert");
  require_1d(tokens_per_expert, E, op, "tokensPerExpert", "one count per expert");
  require_tensor(experts_per_token, DType::i32, logits, "logits", op, "expertsPerToken");
  require_1d(experts_per_token, E + 1, op, "expertsPerToken", "tokens with 0, 1, ..., E experts");
  require_tensor(nan_rows, DType::i32, logits, "logits", op, "nanRows");
  require_1d(nan_rows, 2, op, "nanRows", "[count, first bad row]");
  if (logits.device().is_cuda())
    MOE_ARG_CHECK(E <= kExpertChoiceMaxExpertsCuda, op, "'logits' ", logits.describe(), " has ", E,
                  " experts; the CUDA expert-choice router handles up to ", kExpertChoiceMaxExpertsCuda);
  MOE_ON_DEVICE(logits, op,
                router_expert_choice_cpu(logits, p, scores, slot, weights, indices, tokens_per_expert, experts_per_token, nan_rows),
                router_expert_choice_cuda(logits, p, scores, slot, weights, indices, tokens_per_expert, experts_per_token, nan_rows,
                                          op_stream(logits)));
}

void router_expert_choice_backward(const Tensor& d_weights, const Tensor& scores, const Tensor& slot, ScoreFn score, float route_scale,
                                   const Tensor& d_logits, bool accumulate) {
  const char* op = "routerBackward";
  require_tensor(scores, DType::f32, scores, "scores", op, "scores");
  MOE_ARG_CHECK(scores.dim() == 2 && scores.size(1) >= 1, op, "'scores' ", scores.describe(), " must be 2-D [tokens, experts]");
  const int64_t T = scores.size(0), E = scores.size(1);
  check_score(score, op);
  MOE_ARG_CHECK(std::isfinite(route_scale), op, "'routeScale' = ", route_scale, " must be finite");
  require_tensor(slot, DType::i32, scores, "scores", op, "slot");
  require_2d(slot, T, E, op, "slot", "like 'scores' (expert choice)");
  require_tensor(d_weights, DType::f32, scores, "scores", op, "dWeights");
  require_2d(d_weights, T, E, op, "dWeights", "like 'scores' (expert choice)");
  require_tensor(d_logits, DType::f32, scores, "scores", op, "dLogits");
  require_2d(d_logits, T, E, op, "dLogits", "like 'scores'");
  if (T == 0) return;
  MOE_ON_DEVICE(scores, op, router_expert_choice_backward_cpu(d_weights, scores, slot, score, route_scale, d_logits, accumulate),
                router_expert_choice_backward_cuda(d_weights, scores, slot, score, route_scale, d_logits, accumulate, op_stream(scores)));
}

}  // namespace moe::ops
