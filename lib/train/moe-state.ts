/**
 * Checkpoint names for the MoE model, and the MoE layer's state in and out of a checkpoint.
 *
 *   layers.{i}.router.weight          [H, E]  f32      replicated
 *   layers.{i}.bias                   [E]     f32      replicated (selection-only balancing bias)
 *   layers.{i}.experts.{e}.w1|w3      [H, F]           sharded, e = GLOBAL expert index
 *   layers.{i}.experts.{e}.w2         [F, H]           sharded
 *   layers.{i}.shared.w1|w3|w2        as above         replicated (shared expert)
 *   layers.{i}.shared.gate            [H]     f32      replicated (sharedGate)
 *   layers.{i}.router.bias            [E]     f32      replicated (routerBias: gpt-oss's, on the logits)
 *   layers.{i}.experts.{e}.b1|b3      [F]     f32      sharded (expertBias: the first projection's, de-interleaved)
 *   layers.{i}.experts.{e}.b2         [H]     f32      sharded
 *   layers.{i}.norm.weight, head.weight                replicated
 *   optim.{param name}.exp_avg|exp_avg_sq              next to their parameter (sharded with experts)
 *
 * W1 and W3 are stored de-interleaved (the layer keeps them interleaved by column in w13), so other
 * tools read them as ordinary [H, F] matrices. Rank r of an EP group of P owns global experts
 * r·E/P … (r+1)·E/P − 1, so any EP size reads exactly the experts it owns by name.
 */
import { checkDeviceUsable, Device, type DeviceLike } from '../device.js';
import { CheckpointError, invalidArgument } from '../errors.js';
import { checkNonNegativeInt, checkOneOf, checkOptions, checkPositiveInt, checkTensor, type OptionKeys } from '../validate.js';
import { interleaveW13 } from '../moe/experts.js';
import type { MoELayer } from '../moe/layer.js';
import { keep, Tensor, tidy } from '../tensor.js';
import type { CheckpointReader } from './checkpoint.js';

export type ExpertWeight = 'w1' | 'w3' | 'w2';
/** gpt-oss's expert biases, per expert: the first projection's halves and the second's. */
export type ExpertBias = 'b1' | 'b3' | 'b2';
export type MomentName = 'exp_avg' | 'exp_avg_sq';

export const ckptNames = {
  router: (layer: number): string => `layers.${layer}.router.weight`,
  bias: (layer: number): string => `layers.${layer}.bias`,
  expert: (layer: number, e: number, w: ExpertWeight): string => `layers.${layer}.experts.${e}.${w}`,
  shared: (layer: number, w: ExpertWeight): string => `layers.${layer}.shared.${w}`,
  sharedGate: (layer: number): string => `layers.${layer}.shared.gate`,
  routerBias: (layer: number): string => `layers.${layer}.router.bias`,
  expertBias: (layer: number, e: number, b: ExpertBias): string => `layers.${layer}.experts.${e}.${b}`,
  norm: (layer: number): string => `layers.${layer}.norm.weight`,
  head: 'head.weight',
  optim: (param: string, moment: MomentName): string => `optim.${param}.${moment}`,
};

/** The global expert index in a checkpoint tensor name (layers.3.experts.17.w1 → 17), or undefined. */
export function expertIndexOf(name: string): number | undefined {
  const m = /(?:^|\.)experts\.(\d+)\./.exec(name);
  return m ? Number(m[1]) : undefined;
}

/** The experts rank `rank` of an EP group of `epSize` owns: [first, first + count). */
export function ownedExperts(numExperts: number, epSize: number, rank: number): { first: number; count: number } {
  checkPositiveInt(numExperts, 'ownedExperts', 'numExperts');
  if (!Number.isSafeInteger(epSize) || epSize < 1 || numExperts % epSize !== 0)
    invalidArgument('ownedExperts', `'numExperts' ${numExperts} must be a multiple of the EP size ${epSize}`);
  if (!Number.isSafeInteger(rank) || rank < 0 || rank >= epSize) invalidArgument('ownedExperts', `'rank' ${rank} is not in [0, ${epSize})`);
  const count = numExperts / epSize;
  return { first: rank * count, count };
}

/**
 * Local experts w13 [El, H, 2F] (interleaved) and w2 [El, F, H] → contiguous per-expert tensors
 * named by GLOBAL index: name(e, 'w1') [H, F], name(e, 'w3') [H, F], name(e, 'w2') [F, H] for
 * e = firstExpert … firstExpert + El − 1. New tensors (dispose them after saving).
 */
