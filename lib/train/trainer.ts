/**
 * The training loop: data shard → model forward/backward → data-parallel gradient reduction →
 * global-norm clipping → fused AdamW (fp32 masters, compute copies refreshed; those three in
 * lib/train/optimizer.ts) → auxiliary-loss-free bias balancing from globally all-reduced expert
 * loads → metrics.
 *
 * Expert parallelism spans groups of model.epSize ranks (default: the whole world of W ranks): a
 * rank holds E/epSize experts and takes its 1/W share of each step's global batch
 * (data.tokensPerStep tokens), so a configuration trains on the same data at any EP size; with
 * epSize < W the experts are replicated over W/epSize expert-data-parallel (EDP) groups.
 * Replicated gradients (router, norms, shared experts, head) are averaged over the world. An
 * expert's gradient already holds its EP group's tokens (through the dispatcher); it is summed over
 * the EDP group and divided by W. Both then equal the gradient of the global mean loss.
 */
import { totalmem } from 'node:os';

import { checkOptionalCommunicator, type Communicator } from '../parallel/communicator.js';
import { allGatherJson } from '../parallel/gather-json.js';
import { expertGroups } from '../parallel/init.js';
import { CheckpointError, invalidArgument, usedAfterDispose } from '../errors.js';
import { checkBoolean, checkOptions } from '../validate.js';
import { Device, getDefaultDevice, cuda, synchronize } from '../device.js';
import { type ExpertParallelGroup, singleRankGroup } from '../moe/dispatcher.js';
import { type MoELayer } from '../moe/layer.js';
import { native } from '../native.js';
import { Tensor, tidy } from '../tensor.js';
import { scale } from '../basic-ops.js';
import { estimateMemory, resolveConfig, type TrainConfig } from './config.js';
import { ClusterTask } from './data.js';
import { layerMetrics, type StepMetrics } from './metrics.js';
import { LAYER_WEIGHT_KEYS, layerParamName, MoEModel, type ModelForward, type Param } from './model.js';
import { type CheckpointReader, loadCheckpoint, saveCheckpoint, type SavedCheckpoint, type SkippedCheckpoint } from './checkpoint.js';
import {
  checkLayerTensors,
  ckptNames,
  copyLayerTensors,
  disposeState,
  type MoELayerMoments,
  moeLayerState,
  routerWeighting,
} from './moe-state.js';
import { balanceBiasUpdate } from './dense-ops.js';
import {
  clipScale,
  createOptimState,
  disposeOptimState,
  type GradientGroups,
  type OptimState,
  optimizerStep,
  reduceGradients,
} from './optimizer.js';
import { cosineSchedule } from './schedule.js';

export interface TrainerOptions {
  /** The world; omitted: this process alone. */
  world?: Communicator;
  /** Called after every step (on every rank) with the step's metrics. */
  onStep?: (m: StepMetrics) => void;
  /** Set `stop` to finish after the current step (Ctrl-C). */
  control?: { stop: boolean };
}

/** Every field of a configuration as `config.section.field` → its value in JSON, sorted by path. */
function configFields(config: TrainConfig): [string, string][] {
  const out: [string, string][] = [];
  for (const [section, fields] of Object.entries(config)) {
    for (const [field, value] of Object.entries(fields as Record<string, unknown>))
      out.push([`config.${section}.${field}`, JSON.stringify(value)]);
  }
  return out.sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
}

/** 32-bit FNV-1a of a string, from `seed` (two seeds give a 64-bit fingerprint). */
function fnv1a(s: string, seed: number): number {
  let h = seed >>> 0;
  for (let i = 0; i < s.length; i++) h = Math.imul(h ^ s.charCodeAt(i), 0x01000193) >>> 0;
  return h | 0;
}

