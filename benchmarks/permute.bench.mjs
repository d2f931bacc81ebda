// Permute / unpermute bandwidth on the GPU, against a device-to-device copy of the same byte count
// and PyTorch (index_select / index_add_) on the same inputs, all measured in this run.
//   node benchmarks/permute.bench.mjs [--out DIR] [--quick]
// Bytes counted are the fewest the op must move:
//   permute:   read x once (T·H·2) + write rows (R·H·2) + rowToken (R·4) + rowOf (T·k·4) + slot (T·k·4)
//   unpermute: read rows (R·H·2) + write y (T·H·2) + rowOf and weights (T·k·8)
// The copy baseline moves the same total (it reads and writes half of it each).
// Routing: uniform random top-k, capacity factor 1 with padToCapacity (so R = E·C = T·k here and no
// host sync sits inside the timed region).
// Timing: time per call over INNER back-to-back calls per event-timed region (the copy baseline the
// same way); 'one call per region' is the older method (device idle at the start, host cost inside).
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { capacity, permute, Tensor, unpermute } from '../dist/lib/index.js';
import { native } from '../dist/lib/native.js';
import { quick, runPeer, timeCuda, writeInputs, writeResult, randomRouting } from './harness.mjs';

const gpu = 'cuda:0';
const shapes = [
  { T: 4096, k: 8, H: 7168, E: 256 },
  { T: 32768, k: 2, H: 4096, E: 8 },
];

const routing = randomRouting;
const INNER = quick ? 5 : 10;

const rows = [];
for (const { T, k, H, E } of quick ? shapes.slice(0, 1) : shapes) {
  const { idx, w } = routing(T, k, E, 1234 + T);
  const indices = Tensor.fromArray(idx, { dtype: 'i32', shape: [T, k], device: gpu });
  const weights = Tensor.fromArray(w, { dtype: 'f32', shape: [T, k], device: gpu });
  const x = Tensor.randn([T, H], { dtype: 'bf16', seed: 7, device: gpu });
  const cap = capacity(indices, weights, { numExperts: E, capacityFactor: 1, dropPolicy: 'probs' });
  const p = permute(x, indices, weights, cap, { padToCapacity: true });
  const R = p.numRows;
  const y = Tensor.empty([T, H], { dtype: 'bf16', device: gpu });

  // INNER back-to-back calls per timed region (time per call): the host's cost of a call overlaps
  // the device work of the one before. Every working set here is several times the L2.
  const permuteMs = timeCuda(() => permute(x, indices, weights, cap, { padToCapacity: true, out: p }), { inner: INNER });
  const permuteSingleMs = timeCuda(() => permute(x, indices, weights, cap, { padToCapacity: true, out: p }));
  // The copy alone, to tell its speed from the layout kernel's: in token order from rowOf (what
  // permute() runs) and the gather by rowToken (x read once per row).
  const scatterMs = timeCuda(() => native().permuteRows(x.handle, p.rowToken.handle, p.rows.handle, p.rowOf.handle), { inner: INNER });
  const gatherMs = timeCuda(() => native().permuteRows(x.handle, p.rowToken.handle, p.rows.handle), { inner: INNER });
  const unpermuteMs = timeCuda(() => unpermute(p.rows, p.rowOf, weights, { out: y }), { inner: INNER });
  const capacityMs = timeCuda(() => {
    const c = capacity(indices, weights, { numExperts: E, capacityFactor: 1, dropPolicy: 'probs', out: cap });
    return c;
  });

  const permuteBytes = T * H * 2 + R * H * 2 + R * 4 + T * k * 8;
  const unpermuteBytes = R * H * 2 + T * H * 2 + T * k * 8;
  const copyRate = (bytesMoved) => {
    const n = Math.floor(bytesMoved / 2 / 2); // bf16 elements read (and written) by the copy
    const a = Tensor.empty([n], { dtype: 'bf16', device: gpu });
    const b = Tensor.empty([n], { dtype: 'bf16', device: gpu });
    a.fill_(1);
    const ms = timeCuda(() => b.copy_(a), { inner: INNER });
    a.dispose();
    b.dispose();
    return (4 * n) / (ms * 1e6); // GB/s, read + write
  };
  const permuteCopy = copyRate(permuteBytes);
  const unpermuteCopy = copyRate(unpermuteBytes);

  // PyTorch on the same inputs, in the same run.
  // Inputs for the peer go to memory-backed scratch, not to the results folder.
  const dir = mkdtempSync(join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'moe-permute-'));
  writeInputs(dir, { x, rows: p.rows, rowToken: p.rowToken, rowWeight: p.rowWeight, rowOf: p.rowOf, weights });
  let peer;
  try {
    peer = runPeer('permute_torch.py', [dir, String(quick ? 10 : 50), String(INNER)]);
  } catch (e) {
    peer = { error: String(e.message ?? e).split('\n')[0] };
  }
  rmSync(dir, { recursive: true, force: true });

  const gbs = (bytes, ms) => bytes / (ms * 1e6);
  const row = (op, ms, bytes, copy, torchMs) => ({
    shape: `T=${T} k=${k} H=${H} E=${E} R=${R}`,
    op,
    ms: +ms.toFixed(4),
    bytes,
    'GB/s': +gbs(bytes, ms).toFixed(1),
    'copy GB/s': +copy.toFixed(1),
    'of copy': +(gbs(bytes, ms) / copy).toFixed(3),
    'torch ms': torchMs ?? null,
    'torch/ours': torchMs ? +(torchMs / ms).toFixed(2) : null,
  });
  rows.push(row('permute (layout + copy)', permuteMs, permuteBytes, permuteCopy, peer?.permute_ms));
  rows.push(row('  one call per region', permuteSingleMs, permuteBytes, permuteCopy, null));
  rows.push(row('  the copy alone, token order', scatterMs, T * H * 2 + R * H * 2 + R * 4 + T * k * 4, permuteCopy, null));
  rows.push(row('  the gather by rowToken', gatherMs, T * H * 2 + R * H * 2 + R * 4, permuteCopy, null));
  rows.push(row('unpermute', unpermuteMs, unpermuteBytes, unpermuteCopy, peer?.unpermute_ms));
  rows.push({ shape: `T=${T} k=${k} H=${H} E=${E}`, op: 'capacity (probs)', ms: +capacityMs.toFixed(4) });
  if (peer?.error) console.error(`torch peer failed: ${peer.error}`);

  for (const t of [indices, weights, x, y]) t.dispose();
  for (const t of Object.values(cap)) if (t instanceof Tensor) t.dispose();
  for (const t of Object.values(p)) if (t instanceof Tensor) t.dispose();
}

writeResult('permute', rows, {
  bar: 'permute and unpermute at >= 70% of a device-to-device copy of the same byte count',
  timing: `per call, ${INNER} back-to-back calls per event-timed region (copies likewise); 'one call per region': device idle at its start`,
  bytes: 'permute: T·H·2 + R·H·2 + R·4 + T·k·8; unpermute: R·H·2 + T·H·2 + T·k·8',
});
