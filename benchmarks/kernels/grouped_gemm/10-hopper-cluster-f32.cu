// Step 10 of the grouped-GEMM ladder: dW (TN) with fp32 results on 128×128 tiles handed off whole
// to TMA tensor stores, one CTA per tile (10a: the addon's kernel at 9fa034d) or 2-CTA clusters
// sharing B by TMA multicast (10b), against the warp slices the addon ships for fp32 (case 0); 10c
// and 10d take 10b apart (clusters with each CTA loading all of B, releasing only its own stages or
// both CTAs' as 10b); 10e and 10f are 10b and 10d with the peer's stage released at CTA scope (the
// cluster-scope release is what 10b and 10d lose to: ladder10-b215a4b, mbar_arrive_in). hopper_cluster_f32.cuh
// says why and how. All ran on the H200 (README, results/ladder10-4392a81.txt).
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
// start); then all are timed interleaved over the rounds.
#include "hopper_cluster_f32.cuh"
#include "hopper_epilogues.cuh"

using moe::ops::hopper::StoreVia;

namespace {

using moe::ops::cluster_f32::Pair;

template <int CLUSTER, Pair PAIR = Pair::Multicast>
void run_cluster(const ladder::Problem& pr, const ladder::Inputs& in, float* out, bool accumulate, int sms) {
  const char* failed =
      moe::ops::cluster_f32::run<CLUSTER, PAIR>(in.da, in.dc, in.doffsets, out, pr.M, pr.E, pr.K, pr.N, accumulate, sms, cudaStream_t(0));
  CHECK(failed == nullptr, "cluster %d, pairing %d: %s", CLUSTER, int(PAIR), failed);
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
  using moe::ops::cluster_f32::resident_clusters;
  std::printf("grids: 10a %d CTAs; 10b %d, 10c %d, 10d %d, 10e %d, 10f %d clusters of 2 resident at once (cudaOccupancyMaxActiveClusters)\n",
              resident_clusters<1>(sms), resident_clusters<2, Pair::Multicast>(sms), resident_clusters<2, Pair::OwnLoads>(sms),
              resident_clusters<2, Pair::Lockstep>(sms), resident_clusters<2, Pair::MulticastCtaRelease>(sms),
              resident_clusters<2, Pair::LockstepCtaRelease>(sms));
  const ladder::Mode m = ladder::Mode::TN;
  const size_t n = ladder::out_elems(pr, m);
  // Case 0 (the warp slices), then the variants; variant v writes o[v].
  struct Variant {
    const char* name;
    const char* what;
    void (*run)(const ladder::Problem&, const ladder::Inputs&, float*, bool, int);
  };
  const std::vector<Variant> variants = {
      {"10a", "10a: 128x128 hand-off, one CTA (9fa034d)", run_cluster<1>},
      {"10b", "10b: 128x128 hand-off, 2-CTA multicast of B", run_cluster<2, Pair::Multicast>},
      {"10c", "10c: 2-CTA clusters, own B loads, own release", run_cluster<2, Pair::OwnLoads>},
      {"10d", "10d: 2-CTA clusters, own B loads, both release", run_cluster<2, Pair::Lockstep>},
      {"10e", "10e: 10b, peer released at CTA scope", run_cluster<2, Pair::MulticastCtaRelease>},
      {"10f", "10f: 10d, peer released at CTA scope", run_cluster<2, Pair::LockstepCtaRelease>},
  };
  const size_t cases = variants.size() + 1;
  std::vector<float*> o(cases, nullptr);
  for (auto*& x : o) {
    CHECK_CUDA(cudaMalloc(&x, std::max<size_t>(1, n) * sizeof(float)));
    CHECK_CUDA(cudaMemset(x, 0xFF, n * sizeof(float)));  // NaN
  }
  std::vector<std::function<void()>> runs = {[&] { moe::ops::hopper::run<StoreVia::WarpSlices, float>(m, pr, in, tile_start, o[0], sms); }};
  for (size_t v = 0; v < variants.size(); ++v) runs.push_back([&, v] { variants[v].run(pr, in, o[v + 1], false, sms); });
  for (auto& r : runs) r();
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<std::vector<float>> res;
  for (auto* x : o) res.push_back(ladder::to_host_floats(x, n));
  std::printf("TN, fp32 results (unwritten outputs: case 0 %zu", unwritten(res[0]));
  for (size_t v = 0; v < variants.size(); ++v) std::printf(", %s %zu", variants[v].name, unwritten(res[v + 1]));
  std::printf(")\n");
  for (const auto& r : res) CHECK(unwritten(r) == 0, "outputs left unwritten");

  // Accumulate: start = case 0's product + 1, so out must be 2·product + 1 (groups of no rows: 1).
  std::vector<float> start(n), want(n);
  for (size_t i = 0; i < n; ++i) start[i] = res[0][i] + 1.f, want[i] = 2.f * res[0][i] + 1.f;
  for (size_t v = 0; v < variants.size(); ++v) {
    CHECK_CUDA(cudaMemcpy(o[v + 1], start.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    variants[v].run(pr, in, o[v + 1], true, sms);
    CHECK_CUDA(cudaDeviceSynchronize());
    const double err = ladder::rel_err(ladder::to_host_floats(o[v + 1], n), want);
    std::printf("  accumulate, %s: relative error against start + product %.2e\n", variants[v].name, err);
    CHECK(err < 1e-5, "accumulate wrong");
  }

  const auto ms = ladder::time_interleaved(runs, args.rounds, args.repeats);
  ladder::report("case 0: warp slices (shipped for fp32)", pr, ms[0], ladder::check_against_cpu(pr, in, m, res[0]), 0.0);
  for (size_t v = 0; v < variants.size(); ++v)
    ladder::report(variants[v].what, pr, ms[v + 1], ladder::check_against_cpu(pr, in, m, res[v + 1]), ladder::rel_err(res[v + 1], res[0]));
  for (size_t v = 0; v < variants.size(); ++v) {
    std::vector<double> ratio;
    for (size_t r = 0; r < ms[0].size(); ++r) ratio.push_back(ms[0][r] / ms[v + 1][r]);
    std::sort(ratio.begin(), ratio.end());
    std::printf("  time case 0 / %s per round: median %.3f [%.3f, %.3f] (> 1: faster than the warp slices)\n", variants[v].name,
                ratio[ratio.size() / 2], ratio.front(), ratio.back());
  }
  for (auto* x : o) CHECK_CUDA(cudaFree(x));
  return 0;
}