/**
 * Every rank must train the same configuration: a rank given another --model.hidden passes other
 * sizes to every collective, and one given another --data.tokensPerStep trains on other batches
 * without any collective noticing. One allGather of a fingerprint of the resolved configuration,
 * before any other collective; when they differ (every rank sees it), the ranks exchange their
 * fields and every rank throws an InvalidArgumentError naming each differing field and its values.
 */
export function checkSameConfig(world: Communicator, config: TrainConfig): void {
  if (world.size === 1) return;
  const fields = configFields(config);
  const text = fields.map(([path, value]) => `${path}=${value}`).join('\n');
  using mine = Tensor.fromArray([fnv1a(text, 0x811c9dc5), fnv1a(text, 0x9747b28c)], { dtype: 'i32', device: 'cpu' });
  using all = world.allGather(mine);
  const prints = all.toNumbers();
  if (prints.every((v, i) => v === prints[i % 2])) return;
  const configs = allGatherJson(world, Object.fromEntries(fields)) as Record<string, string | undefined>[];
  const paths = [...new Set(configs.flatMap((c) => Object.keys(c)))].sort();
  const lines: string[] = [];
  for (const path of paths) {
    const byValue = new Map<string, number[]>();
    configs.forEach((c, r) => {
      const v = c[path] ?? '(absent)';
      byValue.set(v, [...(byValue.get(v) ?? []), r]);
    });
    if (byValue.size < 2) continue;
    const list = (ranks: number[]): string =>
      ranks.length > 8 ? `${ranks.slice(0, 8).join(', ')} and ${ranks.length - 8} more` : ranks.join(', ');
    lines.push(`${path}: ${[...byValue].map(([v, ranks]) => `${v} on rank${ranks.length === 1 ? '' : 's'} ${list(ranks)}`).join('; ')}`);
  }
  invalidArgument(
    'Trainer',
    `rank ${world.rank} of ${world.size}: the ranks were given different configurations, but every rank must train the same one:\n  ${lines.join('\n  ')}`,
  );
}

export class Trainer implements Disposable {
  readonly config: TrainConfig;
  readonly device: Device;
  readonly model: MoEModel;
  readonly task: ClusterTask;
  readonly rank: number;
  readonly size: number;
  private readonly world: Communicator | undefined;
  /** The expert-parallel group the layers dispatch in, and the group holding the same experts. */
  private readonly group: ExpertParallelGroup;
  private readonly edp: Communicator | undefined;
  private readonly state: OptimState[];
  private readonly lr: (step: number) => number;
  private disposed = false;
  /** The next step to run (0-based); a resumed run starts later. */
  step = 0;
  /**
   * What the last resume() read, the newer checkpoints it passed over (failed verification), and the
   * steps the saved run was configured for (null when its manifest has no config): the schedule
   * follows this run's train.steps, which may differ.
   */
  resumedFrom: { dir: string; step: number; skipped: readonly SkippedCheckpoint[]; savedSteps: number | null } | null = null;

