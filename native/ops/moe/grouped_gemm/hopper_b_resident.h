// dW (TN, bf16 results) for few rows per group on Hopper: the group's dC slice resident in shared
// memory, the tiles stored by TMA tensor stores (hopper_b_resident.cu). Built with the Hopper kernel
// (MOE_EP_WITH_HOPPER); grouped_gemm.cc chooses it.
#pragma once
#include "ops/moe/grouped_gemm/grouped_gemm.h"

namespace moe::ops {

// The average rows per group up to which grouped_gemm.cc takes this kernel.
constexpr int64_t B_RESIDENT_MAX_AVERAGE_ROWS = 128;
// The groups it computes: those of at most this many rows (two k-steps: the B slice of an n-tile
// fits in shared memory). The larger ones of a skewed routing are hopper.cu's kernel's, launched
// after it over those groups alone (grouped_gemm_cuda).
constexpr int B_RESIDENT_MAX_GROUP_ROWS = 128;

// Whether it can run this launch: TN, the Store epilogue, bf16 results overwritten (not
// accumulated), and whatever the Hopper kernel needs (grouped_gemm_hopper_fits: the device, TMA's
// 16-byte pitches and alignment).
bool grouped_gemm_b_resident_fits(const GroupedGemm& g);
// Writes dW_e of every group of at most B_RESIDENT_MAX_GROUP_ROWS rows (groups of no rows: zeros)
// and leaves the others' untouched.
void grouped_gemm_b_resident(const GroupedGemm& g, void* stream);

}  // namespace moe::ops
