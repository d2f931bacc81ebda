// The router's logits product logits[T,E] (f32) = x[T,H] (bf16) · Wr[H,E] (bf16), as the layer and the
// serving step call it (groupedGemm('NN', x, Wr[1,H,E], offsets [0,T], f32 out)): ours with the
// skinny kernel (groupedGemm.skinny, native/ops/moe/grouped_gemm/skinny.cu) on and off, against what
// a PyTorch user writes for fp32 logits, timed in the same run on the same inputs, in alternating
// rounds.
//   node benchmarks/router-gemm.bench.mjs [--rounds N] [--out DIR] [--quick] [--no-peer] [--dry-run]
// Shapes:
//   mixtral-t64   T=64,   H=4096, E=8    (Mixtral serving step; ncu at 54297f7: 41.5-42 us with skinny off)
//   mixtral-t256  T=256,  H=4096, E=8    (the same at T=256)
//   dsv3-t128     T=128,  H=7168, E=256  (DeepSeek-V3 serving; 69 us)
//   train-t4096   T=4096, H=7168, E=32   (the training layer's step, benchmarks/moe-layer.bench.mjs; 73 us)
// Peer (benchmarks/peers/router_gemm_torch.py, one process kept alive, driven per round):
//   linear   F.linear(x, Wr.t()).float()       bf16 logits from cuBLAS, then cast (what most MoE code does)
//   mm_f32   torch.mm(x, Wr, out_dtype=torch.float32)   fp32 logits straight from the bf16 product,
//            where this torch has out_dtype on mm (null otherwise)
// Timing: per round and shape, each variant is one timeRegion (harness.mjs) of `inner` back-to-back
// calls rotating among `sets` copies of x and Wr whose total is about three times the L2 (so a call
// does not find its inputs in L2), median over the repeats; the peer does the same with its own
// copies. Reported: median over rounds of the round medians, the range over rounds, bytes moved
// (x + Wr read, logits written once) and GB/s from them, and ratios per round (theirs / ours).
// Check (before timing): our logits with skinny on against skinny off and, with the peer, against
// torch's fp32 product x.float() @ Wr.float(), relative error in norm.
// --dry-run: tiny shapes on the CPU (wall clock) to check the script; the peer only where torch is
// installed.
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { groupedGemm, setKernelOptions, Tensor } from '../dist/lib/index.js';
import {
  args,
  dryRun,
  flag,
  median,
  num,
  PeerSession,
  quick,
  range,
  relErrInNorm,
  timeRegion,
  torchAvailable,
  writeInputs,
  writeResult,
} from './harness.mjs';

const device = dryRun ? 'cpu' : 'cuda:0';
const rounds = Number(flag('--rounds', quick ? '3' : '5'));
const SHAPES = dryRun
  ? [
      { name: 'dry-a', T: 8, H: 64, E: 8 },
      { name: 'dry-b', T: 24, H: 136, E: 32 },
    ]
  : [
      { name: 'mixtral-t64', T: 64, H: 4096, E: 8 },
      { name: 'mixtral-t256', T: 256, H: 4096, E: 8 },
      { name: 'dsv3-t128', T: 128, H: 7168, E: 256 },
      { name: 'train-t4096', T: 4096, H: 7168, E: 32 },
    ];
const L2_BYTES = 50 << 20; // H200
const MAX_SETS = 256;
const repeats = dryRun ? 3 : quick ? 10 : 30;
const warmup = dryRun ? 1 : 5;

const bytesOf = (s) => s.T * s.H * 2 + s.H * s.E * 2 + s.T * s.E * 4;
const setsOf = (s) => Math.min(MAX_SETS, Math.max(2, Math.ceil((3 * L2_BYTES) / bytesOf(s))));

const dir = mkdtempSync(join(dryRun ? tmpdir() : '/dev/shm', 'router-gemm-'));
const peerWanted = !args.includes('--no-peer');
const peerPossible = peerWanted && torchAvailable();
if (peerWanted && !peerPossible) console.log('router-gemm: torch not found by python3; no peer');

