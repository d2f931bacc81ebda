// Grouped GEMM (bf16, fp32 accumulate): forward (NN), dA (NT) and dW (TN) against torch._grouped_mm
// on the same inputs in the same run, plus a dense torch.mm of the same FLOPs.
//   node benchmarks/grouped-gemm.bench.mjs [--out DIR] [--quick]
// FLOPs per product: 2·M·K·N. TFLOP/s = FLOPs / median time.
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';

import { ops, sumOfSquares, Tensor, tidy } from '../dist/lib/index.js';
import { groupedGemm } from '../dist/lib/moe/grouped-gemm.js';
import { shapes } from './grouped-gemm-shapes.mjs';
import { quick, runPeer, timeCuda, writeInputs, writeResult } from './harness.mjs';

const dev = 'cuda:0';
const repeats = quick ? 10 : 30;

const only = process.env.MOE_EP_GG_SHAPES; // e.g. "0,2": a subset while iterating

/**
 * ‖out − ref‖ / ‖ref‖ on the device, in fp32. One product at a time (the decode shape's fp32 dW is
 * 15 GB): its temporaries are freed before it returns.
 */
function relErrInNorm(out, ref) {
  return tidy(() => {
    const refF32 = ref.dtype === 'f32' ? ref : ref.cast('f32');
    const diff = ops.add(out.dtype === 'f32' ? out : out.cast('f32'), refF32, { alpha: -1 });
    return Math.sqrt(sumOfSquares(diff).item() / Math.max(sumOfSquares(refF32).item(), 1e-30));
  });
}

