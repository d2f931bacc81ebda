// Router kernels. Forward: one warp per token, fused (scores, bias, group scores, group selection,
// top-k by repeated warp argmax, normalisation, weights, counts). Each lane holds VPT consecutive
// experts (e = lane·VPT + v) in registers, so E ≤ 32·VPT ≤ 1024; loads and stores are float4 when
// the row allows. No host sync; the only atomics are the counts (and the bad-row counter).
// Backward: one warp per token. Losses: a block per sequence for the balance loss, a warp per
// token for the z-loss, then one block reducing the partial sums in a fixed order (deterministic).
#include <cfloat>
#include <climits>
#include <cstdint>

#include "core/cuda_runtime.h"
#include "core/error.h"
#include "core/tensor.h"
#include "ops/common/launch.h"
#include "ops/router/router.h"

namespace moe::ops {

namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarps = 4;  // warps (tokens) per block in the per-token kernels
constexpr int kMaxCudaExperts = 1024;

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, off));
  return v;
}
// (value, index) argmax over lane segments of `width` (a power of two ≤ 32); ties to the lower index.
// An empty candidate is (-inf, INT_MAX), which loses to everything, -inf values included.
__device__ __forceinline__ void warp_argmax(float& v, int& i, int width = 32) {
  for (int off = 1; off < width; off <<= 1) {
    float ov = __shfl_xor_sync(kFull, v, off);
    int oi = __shfl_xor_sync(kFull, i, off);
    if (ov > v || (ov == v && oi < i)) {
      v = ov;
      i = oi;
    }
  }
}

struct FwdArgs {
  const float* logits;
  const float* bias;  // may be null
  int32_t* indices;
  float* weights;
  int32_t* counts;
  float* scores;
  int32_t* nan;
  int64_t T;
  int E, k, G, topk_groups, m, gs;
  bool sigmoid, normalize, vec;
  bool segmented;  // each lane's experts lie in one group and a group spans seg_lanes (power of two) lanes
  int seg_lanes;
  float scale;
};

__global__ void router_init(int32_t* counts, int E, int32_t* nan, int64_t T) {
  for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < E; e += gridDim.x * blockDim.x) counts[e] = 0;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    nan[0] = 0;
    nan[1] = int32_t(T);
  }
}

// Local argmax over the unmasked slots of this lane (slots are in increasing expert order).
template <int VPT>
__device__ __forceinline__ void local_argmax(const float (&b)[VPT], uint32_t masked, int base, float& v, int& i) {
  v = -INFINITY;
  i = INT_MAX;
#pragma unroll
  for (int s = 0; s < VPT; ++s) {
    if (!((masked >> s) & 1u) && (i == INT_MAX || b[s] > v)) {
      v = b[s];
      i = base + s;
    }
  }
}

template <int VPT>
__global__ void __launch_bounds__(kWarps * 32) router_forward_kernel(FwdArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t t = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (t >= a.T) return;  // whole warps only: T is counted in warps
  const int E = a.E, base = lane * VPT;
  const float* row = a.logits + t * E;

  float s[VPT];
  uint32_t invalid = 0;  // slots past E
  if (a.vec && VPT >= 4) {
#pragma unroll
    for (int q = 0; q < VPT / 4; ++q) {
      if (base + 4 * q < E) {
        float4 f = *reinterpret_cast<const float4*>(row + base + 4 * q);
        s[4 * q] = f.x, s[4 * q + 1] = f.y, s[4 * q + 2] = f.z, s[4 * q + 3] = f.w;
      } else {
        s[4 * q] = s[4 * q + 1] = s[4 * q + 2] = s[4 * q + 3] = 0.f;
        invalid |= 0xfu << (4 * q);
      }
    }
  } else {
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      if (base + v < E) s[v] = row[base + v];
      else {
        s[v] = 0.f;
        invalid |= 1u << v;
      }
    }
  }
  float bv[VPT];
  bool bad = false;