export function splitExperts(
  w13: Tensor,
  w2: Tensor,
  firstExpert: number,
  name: (e: number, w: ExpertWeight) => string,
): Record<string, Tensor> {
  checkTensor(w13, 'splitExperts', 'w13');
  checkTensor(w2, 'splitExperts', 'w2');
  checkNonNegativeInt(firstExpert, 'splitExperts', 'firstExpert');
  if (
    w13.ndim !== 3 ||
    w2.ndim !== 3 ||
    w13.shape[0] !== w2.shape[0] ||
    (w13.shape[2] as number) !== 2 * (w2.shape[1] as number) ||
    w13.shape[1] !== w2.shape[2]
  ) {
    invalidArgument('splitExperts', `'w13' must be [El, H, 2F] and 'w2' [El, F, H]; got [${w13.shape}] and [${w2.shape}]`);
  }
  const [El, H, F2] = w13.shape as [number, number, number];
  const F = F2 / 2;
  // tidy() keeps the tensors of the returned object and disposes the views made on the way.
  return tidy(() => {
    const out: Record<string, Tensor> = {};
    const pairs = (w13.isContiguous ? w13 : w13.contiguous()).view(El, H, F, 2);
    for (let i = 0; i < El; i++) {
      const e = firstExpert + i;
      const p = pairs.narrow(0, i, 1);
      out[name(e, 'w1')] = p.narrow(3, 0, 1).contiguous().view(H, F);
      out[name(e, 'w3')] = p.narrow(3, 1, 1).contiguous().view(H, F);
      out[name(e, 'w2')] = w2.narrow(0, i, 1).contiguous().view(F, H);
    }
    return out;
  });
}

/**
 * Reads experts firstExpert … firstExpert + count − 1 (w1, w3 [H, F]; w2 [F, H]) and builds the
 * layer's layout: w13 [count, H, 2F] (interleaved) and w2 [count, F, H], on `device`, fp32 unless
 * `dtype` says otherwise.
 */
export function joinExperts(
  reader: CheckpointReader,
  firstExpert: number,
  count: number,
  name: (e: number, w: ExpertWeight) => string,
  options: { device?: DeviceLike; dtype?: 'f32' | 'bf16' } = {},
): { w13: Tensor; w2: Tensor } {
  options = checkOptions(options, 'joinExperts', { device: true, dtype: true });
  if (reader === null || typeof reader !== 'object' || typeof (reader as { get?: unknown }).get !== 'function')
    invalidArgument('joinExperts', `'reader' must be a CheckpointReader (from loadCheckpoint)`);
  checkNonNegativeInt(firstExpert, 'joinExperts', 'firstExpert');
  checkPositiveInt(count, 'joinExperts', 'count');
  if (typeof name !== 'function') invalidArgument('joinExperts', `'name' must be a function (expert, weight) → tensor name`);
  // Before any expert is read (a bad device failed after reading them all, naming copyTo).
  const dtype = checkOneOf(options.dtype ?? 'f32', 'joinExperts', 'dtype', ['f32', 'bf16'] as const);
  if (options.device !== undefined) checkDeviceUsable(Device.parse(options.device, 'joinExperts'), 'joinExperts');
  const get = (n: string): Tensor => reader.get(n, { device: 'cpu', dtype });
  return tidy(() => {
    const w1s: Tensor[] = [];
    const w3s: Tensor[] = [];
    const w2s: Tensor[] = [];
    for (let i = 0; i < count; i++) {
      w1s.push(get(name(firstExpert + i, 'w1')));
      w3s.push(get(name(firstExpert + i, 'w3')));
      w2s.push(get(name(firstExpert + i, 'w2')));
    }
    const [H, F] = w1s[0]!.shape as [number, number];
    // Every expert as expert `firstExpert`'s: the views below would take a transposed tensor of the
    // same size without a word.
    const expect = (t: Tensor, e: number, w: ExpertWeight, shape: [number, number]): void => {
      if (t.shape.length !== 2 || t.shape[0] !== shape[0] || t.shape[1] !== shape[1])
        throw new CheckpointError(
          `checkpoint ${reader.dir}: tensor '${name(e, w)}' has shape [${t.shape.join(', ')}] where [${shape.join(', ')}] was expected (as '${name(firstExpert, 'w1')}' [${H}, ${F}] says)`,
        );
    };
    for (let i = 0; i < count; i++) {
      expect(w1s[i]!, firstExpert + i, 'w1', [H, F]);
      expect(w3s[i]!, firstExpert + i, 'w3', [H, F]);
      expect(w2s[i]!, firstExpert + i, 'w2', [F, H]);
    }
    const w1 = Tensor.empty([count, H, F], { dtype, device: 'cpu' });
    const w3 = Tensor.empty([count, H, F], { dtype, device: 'cpu' });
    const w2 = Tensor.empty([count, F, H], { dtype, device: 'cpu' });
    for (let i = 0; i < count; i++) {
      w1.narrow(0, i, 1).copy_(w1s[i]!.view(1, H, F));
      w3.narrow(0, i, 1).copy_(w3s[i]!.view(1, H, F));
      w2.narrow(0, i, 1).copy_(w2s[i]!.view(1, F, H));
    }
    const w13 = interleaveW13(w1, w3);
    const device = options.device ?? 'cpu';
    return { w13: w13.to(device), w2: w2.to(device) };
  });
}

