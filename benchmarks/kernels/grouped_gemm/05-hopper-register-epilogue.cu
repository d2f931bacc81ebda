// Step 05 of the grouped-GEMM ladder (v5, 8f53295, the default until f7fa1f0): the Hopper kernel's
// Store epilogue straight from the consumers' registers (4- and 8-byte stores), against what the
// addon ships: the hand-off for bf16 results, the warp slices for fp32 ones (case 0).
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr 05-hopper-register-epilogue.cu -o 05-hopper-register-epilogue
//   ./05-hopper-register-epilogue [--E 64 --M 32768 --K 7168 --N 2048 --rounds 5 --repeats 20]
//
// NN, NT and TN on the same inputs; each result checked at sampled outputs against the CPU reference
// and in full against case 0, then both timed interleaved over the rounds.
#include "hopper_epilogues.cuh"

using moe::ops::hopper::StoreVia;

int main(int argc, char** argv) {
  const ladder::Args args = ladder::parse_args(argc, argv, 64, 32768, 7168, 2048);
  const ladder::Problem& pr = args.problem;
  ladder::print_problem("05-hopper-register-epilogue", pr);
  CHECK(pr.K % 8 == 0 && pr.N % 8 == 0, "the Hopper kernel needs K and N multiples of 8 (TMA)");
  const ladder::Inputs in = ladder::make_inputs(pr);
  const int32_t* tile_start = ladder::tile_starts(pr, moe::ops::hopper::kTileRows);
  const int sms = ladder::sm_count();
  for (ladder::Mode m : {ladder::Mode::NN, ladder::Mode::NT, ladder::Mode::TN}) {
    ladder::compare<StoreVia::Handoff, StoreVia::Registers, __nv_bfloat16>(m, pr, in, tile_start, sms, args, "case 0: hand-off (shipped for bf16)", "05: from registers");
    ladder::compare<StoreVia::WarpSlices, StoreVia::Registers, float>(m, pr, in, tile_start, sms, args, "case 0: warp slices (shipped for fp32)", "05: from registers");
  }
  return 0;
}