try {
  // Inputs: x uniform in [-1, 1), Wr in ±1/√H (logits of order 1), the same bytes for the peer.
  const cases = SHAPES.map((s, i) => {
    const x = Tensor.rand([s.T, s.H], { seed: 100 + i, low: -1, high: 1, device }).cast('bf16');
    const wr = Tensor.rand([1, s.H, s.E], { seed: 200 + i, low: -1 / Math.sqrt(s.H), high: 1 / Math.sqrt(s.H), device }).cast('bf16');
    const nSets = setsOf(s);
    const sets = Array.from({ length: nSets }, () => ({
      x: x.clone(),
      wr: wr.clone(),
      out: Tensor.empty([s.T, s.E], { dtype: 'f32', device }),
    }));
    const offsets = Tensor.fromArray([0, s.T], { dtype: 'i32', device });
    return { ...s, i, x, wr, sets, offsets, inner: Math.max(20, nSets) };
  });
  writeInputs(
    dir,
    Object.fromEntries(
      cases.flatMap((c) => [
        [`x${c.i}`, c.x],
        [`wr${c.i}`, c.wr.view(c.H, c.E)],
      ]),
    ),
  );

  const run = (c, k) => {
    const s = c.sets[k % c.sets.length];
    groupedGemm('NN', s.x, s.wr, c.offsets, { out: s.out });
  };
  const withSkinny = (on, fn) => {
    const before = setKernelOptions({ groupedGemm: { skinny: on } });
    try {
      return fn();
    } finally {
      setKernelOptions(before);
    }
  };

  // Check: skinny on against off, and (below, with the peer) against torch's fp32 product.
  const checks = {};
  const oursDir = join(dir, 'ours');
  mkdirSync(oursDir);
  const ours = {};
  for (const c of cases) {
    const on = withSkinny(true, () => groupedGemm('NN', c.x, c.wr, c.offsets, { dtype: 'f32' }));
    const off = withSkinny(false, () => groupedGemm('NN', c.x, c.wr, c.offsets, { dtype: 'f32' }));
    checks[`${c.name}: skinny on vs off`] = num(relErrInNorm(on.toArray(), off.toArray()), 9);
    ours[`logits${c.i}`] = on;
    off.dispose();
  }
  writeInputs(oursDir, ours);
  for (const t of Object.values(ours)) t.dispose();

  let peer = null;
  let peerInfo = null;
  if (peerPossible) {
    peer = new PeerSession('router_gemm_torch.py', [dir, String(cases.length), dryRun ? 'cpu' : 'cuda']);
    try {
      peerInfo = await peer.ready(300_000);
      const check = await peer.request({ cmd: 'check', dir: oursDir }, 120_000);
      for (const [i, err] of Object.entries(check.rel_err ?? {}))
        checks[`${cases[Number(i)].name}: ours (skinny on) vs torch fp32`] = num(err, 9);
      for (const [key, err] of Object.entries(check.torch_rel_err ?? {})) {
        const [i, variant] = key.split(' ');
        checks[`${cases[Number(i)].name}: torch ${variant} vs torch fp32`] = num(err, 9);
      }
      if (check.error) checks['peer check'] = check.error;
    } catch (e) {
      console.error(`router-gemm: the peer failed to start: ${e.message}`);
      peer = null;
    }
  }

  // Rounds: every variant of every shape once per round, ours then the peer's.
  const times = Object.fromEntries(cases.map((c) => [c.name, { on: [], off: [], linear: [], mm_f32: [] }]));
  for (let r = 0; r < rounds; r++) {
    for (const c of cases) {
      const t = times[c.name];
      for (const on of [true, false]) {
        t[on ? 'on' : 'off'].push(withSkinny(on, () => timeRegion((_, k) => run(c, k), { device, warmup, repeats, inner: c.inner })));
      }
      if (peer?.alive) {
        try {
          const p = await peer.request({ cmd: 'round', case: c.i, warmup, repeats, inner: c.inner, sets: c.sets.length }, 300_000);
          if (p.error) throw new Error(p.error);
          t.linear.push(p.linear_ms);
          t.mm_f32.push(p.mm_f32_ms ?? null);
        } catch (e) {
          console.error(`router-gemm: peer round failed: ${e.message}`);
          // A round without the peer keeps its place, so that ratios pair the same rounds.
          t.linear.push(null);
          t.mm_f32.push(null);
        }
      }
    }
  }
  await peer?.close();

  const rows = [];
  for (const c of cases) {
    const t = times[c.name];
    const bytes = bytesOf(c);
    // Per round (the peer's rounds that failed, null, are left out of both sides).
    const ratio = (theirs, mine) => theirs.flatMap((v, k) => (v == null ? [] : [v / mine[k]]));
    const present = (ms) => ms.filter((v) => v != null);
    const row = (variant, ms, ratioToOn) => ({
      shape: c.name,
      T: c.T,
      H: c.H,
      E: c.E,
      variant,
      us: ms.length ? num(median(ms) * 1000, 2) : null,
      us_range: ms.length ? range(ms.map((v) => v * 1000)).map((v) => num(v, 2)) : null,
      bytes,
      GBps: ms.length ? num(bytes / (median(ms) * 1e-3) / 1e9, 1) : null,
      time_over_skinny: ratioToOn && ratioToOn.length ? num(median(ratioToOn), 3) : null,
      time_over_skinny_range: ratioToOn && ratioToOn.length ? range(ratioToOn).map((v) => num(v, 3)) : null,
      sets: c.sets.length,
      inner: c.inner,
    });
    rows.push(row('ours skinny on', t.on, null));
    rows.push(row('ours skinny off', t.off, ratio(t.off, t.on)));
    if (present(t.linear).length) rows.push(row('torch F.linear(x, Wr.t()).float()', present(t.linear), ratio(t.linear, t.on)));
    if (present(t.mm_f32).length) rows.push(row('torch.mm(x, Wr, out_dtype=f32)', present(t.mm_f32), ratio(t.mm_f32, t.on)));
  }
  writeResult(
    'router-gemm',
    rows,
    {
      what: 'logits[T,E] f32 = x[T,H] bf16 · Wr[H,E] bf16: groupedGemm NN with one group (skinny on / off) against torch',
      timing: `per round and shape one timeRegion per variant: ${repeats} repeats after ${warmup} warm-up of 'inner' back-to-back calls rotating among 'sets' copies of x and Wr (about 3x the L2 in all, at most ${MAX_SETS}); us = median over ${rounds} rounds of the per-call medians, us_range = min-max over rounds`,
      bytes: 'x (T*H*2) + Wr (H*E*2) read once, logits (T*E*4) written once; GBps = bytes / us',
      time_over_skinny: 'per round, this variant / ours with skinny on; median and min-max over rounds (> 1: skinny faster)',
      peer: peerInfo ? `torch ${peerInfo.torch}; mm out_dtype: ${peerInfo.mm_out_dtype ?? 'unsupported'}` : 'none',
    },
    { checks },
  );
} finally {
  rmSync(dir, { recursive: true, force: true });
}
