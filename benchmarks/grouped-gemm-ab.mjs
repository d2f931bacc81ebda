// A/B of the grouped GEMM's kernels, interleaved so that clock drift cancels (issue #20):
// per (shape, product), `rounds` rounds of one block per variant, in A B / B A order alternately;
// each block is the median of `calls` timed regions. Prints and writes per-round ratios and, from
// nvidia-smi sampled every 50 ms into a file, the mean SM clock, power and temperature of each block.
//   MOE_EP_GG_SHAPES=0,1 node benchmarks/grouped-gemm-ab.mjs --out DIR [--rounds 6] [--calls 15]
//     [--products NN,NT,TN] [--variants default,mmaSync[,tensorCores]] [--inner 1]
// Variants (bf16 results; the addon's kernel switches, set with setKernelOptions):
//   default      what the addon chooses (on an H100/H200: the Hopper kernel, tiles handed off)
//   mmaSync      the portable mma.sync kernel (the Hopper kernel switched off)
//   tensorCores  dW with few rows per group on the tensor cores (the few-rows kernel switched off)
// Issue #20 ran it on the Hopper kernel's epilogues (results/grouped-gemm-ab-epilogues-755eab3.json:
// the hand-off won every round); those that lost left the addon with issue 15 and are timed by the
// ladder's programs now (benchmarks/kernels/grouped_gemm/, steps 05 and 06).
import { spawn } from 'node:child_process';
import { mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

import { setKernelOptions, Tensor, tidy } from '../dist/lib/index.js';
import { groupedGemm } from '../dist/lib/moe/grouped-gemm.js';
import { shapes } from './grouped-gemm-shapes.mjs';
import { timeRegion } from './harness.mjs';

const argv = process.argv.slice(2);
const opt = (name, dflt) => (argv.includes(name) ? argv[argv.indexOf(name) + 1] : dflt);
const rounds = Number(opt('--rounds', 6));
const calls = Number(opt('--calls', 15));
const inner = Number(opt('--inner', 1)); // > 1: back-to-back calls, the host's per-call cost hidden
const products = opt('--products', 'NN,NT,TN').split(',');
const out = opt('--out', '/tmp/gg-ab');
const only = (process.env.MOE_EP_GG_SHAPES ?? '0,1').split(',').map(Number);
const KERNELS = {
  default: {},
  mmaSync: { groupedGemm: { hopper: false } },
  tensorCores: { groupedGemm: { fewRows: false } },
};
const variants = opt('--variants', 'default,mmaSync').split(',');
for (const v of variants) if (!KERNELS[v]) throw new Error(`unknown variant ${v}`);
mkdirSync(out, { recursive: true });

const smiFile = join(out, 'smi.csv');
const smi = spawn(
  'nvidia-smi',
  [
    '--query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active',
    '--format=csv,noheader,nounits',
    '-lms',
    '50',
  ],
  { stdio: ['ignore', openSync(smiFile, 'w'), 'ignore'] },
);

const blocks = [];
for (const i of only) {
  const s = shapes[i];
  const E = s.counts.length;
  const off = [0];
  for (const c of s.counts) off.push(off[off.length - 1] + c);
  tidy(() => {
    const a = Tensor.randn([s.M, s.K], { dtype: 'bf16', device: 'cuda:0', std: 1, seed: 1 });
    const b = Tensor.randn([E, s.K, s.N], { dtype: 'bf16', device: 'cuda:0', std: 0.02, seed: 2 });
    const dC = Tensor.randn([s.M, s.N], { dtype: 'bf16', device: 'cuda:0', std: 1, seed: 3 });
    const offsets = Tensor.fromArray(off, { dtype: 'i32', device: 'cuda:0' });
    const outs = {
      NN: Tensor.empty([s.M, s.N], { dtype: 'bf16', device: 'cuda:0' }),
      NT: Tensor.empty([s.M, s.K], { dtype: 'bf16', device: 'cuda:0' }),
      TN: Tensor.empty([E, s.K, s.N], { dtype: 'bf16', device: 'cuda:0' }),
    };
    const run = {
      NN: () => groupedGemm('NN', a, b, offsets, { out: outs.NN }),
      NT: () => groupedGemm('NT', dC, b, offsets, { out: outs.NT }),
      TN: () => groupedGemm('TN', a, dC, offsets, { out: outs.TN }),
    };
    for (const product of products) {
      for (let r = 0; r < rounds; r++) {
        const order = r % 2 ? [...variants].reverse() : variants;
        for (const v of order) {
          const before = setKernelOptions(KERNELS[v]);
          const t0 = Date.now();
          const ms = timeRegion(run[product], { warmup: 2, repeats: calls, inner });
          const t1 = Date.now();
          setKernelOptions(before);
          const tflops = (2 * s.M * s.K * s.N) / (ms * 1e-3) / 1e12;
          blocks.push({ shape: i, product, round: r, variant: v, ms, tflops, t0, t1 });
        }
      }
    }
  });
}
smi.kill();

// nvidia-smi's timestamps are local time ("2026/11/29 05:22:43.642"), as Date parses them.
const samples = readFileSync(smiFile, 'utf8')
  .trim()
  .split('\n')
  .map((l) => l.split(',').map((x) => x.trim()))
  .filter((f) => f.length >= 5)
  .map(([ts, sm, mem, pw, temp, reasons]) => ({ t: new Date(ts).getTime(), sm: +sm, mem: +mem, pw: +pw, temp: +temp, reasons }));
for (const bl of blocks) {
  const in_ = samples.filter((x) => x.t >= bl.t0 && x.t <= bl.t1);
  const mean = (k) => (in_.length ? +(in_.reduce((z, x) => z + x[k], 0) / in_.length).toFixed(0) : null);
  Object.assign(bl, {
    smMHz: mean('sm'),
    watts: mean('pw'),
    tempC: mean('temp'),
    samples: in_.length,
    reasons: [...new Set(in_.map((x) => x.reasons))].join(' '),
  });
}

// Per (shape, product): per-round ratio of each variant's time to the default's (> 1: the default faster).
const summary = [];
for (const i of only)
  for (const product of products) {
    const bs = blocks.filter((x) => x.shape === i && x.product === product);
    for (const v of variants.filter((x) => x !== 'default')) {
      const ratios = [];
      for (let r = 0; r < rounds; r++) {
        const h = bs.find((x) => x.round === r && x.variant === 'default');
        const o = bs.find((x) => x.round === r && x.variant === v);
        if (h && o) ratios.push(o.ms / h.ms);
      }
      ratios.sort((x, y) => x - y);
      const med = (v2) => {
        const t = bs
          .filter((x) => x.variant === v2)
          .map((x) => x.tflops)
          .sort((x, y) => x - y);
        return +t[Math.floor(t.length / 2)].toFixed(1);
      };
      summary.push({
        shape: shapes[i].name,
        product,
        other: v,
        defaultTFLOPs: med('default'),
        otherTFLOPs: med(v),
        ratioMedian: +ratios[Math.floor(ratios.length / 2)].toFixed(3),
        ratioMin: +ratios[0].toFixed(3),
        ratioMax: +ratios.at(-1).toFixed(3),
      });
    }
  }
writeFileSync(join(out, 'grouped-gemm-ab.json'), JSON.stringify({ rounds, calls, inner, variants, blocks, summary }, null, 1));
console.table(
  blocks.map(({ shape, product, round, variant, tflops, smMHz, watts, tempC, reasons }) => ({
    shape,
    product,
    round,
    variant,
    tflops: +tflops.toFixed(1),
    smMHz,
    watts,
    tempC,
    reasons,
  })),
);
console.table(summary);