const rows = [];
for (const [i, s] of shapes.entries()) {
  if (only && !only.split(',').includes(String(i))) continue;
  const E = s.counts.length;
  const off = [0];
  for (const c of s.counts) off.push(off[off.length - 1] + c);
  const dir = mkdtempSync(join('/dev/shm', 'moe-gg-'));
  const r = tidy(() => {
    const a = Tensor.randn([s.M, s.K], { dtype: 'bf16', device: dev, std: 1, seed: 1 });
    const b = Tensor.randn([E, s.K, s.N], { dtype: 'bf16', device: dev, std: 0.02, seed: 2 });
    const dC = Tensor.randn([s.M, s.N], { dtype: 'bf16', device: dev, std: 1, seed: 3 });
    const offsets = Tensor.fromArray(off, { dtype: 'i32', device: dev });
    const outNN = Tensor.empty([s.M, s.N], { dtype: 'bf16', device: dev });
    const outNT = Tensor.empty([s.M, s.K], { dtype: 'bf16', device: dev });
    const outTN = Tensor.empty([E, s.K, s.N], { dtype: 'bf16', device: dev });
    // The ladder: the portable mma.sync kernel (MOE_EP_GG_HOPPER=0), timed beside the default
    // (the Hopper kernel where it applies) in the same run.
    process.env.MOE_EP_GG_HOPPER = '0';
    const nnSync = timeCuda(() => groupedGemm('NN', a, b, offsets, { out: outNN }), { repeats });
    const ntSync = timeCuda(() => groupedGemm('NT', dC, b, offsets, { out: outNT }), { repeats });
    delete process.env.MOE_EP_GG_HOPPER;
    // The Hopper kernel's register-direct epilogue (v5, before the staged one became the default).
    process.env.MOE_EP_GG_HOPPER_STAGED = '0';
    process.env.MOE_EP_GG_HOPPER_HANDOFF = '0';
    const nnRegs = timeCuda(() => groupedGemm('NN', a, b, offsets, { out: outNN }), { repeats });
    const ntRegs = timeCuda(() => groupedGemm('NT', dC, b, offsets, { out: outNT }), { repeats });
    const tnRegs = timeCuda(() => groupedGemm('TN', a, dC, offsets, { out: outTN }), { repeats });
    delete process.env.MOE_EP_GG_HOPPER_STAGED;
    delete process.env.MOE_EP_GG_HOPPER_HANDOFF;
    // The warp-slice epilogue (v6; the bf16 default before the hand-off): each consumer warp stores
    // its own slices and the next tile waits for it.
    process.env.MOE_EP_GG_HOPPER_HANDOFF = '0';
    const nnSlices = timeCuda(() => groupedGemm('NN', a, b, offsets, { out: outNN }), { repeats });
    const ntSlices = timeCuda(() => groupedGemm('NT', dC, b, offsets, { out: outNT }), { repeats });
    const tnSlices = timeCuda(() => groupedGemm('TN', a, dC, offsets, { out: outTN }), { repeats });
    delete process.env.MOE_EP_GG_HOPPER_HANDOFF;
    const slicesOut = [outNN.clone(), outNT.clone(), outTN.clone()]; // checked against the default's below
    // dW with fp32 results, as training computes it (expertsBackward): the default (warp slices)
    // and the hand-off in two halves (MOE_EP_GG_HOPPER_HANDOFF=1).
    const outTN32 = Tensor.empty([E, s.K, s.N], { dtype: 'f32', device: dev });
    const tnF32 = timeCuda(() => groupedGemm('TN', a, dC, offsets, { out: outTN32 }), { repeats });
    const tnF32Ref = outTN32.clone();
    process.env.MOE_EP_GG_HOPPER_HANDOFF = '1';
    const tnF32Handoff = timeCuda(() => groupedGemm('TN', a, dC, offsets, { out: outTN32 }), { repeats });
    delete process.env.MOE_EP_GG_HOPPER_HANDOFF;
    slicesOut.push(outTN32);
    const nn = timeCuda(() => groupedGemm('NN', a, b, offsets, { out: outNN }), { repeats });
    const nt = timeCuda(() => groupedGemm('NT', dC, b, offsets, { out: outNT }), { repeats });
    const tn = timeCuda(() => groupedGemm('TN', a, dC, offsets, { out: outTN }), { repeats });
    // The other epilogue's results against the default kernel's, relative error in norm (the same
    // arithmetic: 0 unless a tile went wrong). The last pair: fp32 hand-off against fp32 slices.
    const otherEpilogueErr = [outNN, outNT, outTN, tnF32Ref].map((ref, i) => relErrInNorm(slicesOut[i], ref));
    for (const t of [...slicesOut, tnF32Ref]) t.dispose();
    // (After the epilogue comparison, which needs the default's dW in outTN.)
    // dW with few rows per group (≤ 8 on average) takes the few-rows streaming kernel by default:
    // the tensor-core kernel beside it, and its result against the default's.
    let tnTensorCores = null;
    let fewRowsErr = null;
    if (s.M <= 8 * E) {
      const ref = outTN.clone();
      process.env.MOE_EP_GG_FEW_ROWS = '0';
      tnTensorCores = timeCuda(() => groupedGemm('TN', a, dC, offsets, { out: outTN }), { repeats });
      delete process.env.MOE_EP_GG_FEW_ROWS;
      fewRowsErr = relErrInNorm(outTN, ref);
      ref.dispose();
    }
    writeInputs(dir, { a, b, dC, offsets, oursNN: outNN });
    return { tnTensorCores, fewRowsErr, otherEpilogueErr, tnF32, tnF32Handoff, nn, nt, tn, nnSync, ntSync, nnRegs, ntRegs, tnRegs, nnSlices, ntSlices, tnSlices };
  });
  const peer = runPeer('grouped_gemm_torch.py', [dir, String(repeats)]);
  rmSync(dir, { recursive: true, force: true });
  const flops = 2 * s.M * s.K * s.N;
  const tf = (ms) => (ms ? flops / (ms * 1e-3) / 1e12 : null);
  const row = (what, ours, torch) => ({
    shape: s.name,
    product: what,
    oursMs: +ours.toFixed(3),
    torchMs: torch ? +torch.toFixed(3) : null,
    oursTFLOPs: +tf(ours).toFixed(1),
    torchTFLOPs: torch ? +tf(torch).toFixed(1) : null,
    ratio: torch ? +(torch / ours).toFixed(3) : null,
  });
  const [fwd, dA, dW] = [row('forward NN', r.nn, peer.torchNN), row('dA NT', r.nt, peer.torchNT), row('dW TN', r.tn, peer.torchTN)];
  fwd.denseTFLOPs = +tf(peer.denseMM).toFixed(1);
  fwd.mmaSyncTFLOPs = +tf(r.nnSync).toFixed(1);
  dA.mmaSyncTFLOPs = +tf(r.ntSync).toFixed(1);
  fwd.registerEpilogueTFLOPs = +tf(r.nnRegs).toFixed(1);
  dA.registerEpilogueTFLOPs = +tf(r.ntRegs).toFixed(1);
  dW.registerEpilogueTFLOPs = +tf(r.tnRegs).toFixed(1);
  fwd.slicesEpilogueTFLOPs = +tf(r.nnSlices).toFixed(1);
  dA.slicesEpilogueTFLOPs = +tf(r.ntSlices).toFixed(1);
  dW.slicesEpilogueTFLOPs = +tf(r.tnSlices).toFixed(1);
  if (s.M < 32 * E) {
    // Under 32 rows per group dW never takes the Hopper kernel: its epilogue columns would time the
    // default kernel again.
    dW.registerEpilogueTFLOPs = null;
    dW.slicesEpilogueTFLOPs = null;
  }
  [fwd, dA, dW].forEach((x, i) => (x.otherEpilogueVsDefault = +r.otherEpilogueErr[i].toExponential(2)));
  if (r.tnTensorCores) {
    dW.tensorCoreOnlyTFLOPs = +tf(r.tnTensorCores).toFixed(1);
    dW.fewRowsVsTensorCores = +r.fewRowsErr.toExponential(2);
  }
  fwd.relErrVsTorch = peer.relErrNN;
  if (peer.torchTNError) dW.torchError = peer.torchTNError;
  const dW32 = {
    shape: s.name,
    product: 'dW TN, fp32 out',
    oursMs: +r.tnF32.toFixed(3),
    oursTFLOPs: +tf(r.tnF32).toFixed(1),
    handoffTFLOPs: s.M < 32 * E ? null : +tf(r.tnF32Handoff).toFixed(1),
    otherEpilogueVsDefault: +r.otherEpilogueErr[3].toExponential(2),
  };
  rows.push(fwd, dA, dW, dW32);
}
writeResult('grouped-gemm', rows, {
  flops: '2·M·K·N per product; M rows in total split into groups by counts',
  ratio: 'torch time / our time (≥ 1 means we are faster)',
  otherEpilogueVsDefault:
    "relative error in norm of the other epilogue's results against the default kernel's on the same inputs (bf16 rows: warp slices vs hand-off; " +
    "fp32 row: hand-off vs warp slices; the same arithmetic, so 0 unless a tile went wrong)",
  fewRows:
    'dW at <= 8 rows per group on average (decode) is streamed by the few-rows kernel (CUDA cores, rows 8 at a time through shared memory, 16-byte streaming stores); ' +
    'tensorCoreOnlyTFLOPs: MOE_EP_GG_FEW_ROWS=0; fewRowsVsTensorCores: relative error in norm between the two results (bf16 rounding of different summation orders)',
  fp32Out: "'dW TN, fp32 out': the weight gradient as training computes it (fp32 results); no torch peer on this row (torch's grouped mm writes bf16)",
  kernel:
    'NN, NT on cc 9.0: wgmma m64n256k16, 128x256x64 tiles, TMA ring, 1 producer + 2 consumer warpgroups, persistent (hopper.cu); ' +
    'bf16 tiles handed to 3 storer warps of the producer warpgroup through shared memory while the next tile computes (3-stage ring). ' +
    'TN at >= 32 rows per group too; below that, and mmaSyncTFLOPs: mma.sync m16n8k16, 128x128x64 tiles, 3-stage cp.async ring (cuda.cu). ' +
    'registerEpilogueTFLOPs: the Hopper kernel storing straight from registers (MOE_EP_GG_HOPPER_STAGED=0 MOE_EP_GG_HOPPER_HANDOFF=0; TN there only at >= 256 rows per group). ' +
    'slicesEpilogueTFLOPs: each consumer warp stores through its own shared-memory slices, 4-stage ring (MOE_EP_GG_HOPPER_HANDOFF=0; the default for fp32 results). ' +
    "handoffTFLOPs on the fp32 row: the hand-off in two 128-column halves (MOE_EP_GG_HOPPER_HANDOFF=1)",
});
