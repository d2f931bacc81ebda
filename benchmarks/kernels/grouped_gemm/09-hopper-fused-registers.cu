// Step 09 of the grouped-GEMM ladder: the Hopper kernel's fused SwiGLU (the forward's up GEMM, NN)
// and dSwiGLU (the backward's down dA, NT) epilogues applied by the consumers to their fragments and
// stored straight from them (the addon's way until cf38d04; then groupedGemm.fusedHandoff = false),
// against what the addon ships (case 0, v9): the bf16 product tile handed to the producer's storer
// warps, which apply the epilogue while copying it out. Both from hopper_fused.cuh (hopper.cu at
// cf38d04).
//
//   make 09-hopper-fused-registers
//   ./09-hopper-fused-registers                 # the layer's shape: E=32, M=32768, H=7168, F=2048
//   ./09-hopper-fused-registers --E 8 --M 16384 --H 4096 --F 14336 --rounds 5 --repeats 20
//
// SwiGLU: a [M, H] · w13_e [H, 2F] (W1 and W3 columns interleaved) → h [M, F] and the saved g
// [M, 2F]. dSwiGLU: dout [M, H] · w2_eᵀ (w2 [E, F, H]) → dh [M, F], with a saved g [M, 2F] → dg
// [M, 2F]. Outputs are poisoned (NaN) before the checked run: every one must be written. Each output
// is checked at 2048 sampled places against the CPU reference (plain loops, double accumulation; the
// epilogue from the product rounded to bf16, as native/ops/moe/grouped_gemm/swiglu.h says every path
// computes) and in full against case 0; then both are timed interleaved over the rounds (A B / B A).
#include "hopper_fused.cuh"

using moe::ops::GemmEpilogue;
using moe::ops::hopper::StoreVia;

