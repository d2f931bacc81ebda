// dW (TN) when groups have few rows on average (decode), streamed without tensor cores
// (few_rows.cu).
#pragma once
#include "ops/moe/grouped_gemm/grouped_gemm.h"

namespace moe::ops {

// Taken when M ≤ FEW_ROWS_AVERAGE · E (and K, N multiples of 8, 16-byte aligned pointers): every
// group then costs its rows' FMAs per output, at most FEW_ROWS_AVERAGE per output in all.
// MOE_EP_GG_FEW_ROWS=0 turns it off.
constexpr int FEW_ROWS_AVERAGE = 8;

bool few_rows_tn_eligible(const GroupedGemm& g);
// Writes (or adds to) every dW_e.
void few_rows_tn(const GroupedGemm& g, void* stream);

}  // namespace moe::ops