  constructor(config: TrainConfig, options: { world?: Communicator } = {}) {
    options = checkOptions(options, 'Trainer', { world: true });
    checkOptionalCommunicator(options.world, 'Trainer', 'world');
    // Checked (and any missing fields defaulted) as the CLI does; a resolved config comes back equal.
    config = resolveConfig(config);
    // Before any other collective: ranks that disagree on sizes would otherwise fail in the first
    // one with a less telling error, and ranks that differ in data or schedule would not fail at all.
    if (options.world) checkSameConfig(options.world, config);
    this.config = config;
    this.world = options.world;
    this.rank = options.world?.rank ?? 0;
    this.size = options.world?.size ?? 1;
    // Each rank trains on its own slice of the step's batch, and the sequence-wise loss runs on that
    // slice: both must divide evenly (every rank has this config, so every rank stops here alike).
    const { tokensPerStep } = config.data;
    if (tokensPerStep % this.size !== 0)
      invalidArgument('Trainer', `config.data.tokensPerStep ${tokensPerStep} must divide evenly over the ${this.size} ranks`);
    // Micro-batches split each rank's tokens again, and every forward runs on one of them.
    const { microBatches } = config.train;
    const perRank = tokensPerStep / this.size;
    if (perRank % microBatches !== 0)
      invalidArgument(
        'Trainer',
        `config.train.microBatches ${microBatches} must divide each rank's ${perRank} tokens (config.data.tokensPerStep ${tokensPerStep} over ${this.size} ranks)`,
      );
    const perPass = perRank / microBatches;
    const seqLen = config.balance.seqLen;
    if (seqLen !== null && perPass % seqLen !== 0)
      invalidArgument(
        'Trainer',
        microBatches === 1
          ? `config.balance.seqLen ${seqLen} must divide each rank's ${perRank} tokens (config.data.tokensPerStep ${tokensPerStep} over ${this.size} ranks): the sequence-wise loss runs on each rank's own tokens`
          : `config.balance.seqLen ${seqLen} must divide the ${perPass} tokens of each forward (config.data.tokensPerStep ${tokensPerStep} over ${this.size} ranks and ${microBatches} micro-batches): the sequence-wise loss runs on each forward's own tokens`,
      );
    const epSize = config.model.epSize ?? this.size;
    if (options.world && epSize < this.size) {
      const { ep, edp } = expertGroups(options.world, epSize);
      this.group = ep;
      this.edp = edp;
    } else {
      if (epSize !== this.size) invalidArgument('Trainer', `config.model.epSize ${epSize} must divide the ${this.size} rank(s)`);
      this.group = options.world ?? singleRankGroup;
      this.edp = undefined;
    }
    const want = config.train.device;
    if (want === 'cuda' && !cuda.isAvailable())
      invalidArgument('Trainer', `config.train.device is 'cuda' but no GPU is usable: ${cuda.unavailableReason()}`);
    this.device =
      want === 'cpu'
        ? Device.cpu
        : want === 'cuda'
          ? getDefaultDevice().isCuda
            ? getDefaultDevice()
            : Device.cuda(0)
          : cuda.isAvailable()
            ? getDefaultDevice()
            : Device.cpu;
    const dtype = this.device.isCuda ? 'bf16' : 'f32';
    const m = config.model;
    checkMemory(config, this.size, this.device);
    this.model = new MoEModel(
      {
        layers: m.layers,
        hidden: m.hidden,
        ffn: m.ffn,
        numExperts: m.experts,
        topK: m.topK,
        routing: m.routing,
        scoreFunction: m.scoreFunction,
        ...(m.normalize === null ? {} : { normalize: m.normalize }),
        routeScale: m.routeScale,
        groups: m.groups,
        topkGroups: m.topkGroups,
        ...(m.groupTop === null ? {} : { groupTop: m.groupTop }),
        dropPolicy: m.dropPolicy,
        sharedFfn: m.sharedFfn,
        sharedGate: m.sharedGate,
        routeWeightsOn: m.routeWeightsOn,
        activation: m.activation,
        ...(m.activation === 'clamped-swiglu' ? { swigluLimit: m.swigluLimit } : {}),
        routerBias: m.routerBias,
        expertBias: m.expertBias,
        loss: m.loss,
        commStream: m.overlapComm,
        transport: m.transport,
        fp8Dispatch: m.fp8Dispatch,
        recompute: config.train.recompute,
        weightGradDtype: config.train.weightGradDtype,
        ...(m.capacityFactor === null ? {} : { capacityFactor: m.capacityFactor }),
        auxLossCoef: config.balance.auxLossCoef,
        seqAuxLossCoef: config.balance.seqAuxLossCoef,
        zLossCoef: config.balance.zLossCoef,
        ...(config.balance.seqLen === null ? {} : { seqLen: config.balance.seqLen }),
      },
      this.device,
      dtype,
      this.group,
      config.data.seed,
    );
    this.task = new ClusterTask({
      dim: m.hidden,
      clusters: config.data.clusters,
      zipf: config.data.zipf,
      noise: config.data.noise,
      seed: config.data.seed,
      ...(config.data.onDevice ? { device: this.device } : {}),
    });
    this.state = createOptimState(this.model.params(), this.device);
    const o = config.optimizer;
    // A run shorter than the warm-up warms up over the whole run.
    this.lr = cosineSchedule({
      warmupSteps: Math.min(o.warmupSteps, config.train.steps),
      totalSteps: config.train.steps,
      maxLr: o.lr,
      minLr: o.minLr,
    });
  }

