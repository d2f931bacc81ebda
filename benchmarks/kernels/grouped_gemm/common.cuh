// What every step of the grouped-GEMM ladder shares (the pattern of llm.c's dev/cuda): a problem
// (M rows in E groups, K, N), bf16 inputs from a fixed seed, a CPU reference (plain loops, double
// accumulation) at sampled outputs, the comparison of two GPU results in full, and a timer that
// interleaves the variants over rounds (CUDA events; median and spread per variant).
//
// Products (as in native/ops/moe/grouped_gemm/grouped_gemm.h; offsets [E+1] split the M rows):
//   NN  out[M,N]   = a[M,K] · b_e[K,N]    b [E,K,N]
//   NT  out[M,K]   = c[M,N] · b_eᵀ        (dA)
//   TN  out_e[K,N] = a_eᵀ · c_e           a [M,K], c [M,N], out [E,K,N]   (dW)
// FLOPs per product: 2·M·K·N.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#define CHECK_CUDA(call)                                                                            \
  do {                                                                                              \
    cudaError_t err_ = (call);                                                                      \
    if (err_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(err_)); \
      std::exit(1);                                                                                 \
    }                                                                                               \
  } while (0)
#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::fprintf(stderr, "%s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                              \
      std::fprintf(stderr, "\n");                                     \
      std::exit(1);                                                   \
    }                                                                 \
  } while (0)

namespace ladder {

enum class Mode { NN, NT, TN };
inline const char* mode_name(Mode m) { return m == Mode::NN ? "NN" : m == Mode::NT ? "NT" : "TN"; }

struct Problem {
  int E = 0, K = 0, N = 0, M = 0;
  std::vector<int> offsets;  // [E+1]
};

// M rows split as evenly as possible over E groups (benchmarks/grouped-gemm-shapes.mjs: balanced()).
inline Problem balanced(int E, int M, int K, int N) {
  Problem p;
  p.E = E, p.M = M, p.K = K, p.N = N;
  p.offsets.resize(E + 1);
  for (int e = 0; e <= E; ++e) p.offsets[e] = int((int64_t(e) * M) / E);
  return p;
}

// --E --M --K --N override the default problem (balanced groups); --rounds, --repeats the timing.
struct Args {
  Problem problem;
  int rounds = 5, repeats = 20;
};
inline Args parse_args(int argc, char** argv, int E, int M, int K, int N) {
  Args a;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    const int v = std::atoi(argv[i + 1]);
    if (k == "--E") E = v;
    else if (k == "--M") M = v;
    else if (k == "--K") K = v;
    else if (k == "--N") N = v;
    else if (k == "--rounds") a.rounds = v;
    else if (k == "--repeats") a.repeats = v;
    else CHECK(false, "unknown argument %s (--E --M --K --N --rounds --repeats)", k.c_str());
  }
  CHECK(E >= 1 && M >= 0 && K > 0 && N > 0, "bad problem E=%d M=%d K=%d N=%d", E, M, K, N);
  a.problem = balanced(E, M, K, N);
  return a;
}

// Counts that exercise a kernel's edges (--ragged 1 in 08 and 10): every 7th group empty, every 5th
// under one k-step (1-63 rows), the rest ragged around the mean; the total stays M.
inline Problem ragged(const Problem& b) {
  Problem p = b;
  std::vector<int> counts(p.E);
  int64_t sum = 0;
  for (int e = 0; e < p.E; ++e) {
    counts[e] = e % 7 == 3 ? 0 : e % 5 == 2 ? 1 + (e * 13) % 63 : std::max(1, (p.M / p.E) / 2 + (e * 7919) % std::max(1, p.M / p.E));
    sum += counts[e];
  }
  // scale the ragged ones so that the total is M (the remainder to the last non-empty group)
  int64_t fixed = 0, free_sum = 0;
  for (int e = 0; e < p.E; ++e) (e % 7 == 3 || e % 5 == 2 ? fixed : free_sum) += counts[e];
  int64_t left = std::max<int64_t>(0, p.M - fixed), given = 0;
  int last = -1;
  for (int e = 0; e < p.E; ++e)
    if (!(e % 7 == 3 || e % 5 == 2)) {
      counts[e] = free_sum ? int(counts[e] * left / free_sum) : 0;
      given += counts[e];
      last = e;
    }
  if (last >= 0) counts[last] += int(left - given);
  p.offsets.assign(p.E + 1, 0);
  for (int e = 0; e < p.E; ++e) p.offsets[e + 1] = p.offsets[e] + counts[e];
  p.M = p.offsets[p.E];
  return p;
}

