// The CPU matmul (ops.matmul on the 'cpu' device: the no-GPU path and the oracle of every GEMM
// kernel) of this build against another addon's, in alternating rounds, each in a fresh process:
//   node benchmarks/cpu-matmul.bench.mjs --against /path/to/other/moe_ep.node [--rounds 5] [--out DIR]
// Shapes: square f32 and bf16 products (fp32 results), b with contiguous rows and b transposed.
// Writes cpu-matmul-<commit>.json: per shape the median and range over rounds of each addon's ms,
// and GFLOP/s (2·M·N·K / ms).
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';

import { flag, median, range, writeResult } from './harness.mjs';

const other = flag('--against', null);
if (!other) throw new Error('--against /path/to/moe_ep.node: the addon to time beside this build');
const rounds = Number(flag('--rounds', '5'));
const mine = join(import.meta.dirname, '..', 'build', 'Release', 'moe_ep.node');
const shapes = [
  [512, 'f32', false],
  [1024, 'f32', false],
  [1024, 'bf16', false],
  [1024, 'f32', true],
  [2048, 'f32', false],
];
// One process per addon and round: times every shape once (after one untimed product).
const child = `
const { ops, Tensor } = await import(${JSON.stringify(join(import.meta.dirname, '..', 'dist', 'lib', 'index.js'))});
const out = [];
for (const [n, dt, trans] of ${JSON.stringify(shapes)}) {
  const a = Tensor.randn([n, n], { device: 'cpu', seed: 1 }).cast(dt);
  const s = Tensor.randn([n, n], { device: 'cpu', seed: 2 }).cast(dt);
  const b = trans ? s.transpose() : s;
  ops.matmul(a.narrow(0, 0, 8), b, { dtype: 'f32' });
  const t = performance.now();
  ops.matmul(a, b, { dtype: 'f32' });
  out.push(performance.now() - t);
}
console.log(JSON.stringify(out));`;
const ms = { this: shapes.map(() => []), other: shapes.map(() => []) };
for (let r = 0; r < rounds; r++) {
  // A B, then B A: a drifting machine load hits both alike.
  const order = r % 2 ? ['other', 'this'] : ['this', 'other'];
  for (const who of order) {
    const p = spawnSync(process.execPath, ['--input-type=module', '-e', child], {
      encoding: 'utf8',
      env: { ...process.env, MOE_EP_ADDON: who === 'this' ? mine : other },
    });
    if (p.status !== 0) throw new Error(`${who}: ${p.stderr}`);
    JSON.parse(p.stdout.trim().split('\n').at(-1)).forEach((v, i) => ms[who][i].push(v));
  }
  console.error(`round ${r + 1}/${rounds}`);
}
const num = (v, d = 1) => +v.toFixed(d);
const rows = shapes.map(([n, dt, trans], i) => {
  const flops = 2 * n ** 3;
  const [a, b] = [median(ms.this[i]), median(ms.other[i])];
  return {
    shape: `${n}³ ${dt}${trans ? ', b transposed' : ''}`,
    'this ms': num(a),
    'this range': range(ms.this[i])
      .map((v) => num(v))
      .join('–'),
    'other ms': num(b),
    'other range': range(ms.other[i])
      .map((v) => num(v))
      .join('–'),
    'other/this': num(b / a, 2),
    'this GFLOP/s': num(flops / a / 1e6, 2),
    'other GFLOP/s': num(flops / b / 1e6, 2),
  };
});
writeResult('cpu-matmul', rows, {
  this: mine,
  other,
  timing: `${rounds} rounds, each timing every shape once per addon in a fresh process (MOE_EP_ADDON), the two in alternating order; medians and ranges over rounds; wall clock; MOE_EP_CPU_THREADS ${process.env.MOE_EP_CPU_THREADS ?? 'unset (all cores)'}`,
  machine: 'this development machine (2 cores, shared): a relative figure',
});