/** Adam moments with the shapes of the layer's master weights (null where the layer has none). */
export interface MoELayerMoments {
  router?: { expAvg: Tensor; expAvgSq: Tensor };
  w13?: { expAvg: Tensor; expAvgSq: Tensor };
  w2?: { expAvg: Tensor; expAvgSq: Tensor };
  sharedW13?: { expAvg: Tensor; expAvgSq: Tensor };
  sharedW2?: { expAvg: Tensor; expAvgSq: Tensor };
  sharedGate?: { expAvg: Tensor; expAvgSq: Tensor };
  /** gpt-oss's biases: the router's [E] and the experts' [El,2F], [El,H]. */
  routerBias?: { expAvg: Tensor; expAvgSq: Tensor };
  w13Bias?: { expAvg: Tensor; expAvgSq: Tensor };
  w2Bias?: { expAvg: Tensor; expAvgSq: Tensor };
}

const MOMENT_KEYS: OptionKeys<MoELayerMoments> = {
  router: true,
  w13: true,
  w2: true,
  sharedW13: true,
  sharedW2: true,
  sharedGate: true,
  routerBias: true,
  w13Bias: true,
  w2Bias: true,
};

/** The moments, checked: w13's and w2's come together (one without the other would be skipped silently), as do the shared expert's and the experts' biases'. */
function checkMoments(moments: MoELayerMoments | undefined, op: string): MoELayerMoments {
  const m = checkOptions(moments, op, MOMENT_KEYS);
  for (const [a, b] of [
    ['w13', 'w2'],
    ['sharedW13', 'sharedW2'],
    ['w13Bias', 'w2Bias'],
  ] as const)
    if ((m[a] === undefined) !== (m[b] === undefined))
      invalidArgument(
        op,
        `'moments.${m[a] === undefined ? b : a}' was given without 'moments.${m[a] === undefined ? a : b}': give both or neither`,
      );
  return m;
}

/**
 * A MoE layer's tensors for saveCheckpoint: replicated (router, bias, shared expert and their moments)
 * and sharded (this rank's experts by global index, and their moments). The expert and shared tensors
 * are new de-interleaved copies; dispose them with disposeState() after saving.
 */