// A program's own `--name V` taken out of argv (before parse_args, which refuses what it does not
// know): V, or dflt when absent.
inline int take_flag(int& argc, char** argv, const char* name, int dflt) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::string(argv[i]) == name) {
      const int v = std::atoi(argv[i + 1]);
      for (int k = i; k + 2 <= argc; ++k) argv[k] = argv[k + 2];
      argc -= 2;
      return v;
    }
  return dflt;
}

inline void print_counts(const Problem& p) {
  std::printf("ragged counts:");
  for (int e = 0; e < p.E; ++e) std::printf(" %d", p.offsets[e + 1] - p.offsets[e]);
  std::printf("\n");
}

// Uniform in [-scale, scale], rounded to bf16, from a 64-bit LCG: the same inputs on every run.
inline std::vector<__nv_bfloat16> random_bf16(size_t n, uint64_t seed, float scale) {
  std::vector<__nv_bfloat16> v(n);
  uint64_t s = seed * 6364136223846793005ull + 1442695040888963407ull;
  for (size_t i = 0; i < n; ++i) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const float u = float((s >> 40) & 0xFFFFFF) / float(1 << 24);  // [0, 1)
    v[i] = __float2bfloat16_rn((2.f * u - 1.f) * scale);
  }
  return v;
}

template <typename T> T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, std::max<size_t>(1, h.size()) * sizeof(T)));
  if (!h.empty()) CHECK_CUDA(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

// The inputs of all three products, on the host and on the device.
struct Inputs {
  std::vector<__nv_bfloat16> a, b, c;  // a [M,K], b [E,K,N], c [M,N] (dC)
  __nv_bfloat16 *da = nullptr, *db = nullptr, *dc = nullptr;
  int32_t* doffsets = nullptr;
};
inline Inputs make_inputs(const Problem& p) {
  Inputs in;
  in.a = random_bf16(size_t(p.M) * p.K, 1, 1.f);
  in.b = random_bf16(size_t(p.E) * p.K * p.N, 2, 0.05f);
  in.c = random_bf16(size_t(p.M) * p.N, 3, 1.f);
  in.da = to_device(in.a);
  in.db = to_device(in.b);
  in.dc = to_device(in.c);
  in.doffsets = to_device(std::vector<int32_t>(p.offsets.begin(), p.offsets.end()));
  return in;
}

// Shape of a product's output, and its element count.
inline size_t out_elems(const Problem& p, Mode m) {
  return m == Mode::NN ? size_t(p.M) * p.N : m == Mode::NT ? size_t(p.M) * p.K : size_t(p.E) * p.K * p.N;
}
inline double flops(const Problem& p) { return 2.0 * p.M * p.K * p.N; }

inline float bf(__nv_bfloat16 x) { return __bfloat162float(x); }

// The CPU reference of one output element (plain loops, double accumulation). For NN/NT `i` is a
// row of out and `j` a column; for TN `i` = e·K + k and `j` = n.
inline double reference_at(const Problem& p, const Inputs& in, Mode m, size_t i, int j) {
  double acc = 0;
  if (m == Mode::TN) {
    const int e = int(i / p.K), k = int(i % p.K);
    for (int r = p.offsets[e]; r < p.offsets[e + 1]; ++r) acc += double(bf(in.a[size_t(r) * p.K + k])) * bf(in.c[size_t(r) * p.N + j]);
    return acc;
  }
  int e = 0;
  while (e < p.E && !(int(i) >= p.offsets[e] && int(i) < p.offsets[e + 1])) ++e;
  if (e == p.E) return 0;  // a row outside every group: not written
  const __nv_bfloat16* be = in.b.data() + size_t(e) * p.K * p.N;
  if (m == Mode::NN)
    for (int k = 0; k < p.K; ++k) acc += double(bf(in.a[i * p.K + k])) * bf(be[size_t(k) * p.N + j]);
  else
    for (int n = 0; n < p.N; ++n) acc += double(bf(in.c[i * p.N + n])) * bf(be[size_t(j) * p.N + n]);
  return acc;
}

// A GPU result copied back as floats (bf16 or fp32 results).
template <typename OutT> std::vector<float> to_host_floats(const OutT* d, size_t n) {
  std::vector<OutT> h(n);
  CHECK_CUDA(cudaMemcpy(h.data(), d, n * sizeof(OutT), cudaMemcpyDeviceToHost));
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) {
    if constexpr (sizeof(OutT) == 2) f[i] = __bfloat162float(h[i]);
    else f[i] = float(h[i]);
  }
  return f;
}

