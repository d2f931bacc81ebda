// The Hopper (sm_90a) path of the grouped GEMM: TMA loads, wgmma, warp specialisation, a persistent
// grid. Built only when nvcc can target sm_90a (MOE_EP_WITH_HOPPER); chosen at run time on
// compute-capability 9.0 devices for the shapes it takes, the mma.sync kernel otherwise.
#pragma once
#include <cstdint>

#include "ops/moe/grouped_gemm/grouped_gemm.h"

namespace moe::ops {

// Whether the Hopper kernel can run this launch: the device (compute capability 9.0, the sm_90a
// image loaded, the driver's tensor-map encoder found), 16-byte row pitches (K and N multiples of
// 8, as TMA requires), 16-byte aligned pointers, no empty dimension. Whether it is chosen is
// grouped_gemm.cc's business.
bool grouped_gemm_hopper_fits(const GroupedGemm& g);

// tile_start (NN, NT): [E+1] device prefix of ceil(rows_e / 128), the same m-tiles as the mma.sync
// kernel's. TN: null for every group (its work items are known on the host: E × K-tiles × N-tiles),
// or the [E+1] device prefix of the groups to compute, 1 each, 0 for a group to leave alone (the
// large groups beside the B-resident kernel, hopper_b_resident.h).
// trim_tails: TN runs no wgmma on the k16 steps past a group's end (groupedGemm.trimTails; hopper.cu's header).
void grouped_gemm_hopper(const GroupedGemm& g, const int32_t* tile_start, bool trim_tails, void* stream);

}  // namespace moe::ops
