// dW (TN) of one group whose output has few tiles: the router's weight gradient dWr = xᵀ·dLogits
// ([H, E] summed over T tokens; E ≤ 256 columns). The tile kernels give such a product one block per
// 128×256 output tile (56 blocks on 132 SMs at H = 7168, E = 32; 16 at the fine layer's H = 2048,
// E = 128), each walking all T rows. Split into row ranges, it is a grouped GEMM of `splits` groups
// (one fp32 partial [K, N] each, on whichever kernel grouped_gemm.cc picks for that), and the
// partials are added in split order by a finishing kernel: the same bits on every run. Whether and
// how far a call splits is grouped_gemm.cc's business (row_splits).
#pragma once

#include "ops/moe/grouped_gemm/grouped_gemm.h"

namespace moe::ops {

// Split boundaries are multiples of this many rows (the dW kernels' k-tile), so no split but the
// last ends inside a k-tile.
constexpr int64_t SPLIT_ROWS_ALIGN = 64;

// offsets [splits + 1] i32 (device): the group's rows [offsets[0], offsets[1]) of `group_offsets`
// ([2] i32, read on the device and clamped into [0, rows]) cut into `splits` ranges, the cuts
// rounded down to SPLIT_ROWS_ALIGN rows from the group's start.
void split_row_offsets(const Tensor& group_offsets, int64_t rows, const Tensor& offsets, void* stream);

// out[K, N] (f32, viewed as `count` floats) = Σ_s partial[s] in split order, plus out when
// accumulate. partial [splits, K, N] f32; count a multiple of 4, both 16-byte aligned.
void sum_row_splits(const Tensor& partial, int splits, const Tensor& out, bool accumulate, void* stream);

}  // namespace moe::ops