  /** The learning rate of step `step` (0-based) under this run's schedule. */
  lrAt(step: number): number {
    return this.lr(step);
  }

  /** The optimizer moments by parameter name (for checkpoints). */
  optimizerState(): { name: string; param: Tensor; expAvg: Tensor; expAvgSq: Tensor; kind: Param['kind'] }[] {
    return this.state.map((s) => ({
      name: s.param.name,
      param: s.param.master,
      expAvg: s.expAvg,
      expAvgSq: s.expAvgSq,
      kind: s.param.kind,
    }));
  }

  /** One optimizer step on this rank's shard of batch `this.step`. */
  trainStep(): StepMetrics {
    if (this.disposed) usedAfterDispose('Trainer.trainStep', 'the trainer');
    const c = this.config;
    const t0 = performance.now();
    const P = this.size;
    // Host time per phase. Without train.profile the device runs ahead, so its time lands in the
    // phase that first waits for it; with it, each phase ends by waiting for the device.
    const phaseMs = { data: 0, forward: 0, backward: 0, optimizer: 0, metrics: 0 };
    let phaseStart = t0;
    const endPhase = (name: keyof typeof phaseMs): void => {
      if (c.train.profile) synchronize(this.device);
      const now = performance.now();
      phaseMs[name] += now - phaseStart;
      phaseStart = now;
    };
    const metrics = tidy(() => {
      const batch = this.task.batch(this.step, c.data.tokensPerStep, this.rank, P);
      const { x, y } = ClusterTask.to(batch, this.device, this.model.dtype === 'bf16' ? 'bf16' : 'f32');
      const target = c.model.loss === 'cross-entropy' ? ClusterTask.labels(batch).to(this.device) : y;
      batch.dispose();
      endPhase('data');
      // One forward and backward, or train.microBatches of them over row slices, the gradients
      // summed in place (the GEMMs' and rmsnorm's accumulate) and divided by their number at the
      // optimizer; the metrics are summed (counts) or averaged (loss, entropy) over the passes.
      const m = c.train.microBatches;
      const rows = (x.shape[0] as number) / m;
      let grads: Map<string, Tensor> | null = null;
      let sums: {
        correct: Tensor | null;
        loss: Tensor;
        auxLoss: Tensor;
        routing: { tokensPerExpert: Tensor; dropped: Tensor; entropy: Tensor; expertsPerToken: Tensor | null }[];
      } | null = null;
      try {
        if (m > 1) grads = new Map(this.state.map((s) => [s.param.name, Tensor.zeros(s.param.master.shape, { device: this.device })]));
        for (let i = 0; i < m; i++) {
          const fwd = m === 1 ? this.model.forward(x, target) : this.passOf(x, target, i * rows, rows);
          if (!sums) {
            sums = {
              correct: fwd.correct ? fwd.correct.cast('f32') : null,
              loss: fwd.loss.clone(),
              auxLoss: fwd.auxLoss.clone(),
              routing: fwd.routing.map((r) => ({
                tokensPerExpert: r.tokensPerExpert.clone(),
                dropped: r.dropped.clone(),
                entropy: r.entropy.clone(),
                expertsPerToken: r.expertsPerToken?.clone() ?? null,
              })),
            };
          } else {
            const acc = sums;
            if (acc.correct && fwd.correct) acc.correct.add_(fwd.correct.cast('f32'));
            acc.loss.add_(fwd.loss);
            acc.auxLoss.add_(fwd.auxLoss);
            fwd.routing.forEach((r, l) => {
              const a = acc.routing[l] as (typeof acc.routing)[number];
              a.tokensPerExpert.add_(r.tokensPerExpert);
              a.dropped.add_(r.dropped);
              a.entropy.add_(r.entropy);
              if (a.expertsPerToken && r.expertsPerToken) a.expertsPerToken.add_(r.expertsPerToken);
            });
          }
          endPhase('forward');
          if (grads) this.model.backward(fwd, { accumulate: grads });
          else grads = this.model.backward(fwd);
          endPhase('backward');
        }
      } catch (e) {
        for (const g of grads?.values() ?? []) g.dispose();
        throw e;
      }
      const { correct, loss, auxLoss, routing } = sums as NonNullable<typeof sums>;
      const stepGrads = grads as Map<string, Tensor>;
      if (m > 1) {
        scale(loss, 1 / m, { out: loss });
        scale(auxLoss, 1 / m, { out: auxLoss });
        for (const r of routing) scale(r.entropy, 1 / m, { out: r.entropy });
      }
      try {
        // Data-parallel reduction, global-norm clipping, AdamW (a deliberate host sync reads the norm).
        // With micro-batches the buffers hold the sum of m passes' gradients: their mean is that / m.
        const gradNorm = reduceGradients(this.state, stepGrads, this.gradientGroups(), this.device) / m;
        const lr = this.lr(this.step);
        const gradScale = clipScale(gradNorm, c.optimizer.clipNorm) / m;
        optimizerStep(this.state, stepGrads, c.optimizer, { lr, step: this.step + 1, gradScale });
        if (this.model.dtype !== 'bf16') this.model.refreshComputeWeights();
        endPhase('optimizer');
        // Balancing: the bias follows the global expert loads.
        const layers = routing.map((r, i) => {
          const load = r.tokensPerExpert.cast('f32');
          const dropped = r.dropped.cast('f32');
          if (P > 1) {
            this.world?.allReduce(load, 'sum');
            this.world?.allReduce(dropped, 'sum');
            this.world?.allReduce(r.entropy, 'avg');
            if (r.expertsPerToken) this.world?.allReduce(r.expertsPerToken, 'sum');
          }
          const bias = (this.model.layers[i] as { bias: Tensor }).bias;
          // Expert choice has no bias to move (every expert takes exactly C tokens), nor to log.
          if (c.balance.gamma > 0 && !r.expertsPerToken) balanceBiasUpdate(bias, load, c.balance.gamma);
          const perToken = r.expertsPerToken ? Array.from(r.expertsPerToken.toArray() as Int32Array) : undefined;
          const m = layerMetrics(load.toFloat32Array(), dropped.item(), c.data.tokensPerStep * c.model.topK, r.entropy.item(), perToken);
          if (perToken) return m;
          // Six significant digits keep metrics.jsonl short; the exact bias is in the checkpoints.
          return { ...m, bias: Array.from(bias.toFloat32Array(), (b) => Number(b.toPrecision(6))) };
        });
        if (P > 1) {
          this.world?.allReduce(loss, 'avg');
          this.world?.allReduce(auxLoss, 'avg');
          if (correct) this.world?.allReduce(correct, 'sum');
        }
        const lossValue = loss.item();
        endPhase('metrics');
        const seconds = (performance.now() - t0) / 1000;
        return {
          step: this.step,
          loss: lossValue,
          ...(correct ? { accuracy: correct.item() / c.data.tokensPerStep } : {}),
          auxLoss: auxLoss.item(),
          lr,
          gradNorm,
          tokensPerSecond: c.data.tokensPerStep / seconds,
          layers,
          phaseMs: { ...phaseMs },
        };
      } finally {
        for (const g of stepGrads.values()) g.dispose();
      }
    });
    this.step++;
    return metrics;
  }

