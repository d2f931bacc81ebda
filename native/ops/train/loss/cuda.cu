// Loss kernels, all without a host sync and without float atomics.
// MSE: B blocks (B fixed by numel alone) each write grad for their elements and one partial sum;
//      one block then sums the B partials in double, in order.
// Cross-entropy: one block per row writes the row's log-sum-exp, loss term and flags (counted,
//      correct); one block sums them (double, fixed order) into loss, correct and the row count;
//      then an elementwise kernel writes the gradient, reading the count from device memory.
#include <climits>
#include <cmath>
#include <cstdint>

#include "core/cuda_runtime.h"
#include "core/tensor.h"
#include "ops/common/block_reduce.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"
#include "ops/train/loss/loss.h"

namespace moe::ops {

namespace {

constexpr int kFinishThreads = 1024;
constexpr int kRowThreads = 128;
constexpr int64_t kMaxPartials = 1024;

template <typename P, typename Q>
__global__ void mse_partial_kernel(const P* p, const Q* q, int64_t n, float grad_scale, P* g, float* partial) {
  float acc = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float d = to_float(p[i]) - to_float(q[i]);
    acc += d * d;
    if (g) g[i] = from_float<P>(grad_scale * d);
  }
  acc = block_reduce_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out[0] = scale · Σ v[i] over i < n, in a fixed order.
__global__ void sum_scaled_kernel(const float* v, int64_t n, double scale, float* out) {
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += v[i];
  acc = block_reduce_sum(acc);
  if (threadIdx.x == 0) out[0] = float(scale * acc);
}

enum : int32_t { kCounted = 1, kCorrect = 2 };

template <typename P>
__global__ void ce_rows_kernel(const P* p, const int32_t* y, int64_t T, int N, int32_t ignore, float* lse, float* row_loss,
                               int32_t* flags) {
  __shared__ float best_v[32];
  __shared__ int best_i[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    const P* row = p + t * N;
    // argmax (ties to the lower class; NaN never wins), which is also the max for the log-sum-exp
    float v = -INFINITY;
    int i = INT_MAX;
    for (int c = threadIdx.x; c < N; c += blockDim.x) {
      const float x = to_float(row[c]);
      if (x > v) {
        v = x;
        i = c;
      }
    }
    for (int off = 16; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, off);
      const int oi = __shfl_xor_sync(0xffffffffu, i, off);
      if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
      }
    }
    __syncthreads();  // the previous row's readers are done
    if (lane == 0) {
      best_v[warp] = v;
      best_i[warp] = i;
    }
    __syncthreads();
    float mx = best_v[0];
    int arg = best_i[0];
    for (int w = 1; w < warps; ++w) {
      if (best_v[w] > mx || (best_v[w] == mx && best_i[w] < arg)) {
        mx = best_v[w];
        arg = best_i[w];
      }
    }
    if (arg == INT_MAX) arg = 0;
    float s = 0.f;
    for (int c = threadIdx.x; c < N; c += blockDim.x) s += expf(to_float(row[c]) - mx);
    s = block_reduce_sum(s);
    if (threadIdx.x == 0) {
      const float l = mx + logf(s);
      const int32_t target = y[t];
      lse[t] = l;
      if (target == ignore) {
        row_loss[t] = 0.f;
        flags[t] = 0;
      } else if (target < 0 || target >= N) {
        row_loss[t] = NAN;
        flags[t] = kCounted;
      } else {
        row_loss[t] = l - to_float(row[target]);
        flags[t] = kCounted | (arg == target ? kCorrect : 0);
      }
    }
  }
}

__global__ void ce_finish_kernel(const float* row_loss, const int32_t* flags, int64_t T, float* loss, int32_t* correct,
                                 int32_t* count_out) {
  double acc = 0;
  long long count = 0, right = 0;
  for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
    acc += row_loss[t];
    count += flags[t] & kCounted;
    right += (flags[t] & kCorrect) ? 1 : 0;
  }
  acc = block_reduce_sum(acc);
  count = block_reduce_sum(count);
  right = block_reduce_sum(right);
  if (threadIdx.x == 0) {
    loss[0] = count > 0 ? float(acc / double(count)) : 0.f;
    correct[0] = int32_t(right);
    count_out[0] = int32_t(count);
  }
}

