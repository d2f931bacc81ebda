// Step 11 of the grouped-GEMM ladder: dW (TN, bf16 results) for groups of at most 128 rows with the
// group's B slice resident in shared memory (hopper_b_resident.cuh says why and how), against the
// addon's Hopper TN kernel with the hand-off (case 0: hopper_epilogues.cuh, 31c19a6's device code; the
// addon's later bulk-copy drain measured level with it on this shape, grouped-gemm.md v10) and a
// device copy timed in the same rounds (the DRAM roof). Written in session 11, first run in session 12;
// the tensor-store drains 11t and 11t2 (hopper_b_resident.cuh: Drain) compiled in session 12, not yet run.
//
//   make 11-hopper-b-resident-dw
//   ./11-hopper-b-resident-dw                          # E=256 M=32768 K=7168 N=2048: 128 rows a group
//   ./11-hopper-b-resident-dw --ragged 1               # counts of 0-128 rows (empty, sub-k-step, ragged)
//   ./11-hopper-b-resident-dw --E 5 --M 500 --K 200 --N 328 --ragged 1   # partial m- and n-tiles (run first)
//   ./11-hopper-b-resident-dw --E 7 --M 500 --K 136 --N 264 --ragged 1   # an A box wholly past K
//
// Outputs are poisoned (NaN) before the checked run: every element must be written. Each result is
// checked at 2048 sampled outputs against the CPU reference and in full against case 0 (the same
// k order, so the same bits are expected: the count of differing outputs is printed, and the
// report's "vs case 0" is nan when any differs); then case 0, step 11 and the copy are timed
// interleaved. Case 0 drains its tiles with ld.shared/st.global, step 11 with the bulk-copy engine
// (the addon's drain since v10, measured level with the other on this shape): the comparison is B
// residency plus that drain. Every wait of step 11 is bounded (hopper_b_resident.cuh).
// The roof: the bytes of dW (E·K·N bf16) at the copy's bandwidth (2 × 1 GiB moved per copy), as
// benchmarks/grouped-gemm.bench.mjs counts it; beside it the write roof, a cudaMemset of dW's bytes
// (session 12: the first run had step 11 at 0.58 of the copy roof with DRAM at 60% in ncu).
#include <functional>

#include "hopper_b_resident.cuh"