  /**
   * The forward of micro-batch rows [first, first + rows) of this rank's x and target: views (the
   * backward reads them as the forward saved them; the step's tidy frees them).
   */
  private passOf(x: Tensor, target: Tensor, first: number, rows: number): ModelForward {
    return this.model.forward(x.narrow(0, first, rows), target.narrow(0, first, rows));
  }

  private gradientGroups(): GradientGroups {
    return { world: this.world, ep: this.group, edp: this.edp };
  }

  private moments(name: string): { expAvg: Tensor; expAvgSq: Tensor } | undefined {
    const st = this.state.find((x) => x.param.name === name);
    return st ? { expAvg: st.expAvg, expAvgSq: st.expAvgSq } : undefined;
  }

  private layerMoments(i: number): MoELayerMoments {
    const m: MoELayerMoments = {};
    for (const key of LAYER_WEIGHT_KEYS) {
      const v = this.moments(layerParamName(i, key));
      if (v) m[key] = v;
    }
    return m;
  }

  /**
   * Saves model, balancing bias and optimizer state after `this.step` steps (collective when the
   * world has several ranks): experts by global index in each rank's shard, the rest once.
   */
  saveCheckpoint(root: string, keep?: number): SavedCheckpoint {
    if (this.disposed) usedAfterDispose('Trainer.saveCheckpoint', 'the trainer');
    const replicated: Record<string, Tensor> = {};
    const sharded: Record<string, Tensor> = {};
    const states = this.model.layers.map((layer, i) => moeLayerState(layer, i, this.layerMoments(i)));
    try {
      for (const st of states) {
        Object.assign(replicated, st.replicated);
        Object.assign(sharded, st.sharded);
      }
      const dense: [string, Tensor][] = [
        ...this.model.norms.map((t, i): [string, Tensor] => [ckptNames.norm(i), t]),
        [ckptNames.head, this.model.head],
      ];
      for (const [name, t] of dense) {
        replicated[name] = t;
        const m = this.moments(name);
        if (m) {
          replicated[ckptNames.optim(name, 'exp_avg')] = m.expAvg;
          replicated[ckptNames.optim(name, 'exp_avg_sq')] = m.expAvgSq;
        }
      }
      const E = this.config.model.experts;
      return saveCheckpoint(root, {
        step: this.step,
        ...(this.world && this.size > 1 ? { comm: this.world } : {}),
        replicated,
        // Experts replicated over EDP groups are written once, by the first EP group.
        sharded: !this.edp || this.edp.rank === 0 ? sharded : {},
        manifestExtras: {
          config: this.config,
          ep: { size: this.group.size, expertsPerRank: E / this.group.size, numExperts: E },
          router: routerWeighting(this.model.layers[0] as MoELayer), // the same in every layer
          data: { nextBatch: this.step, tokensPerStep: this.config.data.tokensPerStep, seed: this.config.data.seed },
          optimizer: { step: this.step },
          rng: { note: 'stateless: weights from Philox(seed, offset), batches from the step index' },
        },
        ...(keep === undefined ? {} : { keep }),
      });
    } finally {
      for (const st of states) disposeState(st);
    }
  }