// ‖got − ref‖ / ‖ref‖ at `samples` pseudo-random outputs against the CPU reference.
inline double check_against_cpu(const Problem& p, const Inputs& in, Mode m, const std::vector<float>& got, int samples = 2048) {
  const size_t rows = m == Mode::NN || m == Mode::NT ? size_t(p.M) : size_t(p.E) * p.K;
  const int cols = m == Mode::NT ? p.K : p.N;
  if (rows == 0) return 0;
  double num = 0, den = 0;
  uint64_t s = 12345;
  for (int t = 0; t < samples; ++t) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const size_t i = (s >> 33) % rows;
    const int j = int((s >> 13) % uint64_t(cols));
    const double ref = reference_at(p, in, m, i, j), d = double(got[i * cols + j]) - ref;
    num += d * d;
    den += ref * ref;
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// ‖x − y‖ / ‖y‖ over every element.
inline double rel_err(const std::vector<float>& x, const std::vector<float>& y) {
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double d = double(x[i]) - y[i];
    num += d * d;
    den += double(y[i]) * y[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

// Times each variant `repeats` launches per round, the variants interleaved within every round, in
// A B / B A order alternately (so that clock drift cancels, as benchmarks/grouped-gemm-ab.mjs does).
// Returns per variant the milliseconds per launch of every round.
inline std::vector<std::vector<double>> time_interleaved(const std::vector<std::function<void()>>& variants, int rounds, int repeats) {
  std::vector<std::vector<double>> ms(variants.size());
  cudaEvent_t t0, t1;
  CHECK_CUDA(cudaEventCreate(&t0));
  CHECK_CUDA(cudaEventCreate(&t1));
  for (auto& v : variants) v();  // warm-up
  CHECK_CUDA(cudaDeviceSynchronize());
  for (int r = 0; r < rounds; ++r)
    for (size_t j = 0; j < variants.size(); ++j) {
      const size_t i = r % 2 ? variants.size() - 1 - j : j;
      CHECK_CUDA(cudaEventRecord(t0));
      for (int k = 0; k < repeats; ++k) variants[i]();
      CHECK_CUDA(cudaEventRecord(t1));
      CHECK_CUDA(cudaEventSynchronize(t1));
      float e = 0;
      CHECK_CUDA(cudaEventElapsedTime(&e, t0, t1));
      ms[i].push_back(double(e) / repeats);
    }
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaEventDestroy(t0));
  CHECK_CUDA(cudaEventDestroy(t1));
  return ms;
}

inline void report(const char* what, const Problem& p, const std::vector<double>& ms, double err_cpu, double err_vs_case0) {
  std::vector<double> s = ms;
  std::sort(s.begin(), s.end());
  const double med = s[s.size() / 2];
  std::printf("  %-44s %8.3f ms [%.3f, %.3f]  %7.1f TFLOP/s  err vs CPU %.2e  vs case 0 %.2e\n", what, med, s.front(), s.back(),
              flops(p) / (med * 1e-3) / 1e12, err_cpu, err_vs_case0);
}

inline void print_problem(const char* program, const Problem& p) {
  cudaDeviceProp prop{};
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaGetDeviceProperties(&prop, dev));
  std::printf("%s on %s (cc %d.%d, %d SMs): M=%d in E=%d balanced groups, K=%d, N=%d; %.3f TFLOP per product\n", program, prop.name,
              prop.major, prop.minor, prop.multiProcessorCount, p.M, p.E, p.K, p.N, flops(p) / 1e12);
}

// The device's multiprocessor count (the persistent kernels' grid).
inline int sm_count() {
  int dev = 0, sms = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  CHECK_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return sms;
}

// tile_start[e] = Σ_{g<e} ceil(rows_g / bm): the NN/NT m-tiles of every group, on the device.
inline int32_t* tile_starts(const Problem& p, int bm) {
  std::vector<int32_t> ts(p.E + 1, 0);
  for (int e = 0; e < p.E; ++e) ts[e + 1] = ts[e] + (p.offsets[e + 1] - p.offsets[e] + bm - 1) / bm;
  return to_device(ts);
}

}  // namespace ladder
