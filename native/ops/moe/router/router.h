// MoE router: scores, (group-limited) top-k selection, gate weights, their backward, and the
// auxiliary losses. The logits come from a GEMM done elsewhere.
//
// Naming (as in Megatron-Core's router):
//   logits  [T,E] f32   input, one row per token
//   scores  [T,E] f32   unbiased probabilities: softmax(logits) over E, or sigmoid(logits)
//   biased  s + bias[e] used for selection only (bias [E] f32, optional); never for the weights
//   indices [T,k] i32   the chosen experts, ordered by descending biased score
//   weights [T,k] f32   routeScale · s[idx] / (Σ_j s[idx_j] + 1e-20) when normalize, else routeScale · s[idx]
//   tokensPerExpert [E] i32   assignments per expert (sums to T·k), zeroed by the op first
//   nanRows [2] i32     [number of bad rows, first bad row (T when none)]
//
// Group-limited routing (DeepSeek-V2 and V3): E experts in `groups` contiguous groups (E % groups
// == 0, groups ≤ 32); a group's score is the sum of the top m biased scores inside it (m =
// groupTop: DeepSeek-V3 sums its top 2, DeepSeek-V2 takes its maximum, m = 1; groupTop 0 means m =
// k/topkGroups, which then must divide evenly); each token keeps its best `topkGroups` groups and
// picks its top-k among their experts only. groups == 1 is plain top-k. Requires m ≤ E/groups and
// k ≤ topkGroups·E/groups (the kept groups hold k experts).
//
// Ties: the lower expert index (and the lower group index) wins, on every device.
// Near ties: the CPU computes scores, biased scores and group sums in double, the CUDA kernels in
// f32 (group sums differ by up to ~1e-6). Two biased scores, or the last kept and the first dropped
// group's scores, that close may be ordered differently on the two devices; a group near tie swaps
// a whole group's experts (test/router-ties.ts keeps them out of the GPU-vs-CPU test).
// An infinite (not NaN) bias entry is allowed; the one case where the devices may then choose
// differently is a group score that is NaN (+inf + -inf among a group's top m): the CPU's
// argmax keeps a NaN group only when it is the first still allowed; the fast CUDA kernel ranks it
// last, the generic one as its reduction tree falls.
//
// Bad rows: a row with a non-finite logit (NaN, +inf, -inf) or a NaN bias entry is a bad row. It is
// counted in nanRows and written deterministically, identically on CPU and GPU: scores row NaN,
// indices 0..k-1, weights NaN; tokensPerExpert counts those indices, so the sum stays T·k and no
// index is ever out of range downstream. The op itself never throws for bad rows (the GPU cannot
// without a host sync); the TypeScript wrapper reads nanRows and throws when asked (checkNaN).
//
// Backward (router_backward): dWeights [T,k] → dLogits [T,E], through the normalisation and
// routeScale; softmax: full Jacobian, sigmoid: s(1-s). The bias gets no gradient. Out-of-range
// indices are an error on the CPU; the GPU kernel skips them (it cannot throw without a sync).
//
// Losses: each writes its value to loss f32[1] and, when dLogits is given, adds its gradient
// (loss already includes `coef`) into dLogits [T,E]:
//   balance (Switch / DeepSeek-V3 sequence-wise): T = numSeqs·seqLen, per sequence
//     f_e = count_e / (seqLen·k) (no gradient), P_e = mean over the sequence's tokens of p[t,e]
//     where p = scores for softmax and p = scores / Σ_e scores (per token) for sigmoid;
//     loss = coef · E · mean over sequences of Σ_e f_e·P_e. seqLen == T is the Switch loss.
//   z-loss: loss = coef · mean_t (logsumexp_e logits[t,e])².
#pragma once
#include "core/tensor.h"

