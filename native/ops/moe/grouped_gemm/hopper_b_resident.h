// dW (TN, bf16 results) for few rows per group on Hopper: the group's dC slice resident in shared
// memory, the tiles stored by TMA tensor stores (hopper_b_resident.cu). Built with the Hopper kernel
// (MOE_EP_WITH_HOPPER); grouped_gemm.cc chooses it.
#pragma once
#include "ops/moe/grouped_gemm/grouped_gemm.h"

namespace moe::ops {

// The average rows per group up to which grouped_gemm.cc takes this kernel: a group of at most 128
// rows (two k-steps) loads its B slice once; larger ones (a skewed routing) stream theirs.
constexpr int64_t B_RESIDENT_MAX_AVERAGE_ROWS = 128;

// Whether it can run this launch: TN, the Store epilogue, bf16 results overwritten (not
// accumulated), and whatever the Hopper kernel needs (grouped_gemm_hopper_fits: the device, TMA's
// 16-byte pitches and alignment).
bool grouped_gemm_b_resident_fits(const GroupedGemm& g);
// Writes every dW_e (groups of no rows: zeros).
void grouped_gemm_b_resident(const GroupedGemm& g, void* stream);

}  // namespace moe::ops
