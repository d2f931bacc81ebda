// Mean row entropy of router scores, a routing-confidence metric: each row of scores [T, E] (f32,
// non-negative) is normalised to sum 1 (softmax rows already do; sigmoid rows are renormalised, as
// the balance loss does) and out[0] = mean_t −Σ_e p·ln p, in nats. Rows summing to zero count 0;
// a row with a NaN or infinite score makes the mean NaN (the metric shows it, as the loss would).
// Finite rows whose sum overflows a float are outside the op (scores are probabilities): the CPU
// sums in double, the kernel in float.
#pragma once
#include "core/tensor.h"

namespace moe::ops {

void mean_row_entropy(const Tensor& scores, const Tensor& out);

void mean_row_entropy_cpu(const Tensor& scores, const Tensor& out);
void mean_row_entropy_cuda(const Tensor& scores, const Tensor& out, void* stream);

}  // namespace moe::ops