#pragma unroll
  for (int v = 0; v < VPT; ++v) {
    bv[v] = (a.bias && !((invalid >> v) & 1u)) ? a.bias[base + v] : 0.f;
    if (!((invalid >> v) & 1u)) bad = bad || !isfinite(s[v]) || isnan(bv[v]);
  }
  const int k = a.k;
  if (__any_sync(kFull, bad)) {
    // Bad row: counted; scores NaN, indices 0..k-1, weights NaN (the CPU reference does the same).
    if (lane == 0) {
      atomicAdd(&a.nan[0], 1);
      atomicMin(&a.nan[1], int32_t(t));
    }
    for (int e = lane; e < E; e += 32) a.scores[t * E + e] = NAN;
    for (int j = lane; j < k; j += 32) {
      a.indices[t * k + j] = j;
      a.weights[t * k + j] = NAN;
      atomicAdd(&a.counts[j], 1);
    }
    return;
  }

  // ---- scores
  if (a.sigmoid) {
#pragma unroll
    for (int v = 0; v < VPT; ++v) s[v] = 1.f / (1.f + expf(-s[v]));
  } else {
    float mx = -INFINITY;
#pragma unroll
    for (int v = 0; v < VPT; ++v)
      if (!((invalid >> v) & 1u)) mx = fmaxf(mx, s[v]);
    mx = warp_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int v = 0; v < VPT; ++v) {
      s[v] = ((invalid >> v) & 1u) ? 0.f : expf(s[v] - mx);
      sum += s[v];
    }
    float inv = 1.f / warp_sum(sum);
#pragma unroll
    for (int v = 0; v < VPT; ++v) s[v] *= inv;
  }
  float* srow = a.scores + t * E;
  if (a.vec && VPT >= 4) {
#pragma unroll
    for (int q = 0; q < VPT / 4; ++q)
      if (base + 4 * q < E) *reinterpret_cast<float4*>(srow + base + 4 * q) = make_float4(s[4 * q], s[4 * q + 1], s[4 * q + 2], s[4 * q + 3]);
  } else {
#pragma unroll
    for (int v = 0; v < VPT; ++v)
      if (base + v < E) srow[base + v] = s[v];
  }
#pragma unroll
  for (int v = 0; v < VPT; ++v) bv[v] += s[v];  // biased scores: selection only

  // ---- group-limited routing: mask the experts outside the kept groups
  uint32_t masked = invalid;
  if (a.G > 1) {
    const int G = a.G, m = a.m, gs = a.gs;
    float gscore = -INFINITY;  // this lane's group's score (segmented) or group `lane`'s (generic)
    int gid = INT_MAX;
    if (a.segmented) {
      const int g = base / gs;
      uint32_t taken = invalid;
      float sum = 0.f;
      for (int r = 0; r < m; ++r) {
        float v;
        int i;
        local_argmax<VPT>(bv, taken, base, v, i);
        warp_argmax(v, i, a.seg_lanes);
        sum += v;
        if (i != INT_MAX && i / VPT == lane) taken |= 1u << (i - base);
      }
      if (g < G) {
        gscore = sum;
        gid = g;
      }
    } else {
      for (int g = 0; g < G; ++g) {
        uint32_t taken = invalid;
#pragma unroll
        for (int v = 0; v < VPT; ++v)
          if ((base + v) / gs != g) taken |= 1u << v;
        float sum = 0.f;
        for (int r = 0; r < m; ++r) {
          float v;
          int i;
          local_argmax<VPT>(bv, taken, base, v, i);
          warp_argmax(v, i);
          sum += v;
          if (i / VPT == lane) taken |= 1u << (i - base);
        }
        if (lane == g) {
          gscore = sum;
          gid = g;
        }
      }
    }
    uint32_t keep = 0;
    for (int r = 0; r < a.topk_groups; ++r) {
      float v = ((keep >> (gid & 31)) & 1u) || gid == INT_MAX ? -INFINITY : gscore;
      int i = ((keep >> (gid & 31)) & 1u) || gid == INT_MAX ? INT_MAX : gid;
      warp_argmax(v, i);
      keep |= 1u << i;
    }
#pragma unroll
    for (int v = 0; v < VPT; ++v)
      if (!((keep >> (((base + v) / gs) & 31)) & 1u) || base + v >= E) masked |= 1u << v;
  }

  // ---- top-k by repeated warp argmax. The unbiased score of a winner is read back from the
  // scores row this warp just wrote (an L1 hit), which keeps s[] out of local memory.
  __syncwarp();
  int my_idx = 0;
  for (int j = 0; j < k; ++j) {
    float v;
    int i;
    local_argmax<VPT>(bv, masked, base, v, i);
    warp_argmax(v, i);
    if (lane == i / VPT) masked |= 1u << (i - base);
    if (k <= 32) {
      if (lane == j) my_idx = i;
    } else if (lane == 0) {  // k > 32: straight to memory, weights finished below
      a.indices[t * k + j] = i;
      atomicAdd(&a.counts[i], 1);
    }
  }
  if (k <= 32) {
    const float my_s = lane < k ? srow[my_idx] : 0.f;
    const float z = warp_sum(my_s) + kRouterNormEps;
    if (lane < k) {
      a.indices[t * k + lane] = my_idx;
      a.weights[t * k + lane] = a.normalize ? a.scale * (my_s / z) : a.scale * my_s;
      atomicAdd(&a.counts[my_idx], 1);
    }
  } else {
    __syncwarp();
    float z = 0.f;
    for (int j = lane; j < k; j += 32) z += srow[a.indices[t * k + j]];
    z = warp_sum(z) + kRouterNormEps;
    for (int j = lane; j < k; j += 32) {
      const float sj = srow[a.indices[t * k + j]];
      a.weights[t * k + j] = a.normalize ? a.scale * (sj / z) : a.scale * sj;
    }
  }
}