namespace {

// Ragged counts of at most 128 rows: every 7th group empty, every 5th under one k-step (1-63 rows),
// the rest 64-128 rows; M becomes their sum.
ladder::Problem ragged_short(const ladder::Problem& b) {
  ladder::Problem p = b;
  p.offsets.assign(p.E + 1, 0);
  for (int e = 0; e < p.E; ++e) {
    const int rows = e % 7 == 3 ? 0 : e % 5 == 2 ? 1 + (e * 13) % 63 : 64 + (e * 7919) % 65;
    p.offsets[e + 1] = p.offsets[e] + rows;
  }
  p.M = p.offsets[p.E];
  return p;
}

// The inputs of the TN product only (a and c; ladder::make_inputs also draws the [E, K, N] weights,
// 7.5 GB at the default shape, which TN never reads).
ladder::Inputs make_tn_inputs(const ladder::Problem& p) {
  ladder::Inputs in;
  in.a = ladder::random_bf16(size_t(p.M) * p.K, 1, 1.f);
  in.c = ladder::random_bf16(size_t(p.M) * p.N, 3, 1.f);
  in.da = ladder::to_device(in.a);
  in.dc = ladder::to_device(in.c);
  in.doffsets = ladder::to_device(std::vector<int32_t>(p.offsets.begin(), p.offsets.end()));
  return in;
}

// The results stay raw bf16 on the host (dW has 3.76e9 elements at the default shape: floats would
// take 15 GB each): NaNs (the poison, never written) and differing bits are counted in one pass.
std::vector<uint16_t> raw_bf16(const __nv_bfloat16* d, size_t n) {
  std::vector<uint16_t> h(n);
  CHECK_CUDA(cudaMemcpy(h.data(), d, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
  return h;
}
bool is_nan_bf16(uint16_t v) { return (v & 0x7F80) == 0x7F80 && (v & 0x7F) != 0; }
float bf16_value(uint16_t v) {
  const uint32_t w = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &w, 4);
  return f;
}
// ‖got − ref‖ / ‖ref‖ at 2048 pseudo-random outputs against the CPU reference (ladder::check_against_cpu's
// sample, read from raw bf16).
double sampled_err(const ladder::Problem& p, const ladder::Inputs& in, const std::vector<uint16_t>& got) {
  const size_t rows = size_t(p.E) * p.K;
  double num = 0, den = 0;
  uint64_t s = 12345;
  for (int t = 0; t < 2048; ++t) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const size_t i = (s >> 33) % rows;
    const int j = int((s >> 13) % uint64_t(p.N));
    const double ref = ladder::reference_at(p, in, ladder::Mode::TN, i, j), d = double(bf16_value(got[i * p.N + j])) - ref;
    num += d * d;
    den += ref * ref;
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const bool use_ragged = ladder::take_flag(argc, argv, "--ragged", 0) != 0;
  ladder::Args args = ladder::parse_args(argc, argv, 256, 32768, 7168, 2048);
  if (use_ragged) args.problem = ragged_short(args.problem);
  const ladder::Problem& pr = args.problem;
  ladder::print_problem("11-hopper-b-resident-dw", pr);
  if (use_ragged) ladder::print_counts(pr);
  CHECK(pr.K % 8 == 0 && pr.N % 8 == 0 && pr.M > 0, "the Hopper kernels need K and N multiples of 8 (TMA) and M > 0");
  const ladder::Inputs in = make_tn_inputs(pr);
  const int32_t* tile_start = ladder::tile_starts(pr, moe::ops::hopper::kTileRows);
  const int sms = ladder::sm_count();
  const ladder::Mode m = ladder::Mode::TN;
  const size_t n = ladder::out_elems(pr, m);
  // Case 0, then step 11 with each drain (hopper_b_resident.cuh: Drain); kernel c writes o[c].
  using moe::ops::hopper::StoreVia;
  namespace br = moe::ops::hopper::b_resident;
  struct Kernel {
    const char* name;
    const char* what;
    std::function<void(__nv_bfloat16*)> run;
  };
  const std::vector<Kernel> kernels = {
      {"case 0", "case 0: the addon's TN kernel, hand-off",
       [&](__nv_bfloat16* out) { moe::ops::hopper::run<StoreVia::Handoff, __nv_bfloat16>(m, pr, in, tile_start, out, sms); }},
      {"11", "11: B resident, rows by cp.async.bulk", [&](__nv_bfloat16* out) { br::run<br::Probe::None, br::Drain::RowCopies>(pr, in, out, sms); }},
      {"11t", "11t: tensor stores, one buffer", [&](__nv_bfloat16* out) { br::run<br::Probe::None, br::Drain::TensorStores>(pr, in, out, sms); }},
      {"11t2", "11t2: tensor stores, two buffers", [&](__nv_bfloat16* out) { br::run<br::Probe::None, br::Drain::TensorStores2>(pr, in, out, sms); }},
  };
  const size_t K_COUNT = kernels.size();
  std::vector<__nv_bfloat16*> o(K_COUNT, nullptr);
  for (auto*& x : o) {
    CHECK_CUDA(cudaMalloc(&x, std::max<size_t>(1, n) * sizeof(__nv_bfloat16)));
    CHECK_CUDA(cudaMemset(x, 0xFF, n * sizeof(__nv_bfloat16)));  // NaN
  }
  for (size_t c = 0; c < K_COUNT; ++c) kernels[c].run(o[c]);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<uint16_t> r0 = raw_bf16(o[0], n);
  std::vector<double> err(K_COUNT), vs0(K_COUNT);
  std::printf("TN, bf16 results (same operands and k order as case 0: 0 outputs differing expected)\n");
  for (size_t c = 0; c < K_COUNT; ++c) {
    const std::vector<uint16_t> rc = c == 0 ? r0 : raw_bf16(o[c], n);
    size_t nans = 0, differ = 0;
    for (size_t i = 0; i < n; ++i) {
      nans += is_nan_bf16(rc[i]);
      differ += rc[i] != r0[i];
    }
    std::printf("  %s: %zu unwritten, %zu of %zu differ from case 0\n", kernels[c].name, nans, differ, n);
    CHECK(nans == 0, "outputs left unwritten");
    err[c] = sampled_err(pr, in, rc);
    vs0[c] = differ ? std::nan("") : 0.0;
  }

  // The roof's copy: 1 GiB device to device (its own buffers).
  const size_t copy_bytes = size_t(1) << 30;
  void *src = nullptr, *dst = nullptr;
  CHECK_CUDA(cudaMalloc(&src, copy_bytes));
  CHECK_CUDA(cudaMalloc(&dst, copy_bytes));
  CHECK_CUDA(cudaMemset(src, 1, copy_bytes));
  // The write roof: dW's own bytes written by cudaMemset (into step 11's output, checked already).
  // dW here is nearly all writes (7.5 GB out, ~0.5 GB of operands in), so this is the product's
  // tighter roof; the copy's read + write rate stays the benchmark's roof (grouped-gemm.bench.mjs).
  // Then the probes (hopper_b_resident.cuh: their outputs are not the product, so they run after the checks).
  std::vector<std::function<void()>> runs;
  for (size_t c = 0; c < K_COUNT; ++c) runs.push_back([&, c] { kernels[c].run(o[c]); });
  const size_t COPY = runs.size(), FILL = COPY + 1, PROBES = COPY + 2;
  runs.push_back([&] { CHECK_CUDA(cudaMemcpyAsync(dst, src, copy_bytes, cudaMemcpyDeviceToDevice)); });
  runs.push_back([&] { CHECK_CUDA(cudaMemsetAsync(o[1], 0, n * 2)); });
  runs.push_back([&] { br::run<br::Probe::NoMma, br::Drain::RowCopies>(pr, in, o[1], sms); });
  runs.push_back([&] { br::run<br::Probe::NoStore, br::Drain::RowCopies>(pr, in, o[1], sms); });
  runs.push_back([&] { br::run<br::Probe::NoMma, br::Drain::TensorStores2>(pr, in, o[1], sms); });
  const char* probe_names[3] = {"11 without the wgmma (loads, hand-off, stores)", "11 without the stores (loads, wgmma, hand-off)",
                                "11t2 without the wgmma"};

  const auto ms = ladder::time_interleaved(runs, args.rounds, args.repeats);
  for (size_t c = 0; c < K_COUNT; ++c) ladder::report(kernels[c].what, pr, ms[c], err[c], vs0[c]);
  const double copy_bw = 2.0 * double(copy_bytes) / (median(ms[COPY]) * 1e-3);  // bytes/s, read + write
  const double roof_ms = double(n) * 2 / copy_bw * 1e3;
  std::printf("  device copy of 1 GiB: %.3f ms (%.0f GB/s read + write); dW's %.2f GB at that rate: %.3f ms\n", median(ms[COPY]),
              copy_bw / 1e9, double(n) * 2 / 1e9, roof_ms);
  std::printf("  cudaMemset of dW's %.2f GB: %.3f ms (%.0f GB/s written)\n", double(n) * 2 / 1e9, median(ms[FILL]),
              double(n) * 2 / (median(ms[FILL]) * 1e-3) / 1e9);
  for (size_t c = PROBES; c < runs.size(); ++c) {
    std::vector<double> v = ms[c];
    std::sort(v.begin(), v.end());
    std::printf("  probe, %s: %.3f ms [%.3f, %.3f]\n", probe_names[c - PROBES], v[v.size() / 2], v.front(), v.back());
  }
  for (size_t c = 0; c < K_COUNT; ++c) {
    std::vector<double> share, ratio, fill_share;
    for (size_t r = 0; r < ms[c].size(); ++r) {
      const double bw = 2.0 * double(copy_bytes) / (ms[COPY][r] * 1e-3);
      share.push_back(double(n) * 2 / bw * 1e3 / ms[c][r]);
      ratio.push_back(ms[0][r] / ms[c][r]);
      fill_share.push_back(ms[FILL][r] / ms[c][r]);
    }
    std::sort(share.begin(), share.end());
    std::sort(ratio.begin(), ratio.end());
    std::sort(fill_share.begin(), fill_share.end());
    std::printf("  %s: share of the roof per round %.3f [%.3f, %.3f]", kernels[c].name, share[share.size() / 2], share.front(), share.back());
    if (c > 0)
      std::printf("; time case 0 / %s per round %.3f [%.3f, %.3f] (> 1: faster)", kernels[c].name, ratio[ratio.size() / 2], ratio.front(),
                  ratio.back());
    std::printf("; time of the memset / this per round %.3f [%.3f, %.3f]\n", fill_share[fill_share.size() / 2], fill_share.front(),
                fill_share.back());
  }
  for (auto* x : o) CHECK_CUDA(cudaFree(x));
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));
  return 0;
}
