// Step 12 of the grouped-GEMM ladder (session 13): training's fp32 dW (TN) drained by TMA tensor
// stores that the consumer warpgroups issue themselves (StoreVia::ConsumerTma in hopper_epilogues.cuh),
// against the warp slices the addon ships for fp32 results (case 0).
//
// Why: on the layer's dW shapes the warp slices leave the consumers storing for ~30% of each tile
// (benchmarks/kernels-notes.md, "fp32 dW with its stores hidden"); the ways tried so far to hide
// that (the fp32 hand-off to the storer warps in two halves by row copies, 07; the ping-pong kernel,
// 08; the whole tile or 128-wide tiles through TMA stores beside a smaller ring, 10a) lost or ran
// level. Here the 4-stage ring stays whole: each consumer drains its 64×256 fp32 tile in four
// quarters through 16 KiB of its own staging, the global writes left to the copy engine, so a
// consumer spends per quarter only its shared-memory stores and a wait for the engine's read of the
// previous quarter. Ladder 11t (bf16, one staging buffer, tensor stores) ran 1.26× row copies.
// 12b keeps the 16 KiB but as two 8 KiB boxes taken in turn (eighths: the consumers write one box
// while the engine reads the other); 12c gives the staging five boxes a consumer (80 KiB) and the
// ring a stage (3), so that most of a tile's stores drain during the next tile's mainloop.
//
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -I../../../native 12-hopper-tma-store-fp32.cu -o 12-hopper-tma-store-fp32
//   ./12-hopper-tma-store-fp32 [--E 32 --M 32768 --K 7168 --N 4096 --rounds 5 --repeats 20] [--ragged 1]
//
// dW (TN) only; each result checked at sampled outputs against the CPU reference and in full
// against case 0 (the same accumulators stored another way: equal bit for bit), then both timed
// interleaved over the rounds. Default shape: the layer's dW13 (E=32, 1024 rows per group,
// K = H = 7168, N = 2F = 4096); the layer's dW2 is --K 2048 --N 7168.
#include <type_traits>

#include "hopper_epilogues.cuh"

using moe::ops::hopper::StoreVia;
template <StoreVia V> using Via = std::integral_constant<StoreVia, V>;

