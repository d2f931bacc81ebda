// AdamW: one grid-stride elementwise kernel; every element read once and written once (plus the
// optional bf16 copy). float4 loads/stores when all pointers are 16-byte aligned.
#include <cstdint>

#include "core/cuda_runtime.h"
#include "core/tensor.h"
#include "ops/common/convert.h"
#include "ops/common/launch.h"
#include "ops/train/adamw/adamw.h"

namespace moe::ops {

namespace {

__device__ __forceinline__ float adamw_one(float& w, float g, float& m, float& v, const AdamWScalars& s) {
  g *= s.grad_scale;
  m = s.beta1 * m + (1.f - s.beta1) * g;
  v = s.beta2 * v + (1.f - s.beta2) * g * g;
  const float denom = sqrtf(v) * s.inv_sqrt_bc2 + s.eps;
  w = w * s.decay - s.step_size * m / denom;
  return w;
}

__global__ void adamw_kernel(float* w, const float* g, float* m, float* v, bf16* wb, int64_t n, AdamWScalars s) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float wi = w[i], mi = m[i], vi = v[i];
    adamw_one(wi, g[i], mi, vi, s);
    w[i] = wi;
    m[i] = mi;
    v[i] = vi;
    if (wb) wb[i] = bf16_from_float(wi);
  }
}

__global__ void adamw_kernel_vec4(float4* w, const float4* g, float4* m, float4* v, bf16* wb, int64_t n4, AdamWScalars s) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    float4 wi = w[i], gi = g[i], mi = m[i], vi = v[i];
    adamw_one(wi.x, gi.x, mi.x, vi.x, s);
    adamw_one(wi.y, gi.y, mi.y, vi.y, s);
    adamw_one(wi.z, gi.z, mi.z, vi.z, s);
    adamw_one(wi.w, gi.w, mi.w, vi.w, s);
    w[i] = wi;
    m[i] = mi;
    v[i] = vi;
    if (wb) {
      wb[4 * i] = bf16_from_float(wi.x);
      wb[4 * i + 1] = bf16_from_float(wi.y);
      wb[4 * i + 2] = bf16_from_float(wi.z);
      wb[4 * i + 3] = bf16_from_float(wi.w);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

void adamw_step_cuda(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& param_bf16,
                     const AdamWScalars& s, void* stream) {
  const int64_t n = param.numel();
  float* w = param.data<float>();
  const float* g = grad.data<float>();
  float* m = exp_avg.data<float>();
  float* v = exp_avg_sq.data<float>();
  bf16* wb = param_bf16.defined() ? param_bf16.data<bf16>() : nullptr;
  cudaStream_t st = cudaStream_t(stream);
  const int64_t n4 =
      (aligned16(w) && aligned16(g) && aligned16(m) && aligned16(v) && (!wb || reinterpret_cast<uintptr_t>(wb) % 8 == 0)) ? n / 4 : 0;
  if (n4 > 0) {
    adamw_kernel_vec4<<<grid_for(n4), kThreads, 0, st>>>(reinterpret_cast<float4*>(w), reinterpret_cast<const float4*>(g),
                                                         reinterpret_cast<float4*>(m), reinterpret_cast<float4*>(v), wb, n4, s);
    cuda::check_launch("adamw");
  }
  const int64_t done = 4 * n4;
  if (done < n) {
    adamw_kernel<<<grid_for(n - done), kThreads, 0, st>>>(w + done, g + done, m + done, v + done, wb ? wb + done : nullptr, n - done, s);
    cuda::check_launch("adamw");
  }
}

}  // namespace moe::ops
