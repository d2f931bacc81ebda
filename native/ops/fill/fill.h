// fill: every element of `out` set to `value` (converted to out's dtype once, on the host).
#pragma once
#include "core/tensor.h"

namespace moe::ops {

void fill(const Tensor& out, double value);

// The element's bytes, 1, 2, 4 or 8 of them, replicated over the tensor.
void fill_pattern_cpu(void* out, int64_t numel, int64_t elem_size, uint64_t pattern);
void fill_pattern_cuda(void* out, int64_t numel, int64_t elem_size, uint64_t pattern, void* stream);

}  // namespace moe::ops
