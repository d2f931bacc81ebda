// fill: every element of `out` set to `value` (converted to out's dtype once, on the host).
// `out` may be a strided view (filling a column of a matrix, say).
#pragma once
#include "core/tensor.h"

namespace moe::ops {

void fill(const Tensor& out, double value);

// The element's bytes, 1, 2, 4 or 8 of them, replicated over the tensor.
void fill_pattern_cpu(const Tensor& out, uint64_t pattern);
void fill_pattern_cuda(const Tensor& out, uint64_t pattern, void* stream);

}  // namespace moe::ops
