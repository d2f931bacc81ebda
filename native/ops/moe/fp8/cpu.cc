#include <cmath>

#include "ops/common/convert.h"
#include "ops/moe/fp8/block.h"
#include "ops/moe/fp8/fp8.h"

namespace moe::ops {

void quantize_fp8_cpu(const Tensor& x, const Tensor& q, const Tensor& scales) {
  const int64_t R = x.size(0), H = x.size(1), B = H / kFp8Block;
  dispatch_float(x.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* px = x.data<T>();
    fp8e4m3* pq = q.data<fp8e4m3>();
    float* ps = scales.data<float>();
    for (int64_t r = 0; r < R; ++r)
      for (int64_t b = 0; b < B; ++b) {
        const T* block = px + r * H + b * kFp8Block;
        float amax = 0;
        for (int64_t i = 0; i < kFp8Block; ++i) amax = std::fmax(amax, std::fabs(to_float(block[i])));
        float s = fp8_scale_for(amax);
        ps[r * B + b] = s;
        for (int64_t i = 0; i < kFp8Block; ++i) pq[r * H + b * kFp8Block + i] = fp8_quantize(to_float(block[i]), s);
      }
  });
}

void dequantize_fp8_cpu(const Tensor& q, const Tensor& scales, const Tensor& out) {
  const int64_t R = out.size(0), H = out.size(1), B = H / kFp8Block;
  dispatch_float(out.dtype(), [&](auto tag) {
    using T = typename decltype(tag)::type;
    const fp8e4m3* pq = q.data<fp8e4m3>();
    const float* ps = scales.data<float>();
    T* po = out.data<T>();
    for (int64_t r = 0; r < R; ++r)
      for (int64_t i = 0; i < H; ++i) po[r * H + i] = from_float<T>(fp8_dequantize(pq[r * H + i], ps[r * B + i / kFp8Block]));
  });
}

}  // namespace moe::ops
