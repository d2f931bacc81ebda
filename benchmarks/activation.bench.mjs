// The activations (ops.relu, silu, gelu with approximate 'none' and 'tanh') and their backward
// passes against PyTorch's kernels for the same (F.relu, F.silu, F.gelu; the aten backward kernels
// autograd runs for them: threshold_backward, silu_backward, gelu_backward), and a device copy of
// the same tensor as the roof, timed in alternating rounds in one run.
//   node benchmarks/activation.bench.mjs [--rounds N] [--out DIR] [--quick] [--no-peer] [--dry-run]
// Shapes: bf16 [16384, 7168] and f32 [8192, 7168] (235 MB a tensor each: far past the L2, so every
// call streams from DRAM). Bytes per call: forward reads x and writes y (2 tensors), backward reads
// dy and x and writes dx (3); the copy reads and writes one (2). GB/s from those; '% of copy' is our
// GB/s over the copy's in the same round.
// Timing: per round, ours (each op one timeRegion, harness.mjs: median over the repeats of regions of
// 5 back-to-back calls, after warm-up)
// then the peer's round (benchmarks/peers/activation_torch.py, kept alive; its own random tensors of
// the same shape and dtype: the values do not change these kernels' time). Reported: the median over
// rounds and the range, and torch/ours per round (median, range).
// Check (before timing): ours against torch on the same inputs (x in [-8, 8), dy in [-2, 2) and the
// edges NaN, ±inf, ±100, ±1e20), per op and dtype: relative error in norm (random inputs only) and the
// share of elements whose bits differ (both compute in fp32 and round once; expf, erff and tanhf may differ in the last ulp).
// --dry-run: small shapes on the CPU (wall clock) to check the script; the peer only where torch is
// installed.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { ops, Tensor } from '../dist/lib/index.js';
import {
  args,
  dryRun,
  flag,
  median,
  num,
  PeerSession,
  quick,
  range,
  timeRegion,
  torchAvailable,
  writeInputs,
  writeResult,
} from './harness.mjs';

const device = dryRun ? 'cpu' : 'cuda:0';
const rounds = Number(flag('--rounds', quick ? '3' : '5'));
const repeats = dryRun ? 3 : quick ? 10 : 20;
const inner = dryRun ? 1 : 5; // back-to-back calls a region: one call's host cost is not timed alone
const warmup = dryRun ? 1 : 3;
const SHAPES = dryRun
  ? [
      { dtype: 'bf16', shape: [64, 96] },
      { dtype: 'f32', shape: [32, 96] },
    ]
  : [
      { dtype: 'bf16', shape: [16384, 7168] },
      { dtype: 'f32', shape: [8192, 7168] },
    ];
const CHECK_SHAPE = dryRun ? [16, 40] : [1024, 7168];
const EDGES = [NaN, Infinity, -Infinity, 100, -100, 1e20, -1e20, 0, -0];

/** Our op for each name, forward (x) or backward (dy, x), writing `out`. */
const OURS = {
  relu: (x, dy, out) => ops.relu(x, { out }),
  silu: (x, dy, out) => ops.silu(x, { out }),
  gelu: (x, dy, out) => ops.gelu(x, { out }),
  geluTanh: (x, dy, out) => ops.gelu(x, { out, approximate: 'tanh' }),
  reluBackward: (x, dy, out) => ops.reluBackward(dy, x, { out }),
  siluBackward: (x, dy, out) => ops.siluBackward(dy, x, { out }),
  geluBackward: (x, dy, out) => ops.geluBackward(dy, x, { out }),
  geluTanhBackward: (x, dy, out) => ops.geluBackward(dy, x, { out, approximate: 'tanh' }),
};
const tensorsPerCall = (op) => (op === 'copy' ? 2 : op.endsWith('Backward') ? 3 : 2);

/** x in [-8, 8) and dy in [-2, 2) of `dtype`, with the edges written over x's first elements. */
function inputs(dtype, shape, seed) {
  const xf = Tensor.rand(shape, { seed, low: -8, high: 8, device });
  const dyf = Tensor.rand(shape, { seed: seed + 1, low: -2, high: 2, device });
  const x = xf.cast(dtype);
  const dy = dyf.cast(dtype);
  const edges = Tensor.fromArray(EDGES, { dtype, device });
  const flat = x.view(-1);
  const head = flat.narrow(0, 0, EDGES.length);
  head.copy_(edges);
  for (const t of [xf, dyf, edges, flat, head]) t.dispose();
  return { x, dy };
}