export function moeLayerState(
  layer: MoELayer,
  index: number,
  moments: MoELayerMoments = {},
): { replicated: Record<string, Tensor>; sharded: Record<string, Tensor>; owned: Tensor[] } {
  checkReaderAndLayer(null, layer, 'moeLayerState');
  moments = checkMoments(moments, 'moeLayerState');
  checkNonNegativeInt(index, 'moeLayerState', 'index'); // it names the checkpoint's tensors
  const first = layer.group.rank * layer.localExperts;
  const replicated: Record<string, Tensor> = {};
  const sharded: Record<string, Tensor> = {};
  const owned: Tensor[] = [];
  const add = (into: Record<string, Tensor>, rec: Record<string, Tensor>): void => {
    for (const [n, t] of Object.entries(rec)) {
      into[n] = t;
      owned.push(t);
    }
  };
  replicated[ckptNames.router(index)] = layer.master.router;
  replicated[ckptNames.bias(index)] = layer.bias;
  const expertName = (e: number, w: ExpertWeight): string => ckptNames.expert(index, e, w);
  add(sharded, splitExperts(layer.master.w13, layer.master.w2, first, expertName));
  for (const m of ['exp_avg', 'exp_avg_sq'] as const) {
    const key = m === 'exp_avg' ? 'expAvg' : 'expAvgSq';
    if (moments.router) replicated[ckptNames.optim(ckptNames.router(index), m)] = moments.router[key];
    if (moments.sharedGate) replicated[ckptNames.optim(ckptNames.sharedGate(index), m)] = moments.sharedGate[key];
    if (moments.w13 && moments.w2)
      add(
        sharded,
        splitExperts(moments.w13[key], moments.w2[key], first, (e, w) => ckptNames.optim(expertName(e, w), m)),
      );
    if (moments.sharedW13 && moments.sharedW2)
      add(
        replicated,
        splitExperts(moments.sharedW13[key], moments.sharedW2[key], 0, (_e, w) => ckptNames.optim(ckptNames.shared(index, w), m)),
      );
    if (moments.routerBias) replicated[ckptNames.optim(ckptNames.routerBias(index), m)] = moments.routerBias[key];
    if (moments.w13Bias && moments.w2Bias)
      add(
        sharded,
        splitExpertBiases(moments.w13Bias[key], moments.w2Bias[key], first, (e, b) =>
          ckptNames.optim(ckptNames.expertBias(index, e, b), m),
        ),
      );
  }
  if (layer.master.sharedW13 && layer.master.sharedW2)
    add(
      replicated,
      splitExperts(layer.master.sharedW13, layer.master.sharedW2, 0, (_e, w) => ckptNames.shared(index, w)),
    );
  if (layer.master.sharedGate) replicated[ckptNames.sharedGate(index)] = layer.master.sharedGate;
  if (layer.master.routerBias) replicated[ckptNames.routerBias(index)] = layer.master.routerBias;
  if (layer.master.w13Bias && layer.master.w2Bias)
    add(
      sharded,
      splitExpertBiases(layer.master.w13Bias, layer.master.w2Bias, first, (e, b) => ckptNames.expertBias(index, e, b)),
    );
  return { replicated, sharded, owned };
}

/**
 * The experts' biases w13Bias [El,2F] (interleaved as w13) and w2Bias [El,H] (or moments of their
 * shapes) → per global expert b1 [F], b3 [F] and b2 [H], named by `name` (new tensors, de-interleaved).
 */
function splitExpertBiases(
  w13Bias: Tensor,
  w2Bias: Tensor,
  first: number,
  name: (e: number, b: ExpertBias) => string,
): Record<string, Tensor> {
  const [El, F2] = w13Bias.shape as [number, number];
  const out: Record<string, Tensor> = {};
  tidy(() => {
    const pairs = w13Bias.view(El, F2 / 2, 2);
    for (let i = 0; i < El; i++) {
      const e = first + i;
      out[name(e, 'b1')] = keep(
        pairs
          .narrow(0, i, 1)
          .narrow(2, 0, 1)
          .contiguous()
          .view(F2 / 2),
      );
      out[name(e, 'b3')] = keep(
        pairs
          .narrow(0, i, 1)
          .narrow(2, 1, 1)
          .contiguous()
          .view(F2 / 2),
      );
      out[name(e, 'b2')] = keep(
        w2Bias
          .narrow(0, i, 1)
          .contiguous()
          .view(w2Bias.shape[1] as number),
      );
    }
  });
  return out;
}

/** Disposes the copies moeLayerState() made. */
export function disposeState(state: { owned: Tensor[] }): void {
  for (const t of state.owned) t.dispose();
}

/**
 * The routing a checkpoint was trained with, from its manifest's config.model.routing (as
 * `moe-ep train` records it; its checkpoints from before the option: token choice); undefined when
 * the manifest has no model config.
 */
export function checkpointRouting(reader: CheckpointReader): 'token-choice' | 'expert-choice' | undefined {
  const model = (reader.manifest.config as { model?: { routing?: unknown } } | null | undefined)?.model;
  if (model === null || typeof model !== 'object') return undefined;
  return model.routing === 'expert-choice' ? 'expert-choice' : 'token-choice';
}

/**
 * How the router scores and weights: recorded by Trainer.saveCheckpoint (manifest `router`). The
 * score function, top-k and groups are recorded since 2026-12-05; older records hold the first two.
 */