namespace moe::ops {

enum class ScoreFn : int { Softmax = 0, Sigmoid = 1 };

struct RouterParams {
  ScoreFn score = ScoreFn::Softmax;
  int64_t k = 1;
  int64_t groups = 1;
  int64_t topk_groups = 1;
  int64_t group_top = 0;  // m, the top biased scores summed into a group's score; 0: k / topk_groups
  bool normalize = false;
  float route_scale = 1.0f;
};

constexpr int64_t kRouterMaxGroups = 32;
constexpr float kRouterNormEps = 1e-20f;

// bias may be undefined (no bias).
void router_forward(const Tensor& logits, const Tensor& bias, const RouterParams& p, const Tensor& indices, const Tensor& weights,
                    const Tensor& tokens_per_expert, const Tensor& scores, const Tensor& nan_rows);
// dLogits = (or += with accumulate) ∂(Σ dWeights·weights)/∂logits. Uses p.score, p.normalize, p.route_scale.
void router_backward(const Tensor& d_weights, const Tensor& scores, const Tensor& indices, const RouterParams& p, const Tensor& d_logits,
                     bool accumulate);
// d_logits may be undefined (value only).
void router_balance_loss(const Tensor& scores, const Tensor& indices, ScoreFn score, int64_t seq_len, float coef, const Tensor& loss,
                         const Tensor& d_logits);
void router_z_loss(const Tensor& logits, float coef, const Tensor& loss, const Tensor& d_logits);

// ---- expert choice (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing")
// Every expert takes its top-C tokens: perfect balance by construction; a token gets 0..E experts.
//   logits  [T,E] f32   input
//   scores  [T,E] f32   softmax over E or sigmoid, exactly as token choice writes them (bad rows: NaN)
//   slot    [T,E] i32   position of token t in expert e's C chosen tokens, numbered in token order
//                       (0..C-1), or -1 when e did not choose t
//   weights [T,E] f32   route_scale·scores[t,e] (an f32 product) where chosen, 0 elsewhere
//   indices [T,E] i32   e in every row (the expert of assignment (t, e), what the permute layout
//                       reads); may be undefined (not written)
//   tokens_per_expert [E] i32   C for every expert
//   experts_per_token [E+1] i32 experts_per_token[n] = tokens chosen by exactly n experts
//   nan_rows [2] i32    as token choice: [bad rows, first bad row (T when none)]
// Selection rule, the same on every device: expert e orders the tokens by scores[t,e] as written
// (f32), descending, NaN below everything, equal scores by ascending t, and takes the first C.
// 0 ≤ C ≤ T. Scores lie in [0, 1] (or NaN), which the CUDA path's 30-bit keys rely on.
// Backward: d_weights [T,E] → d_logits [T,E]: dS = route_scale·d_weights where slot ≥ 0 (0 elsewhere),
// then softmax's Jacobian or s(1-s).
struct ExpertChoiceParams {
  ScoreFn score = ScoreFn::Softmax;
  int64_t capacity = 0;
  float route_scale = 1.0f;
};

// Experts the CUDA expert-choice path handles (its per-token histogram lives in shared memory).
constexpr int64_t kExpertChoiceMaxExpertsCuda = 4096;

void router_expert_choice(const Tensor& logits, const ExpertChoiceParams& p, const Tensor& scores, const Tensor& slot,
                          const Tensor& weights, const Tensor& indices, const Tensor& tokens_per_expert, const Tensor& experts_per_token,
                          const Tensor& nan_rows);
void router_expert_choice_backward(const Tensor& d_weights, const Tensor& scores, const Tensor& slot, ScoreFn score, float route_scale,
                                   const Tensor& d_logits, bool accumulate);

// m: the number of a group's top biased scores summed into its score.
inline int64_t group_score_top(const RouterParams& p) { return p.group_top > 0 ? p.group_top : p.k / p.topk_groups; }

// ---- kernel switches, set from TypeScript (setKernelOptions in lib/kernel-options.ts, through
// native/addon/kernel_options_binding.cc). router.cc is the one place they are read: it chooses the
// CUDA forward kernel of each call (RouterForwardKernel) and whether it may be launched as a
// programmatic dependent. The defaults are what measured fastest (benchmarks/kernels-notes.md).
struct RouterOptions {
  bool fast = true;  // the fast forward kernel for the shapes it has; off: the generic one everywhere
  bool pdl = true;   // launch the fast forward as router_init's programmatic dependent (sm_90 and newer)
};
void set_router_options(const RouterOptions& options);
RouterOptions router_options();

// The CUDA forward kernels: the fast one (forward_fast.cu) for E in {8, 16, ..., 512} with 16-byte
// aligned rows, groups a power of two no wider than its lanes and m ≤ 2; the generic one
// (forward_generic.cu) for everything else up to E = 1024.
enum class RouterForwardKernel : int { Generic = 0, Fast = 1 };

// ---- backends (arguments already checked)
void router_forward_cpu(const Tensor& logits, const Tensor& bias, const RouterParams& p, const Tensor& indices, const Tensor& weights,
                        const Tensor& tokens_per_expert, const Tensor& scores, const Tensor& nan_rows);
void router_backward_cpu(const Tensor& d_weights, const Tensor& scores, const Tensor& indices, const RouterParams& p,
                         const Tensor& d_logits, bool accumulate);
void router_balance_loss_cpu(const Tensor& scores, const Tensor& indices, ScoreFn score, int64_t seq_len, float coef, const Tensor& loss,
                             const Tensor& d_logits);
void router_z_loss_cpu(const Tensor& logits, float coef, const Tensor& loss, const Tensor& d_logits);

void router_expert_choice_cpu(const Tensor& logits, const ExpertChoiceParams& p, const Tensor& scores, const Tensor& slot,
                              const Tensor& weights, const Tensor& indices, const Tensor& tokens_per_expert,
                              const Tensor& experts_per_token, const Tensor& nan_rows);
void router_expert_choice_backward_cpu(const Tensor& d_weights, const Tensor& scores, const Tensor& slot, ScoreFn score, float route_scale,
                                       const Tensor& d_logits, bool accumulate);

// pdl: the fast kernel may be launched as router_init's programmatic dependent, where the device
// allows it (compute capability 9.0 or newer, and the launch was not refused there before).
void router_forward_cuda(const Tensor& logits, const Tensor& bias, const RouterParams& p, const Tensor& indices, const Tensor& weights,
                         const Tensor& tokens_per_expert, const Tensor& scores, const Tensor& nan_rows, RouterForwardKernel kernel,
                         bool pdl, void* stream);
void router_backward_cuda(const Tensor& d_weights, const Tensor& scores, const Tensor& indices, const RouterParams& p,
                          const Tensor& d_logits, bool accumulate, void* stream);
void router_balance_loss_cuda(const Tensor& scores, const Tensor& indices, ScoreFn score, int64_t seq_len, float coef, const Tensor& loss,
                              const Tensor& d_logits, void* stream);
void router_z_loss_cuda(const Tensor& logits, float coef, const Tensor& loss, const Tensor& d_logits, void* stream);
void router_expert_choice_cuda(const Tensor& logits, const ExpertChoiceParams& p, const Tensor& scores, const Tensor& slot,
                               const Tensor& weights, const Tensor& indices, const Tensor& tokens_per_expert,
                               const Tensor& experts_per_token, const Tensor& nan_rows, void* stream);
void router_expert_choice_backward_cuda(const Tensor& d_weights, const Tensor& scores, const Tensor& slot, ScoreFn score, float route_scale,
                                        const Tensor& d_logits, bool accumulate, void* stream);

}  // namespace moe::ops
