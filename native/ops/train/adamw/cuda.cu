// AdamW: one grid-stride elementwise kernel; every element read once and written once (plus the
// optional bf16 copy). Four elements a load when every pointer is aligned for it (16 bytes; 8 for a
// bf16 gradient).
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

// One element; G is float or bf16 (the gradient widened exactly to float).
template <typename G> __global__ void adamw_kernel(float* w, const G* g, float* m, float* v, bf16* wb, int64_t n, AdamWScalars s) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float wi = w[i], mi = m[i], vi = v[i];
    adamw_one(wi, to_float(g[i]), mi, vi, s);
    w[i] = wi;
    m[i] = mi;
    v[i] = vi;
    if (wb) wb[i] = bf16_from_float(wi);
  }
}

// Four gradient elements in one load: a float4, or four bf16 in 8 bytes.
struct alignas(8) Bf16x4 {
  bf16 x, y, z, w;
};
__device__ __forceinline__ float4 widen4(const float4& g) { return g; }
__device__ __forceinline__ float4 widen4(const Bf16x4& g) {
  return make_float4(to_float(g.x), to_float(g.y), to_float(g.z), to_float(g.w));
}

template <typename G4>
__global__ void adamw_kernel_vec4(float4* w, const G4* g, float4* m, float4* v, bf16* wb, int64_t n4, AdamWScalars s) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n4; i += int64_t(gridDim.x) * blockDim.x) {
    float4 wi = w[i], mi = m[i], vi = v[i];
    const float4 gi = widen4(g[i]);
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

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename G, typename G4>
void launch_adamw(float* w, const G* g, float* m, float* v, bf16* wb, int64_t n, const AdamWScalars& s, cudaStream_t st) {
  const bool vec = aligned(w, 16) && aligned(g, sizeof(G4)) && aligned(m, 16) && aligned(v, 16) && (!wb || aligned(wb, 8));
  const int64_t n4 = vec ? n / 4 : 0;
  if (n4 > 0) {
    adamw_kernel_vec4<<<grid_for(n4), kThreads, 0, st>>>(reinterpret_cast<float4*>(w), reinterpret_cast<const G4*>(g),
                                                         reinterpret_cast<float4*>(m), reinterpret_cast<float4*>(v), wb, n4, s);
    cuda::check_launch("adamw");
  }
  const int64_t done = 4 * n4;
  if (done < n) {
    adamw_kernel<<<grid_for(n - done), kThreads, 0, st>>>(w + done, g + done, m + done, v + done, wb ? wb + done : nullptr, n - done, s);
    cuda::check_launch("adamw");
  }
}

}  // namespace

void adamw_step_cuda(const Tensor& param, const Tensor& grad, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& param_bf16,
                     const AdamWScalars& s, void* stream) {
  float* w = param.data<float>();
  float* m = exp_avg.data<float>();
  float* v = exp_avg_sq.data<float>();
  bf16* wb = param_bf16.defined() ? param_bf16.data<bf16>() : nullptr;
  cudaStream_t st = cudaStream_t(stream);
  if (grad.dtype() == DType::bf16) launch_adamw<bf16, Bf16x4>(w, grad.data<bf16>(), m, v, wb, param.numel(), s, st);
  else launch_adamw<float, float4>(w, grad.data<float>(), m, v, wb, param.numel(), s, st);
}

}  // namespace moe::ops