  /** Loads a checkpoint (any EP size) and continues from its step: the same run, resumed. */
  resume(path: string): number {
    if (this.disposed) usedAfterDispose('Trainer.resume', 'the trainer');
    const reader: CheckpointReader = loadCheckpoint(path, this.world && this.size > 1 ? { comm: this.world } : {});
    try {
      checkSameRun(reader, this.config);
      // The dense parameters (norms, head) and their moments: checked with the layers, then copied.
      const dense: [string, Tensor][] = [];
      const addDense = (name: string, t: Tensor): void => {
        dense.push([name, t]);
        const m = this.moments(name);
        if (m) dense.push([ckptNames.optim(name, 'exp_avg'), m.expAvg], [ckptNames.optim(name, 'exp_avg_sq'), m.expAvgSq]);
      };
      this.model.norms.forEach((t, i) => addDense(ckptNames.norm(i), t));
      addDense(ckptNames.head, this.model.head);
      this.checkResumable(reader, dense);
      this.model.layers.forEach((layer, i) => copyLayerTensors(reader, layer, i, this.layerMoments(i)));
      for (const [name, t] of dense) reader.into(name, t);
      this.model.refreshComputeWeights();
      this.step = reader.step;
      this.resumedFrom = { dir: reader.dir, step: reader.step, skipped: reader.skipped, savedSteps: savedSteps(reader) };
      return this.step;
    } finally {
      reader.close();
    }
  }

