// Router losses: a block per sequence for the balance loss, a warp per token for the z-loss, then one
// block reducing the partial sums in a fixed order (deterministic).
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

// One block: out[0] = scale · Σ v[i], summed in a fixed order (deterministic).
__global__ void reduce_sum_kernel(const float* v, int64_t n, double scale, float* out) {
  __shared__ double part[1024];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += v[i];
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = float(scale * part[0]);
}

// Per token: inv[t] = 1 / Σ_e s[t,e] (sigmoid) or 1 (softmax). A warp per token.
__global__ void row_inverse_kernel(const float* s, int64_t T, int E, bool sigmoid, float* inv) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  float r = 0.f;
  if (sigmoid)
    for (int e = lane; e < E; e += 32) r += s[t * E + e];
  r = warp_sum(r);
  if (lane == 0) inv[t] = sigmoid ? 1.f / r : 1.f;
}

// A block per sequence: counts (shared atomics), f_e, P_e, the sequence's Σ f·P, and the gradient
// coefficient g[q,e] = coef·E/S · f_e / seqLen.
__global__ void balance_seq_kernel(const float* s, const int32_t* indices, const float* inv, int E, int k, int64_t seq_len, int64_t S,
                                   float coef, float* seq_loss, float* g) {
  extern __shared__ int counts[];
  __shared__ float part[256];
  const int64_t q = blockIdx.x, t0 = q * seq_len;
  for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (int64_t i = threadIdx.x; i < seq_len * k; i += blockDim.x) {
    int e = indices[t0 * k + i];
    if (e >= 0 && e < E) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  const float per = coef * float(E) / float(S);
  float acc = 0.f;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    double P = 0;  // long sums over tokens: accumulate in double
    for (int64_t t = t0; t < t0 + seq_len; ++t) P += double(s[t * E + e] * inv[t]);
    P /= double(seq_len);
    float f = float(counts[e]) / float(seq_len * k);
    acc += float(double(per) * double(f) * P);
    g[q * E + e] = per * f / float(seq_len);
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int st = blockDim.x / 2; st > 0; st >>= 1) {
    if (threadIdx.x < st) part[threadIdx.x] += part[threadIdx.x + st];
    __syncthreads();
  }
  if (threadIdx.x == 0) seq_loss[q] = part[0];
}

// A warp per token: dLogits += ∂loss/∂logits from g = ∂loss/∂p.
__global__ void balance_grad_kernel(const float* s, const float* inv, const float* g, int64_t T, int E, int64_t seq_len, bool sigmoid,
                                    float* dx) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  const float* srow = s + t * E;
  const float* grow = g + (t / seq_len) * E;
  const float ri = inv[t];
  float gp = 0.f;
  for (int e = lane; e < E; e += 32) gp += grow[e] * srow[e] * ri;
  gp = warp_sum(gp);
  for (int e = lane; e < E; e += 32) {
    float se = srow[e];
    float d = sigmoid ? (grow[e] - gp) * ri * se * (1.f - se) : se * (grow[e] - gp);
    dx[t * E + e] += d;
  }
}

// A warp per token: lse²[t], and dLogits += coef·2·lse·softmax/T.
__global__ void z_loss_kernel(const float* x, int64_t T, int E, float coef, float* lse2, float* dx) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= T) return;
  const float* row = x + t * E;
  float mx = -INFINITY;
  for (int e = lane; e < E; e += 32) mx = fmaxf(mx, row[e]);
  mx = warp_max(mx);
  float sum = 0.f;
  for (int e = lane; e < E; e += 32) sum += expf(row[e] - mx);
  const float lse = mx + logf(warp_sum(sum));
  if (lane == 0) lse2[t] = lse * lse;
  if (dx) {
    const float c = coef * 2.f * lse / float(T);
    for (int e = lane; e < E; e += 32) dx[t * E + e] += c * expf(row[e] - lse);
  }
}

}  // namespace

void router_balance_loss_cuda(const Tensor& scores, const Tensor& indices, ScoreFn score, int64_t seq_len, float coef, const Tensor& loss,
                              const Tensor& d_logits, void* stream) {
  const char* op = "balanceLoss";
  const int64_t T = scores.size(0), E = scores.size(1), k = indices.size(1), S = T / seq_len;
  MOE_ARG_CHECK(E * 4 <= 48 * 1024, op, "'scores' ", scores.describe(), " has too many experts for the CUDA balance loss");
  MOE_ARG_CHECK(S <= INT_MAX, op, "too many sequences");
  cudaStream_t st = cudaStream_t(stream);
  // scratch: inv [T], seq_loss [S], g [S,E] (stream-ordered, released when this returns)
  Tensor scratch = Tensor::empty({T + S + S * E}, DType::f32, scores.device(), op);
  float* inv = scratch.data<float>();
  float* seq_loss = inv + T;
  float* g = seq_loss + S;
  const bool sigmoid = score == ScoreFn::Sigmoid;
  row_inverse_kernel<<<token_blocks(T), kWarps * 32, 0, st>>>(scores.data<float>(), T, int(E), sigmoid, inv);
  cuda::check_launch(op);
  balance_seq_kernel<<<unsigned(S), 256, size_t(E) * sizeof(int), st>>>(scores.data<float>(), indices.data<int32_t>(), inv, int(E), int(k),
                                                                        seq_len, S, coef, seq_loss, g);
  cuda::check_launch(op);
  reduce_sum_kernel<<<1, 1024, 0, st>>>(seq_loss, S, 1.0, loss.data<float>());
  cuda::check_launch(op);
  if (d_logits.defined()) {
    balance_grad_kernel<<<token_blocks(T), kWarps * 32, 0, st>>>(scores.data<float>(), inv, g, T, int(E), seq_len, sigmoid,
                                                                 d_logits.data<float>());
    cuda::check_launch(op);
  }
}

void router_z_loss_cuda(const Tensor& logits, float coef, const Tensor& loss, const Tensor& d_logits, void* stream) {
  const char* op = "zLoss";
  const int64_t T = logits.size(0), E = logits.size(1);
  cudaStream_t st = cudaStream_t(stream);
  Tensor lse2 = Tensor::empty({T}, DType::f32, logits.device(), op);
  z_loss_kernel<<<token_blocks(T), kWarps * 32, 0, st>>>(logits.data<float>(), T, int(E), coef, lse2.data<float>(),
                                                         d_logits.defined() ? d_logits.data<float>() : nullptr);
  cuda::check_launch(op);
  reduce_sum_kernel<<<1, 1024, 0, st>>>(lse2.data<float>(), T, double(coef) / double(T), loss.data<float>());
  cuda::check_launch(op);
}

}  // namespace moe::ops
