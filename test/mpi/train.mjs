// Under mpirun: training at EP = world size follows the EP=1 trajectory on the same global batches.
// Rank 0 also trains the one-rank reference in the same process and compares step by step.
import { init } from '../../dist/lib/index.js';
import { resolveConfig } from '../../dist/lib/train/config.js';
import { Trainer } from '../../dist/lib/train/trainer.js';
import { check } from './common.mjs';

const world = await init();
const cfg = resolveConfig({
  model: { hidden: 16, ffn: 8, experts: 8, topK: 2 },
  data: { tokensPerStep: 64 },
  train: { device: 'cpu', steps: 25, progress: false },
});
const ep = new Trainer(cfg, { world });
const losses = ep.run().map((s) => s.loss);
ep.dispose();
if (world.rank === 0) {
  const ref = new Trainer(cfg);
  const refLosses = ref.run().map((s) => s.loss);
  ref.dispose();
  for (let i = 0; i < losses.length; i++) {
    const rel = Math.abs(losses[i] - refLosses[i]) / refLosses[i];
    check(rel < 2e-3, `step ${i}: EP=${world.size} loss ${losses[i]} vs EP=1 ${refLosses[i]} (rel ${rel.toExponential(2)})`);
  }
  check(losses[losses.length - 1] < 0.5 * losses[0], `the loss fell: ${losses[0]} -> ${losses[losses.length - 1]}`);
}
world.barrier();
console.log(`ok rank ${world.rank} of ${world.size}`);