  /**
   * Everything resume() reads, looked up before it copies anything, and no layer beyond the model's:
   * a checkpoint that failed half-way (one without the config record that checkSameRun compares)
   * would leave the model half loaded, and a caller that catches the error and starts afresh would
   * train on it.
   */
  private checkResumable(reader: CheckpointReader, dense: [string, Tensor][]): void {
    this.model.layers.forEach((layer, i) => checkLayerTensors(reader, layer, i, this.layerMoments(i)));
    for (const [name, dst] of dense) {
      const info = reader.info(name); // names a missing tensor
      if (info.shape.join() !== dst.shape.join())
        throw new CheckpointError(
          `checkpoint ${reader.dir}: tensor '${name}' is [${info.shape.join(', ')}] but this model's is [${dst.shape.join(', ')}]`,
        );
    }
    const L = this.model.layers.length;
    const beyond = reader.names().find((n) => Number(/^(?:optim\.)?layers\.(\d+)\./.exec(n)?.[1] ?? -1) >= L);
    if (beyond !== undefined)
      throw new CheckpointError(
        `checkpoint ${reader.dir}: it holds '${beyond}' but this model has ${L} layers (config.model.layers); build it with the checkpoint's`,
      );
  }

  /**
   * Whether every rank should stop now: true when any rank asks to (a Ctrl-C may reach the ranks at
   * different moments; they must still leave at the same step, or the next collective would hang).
   */
  agreeToStop(localStop: boolean): boolean {
    checkBoolean(localStop, 'Trainer.agreeToStop', 'localStop');
    if (this.size === 1 || !this.world) return localStop;
    using flag = Tensor.full([1], localStop ? 1 : 0, { device: 'cpu' });
    this.world.allReduce(flag, 'max');
    return flag.item() > 0;
  }

