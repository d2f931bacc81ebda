// Grouped GEMM for the experts: rows of `a` are grouped by expert (offsets [E+1] i32, on the
// tensors' device; group e is rows offsets[e] .. offsets[e+1]), each group multiplied by its own
// matrix. bf16 operands, fp32 accumulation. Per-group row counts are read on the device: no host
// synchronisation, and groups with zero rows are fine.
//
//   NN  out[M,N]   = a[M,K] · b_e[K,N]        b [E,K,N]        (forward: tokens · weights)
//   NT  out[M,K]   = a[M,N] · b_eᵀ            b [E,K,N]        (backward: dA = dC · Wᵀ)
//   TN  out_e[K,N] = a_eᵀ · b_e               a [M,K], b [M,N], out [E,K,N]
//                                                              (backward: dW_e = A_eᵀ · dC_e; the
//                                                               inner dimension is each group's row
//                                                               count, any value, zero included)
// Epilogues fused into the same kernel:
//   Store    out = result (bf16 or f32), or out += result with `accumulate` (f32 out).
//   SwiGLU   NN only. b's columns interleave W1 and W3 (column 2i is W1's column i, 2i+1 is W3's),
//            so each thread holds matching pairs: h[:, i] = silu(g1) · g3 is written to `out`
//            [M, N/2] (bf16), and the pre-activations g = a·b to `aux` [M, N] (bf16) when given.
//            h is computed from g as stored (rounded to out's dtype), whether or not g is saved.
//   DSwiGLU  NT only. The result is dh [M, K']; with the saved g (`aux`, [M, 2K'] bf16,
//            interleaved) it writes dg [M, 2K'] to `out`: dg1 = dh·g3·silu'(g1), dg3 = dh·silu(g1),
//            dh rounded to out's dtype first. (Both as an unfused GEMM and elementwise op would
//            compute them: swiglu.h.)
// Rows of `out` outside every group (at or beyond offsets[E]) are not written.
// fp8 rows (NN only, Store or SwiGLU): `a` may be fp8e4m3 with `a_scales` [M, K/128] f32, one scale
// per 128 values of a row (quantizeFp8's format, what an fp8 'keep' dispatch delivers); the product
// is the bf16 GEMM of the dequantised rows, bf16(e4m3 · scale): a bf16 copy is made first
// (grouped_gemm.cc says why not inside the kernel).
#pragma once
#include "core/tensor.h"

namespace moe::ops {

enum class GemmMode : int { NN = 0, NT = 1, TN = 2 };
enum class GemmEpilogue : int { Store = 0, SwiGLU = 1, DSwiGLU = 2 };

struct GroupedGemm {
  GemmMode mode;
  GemmEpilogue epilogue;
  Tensor a, b, offsets, out, aux;
  Tensor a_scales;  // fp8 rows only
  bool accumulate = false;
};

void grouped_gemm(const GroupedGemm& g);

// Kernel switches, set from TypeScript (setKernelOptions in lib/kernel-options.ts, through
// native/addon/kernel_options_binding.cc). grouped_gemm.cc is the one place they are read: it
// chooses the CUDA kernel of each call from them (GemmKernel). The defaults are the kernels that
// measured fastest (benchmarks/grouped-gemm.md); switching one off is for comparisons and tests.
// Eight-byte aligned: held in a std::atomic (grouped_gemm.cc), which is lock-free only at 1, 2, 4 or
// 8 bytes (more bools would need libatomic, which the addon does not link).
struct alignas(8) GroupedGemmOptions {
  bool hopper = true;    // the TMA + wgmma kernel on compute capability 9.0, for the shapes it takes
  bool few_rows = true;  // dW with few rows per group on average (decode): the streaming kernel
  // The forward (NN, Store or SwiGLU) with a handful of rows per group (decode): the split-K weight
  // streaming kernel (decode.cu), where grouped_gemm.cc's decode_rows takes it.
  bool decode = true;
  // The forward (NN, Store) with one group and at most 256 columns (the router's logits x·Wr): the
  // split-K skinny kernel (skinny.cu), where grouped_gemm.cc's select_tile_kernel takes it.
  bool skinny = true;
  // dW (TN, bf16 results) with 32-128 rows per group on average on Hopper: the group's dC slice
  // resident in shared memory, tiles stored by TMA tensor stores (hopper_b_resident.cu), where
  // grouped_gemm.cc's select_tile_kernel takes it. Needs `hopper` on too.
  bool b_resident = true;
  // dW (TN) on the Hopper kernel (hopper.cu): a group's last k-tile runs only the k16 steps that
  // hold its rows. Results unchanged (the steps skipped multiply zeroed rows).
  bool trim_tails = true;
  // dW (TN, plain store, f32 out) of one group with few output tiles (the router's xᵀ·dLogits): its
  // rows split into ranges computed as a grouped GEMM of several groups, the fp32 partials added in
  // order (split_rows.h), where grouped_gemm.cc's row_splits takes it.
  bool split_rows = true;
};
void set_grouped_gemm_options(const GroupedGemmOptions& options);
GroupedGemmOptions grouped_gemm_options();

// The CUDA kernels: mma.sync (cuda.cu; any shape, sm_80 and sm_90), the Hopper one (hopper.cu; built
// with MOE_EP_WITH_HOPPER) and its B-resident dW for few rows per group (hopper_b_resident.cu), the
// few-rows dW kernel (few_rows.cu) and the skinny one-group forward (skinny.cu).
enum class GemmKernel : int { MmaSync = 0, Hopper = 1, FewRows = 2, Skinny = 3, HopperBResident = 4 };

// What grouped_gemm.cc chose for a call. decode_rows = 0: `kernel` for every group. decode_rows > 0
// (NN only): the decode kernel (decode.cu) computes the groups of 1..decode_rows rows, and `kernel`
// the larger ones, launched only when the call has more than decode_rows rows (otherwise no group
// can be larger).
struct GemmChoice {
  GemmKernel kernel = GemmKernel::MmaSync;
  int decode_rows = 0;
  bool trim_tails = true;  // the Hopper kernel's (GroupedGemmOptions::trim_tails)
};

void grouped_gemm_cpu(const GroupedGemm& g);
void grouped_gemm_cuda(const GroupedGemm& g, GemmChoice choice, void* stream);

}  // namespace moe::ops
