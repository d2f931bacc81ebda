// Token choice with bias balancing against expert choice at the same compute, on the default task
// (`moe-ep train`'s embedded default: 2 MoE layers, 8 experts, top-2, sigmoid scores, 256 tokens
// per step, 1000 steps), on the CPU, for several seeds (data.seed seeds the data and the weights).
//   node benchmarks/expert-choice-compare.mjs [--out DIR] [--quick] [--seeds N]     (after npm run build)
// Runs, per seed: token choice as configured by default (dropless, DeepSeek-V3 bias balancing,
// γ = 1e-3); token choice with the bias frozen (γ = 0, for scale); expert choice with capacityFactor
// null = topK, so every expert takes C = T·k/E = 64 tokens and the experts process T·k rows per
// layer and step, as dropless top-k token choice does. The same with the classification loss
// (model.loss cross-entropy). Each row summarises one run: losses (first step, mean of the last 100
// steps), accuracy (classification), MaxVio (mean over the last 100 steps of the larger layer's),
// rows through the experts per layer and step, and for expert choice the tokens that got no expert
// and the experts-per-token histogram of the last step. Wall time is on a shared 2-core machine:
// indicative only.
import { resolveConfig } from '../dist/lib/train/config.js';
import { Trainer } from '../dist/lib/train/trainer.js';
import { args, quick, writeResult } from './harness.mjs';

const seedsIndex = args.indexOf('--seeds');
const seeds = Array.from({ length: seedsIndex >= 0 ? Number(args[seedsIndex + 1]) : quick ? 1 : 3 }, (_, i) => i + 1);
const steps = quick ? 300 : 1000;
const variants = [
  { name: 'token choice + bias balancing', model: {}, balance: {} },
  { name: 'token choice, bias frozen', model: {}, balance: { gamma: 0 } },
  { name: 'expert choice (C = T·k/E)', model: { routing: 'expert-choice' }, balance: {} },
];
const mean = (v) => v.reduce((a, b) => a + b, 0) / v.length;
const rows = [];
for (const loss of ['mse', 'cross-entropy']) {
  for (const v of variants) {
    for (const seed of seeds) {
      const cfg = resolveConfig({
        model: { ...v.model, loss },
        balance: v.balance,
        data: { seed },
        train: { device: 'cpu', steps, progress: false },
      });
      const t0 = performance.now();
      const t = new Trainer(cfg);
      const m = t.run();
      t.dispose();
      const seconds = (performance.now() - t0) / 1000;
      const tail = m.slice(-100);
      const E = cfg.model.experts;
      const T = cfg.data.tokensPerStep;
      const ec = cfg.model.routing === 'expert-choice';
      const rowsPerStep = ec ? E * Math.ceil((T * (cfg.model.capacityFactor ?? cfg.model.topK)) / E) : T * cfg.model.topK;
      const zeroFraction = ec ? mean(tail.map((s) => mean(s.layers.map((l) => (l.expertsPerToken?.[0] ?? 0) / T)))) : 0;
      const last = m[m.length - 1];
      rows.push({
        task: loss,
        variant: v.name,
        seed,
        steps,
        first_loss: +m[0].loss.toFixed(4),
        loss_last100: +mean(tail.map((s) => s.loss)).toFixed(4),
        ...(loss === 'cross-entropy' ? { accuracy_last100: +mean(tail.map((s) => s.accuracy ?? 0)).toFixed(4) } : {}),
        maxvio_last100: +mean(tail.map((s) => Math.max(...s.layers.map((l) => l.maxVio)))).toFixed(4),
        maxvio_first100: +mean(m.slice(0, 100).map((s) => Math.max(...s.layers.map((l) => l.maxVio)))).toFixed(4),
        expert_rows_per_layer_step: rowsPerStep,
        no_expert_fraction_last100: +zeroFraction.toFixed(4),
        experts_per_token_last_step: ec ? last.layers.map((l) => l.expertsPerToken) : null,
        seconds: +seconds.toFixed(1),
      });
      console.error(
        `${loss} | ${v.name} | seed ${seed}: loss ${rows[rows.length - 1].loss_last100}, MaxVio ${rows[rows.length - 1].maxvio_last100}, ${seconds.toFixed(1)} s`,
      );
    }
  }
}

// Means over seeds per (task, variant): what docs/expert-choice.md tabulates.
const summary = [];
for (const loss of ['mse', 'cross-entropy'])
  for (const v of variants) {
    const r = rows.filter((x) => x.task === loss && x.variant === v.name);
    const sd = (f) => {
      const m = mean(r.map(f));
      return Math.sqrt(mean(r.map((x) => (f(x) - m) ** 2)));
    };
    summary.push({
      task: loss,
      variant: v.name,
      seeds: r.length,
      loss_last100_mean: +mean(r.map((x) => x.loss_last100)).toFixed(4),
      loss_last100_sd: +sd((x) => x.loss_last100).toFixed(4),
      ...(loss === 'cross-entropy' ? { accuracy_last100_mean: +mean(r.map((x) => x.accuracy_last100)).toFixed(4) } : {}),
      maxvio_last100_mean: +mean(r.map((x) => x.maxvio_last100)).toFixed(4),
      no_expert_fraction_last100_mean: +mean(r.map((x) => x.no_expert_fraction_last100)).toFixed(4),
      expert_rows_per_layer_step: r[0]?.expert_rows_per_layer_step,
      seconds_mean: +mean(r.map((x) => x.seconds)).toFixed(1),
    });
  }

writeResult('expert-choice-compare', summary, {
  task: "moe-ep train's default configuration (lib/train/config.ts defaultConfig) on the CPU; the variants change only what their name says",
  runs: rows,
  metrics:
    'loss_last100: mean loss over the last 100 steps; maxvio: max over layers of max_e load_e / mean load − 1, averaged over steps; no_expert_fraction: tokens with no expert (expert choice), averaged over layers and the last 100 steps',
  compute: 'expert_rows_per_layer_step: rows the experts process per layer and step (token choice dropless: T·k; expert choice: E·C)',
  timing: 'seconds: wall time of each run on a shared 2-core machine, indicative only',
});
