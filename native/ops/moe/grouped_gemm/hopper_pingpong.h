// The ping-pong Hopper grouped GEMM for fp32 results (hopper_pingpong.cuh): each consumer warpgroup
// owns a whole 128×128 tile and stores it while the other computes the next. Built with hopper.cu
// (sm_90a, MOE_EP_WITH_HOPPER); chosen by grouped_gemm.cc when groupedGemm.pingpong is on.
#pragma once
#include <cstdint>

#include "ops/moe/grouped_gemm/grouped_gemm.h"

namespace moe::ops {

// Whether the ping-pong kernel can run this launch: what the Hopper kernel needs
// (grouped_gemm_hopper_fits), the plain Store epilogue and fp32 results (accumulating or not).
bool grouped_gemm_pingpong_fits(const GroupedGemm& g);

// tile_start (NN, NT): [E+1] device prefix of ceil(rows_e / 128), as for grouped_gemm_hopper; TN
// needs none.
void grouped_gemm_hopper_pingpong(const GroupedGemm& g, const int32_t* tile_start, void* stream);

}  // namespace moe::ops
