// Losses on predictions [T,N] (f32 or bf16; computed in fp32 on the GPU, double in the CPU
// reference). Each writes loss f32[1] and, when `grad` is given, the gradient of the loss with
// respect to the predictions (same dtype and shape as pred; written, not accumulated).
//
// MSE:  loss = mean over all T·N elements of (pred − target)²;  grad = 2·(pred − target)/(T·N).
//       target: the same shape as pred, f32 or bf16.
// Cross-entropy with class targets [T] i32 (a row whose target is `ignore_index` is skipped):
//       count = rows not ignored;  loss = (1/count) Σ_rows −log softmax(pred[t])[target[t]]
//       grad[t] = (softmax(pred[t]) − onehot(target[t]))/count, and 0 on ignored rows.
//       With count == 0: loss 0 and grad 0 (not NaN as in PyTorch: an all-padding batch is not an error).
//       correct i32[1] = rows not ignored whose argmax (ties: the lower class) equals the target.
//       A target outside [0, N) that is not ignore_index: the CPU throws; the GPU (which cannot
//       throw without a host sync) counts the row and gives it loss NaN and a NaN gradient row, so
//       the loss reads NaN.
// The GPU reductions are two-pass (per-block partials, then one block, fixed order): deterministic
// and no host sync.
#pragma once
#include "core/tensor.h"

namespace moe::ops {

void mse_loss(const Tensor& pred, const Tensor& target, const Tensor& loss, const Tensor& grad);
void cross_entropy_loss(const Tensor& pred, const Tensor& target, int64_t ignore_index, const Tensor& loss, const Tensor& grad,
                        const Tensor& correct);

// ---- backends (arguments already checked; grad may be undefined)
void mse_loss_cpu(const Tensor& pred, const Tensor& target, const Tensor& loss, const Tensor& grad);
void cross_entropy_loss_cpu(const Tensor& pred, const Tensor& target, int64_t ignore_index, const Tensor& loss, const Tensor& grad,
                            const Tensor& correct);
void mse_loss_cuda(const Tensor& pred, const Tensor& target, const Tensor& loss, const Tensor& grad, void* stream);
void cross_entropy_loss_cuda(const Tensor& pred, const Tensor& target, int64_t ignore_index, const Tensor& loss, const Tensor& grad,
                             const Tensor& correct, void* stream);

}  // namespace moe::ops
