/**
 * The MoE router: from logits [T,E] (computed by the caller's GEMM) to the chosen experts and their
 * gate weights, the backward of that, and the auxiliary losses. The arithmetic is native
 * (native/ops/moe/router: a CPU reference and fused CUDA kernels); this file validates the config up
 * front, allocates the outputs (each can be passed in as `out`), and decides policy (NaN checks).
 *
 * Naming and shapes:
 *   logits  [T,E] f32   the input
 *   scores  [T,E] f32   unbiased probabilities: softmax over E, or elementwise sigmoid
 *   bias    [E]   f32   optional; added to the scores for *selection only* (DeepSeek-V3's balancing bias)
 *   indices [T,k] i32   chosen experts, by descending biased score; ties: the lower expert index wins
 *   weights [T,k] f32   routeScale · scores[idx], divided by their sum (+1e-20) when `normalize`
 *   tokensPerExpert [E] i32   assignments per expert; sums to T·k
 *   nanRows [2] i32     [rows with a non-finite logit (or NaN bias), first such row (T if none)]
 *
 * Group-limited routing (DeepSeek-V2 and V3): E experts in `groups` contiguous groups; a group scores
 * the sum of its top `groupTop` biased scores (DeepSeek-V3: 2; DeepSeek-V2: 1, the group's maximum;
 * default topK/topkGroups); each token keeps its best `topkGroups` groups and picks its top-k inside
 * them only. `groups: 1` is plain top-k.
 *
 * Bad rows (a NaN or ±inf logit, or a NaN bias) get scores NaN, indices 0..k-1 and weights NaN on
 * every device, and are counted in nanRows; with `checkNaN` the wrapper throws an
 * InvalidArgumentError naming the first bad row.
 *
 * Expert choice (`routing: 'expert-choice'`, Zhou et al. 2022, arXiv:2202.09368): every expert
 * takes its top-C tokens by score, C = min(T, ceil(T·capacityFactor/E)) (capacityFactor is the
 * paper's c, the average number of experts per token; default topK, the compute of top-k token
 * choice). Perfectly balanced by construction (no bias, no auxiliary loss, nothing dropped); a token
 * gets anywhere from 0 to E experts. The assignments are dense over (token, expert):
 *   indices [T,E] i32   e in every row; weights [T,E] f32 routeScale·scores where chosen, else 0
 *   slot    [T,E] i32   position of t among expert e's C tokens in token order, -1 when not chosen
 *   tokensPerExpert [E] = C;  expertsPerToken [E+1] i32: tokens with 0, 1, …, E experts
 * so capacity()/permute()/the dispatcher take them as T×E assignments with fixed C-row segments.
 * Rule (every device): expert e ranks the tokens by their f32 score (NaN lowest), equal scores by
 * the lower token index, and takes the first C. Bad rows are NaN rows, so chosen only when fewer
 * than C good tokens remain. With several ranks each rank routes its own tokens (C per expert per
 * source rank: the paper's routing per group of tokens).
 */
import type { Device } from '../device.js';
import { invalidArgument } from '../errors.js';
import {
  checkFloat32,
  checkBoolean,
  checkOneOf,
  checkKeys,
  checkNumber,
  checkOptions,
  checkPositiveInt,
  checkPositiveNumber,
  checkTensor,
  withOutput,
  withOutputs,
} from '../validate.js';
import { native } from '../native.js';
import { SCORE_FUNCTION } from '../native-codes.js';
import { Tensor } from '../tensor.js';
import { expertCapacity } from './capacity.js';

export type ScoreFunction = 'softmax' | 'sigmoid';
/**
 * Where a token's router weight w applies to expert j: its output, y = Σ_j w_j·E_j(x) (every family
 * but one), or its input, y = Σ_j E_j(w_j·x) (Llama 4). Both layers take both.
 */
export type RouteWeightsOn = 'output' | 'input';
export const ROUTE_WEIGHTS_ON: readonly RouteWeightsOn[] = ['output', 'input'];

