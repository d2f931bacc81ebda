// gpt-oss's gated activation of the experts, on the first projection's output with gate and up
// interleaved by column (the layout of w13: column 2i the gate's i, 2i+1 the up's i):
//   g = min(gate, limit);  u = clamp(up, −limit, limit);  out = (u + 1) · g · sigmoid(alpha · g)
// (alpha 1.702, limit 7 in gpt-oss). fp32 math, one rounding into out's dtype; a NaN stays NaN
// (clamping keeps it, as torch.clamp). h13 [M,2F] and out [M,F] contiguous, one dtype (f32, bf16 or
// f16), one device.
#pragma once
#include "core/tensor.h"

namespace moe::ops {

void clamped_swiglu(const Tensor& h13, const Tensor& out, float alpha, float limit);

// Backward: dh13 [M,2F] (interleaved as h13) from dh [M,F] and the forward's h13; a clamp passes
// the gradient where its input lies within the bounds (ends included), as torch.clamp's backward.
// All three one dtype; dh13 apart from both inputs.
void clamped_swiglu_backward(const Tensor& dh, const Tensor& h13, const Tensor& dh13, float alpha, float limit);

void clamped_swiglu_cpu(const Tensor& h13, const Tensor& out, float alpha, float limit);
void clamped_swiglu_cuda(const Tensor& h13, const Tensor& out, float alpha, float limit, void* stream);
void clamped_swiglu_backward_cpu(const Tensor& dh, const Tensor& h13, const Tensor& dh13, float alpha, float limit);
void clamped_swiglu_backward_cuda(const Tensor& dh, const Tensor& h13, const Tensor& dh13, float alpha, float limit, void* stream);

}  // namespace moe::ops
