// Step 13 of the grouped-GEMM ladder (session 18): the permute fused into the up projection's loads.
// The layer's forward writes x's routed rows into a permuted [M, K] matrix (the permute: 470 MB
// written and read again at the main layer's shape) before the up GEMM reads it. Here the NN
// hand-off kernel reads A's rows from x itself: the producer warp gathers row r of the product
// from x[rows[r]] with cp.async in 16-byte chunks into the 128-byte swizzle (TMA cannot gather on
// Hopper), the stage completing on the lanes' cp.async arrivals beside B's TMA bytes
// (StoreVia::HandoffGatherA in hopper_epilogues.cuh). Issue 20 asks for it: "rows gathered by the
// first GEMM's loads (no materialised permute)". What it would save is the permute's traffic; what
// it may cost is the gather's issue rate (32 16-byte copies a lane a stage) and, at the power limit,
// energy.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I../../../native 13-hopper-gather-a.cu -o 13-hopper-gather-a
//   ./13-hopper-gather-a [--E 32 --M 32768 --K 7168 --N 4096 --top-k 8 --rounds 5 --repeats 20] [--ragged 1] [--soak-ms N]
//
// x has T = M / top-k rows; row r of the product is x[rows[r]], rows drawn at random (each token
// about top-k times), every 97th a padding row (-1: zeros, as the permute's padding). Case 0 is the
// addon's NN hand-off on the permuted matrix (built on the host from x and rows), so both compute
// the same product: checked against the CPU at sampled outputs and against each other in full
// (equal bit for bit). Then, interleaved over the rounds: the permute (a row-gather copy kernel,
// x[rows[r]] to rows r, as the addon's permuteRows writes it) followed by case 0, against the
// gathered kernel alone: the comparison the fusion is for. Exits 1 when the gathered results are not
// case 0's bit for bit or stray from the CPU reference (1e-2 in norm at sampled outputs).
#include <type_traits>

#include "hopper_epilogues.cuh"

using moe::ops::hopper::StoreVia;