/**
 * A layer's routeWeightsOn (default 'output'), checked against its routing: 'input' needs token
 * choice with topK 1 (with more, each expert would take its own scaled copy of the token).
 */
export function checkRouteWeightsOn(value: unknown, router: { topK: number; routing: Routing }, op: string): RouteWeightsOn {
  const on = checkOneOf(value ?? 'output', op, 'routeWeightsOn', ROUTE_WEIGHTS_ON);
  if (on === 'input' && (router.routing === 'expert-choice' || router.topK !== 1))
    invalidArgument(
      op,
      `'routeWeightsOn' 'input' needs token choice with topK 1 (Llama 4's); received ${router.routing === 'expert-choice' ? "routing 'expert-choice'" : `topK ${router.topK}`}: with more, each expert would take its own scaled copy of the token`,
    );
  return on;
}
export type Routing = 'token-choice' | 'expert-choice';

export interface RouterConfig {
  /** E: the number of experts (the logits' second dimension). */
  numExperts: number;
  /** k: experts per token, 1 ≤ k ≤ E. */
  topK: number;
  /** Default 'softmax'. */
  scoreFunction?: ScoreFunction;
  /** Contiguous expert groups (divides E, at most 32). Default 1: plain top-k. */
  groups?: number;
  /** Groups each token keeps (1 ≤ topkGroups ≤ groups; they must hold topK experts). Default: all groups. */
  topkGroups?: number;
  /**
   * A group's score is the sum of its best `groupTop` biased scores (1 ≤ groupTop ≤ numExperts/groups):
   * DeepSeek-V3 sums its top 2, DeepSeek-V2 takes the maximum (1). Default topK/topkGroups, which
   * must then be a whole number. Read only when groups > 1 (resolved to 1 otherwise).
   */
  groupTop?: number;
  /**
   * Normalise the weights over the chosen experts. Default: true for sigmoid token choice with
   * topK > 1, else false. At topK 1 every weight would be routeScale and the router would get no
   * gradient, so MoELayer refuses it there (a served model may still ask for it).
   */
  normalize?: boolean;
  /** Multiplies the weights. Default 1. */
  routeScale?: number;
  /** 'token-choice' (default): each token takes its top-k experts. 'expert-choice': each expert its top-C tokens. */
  routing?: Routing;
  /**
   * Expert choice only: C = min(T, ceil(T·capacityFactor/E)) tokens per expert, i.e. capacityFactor
   * experts per token on average. Default: topK (the same compute as top-k token choice).
   */
  capacityFactor?: number;
}

export type ResolvedRouterConfig = Readonly<Required<RouterConfig>>;

const MAX_GROUPS = 32;
const validated = new WeakSet<object>();

/** A layer config's router fields (capacityFactor aside: a layer reads it as its own). */
const LAYER_ROUTER_FIELDS = [
  'numExperts',
  'topK',
  'scoreFunction',
  'groups',
  'topkGroups',
  'groupTop',
  'normalize',
  'routeScale',
  'routing',
] as const;

/**
 * The router fields a layer's config sets, for resolveRouterConfig (which fills in the defaults and
 * names a bad field): the layers take their config as a RouterConfig plus their own options.
 */
export function routerFieldsOf(config: Partial<RouterConfig>): RouterConfig {
  const fields: Partial<Record<keyof RouterConfig, unknown>> = {};
  for (const key of LAYER_ROUTER_FIELDS) if (config[key] !== undefined) fields[key] = config[key];
  return fields as RouterConfig;
}

