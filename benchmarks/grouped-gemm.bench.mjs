// Grouped GEMM (bf16, fp32 accumulate): forward (NN), dA (NT) and dW (TN) against torch._grouped_mm
// on the same inputs in the same run, plus a dense torch.mm of the same FLOPs.
//   node benchmarks/grouped-gemm.bench.mjs [--out DIR] [--quick]
// FLOPs per product: 2·M·K·N. TFLOP/s = FLOPs / median time.
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';

import { Tensor, tidy } from '../dist/lib/index.js';
import { groupedGemm } from '../dist/lib/moe/grouped-gemm.js';
import { quick, runPeer, timeCuda, writeInputs, writeResult } from './harness.mjs';

const dev = 'cuda:0';
const repeats = quick ? 10 : 30;

function balanced(E, M) {
  return Array.from({ length: E }, (_, e) => Math.floor(((e + 1) * M) / E) - Math.floor((e * M) / E));
}
// Zipf(1.0) over experts, rounded to multiples of 8 rows (torch's dW needs that), summing to M.
function zipf(E, M) {
  const w = Array.from({ length: E }, (_, e) => 1 / (e + 1));
  const s = w.reduce((x, y) => x + y, 0);
  const counts = w.map((x) => Math.floor((x / s) * M / 8) * 8);
  counts[0] += M - counts.reduce((x, y) => x + y, 0);
  return counts;
}

const shapes = [
  { name: 'T=32768 H=7168 F=2048 E=64 balanced', M: 32768, K: 7168, N: 2048, counts: balanced(64, 32768) },
  { name: 'T=32768 H=7168 F=2048 E=64 zipf', M: 32768, K: 7168, N: 2048, counts: zipf(64, 32768) },
  { name: 'T=8192 H=4096 F=14336 E=8', M: 8192, K: 4096, N: 14336, counts: balanced(8, 8192) },
  { name: 'T=4096x8 H=7168 F=2048 E=256', M: 32768, K: 7168, N: 2048, counts: balanced(256, 32768) },
];

const rows = [];
for (const s of shapes) {
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
    // The ladder: the earlier BK=32 configuration, timed beside the default in the same run.
    process.env.MOE_EP_GG_TILE = '32';
    const nn32 = timeCuda(() => groupedGemm('NN', a, b, offsets, { out: outNN }), { repeats });
    delete process.env.MOE_EP_GG_TILE;
    const nn = timeCuda(() => groupedGemm('NN', a, b, offsets, { out: outNN }), { repeats });
    const nt = timeCuda(() => groupedGemm('NT', dC, b, offsets, { out: outNT }), { repeats });
    const tn = timeCuda(() => groupedGemm('TN', a, dC, offsets, { out: outTN }), { repeats });
    writeInputs(dir, { a, b, dC, offsets, oursNN: outNN });
    return { nn, nt, tn, nn32 };
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
  rows.push(row('forward NN', r.nn, peer.torchNN), row('dA NT', r.nt, peer.torchNT), row('dW TN', r.tn, peer.torchTN));
  rows[rows.length - 3].denseTFLOPs = +tf(peer.denseMM).toFixed(1);
  rows[rows.length - 3].bk32TFLOPs = +tf(r.nn32).toFixed(1);
  rows[rows.length - 3].relErrVsTorch = peer.relErrNN;
  if (peer.torchTNError) rows[rows.length - 1].torchError = peer.torchTNError;
}
writeResult('grouped-gemm', rows, {
  flops: '2·M·K·N per product; M rows in total split into groups by counts',
  ratio: 'torch time / our time (≥ 1 means we are faster)',
  kernel: 'mma.sync m16n8k16 bf16, 128x128x64 tiles, 4 warps, 3-stage cp.async ring, staged stores (bk32TFLOPs: the 128x128x32, 4-stage variant)',
});
