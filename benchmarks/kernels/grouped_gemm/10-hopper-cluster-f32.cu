// Step 10 of the grouped-GEMM ladder: dW (TN) with fp32 results on 128×128 tiles handed off whole
// to TMA tensor stores, one CTA per tile (10a: the addon's kernel at 9fa034d) or 2-CTA clusters
// sharing B by TMA multicast (10b), against the warp slices the addon ships for fp32 (case 0).
// hopper_cluster_f32.cuh says why and how. Written in session 9; not yet run on a GPU.
//
//   make 10-hopper-cluster-f32
//   ./10-hopper-cluster-f32 --E 32 --M 32768 --K 7168 --N 4096     # the layer's dW13
//   ./10-hopper-cluster-f32 --E 32 --M 32768 --K 2048 --N 7168     # the layer's dW2
//   ./10-hopper-cluster-f32 ... --ragged 1    # ragged counts (ladder::ragged): empty and sub-k-step groups
//   ./10-hopper-cluster-f32 --E 3 --M 600 --K 200 --N 328 --ragged 1   # an odd m-tile count (2)
//
// Outputs are poisoned (NaN) before the checked run: every element must be written. Each result is
// checked at 2048 sampled outputs against the CPU reference and in full against case 0; then
// accumulate: out = start + product with start = case 0's result + 1 (groups of no rows keep
// start); then the three are timed interleaved over the rounds.
#include "hopper_cluster_f32.cuh"
#include "hopper_epilogues.cuh"

using moe::ops::hopper::StoreVia;

namespace {

template <int CLUSTER> void run_cluster(const ladder::Problem& pr, const ladder::Inputs& in, float* out, bool accumulate, int sms) {
  const char* failed =
      moe::ops::cluster_f32::run<CLUSTER>(in.da, in.dc, in.doffsets, out, pr.M, pr.E, pr.K, pr.N, accumulate, sms, cudaStream_t(0));
  CHECK(failed == nullptr, "cluster %d: %s", CLUSTER, failed);
}

size_t unwritten(const std::vector<float>& r) {
  size_t n = 0;
  for (float v : r) n += std::isnan(v);
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  const bool use_ragged = ladder::take_flag(argc, argv, "--ragged", 0) != 0;  // this program's; the rest: parse_args
  ladder::Args args = ladder::parse_args(argc, argv, 32, 32768, 7168, 4096);
  if (use_ragged) args.problem = ladder::ragged(args.problem);
  const ladder::Problem& pr = args.problem;
  ladder::print_problem("10-hopper-cluster-f32", pr);
  if (use_ragged) ladder::print_counts(pr);
  CHECK(pr.K % 8 == 0 && pr.N % 8 == 0 && pr.M > 0, "the Hopper kernels need K and N multiples of 8 (TMA) and M > 0");
  const ladder::Inputs in = ladder::make_inputs(pr);
  const int32_t* tile_start = ladder::tile_starts(pr, moe::ops::hopper::kTileRows);
  const int sms = ladder::sm_count();
  std::printf("grids: 10a %d CTAs; 10b %d clusters of 2 resident at once (cudaOccupancyMaxActiveClusters)\n",
              moe::ops::cluster_f32::resident_clusters<1>(sms), moe::ops::cluster_f32::resident_clusters<2>(sms));
  const ladder::Mode m = ladder::Mode::TN;
  const size_t n = ladder::out_elems(pr, m);
  float* o[3] = {nullptr, nullptr, nullptr};
  for (auto*& x : o) {
    CHECK_CUDA(cudaMalloc(&x, std::max<size_t>(1, n) * sizeof(float)));
    CHECK_CUDA(cudaMemset(x, 0xFF, n * sizeof(float)));  // NaN
  }
  auto case0 = [&] { moe::ops::hopper::run<StoreVia::WarpSlices, float>(m, pr, in, tile_start, o[0], sms); };
  auto one = [&] { run_cluster<1>(pr, in, o[1], false, sms); };
  auto pair = [&] { run_cluster<2>(pr, in, o[2], false, sms); };
  case0();
  one();
  pair();
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> r0 = ladder::to_host_floats(o[0], n), r1 = ladder::to_host_floats(o[1], n), r2 = ladder::to_host_floats(o[2], n);
  std::printf("TN, fp32 results (unwritten outputs: case 0 %zu, 10a %zu, 10b %zu)\n", unwritten(r0), unwritten(r1), unwritten(r2));
  CHECK(unwritten(r0) == 0 && unwritten(r1) == 0 && unwritten(r2) == 0, "outputs left unwritten");

  // Accumulate: start = case 0's product + 1, so out must be 2·product + 1 (groups of no rows: 1).
  std::vector<float> start(n), want(n);
  for (size_t i = 0; i < n; ++i) start[i] = r0[i] + 1.f, want[i] = 2.f * r0[i] + 1.f;
  for (int c = 1; c <= 2; ++c) {
    CHECK_CUDA(cudaMemcpy(o[c], start.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    if (c == 1) run_cluster<1>(pr, in, o[c], true, sms);
    else run_cluster<2>(pr, in, o[c], true, sms);
    CHECK_CUDA(cudaDeviceSynchronize());
    const double err = ladder::rel_err(ladder::to_host_floats(o[c], n), want);
    std::printf("  accumulate, %s: relative error against start + product %.2e\n", c == 1 ? "10a" : "10b", err);
    CHECK(err < 1e-5, "accumulate wrong");
  }

  const auto ms = ladder::time_interleaved({case0, one, pair}, args.rounds, args.repeats);
  ladder::report("case 0: warp slices (shipped for fp32)", pr, ms[0], ladder::check_against_cpu(pr, in, m, r0), 0.0);
  ladder::report("10a: 128x128 hand-off, one CTA (9fa034d)", pr, ms[1], ladder::check_against_cpu(pr, in, m, r1), ladder::rel_err(r1, r0));
  ladder::report("10b: 128x128 hand-off, 2-CTA multicast of B", pr, ms[2], ladder::check_against_cpu(pr, in, m, r2),
                 ladder::rel_err(r2, r0));
  for (int c = 1; c <= 2; ++c) {
    std::vector<double> ratio;
    for (size_t r = 0; r < ms[0].size(); ++r) ratio.push_back(ms[0][r] / ms[c][r]);
    std::sort(ratio.begin(), ratio.end());
    std::printf("  time case 0 / %s per round: median %.3f [%.3f, %.3f] (> 1: faster than the warp slices)\n", c == 1 ? "10a" : "10b",
                ratio[ratio.size() / 2], ratio.front(), ratio.back());
  }
  for (auto* x : o) CHECK_CUDA(cudaFree(x));
  return 0;
}