/** Validates a router config and fills in the defaults; every error names the field. */
export function resolveRouterConfig(config: RouterConfig): ResolvedRouterConfig {
  if (config === null || typeof config !== 'object') invalidArgument('router', `the config must be an object; received ${String(config)}`);
  checkKeys(config, 'router', {
    numExperts: true,
    topK: true,
    scoreFunction: true,
    groups: true,
    topkGroups: true,
    groupTop: true,
    normalize: true,
    routeScale: true,
    routing: true,
    capacityFactor: true,
  });
  const E = checkPositiveInt(config.numExperts, 'router', 'numExperts');
  const k = checkPositiveInt(config.topK, 'router', 'topK');
  if (k > E) invalidArgument('router', `'topK' = ${k} is more than 'numExperts' = ${E}`);
  const scoreFunction = config.scoreFunction ?? 'softmax';
  if (scoreFunction !== 'softmax' && scoreFunction !== 'sigmoid') {
    invalidArgument('router', `'scoreFunction' must be 'softmax' or 'sigmoid'; received ${String(scoreFunction)}`);
  }
  const groups = checkPositiveInt(config.groups ?? 1, 'router', 'groups');
  if (groups > MAX_GROUPS) invalidArgument('router', `'groups' = ${groups} is more than ${MAX_GROUPS}`);
  if (E % groups !== 0) invalidArgument('router', `'groups' = ${groups} does not divide 'numExperts' = ${E}`);
  const topkGroups = checkPositiveInt(config.topkGroups ?? groups, 'router', 'topkGroups');
  if (topkGroups > groups) invalidArgument('router', `'topkGroups' = ${topkGroups} is more than 'groups' = ${groups}`);
  const groupSize = E / groups;
  // null (a JSON config's way of leaving it out) is left out.
  const givenTop = config.groupTop ?? undefined;
  if (givenTop === undefined && k % topkGroups !== 0) {
    invalidArgument(
      'router',
      `'topK' = ${k} is not divisible by 'topkGroups' = ${topkGroups} (a group scores its top topK/topkGroups unless 'groupTop' says how many)`,
    );
  }
  // One group: nothing reads it; resolved to 1 so that layers differing only in topK agree on it.
  const groupTop = groups === 1 ? 1 : checkPositiveInt(givenTop ?? k / topkGroups, 'router', 'groupTop');
  if (groups === 1 && givenTop !== undefined) checkPositiveInt(givenTop, 'router', 'groupTop');
  if (groupTop > groupSize) {
    invalidArgument(
      'router',
      `'groupTop' = ${groupTop}${givenTop === undefined ? ' (topK/topkGroups, its default)' : ''} is more than a group's ${groupSize} experts (numExperts / groups)`,
    );
  }
  if (k > topkGroups * groupSize) {
    invalidArgument(
      'router',
      `'topK' = ${k} is more than the ${topkGroups * groupSize} experts of the ${topkGroups} groups a token keeps ('topkGroups')`,
    );
  }
  const routing = config.routing ?? 'token-choice';
  if (routing !== 'token-choice' && routing !== 'expert-choice') {
    invalidArgument('router', `'routing' must be 'token-choice' or 'expert-choice'; received ${String(routing)}`);
  }
  // Sigmoid scores are renormalised over the chosen experts by default, but not at k = 1: a single
  // weight renormalised is routeScale for every token, and the router gets no gradient (Megatron-Core
  // normalises sigmoid weights only for topk > 1).
  const normalize = checkBoolean(
    config.normalize ?? (scoreFunction === 'sigmoid' && routing === 'token-choice' && k > 1),
    'router',
    'normalize',
  );
  const routeScale = checkFloat32(checkNumber(config.routeScale ?? 1, 'router', 'routeScale'), 'router', 'routeScale');
  const capacityFactor = checkPositiveNumber(config.capacityFactor ?? k, 'router', 'capacityFactor');
  if (routing === 'expert-choice') {
    if (groups !== 1)
      invalidArgument(
        'router',
        `'groups' = ${groups} is not available with routing 'expert-choice' (experts choose among all tokens); use 1`,
      );
    // A token's weights are its scores: it may have no expert at all to normalise over.
    if (normalize)
      invalidArgument('router', `'normalize' is not available with routing 'expert-choice' (weights are the scores); set it false`);
  }
  const resolved = Object.freeze({
    numExperts: E,
    topK: k,
    scoreFunction,
    groups,
    topkGroups,
    groupTop,
    normalize,
    routeScale,
    routing,
    capacityFactor,
  });
  validated.add(resolved);
  return resolved;
}

