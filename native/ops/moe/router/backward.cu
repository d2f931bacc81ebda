// Router backward: one warp per token.
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

__global__ void __launch_bounds__(kWarps * 32)
    router_backward_kernel(const float* dw, const float* scores, const int32_t* indices, int64_t T, int E, int k, bool sigmoid,
                           bool normalize, float scale, float* dx, bool accumulate) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  const float* srow = scores + t * E;
  float* drow = dx + t * E;
  // sums over the chosen experts; out-of-range indices are skipped (the CPU path rejects them)
  float z = 0.f, adot = 0.f;
  for (int j = lane; j < k; j += 32) {
    int e = indices[t * k + j];
    if (e >= 0 && e < E) {
      float sj = srow[e];
      z += sj;
      adot += dw[t * k + j] * sj;
    }
  }
  z = warp_sum(z) + kRouterNormEps;
  adot = warp_sum(adot);
  // dS for slot j, and c = Σ_e s_e·dS_e (softmax only)
  float c = 0.f;
  if (!sigmoid) {
    for (int j = lane; j < k; j += 32) {
      int e = indices[t * k + j];
      if (e >= 0 && e < E) {
        float d = normalize ? scale * (dw[t * k + j] / z - adot / (z * z)) : scale * dw[t * k + j];
        c += srow[e] * d;
      }
    }
    c = warp_sum(c);
  }
  // dense part: softmax −s_e·c on every expert; sigmoid nothing
  for (int e = lane; e < E; e += 32) {
    float g = sigmoid ? 0.f : -srow[e] * c;
    drow[e] = accumulate ? drow[e] + g : g;
  }
  __syncwarp();
  for (int j = lane; j < k; j += 32) {
    int e = indices[t * k + j];
    if (e >= 0 && e < E) {
      float d = normalize ? scale * (dw[t * k + j] / z - adot / (z * z)) : scale * dw[t * k + j];
      float se = srow[e];
      atomicAdd(&drow[e], sigmoid ? d * se * (1.f - se) : se * d);
    }
  }
}

}  // namespace

void router_backward_cuda(const Tensor& d_weights, const Tensor& scores, const Tensor& indices, const RouterParams& p,
                          const Tensor& d_logits, bool accumulate, void* stream) {
  const int64_t T = scores.size(0), E = scores.size(1), k = indices.size(1);
  router_backward_kernel<<<token_blocks(T), kWarps * 32, 0, cudaStream_t(stream)>>>(
      d_weights.data<float>(), scores.data<float>(), indices.data<int32_t>(), T, int(E), int(k), p.score == ScoreFn::Sigmoid, p.normalize,
      p.route_scale, d_logits.data<float>(), accumulate);
  cuda::check_launch("routerBackward");
}

}  // namespace moe::ops
