// dW (TN) when groups have few rows on average (decode), streamed without tensor cores
// (few_rows.cu).
#pragma once
#include "ops/moe/grouped_gemm/grouped_gemm.h"

namespace moe::ops {

// Taken (grouped_gemm.cc) when M ≤ FEW_ROWS_AVERAGE · E: every group then costs its rows' FMAs per
// output, at most FEW_ROWS_AVERAGE per output in all.
constexpr int FEW_ROWS_AVERAGE = 8;

// Whether the kernel can run this launch: TN with the Store epilogue, K and N multiples of 8,
// 16-byte aligned pointers, sizes within its grid.
bool few_rows_tn_fits(const GroupedGemm& g);
// Writes (or adds to) every dW_e.
void few_rows_tn(const GroupedGemm& g, void* stream);

}  // namespace moe::ops
