#include "ops/moe/grouped_gemm/grouped_gemm.h"

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "core/cuda_runtime.h"
#include "ops/common/checks.h"
#include "ops/common/dispatch.h"
#include "ops/moe/fp8/fp8.h"
#include "ops/moe/grouped_gemm/decode.h"
#include "ops/moe/grouped_gemm/few_rows.h"
#include "ops/moe/grouped_gemm/hopper.h"
#include "ops/moe/grouped_gemm/hopper_b_resident.h"
#include "ops/moe/grouped_gemm/skinny.h"
#include "ops/moe/grouped_gemm/split_rows.h"

namespace moe::ops {

namespace {
const char* op_name(const GroupedGemm& g) {
  if (g.epilogue == GemmEpilogue::SwiGLU) return "swigluGemm";
  if (g.epilogue == GemmEpilogue::DSwiGLU) return "dswigluGemm";
  return "groupedGemm";
}

std::atomic<GroupedGemmOptions> g_options{GroupedGemmOptions{}};
static_assert(std::atomic<GroupedGemmOptions>::is_always_lock_free, "the options must fit a lock-free atomic (no libatomic)");

#if MOE_EP_WITH_CUDA
// dW on the Hopper kernel only from this many rows per group on average. dW with few rows per group
// is bound by writing E·K·N outputs: the Hopper kernel's staged epilogues win against mma.sync at
// 128 rows per group (H200, f838df1: 236 vs ~200 TFLOP/s) but not at 4 (7.1 vs 8.9); the crossover
// between 4 and 128 is not measured.
constexpr int64_t kHopperDwMinRowsPerGroup = 32;

// The skinny kernel past 64 columns only up to this many rows. It reads `a` once per 64-column band
// and `b` once per 32 rows (skinny.cu), so at N = 256 and many rows its L2 traffic is ~12 times a's
// bytes; at T ≤ 1024 the tile kernels have ≤ 8 blocks of 128 rows for it. Not measured: a bound
// from that arithmetic, to be replaced by the H200's crossover.
constexpr int64_t kSkinnyWideMaxRows = 1024;

// The one place the CUDA kernel of a call is chosen, from the options and the shape:
// 0. The forward (NN, Store) with one group and N ≤ 256 columns, the router's logits x·Wr, on the
//    skinny kernel (skinny.cu; groupedGemm.skinny): K split across blocks so that every SM streams
//    x, where the tile kernels give it one block per 128 rows (and the decode kernel, at ≤ 32 rows,
//    one warp's columns per 256). Past 64 columns only up to kSkinnyWideMaxRows rows. H200, 5b01f47
//    (benchmarks/results/router-gemm-5b01f47.json): the layer's x·Wr 24 against 73 µs.
// 1. dW with at most FEW_ROWS_AVERAGE rows per group on average (decode) is bound by its stores:
//    the few-rows kernel streams them (few_rows.cu; H200, 40314f2: 12.6 vs 10.1 TFLOP/s on the
//    tensor cores), where its limits allow.
// 2. dW with bf16 results and kHopperDwMinRowsPerGroup to B_RESIDENT_MAX_AVERAGE_ROWS rows per group
//    on average, on the B-resident Hopper kernel (hopper_b_resident.cu): the group's dC slice stays in
//    shared memory while its m-tiles stream through, the tiles leave by TMA tensor stores. As ladder
//    step 11t it ran the E=256 dW (128 rows per group) 1.263× as fast as hopper.cu's kernel, bit-equal
//    (H200, benchmarks/results/ladder11-5425189.txt); from 32 to 127 rows it is not measured. The
//    host knows only the average: the groups over 128 rows of a skewed routing go to the Hopper
//    kernel (3.), launched after it over those groups alone (grouped_gemm_cuda).
// 3. The Hopper kernel (hopper.cu) on compute capability 9.0 for the shapes TMA describes (dW from
//    kHopperDwMinRowsPerGroup rows per group on average).
// 4. The mma.sync kernel (cuda.cu) otherwise: sm_80, sizes not a multiple of 8, either switch off.
// Inside the Hopper kernel, how tiles are stored follows from the epilogue and the result type alone
// (hopper.cu, launch()); inside mma.sync, the loader and the store follow from the alignment. Two
// variants that lost on the H200 live in the ladder (benchmarks/kernels/grouped_gemm/), no longer
// here: the ping-pong kernel for fp32 results (08) and the fused epilogues stored from the
// consumers' registers (09).
GemmKernel select_tile_kernel(const GroupedGemm& g, const GroupedGemmOptions& o) {
  const int64_t M = g.a.size(0), E = g.offsets.size(0) - 1;
  const bool tn = g.mode == GemmMode::TN;
  if (o.skinny && skinny_nn_fits(g) && (g.b.size(2) <= 64 || M <= kSkinnyWideMaxRows)) return GemmKernel::Skinny;
  if (o.few_rows && tn && M <= FEW_ROWS_AVERAGE * E && few_rows_tn_fits(g)) return GemmKernel::FewRows;
#if MOE_EP_WITH_HOPPER
  if (o.hopper && o.b_resident && tn && M >= kHopperDwMinRowsPerGroup * E && M <= B_RESIDENT_MAX_AVERAGE_ROWS * E &&
      grouped_gemm_b_resident_fits(g))
    return GemmKernel::HopperBResident;
  if (o.hopper && !(tn && M < kHopperDwMinRowsPerGroup * E) && grouped_gemm_hopper_fits(g)) return GemmKernel::Hopper;
#endif
  return GemmKernel::MmaSync;
}

// The decode kernel's row limit for a forward (NN) call of M rows over E groups, or 0 when it should
// not run. The host knows M and E, not the per-group counts (reading them would synchronise):
// - M ≤ 32: no group can have more than M rows, so the decode kernel takes every group, with the
//   smallest of its limits (8, 16, 32 rows) that covers M (fewer token tiles, fewer registers).
// - M ≤ kDecodeMaxAverage·E (at most 4 rows per group on average: T ≤ 16 on Mixtral's top-2 of 8,
//   T ≤ 128 on DeepSeek-V3's top-8 of 256): the decode kernel takes the groups of up to 16 rows and
//   the tile kernel the rare larger ones (a skewed routing).
// - otherwise the tile kernels alone. Measured on the H200 (54297f7,
//   benchmarks/results/serve-{mixtral,deepseek}-54297f7.json, a layer's graph, decode on vs off):
//   4 rows per group on average win (DeepSeek-V3 T = 128: 5.07 vs 5.25 ms), 8 lose (DeepSeek-V3
//   T = 256 with the 32-row limit: 5.96 vs 5.55) and 16 lose (Mixtral T = 64: 1.12 vs 0.81).
// Why 32 rows at most: mma.sync at 32 tokens per weight byte is still a quarter of its rate at the
// weights' bandwidth (decode.cu), and 4 token tiles of accumulators are what fits in registers
// beside 4 KB of loads in flight per warp.
constexpr int64_t kDecodeMaxAverage = 4;
int decode_rows(const GroupedGemm& g, const GroupedGemmOptions& o) {
  if (!o.decode || g.mode != GemmMode::NN || !decode_nn_fits(g)) return 0;
  const int64_t M = g.a.size(0), E = g.offsets.size(0) - 1;
  for (int rows : DECODE_ROWS)
    if (M <= rows) return rows;
  return M <= kDecodeMaxAverage * E ? 16 : 0;
}

// 5. The decode kernel (decode.cu) for the forward with a handful of rows per group, beside the
//    tile kernel chosen above for any larger group (decode_rows); not beside the skinny kernel,
//    which takes every row of its one group.
GemmChoice select_cuda_kernel(const GroupedGemm& g, const GroupedGemmOptions& o) {
  const GemmKernel kernel = select_tile_kernel(g, o);
  return GemmChoice{kernel, kernel == GemmKernel::Skinny ? 0 : decode_rows(g, o), o.trim_tails};
}

// 6. dW (TN, plain store, f32 out) of one group with fewer output tiles than half the SMs (the
//    router's dWr = xᵀ·dLogits, split_rows.h; groupedGemm.splitRows): its rows cut into ranges, one
//    fp32 partial each, so that the tiles times the splits fill about one wave, and no more than
//    a's rows over kSplitRowsMin (a mainloop long enough to pay for its partial's stores). The host
//    knows a's rows, not the group's (on the device): a group much shorter than `a` gets short or
//    empty ranges, each still a partial to write and add (the router's group is all of a). The
//    tile count is the Hopper kernel's (128×256 tiles). Returns 1 for no split. H100, ccb57b8
//    (benchmarks/results/moe-layer-fine-vs-splitRows-off-ccb57b8-h100.json, -vs-splitRows-off-):
//    the fine layer's router dW (H=2048, E=128; 8 splits) 0.021 against 0.043 ms, the main
//    layer's (H=7168, E=32; 2 splits) 0.048 against 0.052: its tiles are 256 columns for 32.
constexpr int64_t kSplitRowsMin = 256;
constexpr int64_t kSplitRowsMax = 16;
int row_splits(const GroupedGemm& g, const GroupedGemmOptions& o) {
  if (!o.split_rows || g.mode != GemmMode::TN || g.epilogue != GemmEpilogue::Store || g.offsets.size(0) != 2 || g.out.dtype() != DType::f32)
    return 1;
  const int64_t M = g.a.size(0), K = g.a.size(1), N = g.b.size(1);
  if (K % 8 != 0 || N % 8 != 0 || (reinterpret_cast<uintptr_t>(g.out.raw()) & 15) != 0) return 1;
  const int64_t tiles = ((K + 127) / 128) * ((N + 255) / 256);
  const int64_t sms = cuda::multiprocessors(g.a.device().index);
  return int(std::max<int64_t>(1, std::min({sms / tiles, M / kSplitRowsMin, kSplitRowsMax})));
}

// The CUDA side of a call: split into row ranges (6.) or straight to the kernel chosen above.
void grouped_gemm_on_cuda(const GroupedGemm& g, const char* op) {
  const GroupedGemmOptions o = grouped_gemm_options();
  const int splits = row_splits(g, o);
  if (splits == 1) {
    grouped_gemm_cuda(g, select_cuda_kernel(g, o), op_stream(g.a));
    return;
  }
  // Scratch from the caching allocator, freed on return: reused only after the kernels queued here.
  GroupedGemm parts = g;
  parts.offsets = Tensor::empty({splits + 1}, DType::i32, g.a.device(), op);
  parts.out = Tensor::empty({splits, g.a.size(1), g.b.size(1)}, DType::f32, g.a.device(), op);
  parts.accumulate = false;
  split_row_offsets(g.offsets, g.a.size(0), parts.offsets, op_stream(g.a));
  grouped_gemm_cuda(parts, select_cuda_kernel(parts, o), op_stream(g.a));
  sum_row_splits(parts.out, splits, g.out, g.accumulate, op_stream(g.a));
}
#endif
}  // namespace

void set_grouped_gemm_options(const GroupedGemmOptions& options) { g_options.store(options); }
GroupedGemmOptions grouped_gemm_options() { return g_options.load(); }

void grouped_gemm(const GroupedGemm& g) {
  const char* op = op_name(g);
  require_defined(g.a, op, "a");
  require_defined(g.b, op, "b");
  require_defined(g.offsets, op, "offsets");
  require_defined(g.out, op, "out");
  require_dtype(g.a, {DType::bf16, DType::f32, DType::fp8e4m3}, op, "a");
  const bool fp8_a = g.a.dtype() == DType::fp8e4m3;
  if (fp8_a) {
    MOE_ARG_CHECK(g.mode == GemmMode::NN && g.epilogue != GemmEpilogue::DSwiGLU, op,
                  "fp8 rows ('a' fp8e4m3) are taken by the forward (NN) product only");
    MOE_ARG_CHECK(g.b.dtype() == DType::bf16, op, "'b' ", g.b.describe(), " must be bf16 when 'a' holds fp8 rows");
    require_defined(g.a_scales, op, "a.scales");
    require_dtype(g.a_scales, {DType::f32}, op, "a.scales");
    require_same_device(g.a, "a", g.a_scales, "a.scales", op);
    require_contiguous(g.a_scales, op, "a.scales");
  } else {
    MOE_ARG_CHECK(g.b.dtype() == g.a.dtype(), op, "'b' ", g.b.describe(), " must have the dtype of 'a' (", dtype_name(g.a.dtype()), ")");
    MOE_ARG_CHECK(!g.a_scales.defined(), op, "'a.scales' goes with fp8 rows only; 'a' is ", dtype_name(g.a.dtype()));
  }
  require_dtype(g.offsets, {DType::i32}, op, "offsets");
  for (const Tensor* t : {&g.b, &g.offsets, &g.out})
    require_same_device(g.a, "a", *t, t == &g.b ? "b" : t == &g.offsets ? "offsets" : "out", op);
  require_contiguous(g.a, op, "a");
  require_contiguous(g.b, op, "b");
  require_contiguous(g.offsets, op, "offsets");
  require_contiguous(g.out, op, "out");
  MOE_ARG_CHECK(g.a.dim() == 2, op, "'a' must be 2-D [rows, features], got ", g.a.describe());
  MOE_ARG_CHECK(g.offsets.dim() == 1 && g.offsets.size(0) >= 1, op, "'offsets' must be [E+1], got ", g.offsets.describe());
  const int64_t E = g.offsets.size(0) - 1, M = g.a.size(0);

  Shape expected;
  if (g.mode == GemmMode::TN) {
    MOE_ARG_CHECK(g.b.dim() == 2 && g.b.size(0) == M, op, "in TN mode 'b' must be [", M, ", N] like the rows of 'a', got ", g.b.describe());
    expected = {E, g.a.size(1), g.b.size(1)};
  } else {
    MOE_ARG_CHECK(g.b.dim() == 3 && g.b.size(0) == E, op, "'b' must be [E, K, N] with E = ", E, " groups (offsets has ", E + 1,
                  " entries), got ", g.b.describe());
    if (g.mode == GemmMode::NN) {
      MOE_ARG_CHECK(g.a.size(1) == g.b.size(1), op, "'a' ", shape_str(g.a.shape()), " and 'b' ", shape_str(g.b.shape()),
                    " disagree on K (a's columns vs b's second dimension)");
      expected = {M, g.b.size(2)};
    } else {
      MOE_ARG_CHECK(g.a.size(1) == g.b.size(2), op, "in NT mode 'a' ", shape_str(g.a.shape()), " must have as many columns as 'b' ",
                    shape_str(g.b.shape()), " has in its last dimension");
      expected = {M, g.b.size(1)};
    }
  }
  switch (g.epilogue) {
    case GemmEpilogue::Store:
      require_dtype(g.out, {DType::bf16, DType::f32}, op, "out");
      MOE_ARG_CHECK(!g.accumulate || g.out.dtype() == DType::f32, op, "'accumulate' needs an f32 'out'");
      break;
    case GemmEpilogue::SwiGLU:
      MOE_ARG_CHECK(g.mode == GemmMode::NN, op, "the SwiGLU epilogue runs on the forward (NN) product");
      MOE_ARG_CHECK(expected[1] % 2 == 0, op, "'b' must hold W1 and W3 interleaved: an even number of columns, got ", expected[1]);
      require_dtype(g.out, {DType::bf16, DType::f32}, op, "out");
      if (g.aux.defined()) {
        MOE_ARG_CHECK(g.aux.dtype() == g.out.dtype(), op, "'g' must have the dtype of 'out'");
        require_contiguous(g.aux, op, "g");
        require_same_device(g.a, "a", g.aux, "g", op);
        MOE_ARG_CHECK(g.aux.shape() == expected, op, "'g' must be ", shape_str(expected), ", got ", g.aux.describe());
      }
      expected[1] /= 2;
      break;
    case GemmEpilogue::DSwiGLU:
      MOE_ARG_CHECK(g.mode == GemmMode::NT, op, "the dSwiGLU epilogue runs on the dh = dout·W2ᵀ (NT) product");
      require_defined(g.aux, op, "g");
      require_dtype(g.out, {DType::bf16, DType::f32}, op, "out");
      MOE_ARG_CHECK(g.aux.dtype() == g.out.dtype(), op, "'g' must have the dtype of 'out'");
      require_contiguous(g.aux, op, "g");
      require_same_device(g.a, "a", g.aux, "g", op);
      expected[1] *= 2;
      MOE_ARG_CHECK(g.aux.shape() == expected, op, "'g' (the saved pre-activations) must be ", shape_str(expected), ", got ",
                    g.aux.describe());
      break;
  }
  MOE_ARG_CHECK(g.out.shape() == expected, op, "'out' must be ", shape_str(expected), ", got ", g.out.describe());
  MOE_ARG_CHECK(M <= INT32_MAX && g.a.size(1) <= INT32_MAX && expected.back() <= INT32_MAX, op, "dimensions beyond 2^31 are not supported");
  if (fp8_a) {
    const int64_t K = g.a.size(1);
    MOE_ARG_CHECK(K % kFp8Block == 0, op, "fp8 rows need K a multiple of ", kFp8Block, ", got ", K);
    const Shape scales_shape{M, K / kFp8Block};
    MOE_ARG_CHECK(g.a_scales.shape() == scales_shape, op, "'a.scales' must be ", shape_str(scales_shape), ", got ", g.a_scales.describe());
  }
  if (g.out.numel() == 0) return;
  if (fp8_a) {
    // fp8 rows: dequantised to a bf16 copy, then the bf16 GEMM (whichever kernel it takes).
    // Dequantising inside the Hopper kernel instead (each consumer converting its A tile in shared
    // memory, bit-equal to this) lost on the H200: it converts every A tile once per n-tile (N/256
    // times; 16 at the layer's W13), where this converts it once. The layer's up + SwiGLU product
    // (M=32768, K=7168, N=4096) ran 0.82× and 0.71× as fast as this path in the two forms tried
    // (conversion instructions, and integer/FMA ones; benchmarks/results/fp8-rows-a7ab0af.json,
    // fp8-rows-dc98f05.json, ncu-fp8-rows-dc98f05.csv.gz). The code is in git at a7ab0af and dc98f05.
    // Reading fp8 rows without a copy needs fp8 tensor-core products (e4m3 weights too).
    GroupedGemm dense = g;
    dense.a = Tensor::empty(g.a.shape(), DType::bf16, g.a.device(), op);
    dense.a_scales = Tensor();
    dequantize_fp8(g.a, g.a_scales, dense.a);
    grouped_gemm(dense);
    return;
  }
  MOE_ON_DEVICE(g.a, op, grouped_gemm_cpu(g), grouped_gemm_on_cuda(g, op));
}

}  // namespace moe::ops