export interface RouterOutputs {
  indices: Tensor;
  weights: Tensor;
  tokensPerExpert: Tensor;
  scores: Tensor;
  nanRows: Tensor;
}

/** What expert-choice routing returns besides RouterOutputs (whose indices/weights are then [T,E]). */
export interface ExpertChoiceOutputs extends RouterOutputs {
  /** [T,E] i32: position of t among expert e's chosen tokens (token order), -1 when not chosen. */
  slot: Tensor;
  /** [E+1] i32: expertsPerToken[n] = tokens chosen by exactly n experts. */
  expertsPerToken: Tensor;
  /** C: tokens per expert. */
  capacity: number;
}

export interface RouterForwardOptions {
  /** Token choice only: selection-only balancing bias [E]. */
  bias?: Tensor;
  /**
   * Read nanRows and throw when a row was bad. On a GPU this is a host synchronisation; default:
   * true on the CPU (free), false on a GPU (the forward then never waits for the device).
   */
  checkNaN?: boolean;
  /** Outputs to write into instead of allocating (expert choice: also slot and expertsPerToken). */
  out?: Partial<RouterOutputs & { slot: Tensor; expertsPerToken: Tensor }>;
}

/** C for expert choice: min(T, ceil(T·capacityFactor/E)) (ceil as expertCapacity rounds it). */
export function expertChoiceCapacity(numTokens: number, numExperts: number, capacityFactor: number): number {
  return Math.min(numTokens, expertCapacity(numTokens, 1, numExperts, capacityFactor));
}

function resolve(config: RouterConfig | ResolvedRouterConfig): ResolvedRouterConfig {
  return validated.has(config) ? (config as ResolvedRouterConfig) : resolveRouterConfig(config);
}

function checkLogits(logits: Tensor, cfg: ResolvedRouterConfig, op: string, arg = 'logits'): number {
  checkTensor(logits, op, arg);
  if (logits.ndim !== 2 || logits.shape[1] !== cfg.numExperts) {
    invalidArgument(
      op,
      `'${arg}' has shape [${logits.shape.join(',')}] but the config has numExperts = ${cfg.numExperts}: expected [tokens, ${cfg.numExperts}]`,
    );
  }
  return logits.shape[0] as number;
}

/** Throws when nanRows says a row was bad (reads it from the device: a sync on a GPU). */
function throwOnBadRows(nanRows: Tensor, op: string): void {
  const [count, first] = nanRows.toArray() as Int32Array; // deliberate host sync, only with checkNaN
  if ((count as number) > 0) {
    invalidArgument(op, `'logits' row ${first} has a NaN or infinite value (or 'bias' has a NaN); ${count} bad row(s) in all`);
  }
}

/**
 * Scores, top-k (group-limited) selection and gate weights for each token; with routing
 * 'expert-choice', expertChoiceForward's outputs. No host sync unless checkNaN.
 */
