// The forward (NN) grouped GEMM when every group it takes has a handful of rows (decode): the
// weights streamed once, split along K as well as N so that every SM has loads in flight
// (decode.cu). Whether a call takes it is grouped_gemm.cc's business (select_cuda_kernel).
#pragma once
#include <cstdint>

#include "ops/moe/grouped_gemm/grouped_gemm.h"

namespace moe::ops {

// The kernel's row limits: groups of 1..rows rows, rows one of these (tokens in 8-row MMA tiles).
constexpr int DECODE_ROWS[] = {8, 16, 32};
constexpr int DECODE_MAX_ROWS = 32;

// Whether the kernel can run this launch: NN with the Store or SwiGLU epilogue, bf16 operands,
// K even, N a multiple of 8, a 4-byte and b/out/g 16-byte aligned, sizes within its grid.
bool decode_nn_fits(const GroupedGemm& g);

// Computes the groups of 1..max_rows rows (max_rows one of DECODE_ROWS) and leaves the others
// (larger groups, rows outside every group) alone: the caller runs another kernel over the larger
// groups when M > max_rows. Scratch for the split-K partials comes from the caching allocator on
// `stream` (stream-ordered; capturable in a CUDA graph); no host synchronisation.
void decode_nn(const GroupedGemm& g, int max_rows, void* stream);

}  // namespace moe::ops
