// Per-expert bias rows added in place to expert-contiguous rows (the grouped GEMM's layout):
//   rows[r] += bias[e]   for offsets[e] <= r < offsets[e + 1]
// (gpt-oss's experts carry biases after both projections). Rows past offsets[E] (capacity padding)
// are left as they are. fp32 add, one rounding into the rows' dtype (torch's bf16 add does the same).
// rows [M,N] contiguous f32, bf16 or f16; bias [E,N] of the rows' dtype; offsets [E+1] i32; all on
// one device. The offsets live on the device and are not read by the host: the kernels clamp each
// expert's range into [0, M], so offsets out of order write nothing out of bounds.
#pragma once
#include "core/tensor.h"

namespace moe::ops {

void expert_bias(const Tensor& rows, const Tensor& bias, const Tensor& offsets);

// Backward: each expert's bias gradient, the sum of its rows' gradients, in fp32 (rows in order,
// one thread a column: the same bits every run): d_bias[e] = Σ_{offsets[e] ≤ r < offsets[e+1]} d_rows[r],
// written, or added with `accumulate`. d_rows [M,N] f32, bf16 or f16; d_bias [E,N] f32.
void expert_bias_backward(const Tensor& d_rows, const Tensor& offsets, const Tensor& d_bias, bool accumulate);

void expert_bias_cpu(const Tensor& rows, const Tensor& bias, const Tensor& offsets);
void expert_bias_cuda(const Tensor& rows, const Tensor& bias, const Tensor& offsets, void* stream);
void expert_bias_backward_cpu(const Tensor& d_rows, const Tensor& offsets, const Tensor& d_bias, bool accumulate);
void expert_bias_backward_cuda(const Tensor& d_rows, const Tensor& offsets, const Tensor& d_bias, bool accumulate, void* stream);

}  // namespace moe::ops