export function routerForward(
  logits: Tensor,
  config: RouterConfig | ResolvedRouterConfig,
  options: RouterForwardOptions = {},
): RouterOutputs {
  const op = 'router';
  options = checkOptions(options, op, { bias: true, checkNaN: true, out: true });
  if (options.checkNaN !== undefined) checkBoolean(options.checkNaN, op, 'checkNaN');
  const cfg = resolve(config);
  if (cfg.routing === 'expert-choice') return expertChoiceForward(logits, cfg, options);
  const T = checkLogits(logits, cfg, op);
  const { bias, out = {} } = options;
  if (bias !== undefined) {
    checkTensor(bias, op, 'bias');
    if (bias.ndim !== 1 || bias.shape[0] !== cfg.numExperts) {
      invalidArgument(op, `'bias' has shape [${bias.shape.join(',')}]; expected [${cfg.numExperts}] (numExperts)`);
    }
  }
  const checkNaN = options.checkNaN ?? logits.device.type === 'cpu';
  const device = logits.device;
  const { numExperts: E, topK: k } = cfg;
  const outputs = withOutputs<{ [K in keyof RouterOutputs]: Tensor }>(
    op,
    out,
    {
      indices: () => Tensor.empty([T, k], { dtype: 'i32', device }),
      weights: () => Tensor.empty([T, k], { dtype: 'f32', device }),
      tokensPerExpert: () => Tensor.empty([E], { dtype: 'i32', device }),
      scores: () => Tensor.empty([T, E], { dtype: 'f32', device }),
      nanRows: () => Tensor.empty([2], { dtype: 'i32', device }),
    },
    (o) => {
      native().routerForward(
        logits.handle,
        bias?.handle ?? null,
        SCORE_FUNCTION[cfg.scoreFunction],
        k,
        cfg.groups,
        cfg.topkGroups,
        cfg.normalize,
        cfg.routeScale,
        o.indices.handle,
        o.weights.handle,
        o.tokensPerExpert.handle,
        o.scores.handle,
        o.nanRows.handle,
        cfg.groupTop,
      );
      if (checkNaN) throwOnBadRows(o.nanRows, op);
    },
    { logits, bias },
  );
  return outputs;
}

/**
 * Expert-choice routing (see the module doc): every expert takes its top-C tokens. No host sync
 * unless checkNaN.
 */
export function expertChoiceForward(
  logits: Tensor,
  config: RouterConfig | ResolvedRouterConfig,
  options: RouterForwardOptions = {},
): ExpertChoiceOutputs {
  const op = 'router';
  options = checkOptions(options, op, { bias: true, checkNaN: true, out: true });
  const cfg = resolve(config);
  if (cfg.routing !== 'expert-choice')
    invalidArgument(op, `expertChoiceForward needs routing 'expert-choice'; the config has '${cfg.routing}'`);
  const T = checkLogits(logits, cfg, op);
  if (options.bias !== undefined)
    invalidArgument(op, `'bias' is not used with routing 'expert-choice' (every expert takes exactly C tokens: balanced by construction)`);
  const E = cfg.numExperts;
  const C = expertChoiceCapacity(T, E, cfg.capacityFactor);
  const checkNaN = options.checkNaN ?? logits.device.type === 'cpu';
  const device = logits.device;
  const o = withOutputs<{
    indices: Tensor;
    weights: Tensor;
    tokensPerExpert: Tensor;
    scores: Tensor;
    nanRows: Tensor;
    slot: Tensor;
    expertsPerToken: Tensor;
  }>(
    op,
    options.out ?? {},
    {
      indices: () => Tensor.empty([T, E], { dtype: 'i32', device }),
      weights: () => Tensor.empty([T, E], { dtype: 'f32', device }),
      tokensPerExpert: () => Tensor.empty([E], { dtype: 'i32', device }),
      scores: () => Tensor.empty([T, E], { dtype: 'f32', device }),
      nanRows: () => Tensor.empty([2], { dtype: 'i32', device }),
      slot: () => Tensor.empty([T, E], { dtype: 'i32', device }),
      expertsPerToken: () => Tensor.empty([E + 1], { dtype: 'i32', device }),
    },
    (r) => {
      native().routerExpertChoice(
        logits.handle,
        SCORE_FUNCTION[cfg.scoreFunction],
        C,
        cfg.routeScale,
        r.scores.handle,
        r.slot.handle,
        r.weights.handle,
        r.indices.handle,
        r.tokensPerExpert.handle,
        r.expertsPerToken.handle,
        r.nanRows.handle,
      );
      if (checkNaN) throwOnBadRows(r.nanRows, op);
    },
    { logits },
  );
  return { ...o, capacity: C };
}

export interface RouterBackwardOptions {
  /** Write (or, with accumulate, add) into this [T,E] f32 tensor. */
  out?: Tensor;
  accumulate?: boolean;
}

