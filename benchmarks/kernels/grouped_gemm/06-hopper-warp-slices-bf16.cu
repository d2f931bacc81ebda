// Step 06 of the grouped-GEMM ladder (v6, f7fa1f0; the bf16 default until 1b34473): bf16 results
// stored through each consumer warp's 16×32 fp32 shared-memory slices (with a 4-stage ring), against
// the hand-off the addon ships for bf16 (case 0). The warp slices remain the addon's way for fp32
// results.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr 06-hopper-warp-slices-bf16.cu -o 06-hopper-warp-slices-bf16
//   ./06-hopper-warp-slices-bf16 [--E 64 --M 32768 --K 7168 --N 2048 --rounds 5 --repeats 20]
//
// NN, NT and TN on the same inputs; each result checked at sampled outputs against the CPU reference
// and in full against case 0, then both timed interleaved over the rounds.
#include "hopper_epilogues.cuh"

using moe::ops::hopper::StoreVia;

int main(int argc, char** argv) {
  const ladder::Args args = ladder::parse_args(argc, argv, 64, 32768, 7168, 2048);
  const ladder::Problem& pr = args.problem;
  ladder::print_problem("06-hopper-warp-slices-bf16", pr);
  CHECK(pr.K % 8 == 0 && pr.N % 8 == 0, "the Hopper kernel needs K and N multiples of 8 (TMA)");
  const ladder::Inputs in = ladder::make_inputs(pr);
  const int32_t* tile_start = ladder::tile_starts(pr, moe::ops::hopper::kTileRows);
  const int sms = ladder::sm_count();
  for (ladder::Mode m : {ladder::Mode::NN, ladder::Mode::NT, ladder::Mode::TN}) {
    ladder::compare<StoreVia::Handoff, StoreVia::WarpSlices, __nv_bfloat16>(m, pr, in, tile_start, sms, args, "case 0: hand-off (shipped for bf16)", "06: warp slices");
  }
  return 0;
}