  /** Runs until the configured number of steps or until control.stop (synchronously). */
  run(options: TrainerOptions = {}): StepMetrics[] {
    if (this.disposed) usedAfterDispose('Trainer.run', 'the trainer');
    options = checkOptions(options, 'Trainer.run', { world: true, onStep: true, control: true });
    // Before the first step: found after it, a bad option would have cost an optimizer step.
    if (options.onStep !== undefined && typeof options.onStep !== 'function')
      invalidArgument('Trainer.run', `'onStep' must be a function (metrics) => void; received ${typeof options.onStep}`);
    const control = options.control;
    if (control !== undefined && (control === null || typeof control !== 'object' || typeof control.stop !== 'boolean'))
      invalidArgument(
        'Trainer.run',
        `'control' must be an object { stop: boolean }; received ${JSON.stringify(control) ?? typeof control}`,
      );
    const out: StepMetrics[] = [];
    while (this.step < this.config.train.steps && !this.agreeToStop(options.control?.stop ?? false)) {
      const m = this.trainStep();
      out.push(m);
      options.onStep?.(m);
    }
    return out;
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    if (this.edp) {
      this.edp.dispose();
      (this.group as Communicator).dispose();
    }
    disposeOptimState(this.state);
    this.model.dispose();
    this.task.dispose();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** Refuses a configuration whose estimated footprint exceeds the memory there is, before allocating. */
function checkMemory(config: TrainConfig, ranks: number, device: Device): void {
  const { params, activations, data } = estimateMemory(config, ranks);
  const onDevice = params + activations + (device.isCuda && !config.data.onDevice ? 0 : data);
  const onHost = device.isCuda ? data : onDevice;
  const gib = (n: number): string => `${(n / 2 ** 30).toFixed(1)} GiB`;
  const need: [string, number, number][] = [
    [device.toString(), onDevice, device.isCuda ? native().deviceProperties(device.index).totalMemory : totalmem()],
  ];
  if (device.isCuda) need.push(['host memory', onHost, totalmem()]);
  for (const [where, bytes, have] of need) {
    if (bytes <= have) continue;
    const m = config.model;
    invalidArgument(
      'Trainer',
      `this configuration needs about ${gib(bytes)} per rank on ${where} (parameters and optimizer state ${gib(params)}, activations ${gib(activations)}, data task ${gib(data)}) ` +
        `but it has ${gib(have)}: reduce config.model.experts (${m.experts}), model.hidden (${m.hidden}), model.ffn (${m.ffn}), model.layers (${m.layers}), data.tokensPerStep (${config.data.tokensPerStep}) or data.clusters (${config.data.clusters}), ` +
        `raise train.microBatches (${config.train.microBatches}: the activations shrink with it), set train.recompute (${config.train.recompute}: 'experts' or 'layer' keep less), or use more ranks`,
    );
  }
}

/**
 * What a resumed run must share with the run that saved the checkpoint: the model's function (its
 * sizes, routing and loss) and the task it learns (the cluster map, made from data.seed). Batch size,
 * EP size, transport, the optimizer and the balancing may change.
 */
const SAME_ON_RESUME = {
  model: [
    'layers',
    'hidden',
    'ffn',
    'experts',
    'topK',
    'routing',
    'scoreFunction',
    'groups',
    'topkGroups',
    // groupTop is not compared raw (null and its default, or any value with one group, route alike):
    // loadMoELayer compares what it resolves to, from the manifest's router record.
    'sharedFfn',
    'sharedGate',
    'routeWeightsOn',
    'activation',
    'swigluLimit',
    'routerBias',
    'expertBias',
    'loss',
  ],
  data: ['clusters', 'seed'],
} as const;

/** train.steps of the run that saved the checkpoint, when its manifest records a config. */
function savedSteps(reader: CheckpointReader): number | null {
  const recorded = reader.manifest.config as { train?: { steps?: unknown } } | null | undefined;
  const steps = recorded !== null && typeof recorded === 'object' ? recorded.train?.steps : undefined;
  return typeof steps === 'number' && Number.isSafeInteger(steps) ? steps : null;
}

/** Refuses a checkpoint whose recorded config (manifest config) differs from `config` where SAME_ON_RESUME says. */
function checkSameRun(reader: CheckpointReader, config: TrainConfig): void {
  const recorded = reader.manifest.config as Record<string, Record<string, unknown> | undefined> | null | undefined;
  if (recorded === null || typeof recorded !== 'object') return; // saved without a config (by other code): nothing to compare
  const differ: string[] = [];
  const flags: string[] = [];
  for (const [section, fields] of Object.entries(SAME_ON_RESUME) as [keyof typeof SAME_ON_RESUME, readonly string[]][]) {
    const was = recorded[section];
    if (was === null || typeof was !== 'object') continue;
    const now = config[section] as unknown as Record<string, unknown>;
    for (const f of fields) {
      if (Object.hasOwn(was, f) && JSON.stringify(was[f]) !== JSON.stringify(now[f])) {
        differ.push(`${section}.${f} ${JSON.stringify(was[f])} (this run: ${JSON.stringify(now[f])})`);
        flags.push(`--${section}.${f} ${typeof was[f] === 'string' ? was[f] : JSON.stringify(was[f])}`);
      }
    }
  }
  if (differ.length > 0)
    throw new CheckpointError(
      `checkpoint ${reader.dir}: saved by a run with ${differ.join(', ')}; resume with the saved run's values (${flags.join(' ')}, or its config.json) or start a new run`,
    );
}
