// Router forward on CUDA: router_init (zeroes the counts, resets nanRows), then one fused kernel,
// the one router.cc chose: the fast one (forward_fast.cu) or the generic one (forward_generic.cu).
// Both apply exactly the selection rule of cpu.cc (see router.h).
#include <climits>
#include <cstdint>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "core/tensor.h"
#include "ops/common/launch.h"
#include "ops/moe/router/router.h"
#include "ops/moe/router/router_cuda.cuh"

namespace moe::ops {

using namespace router_cuda;

namespace {

constexpr int kMaxCudaExperts = 1024;

// Zeroes the counts and sets nanRows to [0, T]. The fast forward (its programmatic dependent) may
// start at once: it touches counts and nanRows only after pdl_wait().
__global__ void router_init(int32_t* counts, int E, int32_t* nan, int64_t T) {
  pdl_launch_dependents();
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < E; e += gridDim.x * blockDim.x) counts[e] = 0;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    nan[0] = 0;
    nan[1] = int32_t(T);
  }
}

}  // namespace

void router_forward_cuda(const Tensor& logits, const Tensor& bias, const RouterParams& p, const Tensor& indices, const Tensor& weights,
                         const Tensor& tokens_per_expert, const Tensor& scores, const Tensor& nan_rows, RouterForwardKernel kernel,
                         bool pdl, void* stream) {
  const char* op = "router";
  const int64_t T = logits.size(0), E = logits.size(1);
  MOE_ARG_CHECK(E <= kMaxCudaExperts, op, "'logits' ", logits.describe(), " has ", E, " experts; the CUDA router handles up to ",
                kMaxCudaExperts);
  MOE_ARG_CHECK(T <= int64_t(INT_MAX) * kWarps && T < INT_MAX, op, "'logits' ", logits.describe(), " has too many tokens");
  cudaStream_t st = cudaStream_t(stream);
  router_init<<<grid_for(E), kThreads, 0, st>>>(tokens_per_expert.data<int32_t>(), int(E), nan_rows.data<int32_t>(), T);
  cuda::check_launch(op);
  if (T == 0) return;
  FwdArgs a{};
  a.logits = logits.data<float>();
  a.bias = bias.defined() ? bias.data<float>() : nullptr;
  a.indices = indices.data<int32_t>();
  a.weights = weights.data<float>();
  a.counts = tokens_per_expert.data<int32_t>();
  a.scores = scores.data<float>();
  a.nan = nan_rows.data<int32_t>();
  a.T = T;
  a.E = int(E);
  a.k = int(p.k);
  a.G = int(p.groups);
  a.topk_groups = int(p.topk_groups);
  a.m = int(group_score_top(p));
  a.gs = int(E / p.groups);
  a.sigmoid = p.score == ScoreFn::Sigmoid;
  a.normalize = p.normalize;
  a.scale = p.route_scale;

  if (kernel == RouterForwardKernel::Fast) {
    launch_fast(static_cast<const RouteArgs&>(a), int(E), logits.device().index, pdl, st);
    cuda::check_launch(op);
    return;
  }

  launch_generic(a, st);
  cuda::check_launch(op);
}

}  // namespace moe::ops
