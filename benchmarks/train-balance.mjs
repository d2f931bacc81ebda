// The figures of docs/train.md's "Balancing, measured", on the CPU: `moe-ep train`'s default task
// (1000 steps), mean loss and MaxVio over the last 100 steps, for
//   - bias balancing off (γ = 0), the default γ = 1e-3, and γ = 3e-4;
//   - at equal per-token FLOPs, 8 experts (top-2, ffn 8) against one expert of ffn 16 (softmax over
//     one expert: its weight is 1, a dense FFN). The default model is 8 experts, top-2, ffn 16.
// Training on the CPU is deterministic (fixed seeds, fixed reduction orders), so one run of each is
// the figure; test/50-train.test.ts asserts the same relations with margins.
//   node benchmarks/train-balance.mjs [--out DIR] [--steps N]
import { defaultConfig } from '../dist/lib/index.js';
import { resolveConfig } from '../dist/lib/train/config.js';
import { Trainer } from '../dist/lib/train/trainer.js';
import { flag, writeResult } from './harness.mjs';

const steps = Number(flag('--steps', defaultConfig.train.steps));
const tail = Math.min(100, steps);
const runs = [
  ['balancing off (γ = 0)', { balance: { gamma: 0 } }],
  ['γ = 1e-3 (the default)', {}],
  ['γ = 3e-4', { balance: { gamma: 3e-4 } }],
  ['8 experts, top-2, ffn 8', { model: { experts: 8, topK: 2, ffn: 8 } }],
  ['one expert, ffn 16 (dense: the same per-token FLOPs)', { model: { experts: 1, topK: 1, ffn: 16, scoreFunction: 'softmax' } }],
];
const rows = [];
for (const [what, overrides] of runs) {
  const t0 = Date.now();
  const cfg = resolveConfig({ ...overrides, train: { device: 'cpu', progress: false, steps } });
  const trainer = new Trainer(cfg);
  const metrics = trainer.run();
  trainer.dispose();
  const last = metrics.slice(-tail);
  const mean = (f) => last.reduce((a, s) => a + f(s), 0) / last.length;
  rows.push({
    what,
    experts: cfg.model.experts,
    topK: cfg.model.topK,
    ffn: cfg.model.ffn,
    gamma: cfg.balance.gamma,
    [`loss (mean of last ${tail})`]: Number(mean((s) => s.loss).toFixed(4)),
    [`MaxVio (mean of last ${tail})`]:
      cfg.model.experts > 1 ? Number(mean((s) => Math.max(...s.layers.map((l) => l.maxVio))).toFixed(3)) : null,
    'first loss': Number(metrics[0].loss.toFixed(3)),
    seconds: Number(((Date.now() - t0) / 1000).toFixed(1)),
  });
  console.log(`${what}: done in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
}
writeResult('train-balance-cpu', rows, {
  task: `moe-ep train's default task and model on the CPU, ${steps} steps; everything else at its default`,
  metrics: `loss and MaxVio (max over layers of max_e load_e / mean load − 1) averaged over the last ${tail} steps`,
  seconds: 'wall time of each run on this machine (shared; not a benchmark figure)',
});