/**
 * dLogits [T,E] from dWeights [T,k], given what the forward saved (scores and indices). Through
 * the normalisation and routeScale; softmax: full Jacobian; sigmoid: s(1-s). The bias has no gradient.
 * Expert choice: dWeights [T,E] and the forward's slot (only chosen pairs carry a gradient).
 */
export function routerBackward(
  dWeights: Tensor,
  saved: { scores: Tensor; indices: Tensor; slot?: Tensor },
  config: RouterConfig | ResolvedRouterConfig,
  options: RouterBackwardOptions = {},
): Tensor {
  const op = 'routerBackward';
  options = checkOptions(options, op, { out: true, accumulate: true });
  const cfg = resolve(config);
  checkTensor(dWeights, op, 'dWeights');
  const T = checkLogits(checkTensor(saved?.scores, op, 'scores'), cfg, op, 'scores');
  const ec = cfg.routing === 'expert-choice';
  if (ec) checkTensor(saved.slot, op, 'slot');
  else checkTensor(saved.indices, op, 'indices');
  if (options.accumulate && options.out === undefined) invalidArgument(op, `'accumulate' needs 'out'`);
  const o = withOutputs<{ dLogits: Tensor }>(
    op,
    { dLogits: options.out },
    { dLogits: () => Tensor.empty([T, cfg.numExperts], { dtype: 'f32', device: saved.scores.device }) },
    (r) =>
      ec
        ? native().routerExpertChoiceBackward(
            dWeights.handle,
            saved.scores.handle,
            (saved.slot as Tensor).handle,
            SCORE_FUNCTION[cfg.scoreFunction],
            cfg.routeScale,
            r.dLogits.handle,
            options.accumulate ?? false,
          )
        : native().routerBackward(
            dWeights.handle,
            saved.scores.handle,
            saved.indices.handle,
            SCORE_FUNCTION[cfg.scoreFunction],
            cfg.normalize,
            cfg.routeScale,
            r.dLogits.handle,
            options.accumulate ?? false,
          ),
    { dWeights, scores: saved.scores, indices: ec ? undefined : saved.indices, slot: ec ? saved.slot : undefined },
  );
  return o.dLogits;
}

export interface LossOptions {
  /** The loss weight α: loss = α·(…) and α·∂(…)/∂logits is added into dLogits. */
  coefficient: number;
  /** Add the loss's gradient w.r.t. the logits into this [T,E] f32 tensor (composes with routerBackward). */
  dLogits?: Tensor;
  /** f32[1] for the loss value. */
  out?: Tensor;
}

function lossInto(device: Device, out: Tensor | undefined, op: string, fn: (loss: Tensor) => void): Tensor {
  return withOutput(op, out, () => Tensor.empty([1], { dtype: 'f32', device }), fn);
}

/**
 * Load-balancing loss α·E·Σ_e f_e·P_e: f_e the fraction of the T·k assignments in `indices` that
 * go to e (no gradient), P_e the mean over tokens of the router probability of e. The papers count
 * each token's top-k of the plain scores over all experts (DeepSeek-V3 eq. 18, Megatron-Core), and
 * MoELayer passes those: with a selection bias or groups they differ from the routed indices. For sigmoid routers the
 * probabilities are the scores normalised to sum 1 per token (as DeepSeek-V3 does).
 * With `seqLen` (T = numSeqs·seqLen) it is DeepSeek-V3's sequence-wise loss: the same per
 * sequence, averaged over sequences. Without it, the Switch (batch-wise) loss.
 */
