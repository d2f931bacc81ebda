// The forward (NN) grouped GEMM with one group and few columns: the router's logits x[T,H]·Wr[H,E]
// (skinny.cu). The tile kernels give it a handful of blocks (one 128×256 tile at T ≤ 128, E ≤ 256);
// this kernel splits K across blocks so that every SM streams x. Whether a call takes it is
// grouped_gemm.cc's business (select_cuda_kernel).
#pragma once

#include "ops/moe/grouped_gemm/grouped_gemm.h"

namespace moe::ops {

// The widest b it takes: N ≤ SKINNY_MAX_N columns.
constexpr int SKINNY_MAX_N = 256;

// Whether the kernel can run this launch: NN, Store (accumulate allowed), one group, bf16 operands,
// K and N multiples of 8 with N ≤ SKINNY_MAX_N, a/b/out 16-byte aligned, sizes within its grid.
bool skinny_nn_fits(const GroupedGemm& g);

// out[rows of the group, N] = a · b[0] (rows outside the group, from offsets on the device, are not
// written). Split-K partial sums (fp32) go to scratch from the caching allocator on `stream` and are
// added by a finishing kernel in a fixed order: the bits do not depend on scheduling. No host
// synchronisation; capturable in a CUDA graph.
void skinny_nn(const GroupedGemm& g, void* stream);

}  // namespace moe::ops
