// dW (TN) for groups of at most FEW_ROWS_MAX rows, streamed without tensor cores (few_rows.cu).
#pragma once
#include "ops/grouped_gemm/grouped_gemm.h"

namespace moe::ops {

// Groups up to this many rows are the few-rows kernel's; larger ones the tensor-core kernel's.
constexpr int FEW_ROWS_MAX = 8;
// Taken when M ≤ FEW_ROWS_AVERAGE · E (and K, N multiples of 8, 16-byte aligned pointers).
// MOE_EP_GG_FEW_ROWS=0 turns it off.
constexpr int FEW_ROWS_AVERAGE = 8;

bool few_rows_tn_eligible(const GroupedGemm& g);
// Writes (or adds to) dW_e for every group of at most FEW_ROWS_MAX rows; leaves the others alone.
void few_rows_tn(const GroupedGemm& g, void* stream);

}  // namespace moe::ops
