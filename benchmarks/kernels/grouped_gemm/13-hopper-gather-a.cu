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
//                        [--completion 0|1|2|3: the form checked and soaked first]
//   ./13-hopper-gather-a --gather-rate 1 [--M --K --rounds --repeats]: the gather alone, 1, 2, 4 and 8 warps a block
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

// Row r of the product is x[rows[r]]: tokens drawn at random (each about M / T times), every 97th a
// padding row (-1: zeros, as the permute's padding).
std::vector<int32_t> routed_rows(int M, int T) {
  std::vector<int32_t> rows(M);
  uint64_t state = 0x9e3779b97f4a7c15ull;
  for (int r = 0; r < M; ++r) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    rows[r] = r % 97 == 96 ? -1 : int((state >> 33) % uint64_t(T));
  }
  return rows;
}

// --gather-rate: how fast W warps of one block gather 128-row stages of x into shared memory with
// the producer's cp.async pattern (8 lanes to a row, 16-byte chunks into the 128-byte swizzle; the
// tile's 128 tokens loaded once, 4 a lane, and passed round by shuffles), nothing consuming them: a
// ring of 4 stages, 3 in flight (cp.async.wait_group 2). Each block walks m-tiles and their k-tiles
// in the GEMM's order (one n-tile's worth), so the rows and their reuse are the GEMM's. What it
// answers: how many warps keep up with the up GEMM's A rate.
__global__ void gather_rate_kernel(const __nv_bfloat16* __restrict__ x, const int32_t* __restrict__ rows, int M, int K, unsigned* sink) {
  extern __shared__ __align__(1024) unsigned char ring[];
  const int warps = int(blockDim.x >> 5), warp = int(threadIdx.x >> 5), lane = int(threadIdx.x & 31);
  const int chunk = lane & 7, quad = lane >> 3, k_tiles = K / 64, m_tiles = (M + 127) / 128;
  int slot = 0;
  for (int t = int(blockIdx.x); t < m_tiles; t += int(gridDim.x)) {
    int token[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = t * 128 + lane + 32 * i;
      token[i] = row < M ? __ldg(rows + row) : -1;
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
      const uint32_t sa = uint32_t(__cvta_generic_to_shared(ring + slot * 16384));
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int jj = 0; jj < 8; ++jj) {
          const int j = 8 * i + jj;  // instruction j of the stage's 32 (4 rows each): warp j % warps issues it
          const int tok = __shfl_sync(0xffffffffu, token[i], 4 * jj + quad);
          if (j % warps != warp) continue;
          const int r = 32 * i + 4 * jj + quad;
          const uint32_t bytes = tok >= 0 ? 16u : 0u;
          const __nv_bfloat16* src = x + (size_t(tok < 0 ? 0 : tok) * K + kt * 64 + 8 * chunk);
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sa + uint32_t(r * 128 + ((chunk ^ (r & 7)) << 4))), "l"(src),
                       "r"(bytes)
                       : "memory");
        }
      asm volatile("cp.async.commit_group;\n" ::: "memory");
      asm volatile("cp.async.wait_group 2;\n" ::: "memory");
      slot = (slot + 1) & 3;
    }
  }
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(sink, unsigned(ring[blockIdx.x % 16384]));  // keeps the copies live
}

int gather_rate(int argc, char** argv) {
  ladder::Args args = ladder::parse_args(argc, argv, 32, 32768, 7168, 4096);
  const ladder::Problem& pr = args.problem;
  const int T = std::max(1, pr.M / 8);
  const std::vector<__nv_bfloat16> x = ladder::random_bf16(size_t(T) * pr.K, 4, 1.f);
  const std::vector<int32_t> rows = routed_rows(pr.M, T);
  __nv_bfloat16* dx = ladder::to_device(x);
  int32_t* drows = ladder::to_device(rows);
  unsigned* sink = nullptr;
  CHECK_CUDA(cudaMalloc(&sink, sizeof(unsigned)));
  const int sms = ladder::sm_count(), stages_total = ((pr.M + 127) / 128) * (pr.K / 64);  // K % 64 == 0 here
  CHECK_CUDA(cudaFuncSetAttribute(gather_rate_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 4 * 16384));
  const int warp_counts[4] = {1, 2, 4, 8};
  std::vector<std::function<void()>> variants;
  for (int w : warp_counts)
    variants.push_back([=] { gather_rate_kernel<<<sms, 32 * w, 4 * 16384>>>(dx, drows, pr.M, pr.K, sink); });
  const auto ms = ladder::time_interleaved(variants, args.rounds, args.repeats);
  const double bytes = double(stages_total) * 16384;
  std::printf("gather rate: %d stages of 128 rows x 64 columns (%.2f GB, one n-tile's A), x %d tokens x %d, %d blocks\n", stages_total,
              bytes / 1e9, T, pr.K, sms);
  for (int i = 0; i < 4; ++i) {
    std::vector<double> m = ms[i];
    std::sort(m.begin(), m.end());
    const double med = m[m.size() / 2];
    std::printf("  %d warp(s) a block: %8.3f ms [%.3f, %.3f]  %7.1f GB/s, %.1f GB/s an SM\n", warp_counts[i], med, m.front(), m.back(),
                bytes / (med * 1e-3) / 1e9, bytes / (med * 1e-3) / 1e9 / sms);
  }
  CHECK_CUDA(cudaFree(sink));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (ladder::take_flag(argc, argv, "--gather-rate", 0) != 0) return gather_rate(argc, argv);
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
  const std::vector<int32_t> rows = routed_rows(pr.M, T);
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