export function balanceLoss(
  scores: Tensor,
  indices: Tensor,
  config: RouterConfig | ResolvedRouterConfig,
  options: LossOptions & { seqLen?: number },
): Tensor {
  const op = 'balanceLoss';
  const cfg = resolve(config);
  if (cfg.routing === 'expert-choice') invalidArgument(op, `not defined for routing 'expert-choice' (every expert takes exactly C tokens)`);
  const T = checkLogits(scores, cfg, op, 'scores');
  checkTensor(indices, op, 'indices');
  checkKeys(options, op, { coefficient: true, dLogits: true, out: true, seqLen: true });
  const coefficient = checkNumber(options?.coefficient, op, 'coefficient');
  // No tokens: no loss to average (the default seqLen, T = 0, would be blamed on an argument not passed).
  if (T === 0 && options.seqLen === undefined) invalidArgument(op, `'scores' has no tokens (T = 0): the balance loss averages over them`);
  const seqLen = options.seqLen ?? T;
  if (!Number.isSafeInteger(seqLen) || seqLen < 1 || T % seqLen !== 0) {
    invalidArgument(op, `'seqLen' = ${String(seqLen)} must be a positive integer dividing the ${T} tokens`);
  }
  if (options.dLogits !== undefined) checkTensor(options.dLogits, op, 'dLogits');
  return lossInto(scores.device, options.out, op, (loss) =>
    native().routerBalanceLoss(
      scores.handle,
      indices.handle,
      SCORE_FUNCTION[cfg.scoreFunction],
      seqLen,
      coefficient,
      loss.handle,
      options.dLogits?.handle ?? null,
    ),
  );
}

/** DeepSeek-V3's sequence-wise balance loss: balanceLoss per sequence of `seqLen` tokens, averaged. */
export function sequenceBalanceLoss(
  scores: Tensor,
  indices: Tensor,
  config: RouterConfig | ResolvedRouterConfig,
  options: LossOptions & { seqLen: number },
): Tensor {
  if (options?.seqLen === undefined) invalidArgument('balanceLoss', `'seqLen' is required for the sequence-wise loss`);
  return balanceLoss(scores, indices, config, options);
}

/** Router z-loss: α · mean over tokens of (logsumexp of the logits)². */
export function zLoss(logits: Tensor, options: LossOptions): Tensor {
  const op = 'zLoss';
  checkTensor(logits, op, 'logits');
  checkKeys(options, op, { coefficient: true, dLogits: true, out: true });
  const coefficient = checkNumber(options?.coefficient, op, 'coefficient');
  if (options.dLogits !== undefined) checkTensor(options.dLogits, op, 'dLogits');
  return lossInto(logits.device, options.out, op, (loss) =>
    native().routerZLoss(logits.handle, coefficient, loss.handle, options.dLogits?.handle ?? null),
  );
}

/** A router with its config validated once at construction. */
export class Router {
  readonly config: ResolvedRouterConfig;
  constructor(config: RouterConfig) {
    this.config = resolveRouterConfig(config);
  }
  forward(logits: Tensor, options: RouterForwardOptions = {}): RouterOutputs {
    return routerForward(logits, this.config, options);
  }
  backward(dWeights: Tensor, saved: { scores: Tensor; indices: Tensor; slot?: Tensor }, options: RouterBackwardOptions = {}): Tensor {
    return routerBackward(dWeights, saved, this.config, options);
  }
  balanceLoss(scores: Tensor, indices: Tensor, options: LossOptions & { seqLen?: number }): Tensor {
    return balanceLoss(scores, indices, this.config, options);
  }
  zLoss(logits: Tensor, options: LossOptions): Tensor {
    return zLoss(logits, options);
  }
}

/**
 * Mean over tokens of the entropy (nats) of each token's routing distribution: softmax scores as
 * they are, sigmoid scores renormalised per token. ln E means undecided, 0 means one expert.
 * f32[1] on the scores' device; no host sync.
 */
export function routerEntropy(scores: Tensor, options: { out?: Tensor } = {}): Tensor {
  const op = 'routerEntropy';
  options = checkOptions(options, op, { out: true });
  checkTensor(scores, op, 'scores');
  return withOutput(
    op,
    options.out,
    () => Tensor.empty([1], { dtype: 'f32', device: scores.device }),
    (out) => native().routerEntropy(scores.handle, out.handle),
  );
}
