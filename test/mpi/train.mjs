// Under mpirun: training at EP = world size follows the EP=1 trajectory on the same global batches,
// and a checkpoint saved at EP = world size resumes at EP=1 (rank 0 alone) on the same trajectory;
// expert-choice routing trains at EP = world size with every expert at exactly C tokens per rank;
// two micro-batches a step at EP = world size follow the EP=1 trajectory too, and so do the experts'
// gradients in bf16 and a model with gpt-oss's biases.
// Rank 0 trains the one-rank references in the same process and compares step by step.
//   --device cpu (default): f32, 25 steps, losses within 2e-3 of EP=1.
//   --device cuda: bf16 on the ranks' GPU (several ranks may share one, through MPI staging), the
//                  references on rank 0's GPU: 8 steps within 2e-2 (bf16 rounding differs with the
//                  rows' grouping).
//   --transport auto|ipc|nccl (default auto): model.transport of the trainers at EP = world size
//                  (and of the EDP groups); the one-rank references use 'auto' (no transport).
//                  Expert choice cannot use 'ipc' (every token to all experts): it runs on 'auto'
//                  unless 'nccl' is asked.
import { rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { init, InvalidArgumentError, Tensor } from '../../dist/lib/index.js';
import { resolveConfig } from '../../dist/lib/train/config.js';
import { Trainer } from '../../dist/lib/train/trainer.js';
import { check, checkTransport, expectThrow, scriptDevice, scriptTransport } from './common.mjs';

const world = await init();
const { gpu } = await scriptDevice(world);
const tr = scriptTransport();
const cfg = resolveConfig({
  // A gated shared expert (sharedGate): its gate is a replicated parameter, reduced like the router.
  model: { hidden: 16, ffn: 8, experts: 8, topK: 2, sharedFfn: 8, sharedGate: true },
  data: { tokensPerStep: 64 },
  train: { device: gpu ? 'cuda' : 'cpu', steps: gpu ? 8 : 25, progress: false },
});
const tolerance = gpu ? 2e-2 : 2e-3;
const saveAt = gpu ? 4 : 12;
const saveAtEdp = gpu ? 4 : 10;
// Every rank uses rank 0's scratch folder (one machine, shared /tmp).
const name = Tensor.fromArray(world.rank === 0 ? [Math.floor(Math.random() * 2 ** 30)] : [0], { dtype: 'i32', device: 'cpu' });
world.broadcast(name, 0);
const dir = join(tmpdir(), `moe-train-mpi-${name.item()}`);

// The trainers at EP > 1 with the transport asked for; the one-rank references keep 'auto'.
const withTransport = (c) => resolveConfig({ ...c, model: { ...c.model, transport: tr.transport } });
const ep = new Trainer(withTransport(cfg), { world });
const losses = [];
for (let i = 0; i < cfg.train.steps; i++) {
  losses.push(ep.trainStep().loss);
  if (ep.step === saveAt) ep.saveCheckpoint(dir); // collective: every rank writes its experts
}
const used = world.size > 1 ? checkTransport(ep.model.layers[0].dispatcher, tr.transport, 'EP training') : 'local';
ep.dispose();
/** Each loss of `a` within the tolerance of `b`'s (rank 0 compares). */
const close = (a, b, what) => {
  for (let i = 0; i < a.length; i++) {
    const rel = Math.abs(a[i] - b[i]) / b[i];
    check(rel < tolerance, `${what}, step ${i}: ${a[i]} vs ${b[i]} (rel ${rel.toExponential(2)})`);
  }
};
/** The one-rank reference trajectory, trained once on rank 0. */
let refLosses = null;
const reference = () => {
  if (!refLosses) {
    const ref = new Trainer(cfg);
    refLosses = ref.run().map((s) => s.loss);
    ref.dispose();
  }
  return refLosses;
};
if (world.rank === 0) {
  close(losses, reference(), `EP=${world.size} against EP=1`);
  if (!gpu) check(losses[losses.length - 1] < 0.5 * losses[0], `the loss fell: ${losses[0]} -> ${losses[losses.length - 1]}`);
  // The EP=size checkpoint, resumed by one rank holding all experts.
  const resumed = new Trainer(cfg);
  check(resumed.resume(dir) === saveAt, `resumed at step ${saveAt}`);
  const rest = resumed.run().map((s) => s.loss);
  resumed.dispose();
  close(rest, losses.slice(saveAt), `resumed at EP=1 from EP=${world.size}`);
  rmSync(dir, { recursive: true, force: true });
}
// Expert-data parallelism: EP groups of half the ranks, the experts replicated over the other half.
{
  const epSize = world.size / 2;
  const edpCfg = resolveConfig({ ...cfg, model: { ...cfg.model, epSize } });
  const dirEdp = `${dir}-edp`;
  const t = new Trainer(withTransport(edpCfg), { world });
  const edpLosses = [];
  for (let i = 0; i < cfg.train.steps; i++) {
    edpLosses.push(t.trainStep().loss);
    if (t.step === saveAtEdp) t.saveCheckpoint(dirEdp); // one EP group writes the experts
  }
  t.dispose();
  if (world.rank === 0) {
    close(edpLosses, reference(), `EP=${epSize} x EDP=2 against EP=1`);
    const resumed = new Trainer(cfg);
    check(resumed.resume(dirEdp) === saveAtEdp, `resumed the EDP checkpoint at step ${saveAtEdp}`);
    const rest = resumed.run().map((s) => s.loss);
    resumed.dispose();
    close(rest, edpLosses.slice(saveAtEdp), `resumed from the EDP checkpoint (steps counted from ${saveAtEdp})`);
    rmSync(dirEdp, { recursive: true, force: true });
  }
}
// Micro-batches at EP = world size: each rank's share in 2 forward/backward passes, the gradients
// accumulated in place, on the EP=1 one-pass trajectory (the exchanges run once per pass). Again
// with recompute 'layer' (each backward dispatches its rows again): the same bits.
{
  const run = (recompute) => {
    const mbCfg = resolveConfig({ ...cfg, train: { ...cfg.train, microBatches: 2, recompute } });
    const t = new Trainer(withTransport(mbCfg), { world });
    const mbLosses = [];
    for (let i = 0; i < cfg.train.steps; i++) mbLosses.push(t.trainStep().loss);
    t.dispose();
    return mbLosses;
  };
  const mbLosses = run('none');
  if (world.rank === 0) close(mbLosses, reference(), `EP=${world.size} with 2 micro-batches against EP=1`);
  const again = run('layer');
  check(JSON.stringify(again) === JSON.stringify(mbLosses), `recompute 'layer' at EP=${world.size}: ${again} vs ${mbLosses}`);
}
// The experts' gradients in bf16 (train.weightGradDtype), reduced in bf16 over the EDP groups (the
// routed experts) and the world (the shared expert): on the EP=1 f32 trajectory.
{
  const bf16Cfg = resolveConfig({
    ...cfg,
    model: { ...cfg.model, epSize: world.size / 2 },
    train: { ...cfg.train, weightGradDtype: 'bf16' },
  });
  const t = new Trainer(withTransport(bf16Cfg), { world });
  const bf16Losses = [];
  for (let i = 0; i < cfg.train.steps; i++) bf16Losses.push(t.trainStep().loss);
  t.dispose();
  if (world.rank === 0) close(bf16Losses, reference(), `EP=${world.size / 2} x EDP=2 with bf16 expert gradients against EP=1 (f32)`);
}
// gpt-oss's biases at EP = world size and at EP = half × EDP = 2: the router's reduced as a
// replicated parameter, the experts' with their experts; on the EP=1 trajectory.
{
  const biasModel = { ...cfg.model, activation: 'clamped-swiglu', routerBias: true, expertBias: true };
  let refBias = null;
  for (const epSize of [world.size, world.size / 2]) {
    const t = new Trainer(withTransport(resolveConfig({ ...cfg, model: { ...biasModel, epSize } })), { world });
    const biasLosses = [];
    for (let i = 0; i < cfg.train.steps; i++) biasLosses.push(t.trainStep().loss);
    t.dispose();
    if (world.rank === 0) {
      if (!refBias) {
        const ref = new Trainer(resolveConfig({ ...cfg, model: biasModel }));
        refBias = ref.run().map((s) => s.loss);
        ref.dispose();
      }
      close(biasLosses, refBias, `EP=${epSize} (of ${world.size} ranks) with gpt-oss's biases against EP=1`);
    }
  }
}
// Expert choice at EP = world size: each rank's experts choose among that rank's share of the
// batch (C = ceil((T/P)·k/E) per expert and rank), so the metrics all-reduced over the ranks show
// every expert at P·C tokens and the experts-per-token histogram covering the whole batch.
{
  const ecCfg = resolveConfig({
    ...cfg,
    model: { ...cfg.model, routing: 'expert-choice', transport: tr.transport === 'nccl' ? 'nccl' : 'auto' },
  });
  const t = new Trainer(ecCfg, { world });
  const T = cfg.data.tokensPerStep,
    E = cfg.model.experts,
    P = world.size;
  const C = Math.ceil(((T / P) * cfg.model.topK) / E);
  const ecLosses = [];
  for (let i = 0; i < cfg.train.steps; i++) {
    const m = t.trainStep();
    ecLosses.push(m.loss);
    for (const l of m.layers) {
      check(
        l.tokensPerExpert.every((n) => n === P * C),
        `expert choice step ${i}: tokens per expert ${l.tokensPerExpert} (expected ${P * C} each)`,
      );
      check(
        l.expertsPerToken.reduce((a, b) => a + b, 0) === T,
        `expert choice step ${i}: experts per token ${l.expertsPerToken} covers ${T} tokens`,
      );
    }
  }
  t.dispose();
  if (!gpu)
    check(
      ecLosses[ecLosses.length - 1] < 0.5 * ecLosses[0],
      `expert choice at EP=${P}: the loss fell: ${ecLosses[0]} -> ${ecLosses[ecLosses.length - 1]}`,
    );
}
// The sequence-wise loss runs on each rank's own tokens: a seqLen that divides the global batch but
// not a rank's share is refused by the Trainer on every rank, before the first step.
expectThrow(
  () => new Trainer(resolveConfig({ ...cfg, balance: { seqAuxLossCoef: 0.01, seqLen: cfg.data.tokensPerStep } }), { world }),
  InvalidArgumentError,
  new RegExp(`config\\.balance\\.seqLen ${cfg.data.tokensPerStep} must divide each rank's ${cfg.data.tokensPerStep / world.size} tokens`),
  'a seqLen larger than a rank share',
);
world.barrier();
console.log(`ok rank ${world.rank} of ${world.size} (transport ${used})`);