export interface RouterWeighting {
  normalize: boolean;
  routeScale: number;
  scoreFunction?: string;
  topK?: number;
  groups?: number;
  topkGroups?: number;
  /** Since 2026-12-06 (session 27), with groups > 1: a group's score sums its top groupTop (before: topK/topkGroups). */
  groupTop?: number;
  /** Since 2026-12-05 (session 26): where the weight applies, and the experts' activation. */
  routeWeightsOn?: string;
  activation?: string;
  swigluAlpha?: number;
  swigluLimit?: number;
}

/** The manifest's `router` record for `layer` (Trainer.saveCheckpoint writes it). */
export function routerWeighting(layer: MoELayer): RouterWeighting {
  const { normalize, routeScale, scoreFunction, topK, groups, topkGroups, groupTop, routeWeightsOn, activation, swigluAlpha, swigluLimit } =
    layer.config;
  return {
    normalize,
    routeScale,
    scoreFunction,
    topK,
    groups,
    topkGroups,
    // Read only with groups: recorded there alone, so that one group's records compare equal.
    ...(groups > 1 ? { groupTop } : {}),
    routeWeightsOn,
    activation,
    ...(activation === 'clamped-swiglu' ? { swigluAlpha, swigluLimit } : {}),
  };
}

/**
 * Refuses a checkpoint whose router weighted its scores otherwise than `layer` does: the same
 * weights would route and scale tokens differently. The manifest's `router` record when there is
 * one; without it (saved before moe-ep 0.1.0 recorded it), a Trainer run with sigmoid scores and
 * topK 1, which then normalised every weight to routeScale and now does not.
 */
function checkRouterWeighting(reader: CheckpointReader, layer: MoELayer, index: number): void {
  const recorded = reader.manifest.router as Partial<RouterWeighting> | null | undefined;
  const now = routerWeighting(layer);
  const model = (reader.manifest.config as { model?: Record<string, unknown> } | null | undefined)?.model;
  // What a router trained one way computes another way: each field the manifest records (the
  // router record, or moe-ep train's config.model) must be this layer's.
  const fromConfig: Partial<Record<keyof RouterWeighting, unknown>> =
    model !== null && typeof model === 'object'
      ? {
          scoreFunction: model['scoreFunction'],
          topK: model['topK'],
          groups: model['groups'],
          topkGroups: model['topkGroups'],
          groupTop: model['groupTop'] ?? undefined, // null: topK/topkGroups
        }
      : {};
  // Records from before routeWeightsOn and activation existed: 'output' and 'swiglu', the only ones then.
  const since = recorded !== null && typeof recorded === 'object' ? { routeWeightsOn: 'output', activation: 'swiglu', ...recorded } : null;
  const wasOf = (key: keyof RouterWeighting): unknown =>
    since !== null && since[key] !== undefined ? since[key] : fromConfig[key as keyof typeof fromConfig];
  for (const key of [
    'scoreFunction',
    'topK',
    'groups',
    'topkGroups',
    'groupTop',
    'routeWeightsOn',
    'activation',
    'swigluAlpha',
    'swigluLimit',
  ] as const) {
    let was = wasOf(key);
    // groupTop is read (and recorded) only with groups; saved before it existed, a group scored its top topK/topkGroups.
    if (key === 'groupTop') {
      const [groups, topK, topkGroups] = [wasOf('groups'), wasOf('topK'), wasOf('topkGroups')];
      if (typeof groups === 'number' && groups <= 1) was = undefined;
      else if (was === undefined && typeof groups === 'number' && typeof topK === 'number' && typeof topkGroups === 'number')
        was = topK / topkGroups;
    }
    if (was !== undefined && was !== now[key])
      throw new CheckpointError(
        `checkpoint ${reader.dir}: layer ${index}'s router was trained with ${key} ${JSON.stringify(was)} but this layer has ${key} ${JSON.stringify(now[key])}; build the layer with the checkpoint's value`,
      );
  }
  if (recorded !== null && typeof recorded === 'object') {
    if (recorded.normalize !== now.normalize || recorded.routeScale !== now.routeScale)
      throw new CheckpointError(
        `checkpoint ${reader.dir}: layer ${index}'s router was trained with normalize ${String(recorded.normalize)}, routeScale ${String(recorded.routeScale)} (manifest router) but this layer has normalize ${now.normalize}, routeScale ${now.routeScale}; build the layer with the checkpoint's values`,
      );
    return;
  }
  if (model?.scoreFunction === 'sigmoid' && model.topK === 1 && layer.config.topK === 1)
    throw new CheckpointError(
      `checkpoint ${reader.dir}: saved before checkpoints recorded the router's weighting, by a sigmoid topK 1 run, which then normalised every weight to routeScale (so its router never learned); this version weights by σ(logit) and refuses to normalise a single weight: start a new run`,
    );
}