int main(int argc, char** argv) {
  // --ragged and --only are this program's; the rest go to ladder::parse_args. --only 1, 2, 3: compare
  // case 0 with step 12, 12b or 12c alone (0: all three), e.g. to profile one pair; 4, 5: with the
  // probes that store nothing (4- and 3-stage rings); 6, 7: case 0 against itself and against 12c with
  // the blocks' starts staggered (block b waits (b % --stagger-phases) · --stagger-ns, default 2 and
  // 6000 ns: about half a dW13 tile), so that their results are not all written at once; 8: case 0
  // against 12c with an evict-first L2 policy on its stores; 9: case 0 against 12c writing every tile
  // of a block into one block-private slot (~17 MiB, L2-resident; its result wrong by design); 10: 12c
  // issuing no tensor store (the consumers' own work alone); 11: 12c issuing half of its stores; 12,
  // 13: 10 without the proxy fence, and without the fence and the barriers (shared stores alone); 14:
  // case 0 against 12d (12c with its shared-memory stores free of bank conflicts); 15: 13 with 12d's
  // placement; 16: case 0 against the fp32 tile stored straight from the registers (v5's way, never
  // measured for fp32); 17: case 0 against the probe that pauses --pause-ns (default 600) per tile in
  // place of an epilogue; 18, 19: case 0 against 12d and against itself with the second consumer
  // warpgroup starting --lag-ns (default 1000) late, so that the two stay out of step if the ring lets
  // them (one's epilogue under the other's wgmmas); 20: the same with 12b (two 8 KiB boxes a consumer,
  // so the ring keeps 4 stages for the lag); 21: NN, bf16, the hand-off against itself; 22: NN, bf16,
  // the hand-off against itself with every --short-every-th tile (default 16) doing part of its work
  // (--short-kind 1, default: narrow, both consumers on 64 rows with half the columns each; 2: half
  // its k-tiles), its result wrong by design: with --soak-ms and MOE_EP_SMI, whether the clock falls
  // by more than the work saved (grouped-gemm.md v13, v14); --short-wave 1: every --short-every-th
  // wave of work items short instead of single items (the blocks stay in step); --dynamic 1: the
  // probe side's blocks draw their work items from a global counter (the items in flight stay a
  // window of about one wave whatever the tiles' lengths); 23: case 0 against itself with dynamic
  // work items, plain tiles (the scheduler's own cost). --trace 1:
  // one more launch of each side with block 0's consumers marking every tile's start, first full
  // stage, last wgmma and epilogue end (clock64), summarised as medians with the SM clock they imply,
  // and every block's time from its first tile to its last end beside the launch's span. --soak-ms
  // N: each side alone back to back for N ms after the timed rounds, its wall-clock window printed
  // (nvidia-smi's clock and power samples: device-session.sh's MOE_EP_SMI).
  const bool use_ragged = ladder::take_flag(argc, argv, "--ragged", 0) != 0;
  const int only = ladder::take_flag(argc, argv, "--only", 0);
  const bool trace = ladder::take_flag(argc, argv, "--trace", 0) != 0;
  ladder::Probe plain, stagger, pause, lag, shorts;
  stagger.stagger_ns = ladder::take_flag(argc, argv, "--stagger-ns", 6000);
  stagger.stagger_phases = ladder::take_flag(argc, argv, "--stagger-phases", 2);
  pause.pause_ns = ladder::take_flag(argc, argv, "--pause-ns", 600);
  lag.lag_ns = ladder::take_flag(argc, argv, "--lag-ns", 1000);
  shorts.short_every = ladder::take_flag(argc, argv, "--short-every", 16);
  shorts.short_kind = ladder::take_flag(argc, argv, "--short-kind", 1);
  shorts.short_wave = ladder::take_flag(argc, argv, "--short-wave", 0) != 0;  // whole waves short (hopper_epilogues.cuh)
  // --dynamic 1: 22's probe side draws its work items from a global counter (ProbeKnobs::tile_counter);
  // 23 times case 0 against itself with dynamic work items (the scheduler's own cost).
  const bool dynamic = ladder::take_flag(argc, argv, "--dynamic", 0) != 0;
  CHECK(!dynamic || only == 22, "--dynamic 1 goes with --only 22 (23 is dynamic anyway)");
  int* tile_counter = nullptr;  // [next item, blocks done], zeroed once: the kernel's last block zeroes them again
  if (dynamic || only == 23) {
    CHECK_CUDA(cudaMalloc(&tile_counter, 2 * sizeof(int)));
    CHECK_CUDA(cudaMemset(tile_counter, 0, 2 * sizeof(int)));
  }
  if (dynamic) shorts.tile_counter = tile_counter;
  ladder::Probe dynamic_items;
  dynamic_items.tile_counter = tile_counter;
  CHECK(shorts.short_every >= 1 && (shorts.short_kind == 1 || shorts.short_kind == 2), "--short-every >= 1, --short-kind 1 or 2");
  const int soak_ms = ladder::take_flag(argc, argv, "--soak-ms", 0);
  for (ladder::Probe* probe : {&plain, &stagger, &pause, &lag, &shorts, &dynamic_items}) {
    probe->trace = trace;
    probe->soak_ms = soak_ms;
  }
  ladder::Args args = ladder::parse_args(argc, argv, 32, 32768, 7168, 4096);
  if (use_ragged) args.problem = ladder::ragged(args.problem);
  const ladder::Problem& pr = args.problem;
  ladder::print_problem("12-hopper-tma-store-fp32", pr);
  if (use_ragged) ladder::print_counts(pr);
  CHECK(pr.K % 8 == 0 && pr.N % 8 == 0 && pr.M > 0, "the Hopper kernel needs K and N multiples of 8 (TMA) and M > 0");
  const ladder::Inputs in = ladder::make_inputs(pr);
  const int32_t* tile_start = ladder::tile_starts(pr, moe::ops::hopper::kTileRows);
  const int sms = ladder::sm_count();
  // Each pairing: case 0 (the warp slices, the addon's fp32 dW until 8944e80) against one step or probe.
  auto against_case0 = [&](auto via, const char* label, const ladder::Probe& probe) {
    ladder::compare<StoreVia::WarpSlices, decltype(via)::value, float>(ladder::Mode::TN, pr, in, tile_start, sms, args,
                                                                      "case 0: warp slices (shipped for fp32)", label, probe);
  };
  if (only == 0 || only == 1) against_case0(Via<StoreVia::ConsumerTma>{}, "12: consumer-issued TMA stores, quarter tiles", plain);
  if (only == 0 || only == 2) against_case0(Via<StoreVia::ConsumerTmaDouble>{}, "12b: the same, eighths through two boxes in turn", plain);
  if (only == 0 || only == 3) against_case0(Via<StoreVia::ConsumerTmaDeep>{}, "12c: eighths through five boxes, 3-stage ring", plain);
  // Probes (only when asked for): the same loads and wgmmas with no stores at all, or with a part of
  // the epilogue left out.
  if (only == 4) against_case0(Via<StoreVia::ProbeNoStore>{}, "probe: no stores, 4-stage ring (result unwritten)", plain);
  if (only == 5) against_case0(Via<StoreVia::ProbeNoStore3>{}, "probe: no stores, 3-stage ring (result unwritten)", plain);
  if (only == 6) against_case0(Via<StoreVia::WarpSlices>{}, "probe: warp slices, blocks staggered", stagger);
  if (only == 7) against_case0(Via<StoreVia::ConsumerTmaDeep>{}, "probe: 12c, blocks staggered", stagger);
  if (only == 8) against_case0(Via<StoreVia::ConsumerTmaDeepEvictFirst>{}, "probe: 12c, stores evict-first in L2", plain);
  if (only == 9) against_case0(Via<StoreVia::ProbeL2Resident>{}, "probe: 12c, each block's tiles into one L2-resident slot (result wrong by design)", plain);
  if (only == 10) against_case0(Via<StoreVia::ProbeBoxesNoTma>{}, "probe: 12c's consumer work, no tensor store (result unwritten)", plain);
  if (only == 11) against_case0(Via<StoreVia::ProbeHalfStores>{}, "probe: 12c storing half its eighths (result half written)", plain);
  if (only == 12) against_case0(Via<StoreVia::ProbeBoxesNoFence>{}, "probe: 10 without the proxy fence (result unwritten)", plain);
  if (only == 13) against_case0(Via<StoreVia::ProbeBoxesNoSync>{}, "probe: 10 with shared stores only (result unwritten)", plain);
  if (only == 14) against_case0(Via<StoreVia::ConsumerTmaDeepSpread>{}, "12d: 12c, shared stores free of bank conflicts", plain);
  if (only == 15) against_case0(Via<StoreVia::ProbeSpreadNoSync>{}, "probe: 13 with 12d's placement (result unwritten)", plain);
  if (only == 16) against_case0(Via<StoreVia::Registers>{}, "05's way: from the registers", plain);
  if (only == 17) against_case0(Via<StoreVia::ProbePause>{}, "probe: a pause of --pause-ns a tile, no epilogue (result unwritten)", pause);
  if (only == 18) against_case0(Via<StoreVia::ConsumerTmaDeepSpread>{}, "probe: 12d, second consumer --lag-ns late", lag);
  if (only == 19) against_case0(Via<StoreVia::WarpSlices>{}, "probe: warp slices, second consumer --lag-ns late", lag);
  if (only == 20) against_case0(Via<StoreVia::ConsumerTmaDouble>{}, "probe: 12b (4-stage ring), second consumer --lag-ns late", lag);
  // 21: not dW: the NN product (the layer's up or down projection, bf16 results) with the hand-off
  // the addon ships for it, against itself, for --trace's per-tile marks of a long-k product.
  if (only == 21)
    ladder::compare<StoreVia::Handoff, StoreVia::Handoff, __nv_bfloat16>(ladder::Mode::NN, pr, in, tile_start, sms, args, "case 0: hand-off (shipped for bf16)",
                                                                         "the same (NN, bf16)", plain);
  if (only == 22)
    ladder::compare<StoreVia::Handoff, StoreVia::Handoff, __nv_bfloat16>(
        ladder::Mode::NN, pr, in, tile_start, sms, args, "case 0: hand-off (shipped for bf16)",
        shorts.short_wave ? (shorts.short_kind == 1 ? "probe: every --short-every-th wave narrow (result wrong by design)"
                                                    : "probe: every --short-every-th wave half its k-tiles (result wrong by design)")
                          : (shorts.short_kind == 1 ? "probe: every --short-every-th tile narrow (result wrong by design)"
                                                    : "probe: every --short-every-th tile half its k-tiles (result wrong by design)"),
        shorts);
  // 23 computes case 0's tiles in another order: the same bits, or the program fails (the small
  // checks of device-session.sh then stop before the timed runs).
  double dynamic_vs_case0 = 0.0;
  if (only == 23)
    dynamic_vs_case0 = ladder::compare<StoreVia::Handoff, StoreVia::Handoff, __nv_bfloat16>(
        ladder::Mode::NN, pr, in, tile_start, sms, args, "case 0: hand-off (shipped for bf16)", "the same, dynamic work items", dynamic_items);
  if (tile_counter != nullptr) CHECK_CUDA(cudaFree(tile_counter));
  if (dynamic_vs_case0 != 0.0) {
    std::printf("dynamic work items: results differ from case 0 (%.3e)\n", dynamic_vs_case0);
    return 1;
  }
  return 0;
}