template <typename P>
__global__ void ce_grad_kernel(const P* p, const int32_t* y, int64_t T, int N, int32_t ignore, const float* lse, const int32_t* count,
                               P* g) {
  const int64_t n = T * N;
  const float inv = count[0] > 0 ? 1.f / float(count[0]) : 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = i / N;
    const int c = int(i - t * N);
    const int32_t target = y[t];
    float d;
    if (target == ignore) d = 0.f;
    else if (target < 0 || target >= N) d = NAN;
    else d = (expf(to_float(p[i]) - lse[t]) - (c == target ? 1.f : 0.f)) * inv;
    g[i] = from_float<P>(d);
  }
}

}  // namespace

void mse_loss_cuda(const Tensor& pred, const Tensor& target, const Tensor& loss, const Tensor& grad, void* stream) {
  const char* op = "mseLoss";
  const int64_t n = pred.numel();
  const int64_t B = std::min<int64_t>(kMaxPartials, (n + kThreads * 4 - 1) / (kThreads * 4));
  cudaStream_t st = cudaStream_t(stream);
  Tensor partial = Tensor::empty({B}, DType::f32, pred.device(), op);  // scratch, stream-ordered
  dispatch_float(pred.dtype(), [&](auto ptag) {
    using P = typename decltype(ptag)::type;
    dispatch_float(target.dtype(), [&](auto ttag) {
      using Q = typename decltype(ttag)::type;
      mse_partial_kernel<P, Q><<<unsigned(B), kThreads, 0, st>>>(pred.data<P>(), target.data<Q>(), n, float(2.0 / double(n)),
                                                                 grad.defined() ? grad.data<P>() : nullptr, partial.data<float>());
    });
  });
  cuda::check_launch(op);
  sum_scaled_kernel<<<1, kFinishThreads, 0, st>>>(partial.data<float>(), B, 1.0 / double(n), loss.data<float>());
  cuda::check_launch(op);
}

void cross_entropy_loss_cuda(const Tensor& pred, const Tensor& target, int64_t ignore_index, const Tensor& loss, const Tensor& grad,
                             const Tensor& correct, void* stream) {
  const char* op = "crossEntropyLoss";
  const int64_t T = pred.size(0), N = pred.size(1);
  cudaStream_t st = cudaStream_t(stream);
  // scratch: lse [T], row_loss [T] (f32); flags [T], count [1] (i32). Stream-ordered.
  Tensor fs = Tensor::empty({2 * T}, DType::f32, pred.device(), op);
  Tensor is = Tensor::empty({T + 1}, DType::i32, pred.device(), op);
  float* lse = fs.data<float>();
  float* row_loss = lse + T;
  int32_t* flags = is.data<int32_t>();
  int32_t* count = flags + T;
  dispatch_float(pred.dtype(), [&](auto tag) {
    using P = typename decltype(tag)::type;
    if (T > 0) {
      ce_rows_kernel<P><<<unsigned(std::min<int64_t>(T, INT_MAX)), kRowThreads, 0, st>>>(pred.data<P>(), target.data<int32_t>(), T, int(N),
                                                                                         int32_t(ignore_index), lse, row_loss, flags);
      cuda::check_launch(op);
    }
    ce_finish_kernel<<<1, kFinishThreads, 0, st>>>(row_loss, flags, T, loss.data<float>(), correct.data<int32_t>(), count);
    cuda::check_launch(op);
    if (grad.defined() && T > 0) {
      ce_grad_kernel<P><<<grid_for(T * N), kThreads, 0, st>>>(pred.data<P>(), target.data<int32_t>(), T, int(N), int32_t(ignore_index), lse,
                                                              count, grad.data<P>());
      cuda::check_launch(op);
    }
  });
}

}  // namespace moe::ops