/** The reader and the layer a load or save was handed (types alone: a plain object reached `.config` as a TypeError). */
function checkReaderAndLayer(reader: CheckpointReader | null, layer: MoELayer, op: string): void {
  if (reader !== null && (reader === undefined || typeof reader !== 'object' || typeof (reader as { dir?: unknown }).dir !== 'string'))
    invalidArgument(op, `'reader' must be a CheckpointReader (from loadCheckpoint)`);
  const l = layer as unknown as { config?: unknown; master?: unknown } | null;
  if (l === null || typeof l !== 'object' || typeof l.config !== 'object' || typeof l.master !== 'object')
    invalidArgument(op, `'layer' must be a MoELayer`);
}

/**
 * The checkpoint's layer is the same kind of layer: its routing, its router's weighting, and the same
 * optional parts (a shared expert, its gate, gpt-oss's biases), each refused by name either way.
 */
function checkSameLayerKind(reader: CheckpointReader, layer: MoELayer, index: number): void {
  // A router trained to pick tokens does not pick experts (nor the reverse): the other routing is refused.
  const recorded = checkpointRouting(reader);
  if (recorded !== undefined && recorded !== layer.config.routing) {
    throw new CheckpointError(
      `checkpoint ${reader.dir}: layer ${index} was trained with routing '${recorded}' (manifest config.model.routing) but this layer routes '${layer.config.routing}'; build the model with the same routing (--model.routing ${recorded})`,
    );
  }
  checkRouterWeighting(reader, layer, index);
  const first = layer.group.rank * layer.localExperts;
  // A shared expert in the checkpoint that the layer lacks would be dropped without a word.
  if (!layer.master.sharedW13 && Object.hasOwn(reader.manifest.tensors, ckptNames.shared(index, 'w1')))
    throw new CheckpointError(
      `checkpoint ${reader.dir}: layer ${index} has a shared expert ('${ckptNames.shared(index, 'w1')}') but this layer has none; build it with the checkpoint's sharedFfn`,
    );
  // The same for the shared expert's gate, either way: a gated output read ungated (or the reverse) is another function.
  const gateName = ckptNames.sharedGate(index);
  const hasGate = Object.hasOwn(reader.manifest.tensors, gateName);
  if (hasGate !== (layer.master.sharedGate !== null))
    throw new CheckpointError(
      hasGate
        ? `checkpoint ${reader.dir}: layer ${index}'s shared expert is gated ('${gateName}') but this layer's is not; build it with sharedGate true`
        : `checkpoint ${reader.dir}: layer ${index} has no shared expert gate ('${gateName}') but this layer has one; build it without sharedGate`,
    );
  // gpt-oss's biases, either way: a layer with them read without (or the reverse) is another function.
  const biasName = ckptNames.routerBias(index);
  const expertBiasName = ckptNames.expertBias(index, first, 'b1');
  for (const [what, inCkpt, inLayer, option] of [
    ['a router bias', Object.hasOwn(reader.manifest.tensors, biasName), layer.master.routerBias !== null, 'routerBias'],
    ['expert biases', Object.hasOwn(reader.manifest.tensors, expertBiasName), layer.master.w13Bias !== null, 'expertBias'],
  ] as const)
    if (inCkpt !== inLayer)
      throw new CheckpointError(
        `checkpoint ${reader.dir}: layer ${index} ${inCkpt ? 'has' : 'has no'} ${what} but this layer ${inLayer ? 'has' : 'has none'}; build it with ${option} ${String(inCkpt)}`,
      );
}

/**
 * Every tensor loadMoELayer will read, looked up before it copies any: present, of a float dtype and
 * of the layer's shape, its files verified (when the reader verifies). A checkpoint that fails
 * half-way would leave the layer half overwritten.
 */
