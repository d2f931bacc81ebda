// Step 07 of the grouped-GEMM ladder, the part the addon did not keep (3012e8f; opt-in with
// MOE_EP_GG_HOPPER_HANDOFF=1 until issue 15): fp32 results handed to the storer warps in two halves
// of 128 columns (68 KiB each), against the warp slices the addon ships for fp32 (case 0). The
// hand-off itself is the addon's way for bf16 results.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr 07-hopper-handoff-fp32.cu -o 07-hopper-handoff-fp32
//   ./07-hopper-handoff-fp32 [--E 64 --M 32768 --K 7168 --N 2048 --rounds 5 --repeats 20]
//
// NN, NT and TN on the same inputs; each result checked at sampled outputs against the CPU reference
// and in full against case 0, then both timed interleaved over the rounds.
#include "hopper_epilogues.cuh"

using moe::ops::hopper::StoreVia;

int main(int argc, char** argv) {
  const ladder::Args args = ladder::parse_args(argc, argv, 64, 32768, 7168, 2048);
  const ladder::Problem& pr = args.problem;
  ladder::print_problem("07-hopper-handoff-fp32", pr);
  CHECK(pr.K % 8 == 0 && pr.N % 8 == 0, "the Hopper kernel needs K and N multiples of 8 (TMA)");
  const ladder::Inputs in = ladder::make_inputs(pr);
  const int32_t* tile_start = ladder::tile_starts(pr, moe::ops::hopper::kTileRows);
  const int sms = ladder::sm_count();
  for (ladder::Mode m : {ladder::Mode::NN, ladder::Mode::NT, ladder::Mode::TN}) {
    ladder::compare<StoreVia::WarpSlices, StoreVia::Handoff, float>(m, pr, in, tile_start, sms, args, "case 0: warp slices (shipped for fp32)", "07: hand-off in two halves");
  }
  return 0;
}
