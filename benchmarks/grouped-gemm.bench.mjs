// Grouped GEMM (bf16, fp32 accumulate): forward (NN), dA (NT) and dW (TN) against torch._grouped_mm
// on the same inputs in the same run, plus a dense torch.mm of the same FLOPs.
//   node benchmarks/grouped-gemm.bench.mjs [--out DIR] [--quick]
// FLOPs per product: 2·M·K·N. TFLOP/s = FLOPs / median time.
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';

import { ops, setKernelOptions, sumOfSquares, Tensor, tidy } from '../dist/lib/index.js';
import { groupedGemm } from '../dist/lib/moe/grouped-gemm.js';
import { shapes } from './grouped-gemm-shapes.mjs';
import { quick, runPeer, timeCuda, writeInputs, writeResult } from './harness.mjs';

const dev = 'cuda:0';
const repeats = quick ? 10 : 30;

const only = process.env.MOE_EP_GG_SHAPES; // e.g. "0,2": a subset while iterating

/** Runs fn with some grouped-GEMM kernel switches (docs/kernels.md), then puts them back. */
function withKernels(groupedGemm, fn) {
  const before = setKernelOptions({ groupedGemm });
  try {
    return fn();
  } finally {
    setKernelOptions(before);
  }
}

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
    // The ladder: the portable mma.sync kernel (groupedGemm.hopper off), timed beside the default
    // (the Hopper kernel where it applies) in the same run.
    const [nnSync, ntSync] = withKernels({ hopper: false }, () => [
      timeCuda(() => groupedGemm('NN', a, b, offsets, { out: outNN }), { repeats }),
      timeCuda(() => groupedGemm('NT', dC, b, offsets, { out: outNT }), { repeats }),
    ]);
    // (The Hopper epilogues that lost, and the mma.sync kernel's BK=32 tile, are timed by the
    // ladder's programs: benchmarks/kernels/grouped_gemm/.)
    // dW with fp32 results, as training computes it (expertsBackward).
    const outTN32 = Tensor.empty([E, s.K, s.N], { dtype: 'f32', device: dev });
    const tnF32 = timeCuda(() => groupedGemm('TN', a, dC, offsets, { out: outTN32 }), { repeats });
    outTN32.dispose();
    const nn = timeCuda(() => groupedGemm('NN', a, b, offsets, { out: outNN }), { repeats });
    const nt = timeCuda(() => groupedGemm('NT', dC, b, offsets, { out: outNT }), { repeats });
    const tn = timeCuda(() => groupedGemm('TN', a, dC, offsets, { out: outTN }), { repeats });
    // dW with few rows per group (≤ 8 on average) takes the few-rows streaming kernel by default:
    // the tensor-core kernel beside it, and its result against the default's.
    let tnTensorCores = null;
    let fewRowsErr = null;
    if (s.M <= 8 * E) {
      const ref = outTN.clone();
      tnTensorCores = withKernels({ fewRows: false }, () => timeCuda(() => groupedGemm('TN', a, dC, offsets, { out: outTN }), { repeats }));
      fewRowsErr = relErrInNorm(outTN, ref);
      ref.dispose();
    }
    writeInputs(dir, { a, b, dC, offsets, oursNN: outNN });
    return { tnTensorCores, fewRowsErr, tnF32, nn, nt, tn, nnSync, ntSync };
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
  };
  rows.push(fwd, dA, dW, dW32);
}
writeResult('grouped-gemm', rows, {
  flops: '2·M·K·N per product; M rows in total split into groups by counts',
  ratio: 'torch time / our time (≥ 1 means we are faster)',
  fewRows:
    'dW at <= 8 rows per group on average (decode) is streamed by the few-rows kernel (CUDA cores, rows 8 at a time through shared memory, 16-byte streaming stores); ' +
    'tensorCoreOnlyTFLOPs: setKernelOptions({ groupedGemm: { fewRows: false } }); fewRowsVsTensorCores: relative error in norm between the two results (bf16 rounding of different summation orders)',
  fp32Out:
    "'dW TN, fp32 out': the weight gradient as training computes it (fp32 results); no torch peer on this row (torch's grouped mm writes bf16)",
  kernel:
    'NN, NT on cc 9.0: wgmma m64n256k16, 128x256x64 tiles, TMA ring, 1 producer + 2 consumer warpgroups, persistent (hopper.cu); ' +
    'bf16 tiles handed to 3 storer warps of the producer warpgroup through shared memory while the next tile computes (3-stage ring); ' +
    'fp32 tiles stored by each consumer warp through its own shared-memory slices (4-stage ring). ' +
    'TN at >= 32 rows per group too; below that, and mmaSyncTFLOPs: mma.sync m16n8k16, 128x128x64 tiles, 3-stage cp.async ring (cuda.cu). ' +
    'The variants that lost (register-direct stores, warp slices for bf16, the fp32 hand-off, the 128x128x32 mma.sync tile): benchmarks/kernels/grouped_gemm/',
});