export function checkLayerTensors(reader: CheckpointReader, layer: MoELayer, index: number, moments: MoELayerMoments = {}): void {
  checkSameLayerKind(reader, layer, index);
  const El = layer.localExperts;
  const first = layer.group.rank * El;
  const want: [string, readonly number[]][] = [];
  const [, H, F2] = layer.master.w13.shape as [number, number, number];
  const F = F2 / 2;
  // w13 [count, H, 2F] → each expert's w1 and w3 [H, F] and w2 [F, H] (the shared expert has its own F).
  const experts = (name: (e: number, w: ExpertWeight) => string, w13: Tensor, from: number, what: string): void => {
    const [count, H, F2] = w13.shape as [number, number, number];
    const F = F2 / 2;
    const w1 = reader.info(name(from, 'w1'));
    if (w1.shape.length === 2 && (w1.shape[0] !== H || w1.shape[1] !== F))
      throw new CheckpointError(
        `checkpoint ${reader.dir}: layer ${index}'s '${name(from, 'w1')}' is [${w1.shape.join(', ')}] but ${what} [hidden ${H}, ffn ${F}]; build the model with the checkpoint's sizes`,
      );
    for (let e = from; e < from + count; e++) want.push([name(e, 'w1'), [H, F]], [name(e, 'w3'), [H, F]], [name(e, 'w2'), [F, H]]);
  };
  const biases = (name: (e: number, b: ExpertBias) => string): void => {
    for (let e = first; e < first + El; e++) want.push([name(e, 'b1'), [F]], [name(e, 'b3'), [F]], [name(e, 'b2'), [H]]);
  };
  const param = (name: string, t: Tensor | null | undefined): void => {
    if (t) want.push([name, t.shape]);
  };
  const expertName = (e: number, w: ExpertWeight): string => ckptNames.expert(index, e, w);
  const sharedName = (_e: number, w: ExpertWeight): string => ckptNames.shared(index, w);
  param(ckptNames.router(index), layer.master.router);
  param(ckptNames.bias(index), layer.bias);
  param(ckptNames.sharedGate(index), layer.master.sharedGate);
  param(ckptNames.routerBias(index), layer.master.routerBias);
  if (layer.master.w13Bias) biases((e, b) => ckptNames.expertBias(index, e, b));
  experts(expertName, layer.master.w13, first, "this layer's experts are");
  if (layer.master.sharedW13) experts(sharedName, layer.master.sharedW13, 0, "this layer's shared expert is");
  for (const m of ['exp_avg', 'exp_avg_sq'] as const) {
    const key = m === 'exp_avg' ? 'expAvg' : 'expAvgSq';
    const optim = (name: string): string => ckptNames.optim(name, m);
    param(optim(ckptNames.router(index)), moments.router?.[key]);
    param(optim(ckptNames.sharedGate(index)), moments.sharedGate?.[key]);
    param(optim(ckptNames.routerBias(index)), moments.routerBias?.[key]);
    if (moments.w13 && moments.w2) experts((e, w) => optim(expertName(e, w)), moments.w13[key], first, "this layer's experts are");
    if (moments.sharedW13 && moments.sharedW2)
      experts((e, w) => optim(sharedName(e, w)), moments.sharedW13[key], 0, "this layer's shared expert is");
    if (moments.w13Bias && moments.w2Bias) biases((e, b) => optim(ckptNames.expertBias(index, e, b)));
  }
  const files = new Set<string>();
  for (const [name, shape] of want) {
    const t = reader.info(name); // names a missing tensor
    files.add(t.file);
    if (t.shape.join() !== shape.join())
      throw new CheckpointError(
        `checkpoint ${reader.dir}: tensor '${name}' is [${t.shape.join(', ')}] but layer ${index} needs [${shape.join(', ')}]`,
      );
    if (!['f32', 'bf16', 'f16'].includes(t.dtype))
      throw new CheckpointError(
        `checkpoint ${reader.dir}: tensor '${name}' is stored as ${t.dtype}; a weight or optimizer moment is a float tensor`,
      );
  }
  // A damaged file is found now rather than at its first tensor: the check a verifying reader makes
  // at that read anyway (once per file), moved before the first copy.
  if (reader.verify) for (const f of files) reader.verifyFile(f);
}

/**
 * Loads layer `index` into a MoE layer built with the same sizes (any EP size: it reads the experts
 * it owns by global index), moments too when given, then refreshes the compute copies.
 */
export function loadMoELayer(reader: CheckpointReader, layer: MoELayer, index: number, moments: MoELayerMoments = {}): void {
  checkReaderAndLayer(reader, layer, 'loadMoELayer');
  moments = checkMoments(moments, 'loadMoELayer');
  checkLayerTensors(reader, layer, index, moments);
  copyLayerTensors(reader, layer, index, moments);
}

