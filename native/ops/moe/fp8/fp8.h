// FP8 (e4m3) row quantisation for dispatch, DeepEP/DeepSeek-V3 style: one fp32 scale per block of
// 128 consecutive values in a row, scale = amax / 448 (1 for an all-zero block), q = x / scale
// rounded to nearest and saturated. Dequantisation multiplies back. x and out: [R, H] f32 or bf16
// with H a multiple of 128; q: [R, H] fp8e4m3; scales: [R, H/128] f32.
#pragma once
#include "core/tensor.h"

namespace moe::ops {

constexpr int64_t kFp8Block = 128;

void quantize_fp8(const Tensor& x, const Tensor& q, const Tensor& scales);
void dequantize_fp8(const Tensor& q, const Tensor& scales, const Tensor& out);

void quantize_fp8_cpu(const Tensor& x, const Tensor& q, const Tensor& scales);
void dequantize_fp8_cpu(const Tensor& q, const Tensor& scales, const Tensor& out);
void quantize_fp8_cuda(const Tensor& x, const Tensor& q, const Tensor& scales, void* stream);
void dequantize_fp8_cuda(const Tensor& q, const Tensor& scales, const Tensor& out, void* stream);

}  // namespace moe::ops