template <int VPT> void launch_forward(const FwdArgs& a, cudaStream_t stream) {
  const unsigned blocks = unsigned((a.T + kWarps - 1) / kWarps);
  router_forward_kernel<VPT><<<blocks, kWarps * 32, 0, stream>>>(a);
}

// ---------------------------------------------------------------------------------- backward
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

// -------------------------------------------------------------------------------------- losses
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
__global__ void balance_seq_kernel(const float* s, const int32_t* indices, const float* inv, int E, int k, int64_t seq_len,
                                   int64_t S, float coef, float* seq_loss, float* g) {
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
__global__ void balance_grad_kernel(const float* s, const float* inv, const float* g, int64_t T, int E, int64_t seq_len,
                                    bool sigmoid, float* dx) {
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

unsigned token_blocks(int64_t T) { return unsigned((T + kWarps - 1) / kWarps); }

}  // namespace

void router_forward_cuda(const Tensor& logits, const Tensor& bias, const RouterParams& p, const Tensor& indices,
                         const Tensor& weights, const Tensor& tokens_per_expert, const Tensor& scores, const Tensor& nan_rows,
                         void* stream) {
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
  a.m = int(p.k / p.topk_groups);
  a.gs = int(E / p.groups);
  a.sigmoid = p.score == ScoreFn::Sigmoid;
  a.normalize = p.normalize;
  a.scale = p.route_scale;
  int vpt = 1;
  while (32 * vpt < E) vpt *= 2;
  a.vec = E % 4 == 0 && (reinterpret_cast<uintptr_t>(a.logits) % 16 == 0) && (reinterpret_cast<uintptr_t>(a.scores) % 16 == 0);
  const int lanes_per_group = a.gs / vpt;
  a.segmented = a.gs % vpt == 0 && lanes_per_group >= 1 && lanes_per_group <= 32 && (lanes_per_group & (lanes_per_group - 1)) == 0;
  a.seg_lanes = a.segmented ? lanes_per_group : 32;
  switch (vpt) {
    case 1: launch_forward<1>(a, st); break;
    case 2: launch_forward<2>(a, st); break;
    case 4: launch_forward<4>(a, st); break;
    case 8: launch_forward<8>(a, st); break;
    case 16: launch_forward<16>(a, st); break;
    default: launch_forward<32>(a, st); break;
  }
  cuda::check_launch(op);
}

void router_backward_cuda(const Tensor& d_weights, const Tensor& scores, const Tensor& indices, const RouterParams& p,
                          const Tensor& d_logits, bool accumulate, void* stream) {
  const int64_t T = scores.size(0), E = scores.size(1), k = indices.size(1);
  router_backward_kernel<<<token_blocks(T), kWarps * 32, 0, cudaStream_t(stream)>>>(
      d_weights.data<float>(), scores.data<float>(), indices.data<int32_t>(), T, int(E), int(k), p.score == ScoreFn::Sigmoid,
      p.normalize, p.route_scale, d_logits.data<float>(), accumulate);
  cuda::check_launch("routerBackward");
}

void router_balance_loss_cuda(const Tensor& scores, const Tensor& indices, ScoreFn score, int64_t seq_len, float coef,
                              const Tensor& loss, const Tensor& d_logits, void* stream) {
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
  balance_seq_kernel<<<unsigned(S), 256, size_t(E) * sizeof(int), st>>>(scores.data<float>(), indices.data<int32_t>(), inv,
                                                                        int(E), int(k), seq_len, S, coef, seq_loss, g);
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