/** loadMoELayer's copies, every tensor already checked by checkLayerTensors (a resume checks every layer first). */
export function copyLayerTensors(reader: CheckpointReader, layer: MoELayer, index: number, moments: MoELayerMoments): void {
  const El = layer.localExperts;
  const first = layer.group.rank * El;
  const expertName = (e: number, w: ExpertWeight): string => ckptNames.expert(index, e, w);
  const gateName = ckptNames.sharedGate(index);
  const biasName = ckptNames.routerBias(index);
  const intoExperts = (
    w13: Tensor,
    w2: Tensor,
    name: (e: number, w: ExpertWeight) => string,
    count: number,
    from: number,
    what = "this layer's experts are",
  ): void => {
    const j = joinExperts(reader, from, count, name);
    try {
      const [, H, F2] = w13.shape as [number, number, number];
      const [, h, f2] = j.w13.shape as [number, number, number];
      if (h !== H || f2 !== F2)
        throw new CheckpointError(
          `checkpoint ${reader.dir}: layer ${index}'s '${name(from, 'w1')}' is [${h}, ${f2 / 2}] but ${what} [hidden ${H}, ffn ${F2 / 2}]; build the model with the checkpoint's sizes`,
        );
      w13.copy_(j.w13);
      w2.copy_(j.w2);
    } finally {
      j.w13.dispose();
      j.w2.dispose();
    }
  };
  reader.into(ckptNames.router(index), layer.master.router);
  reader.into(ckptNames.bias(index), layer.bias);
  if (layer.master.sharedGate) reader.into(gateName, layer.master.sharedGate);
  /** Per global expert b1, b3, b2 named by `name` → w13Bias [El,2F] (interleaved) and w2Bias [El,H]. */
  const intoExpertBiases = (w13Bias: Tensor, w2Bias: Tensor, name: (e: number, b: ExpertBias) => string): void => {
    const [, F2] = w13Bias.shape as [number, number];
    tidy(() => {
      const pairs = w13Bias.view(El, F2 / 2, 2);
      for (let i = 0; i < El; i++) {
        const e = first + i;
        const b1 = Tensor.empty([F2 / 2], { device: w13Bias.device });
        const b3 = Tensor.empty([F2 / 2], { device: w13Bias.device });
        reader.into(name(e, 'b1'), b1);
        reader.into(name(e, 'b3'), b3);
        pairs
          .narrow(0, i, 1)
          .narrow(2, 0, 1)
          .copy_(b1.view(1, F2 / 2, 1));
        pairs
          .narrow(0, i, 1)
          .narrow(2, 1, 1)
          .copy_(b3.view(1, F2 / 2, 1));
        using row = w2Bias.narrow(0, i, 1);
        using flat = row.view(row.shape[1] as number);
        reader.into(name(e, 'b2'), flat);
      }
    });
  };
  if (layer.master.routerBias) reader.into(biasName, layer.master.routerBias);
  if (layer.master.w13Bias && layer.master.w2Bias)
    intoExpertBiases(layer.master.w13Bias, layer.master.w2Bias, (e, b) => ckptNames.expertBias(index, e, b));
  intoExperts(layer.master.w13, layer.master.w2, expertName, El, first);
  if (layer.master.sharedW13 && layer.master.sharedW2)
    intoExperts(
      layer.master.sharedW13,
      layer.master.sharedW2,
      (_e, w) => ckptNames.shared(index, w),
      1,
      0,
      "this layer's shared expert is",
    );
  for (const m of ['exp_avg', 'exp_avg_sq'] as const) {
    const key = m === 'exp_avg' ? 'expAvg' : 'expAvgSq';
    if (moments.router) reader.into(ckptNames.optim(ckptNames.router(index), m), moments.router[key]);
    if (moments.sharedGate) reader.into(ckptNames.optim(gateName, m), moments.sharedGate[key]);
    if (moments.w13 && moments.w2)
      intoExperts(moments.w13[key], moments.w2[key], (e, w) => ckptNames.optim(expertName(e, w), m), El, first);
    if (moments.sharedW13 && moments.sharedW2)
      intoExperts(moments.sharedW13[key], moments.sharedW2[key], (_e, w) => ckptNames.optim(ckptNames.shared(index, w), m), 1, 0);
    if (moments.routerBias) reader.into(ckptNames.optim(biasName, m), moments.routerBias[key]);
    if (moments.w13Bias && moments.w2Bias)
      intoExpertBiases(moments.w13Bias[key], moments.w2Bias[key], (e, b) => ckptNames.optim(ckptNames.expertBias(index, e, b), m));
  }
  layer.refreshComputeWeights();
}
