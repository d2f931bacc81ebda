// Auxiliary-loss-free load balancing (DeepSeek-V3): after each step, the router's selection bias
// moves toward under-loaded experts:
//   bias[e] += gamma · sign(mean_e'(load[e']) − load[e]),  sign(0) = 0
// bias [E] f32 (updated in place); load [E] i32 or f32 (tokens per expert, already all-reduced
// across ranks by the caller). The comparison is exact: sign(Σ load − E·load[e]), in int64 for
// i32 loads and in double for f32 loads (summed in index order on both backends).
#pragma once
#include "core/tensor.h"

namespace moe::ops {

void balance_bias_update(const Tensor& bias, const Tensor& load, double gamma);

void balance_bias_update_cpu(const Tensor& bias, const Tensor& load, float gamma);
void balance_bias_update_cuda(const Tensor& bias, const Tensor& load, float gamma, void* stream);

}  // namespace moe::ops