namespace {

// The permute's copy: one warp per destination row, 16-byte pieces (K % 8 == 0); -1: a zero row.
__global__ void gather_rows_kernel(const __nv_bfloat16* __restrict__ x, const int32_t* __restrict__ rows, int M, int K,
                                   __nv_bfloat16* __restrict__ out) {
  const int warp = int((blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = int(threadIdx.x & 31);
  if (warp >= M) return;
  const int token = rows[warp];
  uint4* dst = reinterpret_cast<uint4*>(out + size_t(warp) * K);
  const uint4* src = reinterpret_cast<const uint4*>(x + size_t(token < 0 ? 0 : token) * K);
  for (int c = lane; c < K / 8; c += 32) dst[c] = token < 0 ? make_uint4(0, 0, 0, 0) : src[c];
}

}  // namespace

int main(int argc, char** argv) {
  const bool use_ragged = ladder::take_flag(argc, argv, "--ragged", 0) != 0;
  const int top_k = ladder::take_flag(argc, argv, "--top-k", 8);
  const int soak_ms = ladder::take_flag(argc, argv, "--soak-ms", 0);
  const int completion = ladder::take_flag(argc, argv, "--completion", 1);  // the form checked and soaked first
  ladder::Args args = ladder::parse_args(argc, argv, 32, 32768, 7168, 4096);
  if (use_ragged) args.problem = ladder::ragged(args.problem);
  const ladder::Problem& pr = args.problem;
  ladder::print_problem("13-hopper-gather-a", pr);
  if (use_ragged) ladder::print_counts(pr);
  CHECK(pr.K % 8 == 0 && pr.N % 8 == 0 && pr.M > 0, "the Hopper kernel needs K and N multiples of 8 (TMA) and M > 0");
  CHECK(top_k >= 1, "--top-k must be at least 1");
  ladder::Inputs in = ladder::make_inputs(pr);

  // x [T, K] and rows [M]; A (case 0's input, and the CPU reference's) = x[rows], zero rows for -1.
  const int T = std::max(1, pr.M / top_k);
  const std::vector<__nv_bfloat16> x = ladder::random_bf16(size_t(T) * pr.K, 4, 1.f);
  std::vector<int32_t> rows(pr.M);
  uint64_t state = 0x9e3779b97f4a7c15ull;
  for (int r = 0; r < pr.M; ++r) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    rows[r] = r % 97 == 96 ? -1 : int((state >> 33) % uint64_t(T));
  }
  const __nv_bfloat16 zero = __float2bfloat16(0.f);
  for (int r = 0; r < pr.M; ++r)
    for (int k = 0; k < pr.K; ++k) in.a[size_t(r) * pr.K + k] = rows[r] < 0 ? zero : x[size_t(rows[r]) * pr.K + k];
  CHECK_CUDA(cudaMemcpy(in.da, in.a.data(), in.a.size() * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  __nv_bfloat16* dx = ladder::to_device(x);
  int32_t* drows = ladder::to_device(rows);

  const int32_t* tile_start = ladder::tile_starts(pr, moe::ops::hopper::kTileRows);
  const int sms = ladder::sm_count();
  // The ways a gathered stage is loaded and completes (ProbeKnobs::gather_completion).
  const char* const completion_names[4] = {"13: gathered, lanes' cp.async arrivals, consumers fence",
                                           "13b: gathered, lanes wait a stage behind, fence, arrive",
                                           "13x: gathered, no proxy fence (probe, unsafe)",
                                           "13t: gathered by a TMA load per row"};
  ladder::Probe gather;
  gather.gather_x = dx;
  gather.gather_rows = drows;
  gather.gather_ld = pr.K;
  gather.soak_ms = soak_ms;
  CHECK(completion >= 0 && completion <= 3, "--completion must be 0, 1, 2 or 3");
  gather.gather_tokens = T;
  gather.gather_completion = completion;
  std::printf("x: %d tokens, each row of the product one of them (top-%d), every 97th a zero row\n", T, top_k);
  // The kernels alone, checked: case 0 on the permuted rows against the gathered kernel on x.
  ladder::compare<StoreVia::Handoff, StoreVia::HandoffGatherA, __nv_bfloat16>(
      ladder::Mode::NN, pr, in, tile_start, sms, args, "case 0: hand-off on the permuted rows (shipped)",
      completion_names[completion], gather);

  // What the fusion is for: the permute's copy and case 0, against the gathered kernel alone, in
  // each of its three completions (all interleaved in the same rounds).
  const size_t n = ladder::out_elems(pr, ladder::Mode::NN);
  __nv_bfloat16 *o0 = nullptr, *permuted = nullptr, *og[4] = {nullptr, nullptr, nullptr, nullptr};
  CHECK_CUDA(cudaMalloc(&o0, n * sizeof(__nv_bfloat16)));
  for (auto*& o : og) CHECK_CUDA(cudaMalloc(&o, n * sizeof(__nv_bfloat16)));
  CHECK_CUDA(cudaMalloc(&permuted, size_t(pr.M) * pr.K * sizeof(__nv_bfloat16)));
  ladder::Inputs on_permuted;  // the device pointers alone (run() reads nothing else): case 0 reads the rows the copy has just written
  on_permuted.da = permuted;
  on_permuted.db = in.db;
  on_permuted.dc = in.dc;
  on_permuted.doffsets = in.doffsets;
  const int copy_blocks = (pr.M * 32 + 255) / 256;
  auto permute_then_gemm = [&] {
    gather_rows_kernel<<<copy_blocks, 256>>>(dx, drows, pr.M, pr.K, permuted);
    moe::ops::hopper::run<StoreVia::Handoff>(ladder::Mode::NN, pr, on_permuted, tile_start, o0, sms);
  };
  ladder::Probe modes[4] = {gather, gather, gather, gather};
  std::vector<std::function<void()>> variants{permute_then_gemm};
  for (int c = 0; c < 4; ++c) {
    modes[c].gather_completion = c;
    modes[c].soak_ms = 0;  // the compare above soaked; here every variant runs its rounds as timed
    variants.push_back([&, c] { moe::ops::hopper::run<StoreVia::HandoffGatherA>(ladder::Mode::NN, pr, in, tile_start, og[c], sms, modes[c]); });
  }
  variants.push_back([&] { gather_rows_kernel<<<copy_blocks, 256>>>(dx, drows, pr.M, pr.K, permuted); });
  const auto ms = ladder::time_interleaved(variants, args.rounds, args.repeats);
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> r0 = ladder::to_host_floats(o0, n);
  std::printf("permute + GEMM against the gathered GEMM, interleaved\n");
  ladder::report("permute (row-gather copy) + case 0", pr, ms[0], 0.0, 0.0);
  bool ok = true;
  for (int c = 0; c < 4; ++c) {
    const std::vector<float> rc = ladder::to_host_floats(og[c], n);
    const double vs_case0 = ladder::rel_err(rc, r0), vs_cpu = ladder::check_against_cpu(pr, in, ladder::Mode::NN, rc);
    ladder::report(completion_names[c], pr, ms[1 + c], vs_cpu, vs_case0);
    if (c != 2) ok = ok && vs_case0 == 0.0 && vs_cpu < 1e-2;  // 13x is a probe: reported, never trusted
  }
  std::vector<double> copy_ms = ms[5];
  std::sort(copy_ms.begin(), copy_ms.end());
  const double copy_med = copy_ms[copy_ms.size() / 2], copy_bytes = 2.0 * pr.M * pr.K * sizeof(__nv_bfloat16);  // rows read + written
  std::printf("  %-44s %8.3f ms [%.3f, %.3f]  %7.1f GB/s (rows read and written)\n", "the permute's copy alone", copy_med, copy_ms.front(),
              copy_ms.back(), copy_bytes / (copy_med * 1e-3) / 1e9);
  CHECK_CUDA(cudaFree(o0));
  for (auto* o : og) CHECK_CUDA(cudaFree(o));
  CHECK_CUDA(cudaFree(permuted));
  // A failing check fails the program (device-session.sh's small checks then stop the step).
  return ok ? 0 : 1;
}