namespace {

float round_bf16(double x) { return __bfloat162float(__float2bfloat16_rn(float(x))); }

// ‖got − ref‖ / ‖ref‖ at `samples` pseudo-random (row, column) places; at(i, j) gives {ref, got}.
template <typename At> double sampled_err(size_t rows, int cols, At at, int samples = 2048) {
  double num = 0, den = 0;
  uint64_t s = 12345;
  for (int t = 0; t < samples && rows > 0; ++t) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const size_t i = (s >> 33) % rows;
    const int j = int((s >> 13) % uint64_t(cols));
    const auto [ref, got] = at(i, j);
    num += (got - ref) * (got - ref);
    den += ref * ref;
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

size_t count_nan(const std::vector<float>& v) {
  size_t n = 0;
  for (float x : v) n += std::isnan(x);
  return n;
}
size_t count_bits_differ(const __nv_bfloat16* x, const __nv_bfloat16* y, size_t n) {
  std::vector<uint16_t> hx(n), hy(n);
  CHECK_CUDA(cudaMemcpy(hx.data(), x, n * 2, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(hy.data(), y, n * 2, cudaMemcpyDeviceToHost));
  size_t d = 0;
  for (size_t i = 0; i < n; ++i) d += hx[i] != hy[i];
  return d;
}

__nv_bfloat16* poisoned(size_t n) {
  __nv_bfloat16* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, std::max<size_t>(1, n) * 2));
  CHECK_CUDA(cudaMemset(p, 0xFF, n * 2));  // NaN
  return p;
}

void print_ratio(const std::vector<std::vector<double>>& ms) {
  std::vector<double> ratio;
  for (size_t r = 0; r < ms[0].size(); ++r) ratio.push_back(ms[1][r] / ms[0][r]);
  std::sort(ratio.begin(), ratio.end());
  std::printf("  time 09 / case 0 per round: median %.3f [%.3f, %.3f] (> 1: the hand-off faster)\n", ratio[ratio.size() / 2], ratio.front(),
              ratio.back());
}

// The forward's up GEMM with SwiGLU: pr = (E, M, K = H, N = 2F).
void swiglu(const ladder::Problem& pr, const ladder::Args& args, int sms) {
  using moe::ops::hopper::run;
  const ladder::Inputs in = ladder::make_inputs(pr);
  const int32_t* tile_start = ladder::tile_starts(pr, moe::ops::hopper::kTileRows);
  const size_t nh = size_t(pr.M) * (pr.N / 2), ng = size_t(pr.M) * pr.N;
  __nv_bfloat16 *h0 = poisoned(nh), *g0 = poisoned(ng), *h1 = poisoned(nh), *g1 = poisoned(ng);
  auto case0 = [&] { run<StoreVia::Handoff, GemmEpilogue::SwiGLU>(pr, in, tile_start, h0, g0, nullptr, sms); };
  auto step09 = [&] { run<StoreVia::Registers, GemmEpilogue::SwiGLU>(pr, in, tile_start, h1, g1, nullptr, sms); };
  case0();
  step09();
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> rh0 = ladder::to_host_floats(h0, nh), rg0 = ladder::to_host_floats(g0, ng);
  const std::vector<float> rh1 = ladder::to_host_floats(h1, nh), rg1 = ladder::to_host_floats(g1, ng);
  // CPU: g = the product rounded to bf16; h = silu(g1)·g3 of hidden unit u from g's columns 2u, 2u+1.
  auto g_err = [&](const std::vector<float>& g) {
    return sampled_err(size_t(pr.M), pr.N, [&](size_t i, int j) {
      return std::pair<double, double>{round_bf16(ladder::reference_at(pr, in, ladder::Mode::NN, i, j)), g[i * pr.N + j]};
    });
  };
  auto h_err = [&](const std::vector<float>& h) {
    return sampled_err(size_t(pr.M), pr.N / 2, [&](size_t i, int u) {
      const float a = round_bf16(ladder::reference_at(pr, in, ladder::Mode::NN, i, 2 * u));
      const float b = round_bf16(ladder::reference_at(pr, in, ladder::Mode::NN, i, 2 * u + 1));
      return std::pair<double, double>{double(moe::ops::silu(a) * b), h[i * (pr.N / 2) + u]};
    });
  };
  const size_t unwritten0 = count_nan(rh0) + count_nan(rg0), unwritten1 = count_nan(rh1) + count_nan(rg1);
  const auto ms = ladder::time_interleaved({case0, step09}, args.rounds, args.repeats);
  std::printf("SwiGLU (NN, K=H=%d, N=2F=%d; unwritten outputs: case 0 %zu, 09 %zu)\n", pr.K, pr.N, unwritten0, unwritten1);
  ladder::report("case 0: hand-off (shipped), h", pr, ms[0], h_err(rh0), 0.0);
  ladder::report("09: from registers, h", pr, ms[1], h_err(rh1), ladder::rel_err(rh1, rh0));
  std::printf("  g vs CPU: case 0 %.2e, 09 %.2e; g bits that differ between them: %zu of %zu\n", g_err(rg0), g_err(rg1),
              count_bits_differ(g0, g1, ng), ng);
  print_ratio(ms);
  CHECK(unwritten0 == 0 && unwritten1 == 0, "outputs left unwritten");
  for (void* p : {(void*)h0, (void*)g0, (void*)h1, (void*)g1, (void*)in.da, (void*)in.db, (void*)in.dc, (void*)in.doffsets, (void*)tile_start})
    CHECK_CUDA(cudaFree(p));
}

// The backward's down dA with dSwiGLU: pr = (E, M, K = F, N = H); out dg [M, 2F].
void dswiglu(const ladder::Problem& pr, const ladder::Args& args, int sms) {
  using moe::ops::hopper::run;
  const ladder::Inputs in = ladder::make_inputs(pr);
  const int32_t* tile_start = ladder::tile_starts(pr, moe::ops::hopper::kTileRows);
  const size_t n = size_t(pr.M) * 2 * pr.K;
  const std::vector<__nv_bfloat16> g = ladder::random_bf16(n, 4, 3.f);  // saved pre-activations (g1, g3) interleaved
  const __nv_bfloat16* dg_saved = ladder::to_device(g);
  __nv_bfloat16 *o0 = poisoned(n), *o1 = poisoned(n);
  auto case0 = [&] { run<StoreVia::Handoff, GemmEpilogue::DSwiGLU>(pr, in, tile_start, o0, nullptr, dg_saved, sms); };
  auto step09 = [&] { run<StoreVia::Registers, GemmEpilogue::DSwiGLU>(pr, in, tile_start, o1, nullptr, dg_saved, sms); };
  case0();
  step09();
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  const std::vector<float> r0 = ladder::to_host_floats(o0, n), r1 = ladder::to_host_floats(o1, n);
  // CPU: dh = the product rounded to bf16; dg1 = dh·g3·silu'(g1), dg3 = dh·silu(g1) (columns 2u, 2u+1).
  auto err = [&](const std::vector<float>& dg) {
    return sampled_err(size_t(pr.M), 2 * pr.K, [&](size_t i, int j) {
      const int u = j / 2;
      const float dh = round_bf16(ladder::reference_at(pr, in, ladder::Mode::NT, i, u));
      const float g1 = ladder::bf(g[i * 2 * pr.K + 2 * u]), g3 = ladder::bf(g[i * 2 * pr.K + 2 * u + 1]);
      const float ref = j % 2 == 0 ? dh * g3 * moe::ops::silu_grad(g1) : dh * moe::ops::silu(g1);
      return std::pair<double, double>{double(ref), dg[i * 2 * pr.K + j]};
    });
  };
  const size_t unwritten0 = count_nan(r0), unwritten1 = count_nan(r1);
  const auto ms = ladder::time_interleaved({case0, step09}, args.rounds, args.repeats);
  std::printf("dSwiGLU (NT, K=F=%d, N=H=%d; FLOPs of dh; unwritten outputs: case 0 %zu, 09 %zu)\n", pr.K, pr.N, unwritten0, unwritten1);
  ladder::report("case 0: hand-off (shipped), dg", pr, ms[0], err(r0), 0.0);
  ladder::report("09: from registers, dg", pr, ms[1], err(r1), ladder::rel_err(r1, r0));
  print_ratio(ms);
  CHECK(unwritten0 == 0 && unwritten1 == 0, "outputs left unwritten");
  for (void* p : {(void*)o0, (void*)o1, (void*)dg_saved, (void*)in.da, (void*)in.db, (void*)in.dc, (void*)in.doffsets, (void*)tile_start})
    CHECK_CUDA(cudaFree(p));
}

}  // namespace

int main(int argc, char** argv) {
  // --H and --F are this program's; the rest go to ladder::parse_args (its K and N are not used).
  int H = 7168, F = 2048;
  std::vector<char*> rest = {argv[0]};
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if ((k == "--H" || k == "--F") && i + 1 < argc) {
      (k == "--H" ? H : F) = std::atoi(argv[i + 1]);
      ++i;
    } else {
      rest.push_back(argv[i]);
    }
  }
  const ladder::Args args = ladder::parse_args(int(rest.size()), rest.data(), 32, 32768, H, 2 * F);
  const int E = args.problem.E, M = args.problem.M;
  CHECK(H % 8 == 0 && F % 8 == 0 && H > 0 && F > 0 && M > 0, "the Hopper kernel needs H and F multiples of 8 (TMA) and M > 0");
  const ladder::Problem up = ladder::balanced(E, M, H, 2 * F), down = ladder::balanced(E, M, F, H);
  ladder::print_problem("09-hopper-fused-registers (SwiGLU)", up);
  const int sms = ladder::sm_count();
  swiglu(up, args, sms);
  ladder::print_problem("09-hopper-fused-registers (dSwiGLU)", down);
  dswiglu(down, args, sms);
  return 0;
}