const peerWanted = !args.includes('--no-peer');
const peer = peerWanted && torchAvailable() ? new PeerSession('activation_torch.py', [dryRun ? 'cpu' : 'cuda']) : null;
if (peerWanted && !peer) console.log('activation: torch not found by python3; no peer');
const notes = {
  shapes: SHAPES.map((s) => `${s.dtype} [${s.shape}]`).join(', '),
  bytes: 'forward: x read, y written; backward: dy and x read, dx written; copy: x read, y written',
  timing: `per round ours then torch's; each op: median over ${repeats} regions of ${inner} back-to-back calls, after ${warmup} warm-up regions; ${rounds} rounds; median over rounds and the range; torch/ours per round`,
};
const dir = mkdtempSync(join(dryRun ? tmpdir() : '/dev/shm', 'activation-'));
const rows = [];
let checked = null;
try {
  let torchVersion = null;
  if (peer) {
    try {
      torchVersion = (await peer.ready(120_000)).torch;
    } catch (e) {
      notes.peer = `the torch peer did not start: ${e.message}`;
    }
  }
  // The check: our outputs on the check shape beside torch's, same inputs.
  const toWrite = {};
  for (const [i, { dtype }] of SHAPES.entries()) {
    const { x, dy } = inputs(dtype, CHECK_SHAPE, 10 + 2 * i);
    toWrite[`x_${dtype}`] = x;
    toWrite[`dy_${dtype}`] = dy;
    for (const [op, run] of Object.entries(OURS)) toWrite[`${op}_${dtype}`] = run(x, dy, Tensor.empty(CHECK_SHAPE, { dtype, device }));
  }
  if (peer?.alive) {
    writeInputs(dir, toWrite);
    try {
      checked = (await peer.request({ cmd: 'check', dir }, 300_000)).check ?? null;
    } catch (e) {
      notes.check = `the peer's check failed: ${e.message}`;
    }
  }
  for (const t of Object.values(toWrite)) t.dispose();

  for (const [i, { dtype, shape }] of SHAPES.entries()) {
    const { x, dy } = inputs(dtype, shape, 100 + 2 * i);
    const out = Tensor.empty(shape, { dtype, device });
    const names = [...Object.keys(OURS), 'copy'];
    const ours = Object.fromEntries(names.map((n) => [n, []]));
    const theirs = Object.fromEntries(names.map((n) => [n, []]));
    for (let r = 0; r < rounds; r++) {
      for (const op of names) {
        const run = op === 'copy' ? () => out.copy_(x) : () => OURS[op](x, dy, out);
        ours[op].push(timeRegion(run, { device, warmup, repeats, inner }));
      }
      if (peer?.alive) {
        try {
          const answer = await peer.request({ cmd: 'round', dtype, shape, warmup, repeats, inner }, 300_000);
          if (answer.error) throw new Error(answer.error);
          for (const op of names) theirs[op].push(answer.ms[op]);
        } catch (e) {
          notes.peer = `round ${r + 1} of ${dtype} failed on the peer: ${e.message}`;
        }
      }
      console.log(
        `activation ${dtype} [${shape}] round ${r + 1}/${rounds}: silu ${num(ours.silu.at(-1))} ms, torch ${num(theirs.silu.at(-1)) ?? '-'} ms`,
      );
    }
    const elems = shape[0] * shape[1];
    const size = dtype === 'f32' ? 4 : 2;
    for (const op of names) {
      const bytes = tensorsPerCall(op) * elems * size;
      const ratios = theirs[op].length === ours[op].length ? theirs[op].map((t, k) => t / ours[op][k]) : [];
      const copyShare = ours[op].map((m, k) => ours.copy[k] / m); // (bytes/m) / (copy bytes/copy ms) with the copy's 2 tensors
      const check = checked?.[`${op} ${dtype}`];
      rows.push({
        dtype,
        shape: `[${shape}]`,
        op,
        ms: num(median(ours[op]), 4),
        'ms range': range(ours[op])
          .map((v) => num(v, 4))
          .join('–'),
        'GB/s': num(bytes / median(ours[op]) / 1e6, 0),
        '% of copy GB/s': num((100 * median(copyShare) * tensorsPerCall(op)) / 2, 1),
        'torch ms': ratios.length ? num(median(theirs[op]), 4) : null,
        'torch/ours': ratios.length ? num(median(ratios), 3) : null,
        'ratio range': ratios.length
          ? range(ratios)
              .map((v) => num(v, 3))
              .join('–')
          : null,
        'vs torch relErr': check ? Number(check.rel_err.toPrecision(3)) : null,
        'vs torch bits differ': check ? Number(check.bits_differ.toPrecision(3)) : null,
        'vs torch non-finite differ': check ? check.nonfinite_differ : null,
      });
    }
    for (const t of [x, dy, out]) t.dispose();
  }
  writeResult(`activation${dryRun ? '-dry' : ''}`, rows, notes, torchVersion ? { torch: torchVersion } : {});
} finally {
  await peer?.close();
  rmSync(dir, { recursive: true, force: true });
}
