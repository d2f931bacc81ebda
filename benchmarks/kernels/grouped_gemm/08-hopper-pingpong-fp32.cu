// Step 08 of the grouped-GEMM ladder: the ping-pong Hopper kernel for fp32 results
// (hopper_pingpong.cuh; in the addon behind setKernelOptions({ groupedGemm: { pingpong: true } })
// until it measured slower, then moved here unchanged) against the warp slices the addon ships for
// fp32 (case 0). Each consumer warpgroup owns a 128×128 tile and stores it from its
// registers while the other warpgroup's mainloop runs; case 0's two warpgroups share a 128×256
// tile and both stop the tensor cores to store it.
//
//   make 08-hopper-pingpong-fp32
//   ./08-hopper-pingpong-fp32 --E 32 --M 32768 --K 7168 --N 4096     # the layer's dW13
//   ./08-hopper-pingpong-fp32 --E 32 --M 32768 --K 2048 --N 7168     # the layer's dW2
//   ./08-hopper-pingpong-fp32 ... --ragged 1    # ragged counts with empty and sub-k-step groups
//   ./08-hopper-pingpong-fp32 ... --modes 7     # bit mask: 1 TN (default), 2 NN, 4 NT
//
// Outputs are poisoned (NaN) before the checked run: every element must be written. Each result is
// checked at 2048 sampled outputs against the CPU reference and in full against case 0, then both
// are timed interleaved over the rounds (A B / B A).
#include "hopper_epilogues.cuh"
#include "hopper_pingpong.cuh"

using moe::ops::hopper::StoreVia;

namespace {

void run_pingpong(ladder::Mode m, const ladder::Problem& pr, const ladder::Inputs& in, const int32_t* tile_start, float* out, int sms) {
  namespace pp = moe::ops::pingpong;
  pp::Problem q{};
  q.mode = m == ladder::Mode::TN ? pp::Mode::TN : m == ladder::Mode::NT ? pp::Mode::NT : pp::Mode::NN;
  q.a = m == ladder::Mode::NT ? static_cast<const void*>(in.dc) : in.da;
  q.b = m == ladder::Mode::TN ? static_cast<const void*>(in.dc) : in.db;
  q.offsets = in.doffsets;
  q.tile_start = tile_start;
  q.out = out;
  q.M = pr.M, q.E = pr.E, q.K = pr.K, q.N = pr.N;
  q.accumulate = false;
  const char* failed = pp::run(q, sms, 0);
  CHECK(failed == nullptr, "%s", failed);
}

void compare(ladder::Mode m, const ladder::Problem& pr, const ladder::Inputs& in, const int32_t* tile_start, int sms,
             const ladder::Args& args) {
  using moe::ops::hopper::run;
  const size_t n = ladder::out_elems(pr, m);
  float *o0 = nullptr, *o1 = nullptr;
  CHECK_CUDA(cudaMalloc(&o0, std::max<size_t>(1, n) * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&o1, std::max<size_t>(1, n) * sizeof(float)));
  CHECK_CUDA(cudaMemset(o0, 0xFF, n * sizeof(float)));  // NaN
  CHECK_CUDA(cudaMemset(o1, 0xFF, n * sizeof(float)));
  run<StoreVia::WarpSlices, float>(m, pr, in, tile_start, o0, sms);
  CHECK_CUDA(cudaGetLastError());
  run_pingpong(m, pr, in, tile_start, o1, sms);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> r0 = ladder::to_host_floats(o0, n), r1 = ladder::to_host_floats(o1, n);
  // NN/NT: rows outside every group are not written by either; elsewhere every element must be.
  size_t unwritten0 = 0, unwritten1 = 0;
  const size_t row_len = m == ladder::Mode::NT ? size_t(pr.K) : size_t(pr.N);
  for (size_t i = 0; i < n; ++i) {
    const bool outside = m != ladder::Mode::TN && int(i / row_len) >= pr.offsets[pr.E];
    if (outside) {
      r0[i] = r1[i] = 0.f;
      continue;
    }
    unwritten0 += std::isnan(r0[i]);
    unwritten1 += std::isnan(r1[i]);
  }
  const auto ms = ladder::time_interleaved(
      {[&] { run<StoreVia::WarpSlices, float>(m, pr, in, tile_start, o0, sms); }, [&] { run_pingpong(m, pr, in, tile_start, o1, sms); }},
      args.rounds, args.repeats);
  std::printf("%s, fp32 results (unwritten outputs: case 0 %zu, 08 %zu)\n", ladder::mode_name(m), unwritten0, unwritten1);
  ladder::report("case 0: warp slices (shipped for fp32)", pr, ms[0], ladder::check_against_cpu(pr, in, m, r0), 0.0);
  ladder::report("08: ping-pong, 128x128 per warpgroup", pr, ms[1], ladder::check_against_cpu(pr, in, m, r1), ladder::rel_err(r1, r0));
  std::vector<double> ratio;
  for (size_t r = 0; r < ms[0].size(); ++r) ratio.push_back(ms[0][r] / ms[1][r]);
  std::sort(ratio.begin(), ratio.end());
  std::printf("  time case 0 / 08 per round: median %.3f [%.3f, %.3f] (> 1: ping-pong faster)\n", ratio[ratio.size() / 2], ratio.front(),
              ratio.back());
  CHECK(unwritten0 == 0 && unwritten1 == 0, "outputs left unwritten");
  CHECK_CUDA(cudaFree(o0));
  CHECK_CUDA(cudaFree(o1));
}

}  // namespace

int main(int argc, char** argv) {
  // --ragged and --modes are this program's; the rest go to ladder::parse_args.
  const bool use_ragged = ladder::take_flag(argc, argv, "--ragged", 0) != 0;
  const int modes = ladder::take_flag(argc, argv, "--modes", 1);
  ladder::Args args = ladder::parse_args(argc, argv, 32, 32768, 7168, 4096);
  if (use_ragged) args.problem = ladder::ragged(args.problem);
  const ladder::Problem& pr = args.problem;
  ladder::print_problem("08-hopper-pingpong-fp32", pr);
  if (use_ragged) ladder::print_counts(pr);
  CHECK(pr.K % 8 == 0 && pr.N % 8 == 0 && pr.M > 0, "the Hopper kernels need K and N multiples of 8 (TMA) and M > 0");
  const ladder::Inputs in = ladder::make_inputs(pr);
  const int32_t* tile_start = ladder::tile_starts(pr, moe::ops::hopper::kTileRows);
  static_assert(moe::ops::hopper::kTileRows == moe::ops::pingpong::BM, "both kernels walk 128-row m-tiles");
  const int sms = ladder::sm_count();
  if (modes & 1) compare(ladder::Mode::TN, pr, in, tile_start, sms, args);
  if (modes & 2) compare(ladder::Mode::NN, pr, in, tile_start, sms, args);
  if (modes & 4) compare(ladder::Mode::NT, pr, in, tile_start, sms, args);
  return 0;
}
