/**
 * The `moe-ep train` configuration: defaults, a JSON schema (draft-07, validated with Ajv), and
 * overrides from the command line (`--model.experts 16`, `--steps 100`). Errors point at the field:
 * "config.model.experts: must be >= 1".
 */
import { Ajv, type ErrorObject } from 'ajv';

import { F32_MAX, F32_MIN_NORMAL } from '../dtype.js';
import { closestName, InvalidArgumentError } from '../errors.js';
import { FP8_BLOCK } from '../moe/fp8.js';
import { WEIGHT_GRAD_DTYPES, type WeightGradDType } from '../moe/experts.js';
import { type Recompute, RECOMPUTE_MODES } from '../moe/layer.js';
import { CLUSTER_NOISE_MAX } from './data.js';

export interface TrainConfig {
  model: {
    layers: number;
    hidden: number;
    ffn: number;
    experts: number;
    topK: number;
    /** 'token-choice': each token its top-k experts; 'expert-choice': each expert its top-C tokens (docs/expert-choice.md). */
    routing: 'token-choice' | 'expert-choice';
    scoreFunction: 'softmax' | 'sigmoid';
    /** Weights renormalised over the chosen experts; null: the router's default (sigmoid top-k > 1: on; softmax: off). */
    normalize: boolean | null;
    /** Factor on the weights (DeepSeek-V3's routed_scaling_factor). */
    routeScale: number;
    groups: number;
    topkGroups: number;
    /** With groups: a group's score sums its top groupTop scores (DeepSeek-V3: 2, DeepSeek-V2: 1); null: topK/topkGroups. */
    groupTop: number | null;
    /** null: dropless (expert choice: topK). Expert choice: C = min(T, ceil(T·capacityFactor/E)) tokens per expert and rank. */
    capacityFactor: number | null;
    dropPolicy: 'probs' | 'position';
    sharedFfn: number;
    /** Scale the shared expert's output per token by sigmoid(x·g), g learned (Qwen2-MoE); needs sharedFfn. */
    sharedGate: boolean;
    /** gpt-oss's learned bias on the router's logits (MoELayer's routerBias), trained. */
    routerBias: boolean;
    /** gpt-oss's biases on the experts' two projections (MoELayer's expertBias), trained. */
    expertBias: boolean;
    /** Where the router weight applies: the expert's output, or (Llama 4, top-1 token choice) its input. */
    routeWeightsOn: 'output' | 'input';
    /** The experts' activation: SwiGLU, or gpt-oss's clamped SwiGLU with its limit (with its biases: routerBias, expertBias). */
    activation: 'swiglu' | 'clamped-swiglu';
    swigluLimit: number;
    /** 'mse': regress the cluster map's output; 'cross-entropy': classify its argmax (hidden classes). */
    loss: 'mse' | 'cross-entropy';
    /** Expert-parallel group size; null: the whole world. Smaller sizes replicate the experts over expert-data-parallel groups. */
    epSize: number | null;
    /** The all-to-alls on their own stream beside independent compute (MoELayer's commStream); the same results. */
    overlapComm: boolean;
    /** How rows travel between ranks (Dispatcher's `transport`): 'auto' | 'ipc' | 'nccl'. */
    transport: 'auto' | 'ipc' | 'nccl';
    /** Routed rows dispatched as fp8 e4m3 with per-128 scales (MoELayer's fp8Dispatch): false | true | 'keep'. */
    fp8Dispatch: boolean | 'keep';
  };
  balance: { gamma: number; auxLossCoef: number; seqAuxLossCoef: number; seqLen: number | null; zLossCoef: number };
  optimizer: {
    lr: number;
    minLr: number;
    warmupSteps: number;
    beta1: number;
    beta2: number;
    eps: number;
    weightDecay: number;
    clipNorm: number;
  };
  data: { clusters: number; zipf: number; noise: number; tokensPerStep: number; seed: number; onDevice: boolean };
  train: {
    steps: number;
    /** Each rank's share of a step in this many forward/backward passes, gradients accumulated (1: one pass). */
    microBatches: number;
    /** What each MoE layer's backward computes again instead of keeping from the forward (MoELayer's recompute). */
    recompute: Recompute;
    /** The experts' weight gradients (MoELayer's weightGradDtype): 'bf16' needs microBatches 1. */
    weightGradDtype: WeightGradDType;
    device: 'auto' | 'cpu' | 'cuda';
    out: string | null;
    logEvery: number;
    progress: boolean;
    profile: boolean;
    timeoutMs: number;
  };
  checkpoint: { every: number; keep: number; dir: string | null; resume: string | null };
}

/** The embedded default: seconds on two CPU cores (docs/benchmarks.md#first-contact); experts matter on its data. */
export const defaultConfig: TrainConfig = {
  model: {
    layers: 2,
    hidden: 32,
    ffn: 16,
    experts: 8,
    topK: 2,
    routing: 'token-choice',
    scoreFunction: 'sigmoid',
    normalize: null,
    routeScale: 1,
    groups: 1,
    topkGroups: 1,
    groupTop: null,
    capacityFactor: null,
    dropPolicy: 'probs',
    sharedFfn: 0,
    sharedGate: false,
    routerBias: false,
    expertBias: false,
    routeWeightsOn: 'output',
    activation: 'swiglu',
    swigluLimit: 7,
    loss: 'mse',
    epSize: null,
    overlapComm: false,
    transport: 'auto',
    fp8Dispatch: false,
  },
  balance: { gamma: 1e-3, auxLossCoef: 0, seqAuxLossCoef: 0, seqLen: null, zLossCoef: 0 },
  optimizer: { lr: 5e-3, minLr: 5e-4, warmupSteps: 50, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.01, clipNorm: 1 },
  data: { clusters: 32, zipf: 1.2, noise: 0.3, tokensPerStep: 256, seed: 1, onDevice: false },
  train: {
    steps: 1000,
    microBatches: 1,
    recompute: 'none',
    weightGradDtype: 'f32',
    device: 'auto',
    out: null,
    logEvery: 1,
    progress: true,
    profile: false,
    timeoutMs: 300_000,
  },
  checkpoint: { every: 0, keep: 3, dir: null, resume: null },
};

// Integers stay within int32, what the kernels index with (and far inside exact doubles).
const int = (minimum: number) => ({ type: 'integer', minimum, maximum: 2 ** 31 - 1 });
// Every number field ends up in float32 arithmetic (the kernels, the data task): at most F32_MAX.
const num = (minimum?: number, exclusiveMinimum?: number) => ({
  type: 'number',
  ...(minimum === undefined ? {} : { minimum }),
  ...(exclusiveMinimum === undefined ? {} : { exclusiveMinimum }),
  maximum: F32_MAX,
});
const section = (properties: Record<string, unknown>) => ({ type: 'object', additionalProperties: false, properties });

export const trainConfigSchema = {
  $schema: 'http://json-schema.org/draft-07/schema#',
  title: 'moe-ep train configuration',
  type: 'object',
  additionalProperties: false,
  properties: {
    model: section({
      layers: { ...int(1), description: 'MoE blocks: x ← x + MoE(RMSNorm(x))' },
      hidden: { ...int(1), description: 'model width (also the data dimension)' },
      ffn: { ...int(1), description: 'each expert’s SwiGLU hidden size' },
      experts: { ...int(1), description: 'experts per layer (global; a multiple of the expert-parallel size)' },
      topK: { ...int(1), description: 'experts per token' },
      routing: {
        enum: ['token-choice', 'expert-choice'],
        description:
          "'token-choice': each token takes its top-k experts; 'expert-choice': each expert takes its top-C of each rank's tokens, C = min(T, ceil(T·capacityFactor/E)) (capacityFactor null: topK, the same compute), balanced by construction (no bias, no balance loss)",
      },
      scoreFunction: {
        enum: ['softmax', 'sigmoid'],
        description: 'router scores: softmax over the experts, or a sigmoid per expert (DeepSeek-V3)',
      },
      normalize: {
        anyOf: [{ type: 'null' }, { type: 'boolean' }],
        description:
          "weights renormalised over the chosen experts (Megatron-Core's default softmax router: true); null: the router's default (sigmoid with topK > 1: true; softmax: false, Megatron's --moe-router-pre-softmax)",
      },
      routeScale: { ...num(undefined, 0), description: "factor on the weights (Megatron's --moe-router-topk-scaling-factor)" },
      groups: { ...int(1), description: 'expert groups for group-limited routing (1: none)' },
      topkGroups: { ...int(1), description: 'groups a token takes its experts from (they must hold topK experts)' },
      groupTop: {
        anyOf: [{ type: 'null' }, int(1)],
        description:
          "with groups: a group's score is the sum of its best groupTop scores (DeepSeek-V3: 2; DeepSeek-V2: 1, the maximum); null: topK/topkGroups",
      },
      capacityFactor: {
        anyOf: [{ type: 'null' }, num(undefined, 0)],
        description:
          'expert capacity as a multiple of the even share T·k/E; null: dropless. Expert choice: average experts per token (null: topK)',
      },
      dropPolicy: {
        enum: ['probs', 'position'],
        description: 'what a full expert drops: the lowest router probabilities, or the last tokens',
      },
      sharedFfn: { ...int(0), description: '0: no shared expert' },
      sharedGate: {
        type: 'boolean',
        description: "scale the shared expert's output per token by sigmoid(x·g), g learned (Qwen2-MoE; needs sharedFfn)",
      },
      routerBias: { type: 'boolean', description: "a learned bias on the router's logits, before the top-k (gpt-oss)" },
      expertBias: {
        type: 'boolean',
        description: "learned biases on each expert's two projections, [2F] and [H] (gpt-oss), trained without weight decay",
      },
      routeWeightsOn: {
        enum: ['output', 'input'],
        description: "where the router weight applies: the expert's output, or (Llama 4; topK 1, token choice) its input",
      },
      activation: {
        enum: ['swiglu', 'clamped-swiglu'],
        description: "the experts' activation: SwiGLU, or gpt-oss's clamped SwiGLU (alpha 1.702, limit swigluLimit)",
      },
      swigluLimit: { ...num(undefined, 0), description: "the clamped SwiGLU's limit (gpt-oss: 7); read with activation 'clamped-swiglu'" },
      loss: { enum: ['mse', 'cross-entropy'], description: "'mse' regression, or 'cross-entropy' on the argmax class" },
      epSize: {
        anyOf: [{ type: 'null' }, int(1)],
        description:
          'expert-parallel group size (divides the number of ranks); null: all ranks. Experts are replicated over world/epSize groups',
      },
      overlapComm: {
        type: 'boolean',
        description: 'run the all-to-alls on their own stream beside the shared expert and the router backward (same results)',
      },
      transport: {
        enum: ['auto', 'ipc', 'nccl'],
        description:
          "how rows travel between ranks: 'auto' (peer memory when the ranks' GPUs reach each other's, else the communicator's all-to-all), 'ipc' (peer memory, required), 'nccl' (the communicator's all-to-all: NCCL, or MPI)",
      },
      fp8Dispatch: {
        enum: [false, true, 'keep'],
        description:
          "dispatch the routed rows as fp8 e4m3 with one scale per 128 values (half the bytes; hidden a multiple of 128): true dequantises them on arrival, 'keep' hands the experts e4m3 rows",
      },
    }),
    balance: section({
      gamma: { ...num(0), description: 'auxiliary-loss-free bias step (0 freezes the bias)' },
      auxLossCoef: { ...num(0), description: 'weight of the Switch (batch-wise) balance loss (0: off)' },
      seqAuxLossCoef: { ...num(0), description: 'weight of the sequence-wise balance loss (DeepSeek-V3; needs seqLen)' },
      seqLen: {
        anyOf: [{ type: 'null' }, int(1)],
        description: "tokens per sequence for the sequence-wise loss (divides each rank's share of tokensPerStep)",
      },
      zLossCoef: { ...num(0), description: 'weight of the router z-loss, which keeps the logits small (0: off)' },
    }),
    optimizer: section({
      lr: { ...num(undefined, 0), description: 'peak learning rate (AdamW), reached after the warm-up' },
      minLr: { ...num(0), description: 'end of the cosine decay, reached at the last step' },
      warmupSteps: { ...int(0), description: 'steps of linear warm-up from 0' },
      beta1: { type: 'number', minimum: 0, exclusiveMaximum: 1, description: 'AdamW decay of the gradient average' },
      beta2: { type: 'number', minimum: 0, exclusiveMaximum: 1, description: 'AdamW decay of the squared-gradient average' },
      eps: { ...num(undefined, 0), description: 'AdamW epsilon in the denominator' },
      weightDecay: { ...num(0), description: 'decoupled weight decay (norm weights are exempt)' },
      clipNorm: { ...num(0), description: 'clip the global gradient norm to this (0: no clipping)' },
    }),
    data: section({
      clusters: { ...int(1), description: 'clusters of the synthetic inputs, each with its own target map' },
      zipf: { ...num(0), description: 'Zipf exponent of the cluster frequencies (0: uniform)' },
      noise: {
        ...num(0),
        maximum: CLUSTER_NOISE_MAX,
        description: 'standard deviation of the inputs around their cluster centre (unit-scale clusters)',
      },
      tokensPerStep: { ...int(1), description: 'global batch per step, split evenly over the ranks' },
      seed: { ...int(0), description: 'seed of the weights and the data (a run repeats exactly)' },
      onDevice: {
        type: 'boolean',
        description:
          "make each batch on the training device: the inputs (the same draws as on the CPU) and the targets x·A_c in bf16 there; for wide models on a GPU, whose steps the CPU's normals and f32 GEMM can dominate; the targets then differ from a CPU run's in rounding",
      },
    }),
    train: section({
      steps: { ...int(1), description: 'optimizer steps (the learning-rate schedule ends there)' },
      microBatches: {
        ...int(1),
        description: "each rank's tokens of a step in N forward/backward passes, gradients accumulated (activation memory / N)",
      },
      recompute: {
        enum: RECOMPUTE_MODES,
        description:
          "what each MoE layer's backward computes again instead of keeping: experts (their forward GEMMs: the SwiGLU halves and output rows not kept) or layer (the dispatch too: the routed rows not kept); the same gradients, bit for bit",
      },
      weightGradDtype: {
        enum: WEIGHT_GRAD_DTYPES,
        description:
          "the experts' weight gradients (routed and shared): f32, or bf16 (half their memory, faster dW products and AdamW reads, each within one bf16 rounding of f32; needs microBatches 1)",
      },
      device: { enum: ['auto', 'cpu', 'cuda'], description: 'auto: the GPU when one is usable, else the CPU' },
      out: { anyOf: [{ type: 'null' }, { type: 'string', minLength: 1 }], description: 'run folder (default runs/<timestamp>)' },
      logEvery: { ...int(1), description: 'write every N-th step to metrics.jsonl (and the report)' },
      progress: { type: 'boolean', description: 'a progress bar on a terminal (false: a line every 5% of the run)' },
      profile: { type: 'boolean', description: 'wait for the device at the end of each phase, so metrics.jsonl phaseMs is exact (slower)' },
      timeoutMs: {
        ...int(0),
        description:
          'collective timeout in ms (also the start-up rendezvous): past it the run stops with a TimeoutError naming the op and the ranks not heard from; 0: wait forever',
      },
    }),
    checkpoint: section({
      every: { ...int(0), description: 'save every N steps (0: only at the end and when stopped: Ctrl-C, SIGTERM, SIGHUP)' },
      keep: { ...int(1), description: 'checkpoints kept (older ones are deleted)' },
      dir: { anyOf: [{ type: 'null' }, { type: 'string', minLength: 1 }], description: 'default <out>/checkpoints' },
      resume: {
        anyOf: [{ type: 'null' }, { type: 'string', minLength: 1 }],
        description: "'latest' (the newest in dir) or a checkpoint folder",
      },
    }),
  },
} as const;

const ajv = new Ajv({ allErrors: true, strict: true });
const validate = ajv.compile(trainConfigSchema);

/** ` (did you mean 'x'?)` when a known name is close to `name`, else ''. */
function didYouMean(name: string, known: readonly string[]): string {
  const close = closestName(name, known);
  return close ? ` (did you mean '${close}'?)` : '';
}

function describe(e: ErrorObject): string {
  const path = 'config' + e.instancePath.replace(/\//g, '.');
  if (e.keyword === 'additionalProperties') {
    const field = String(e.params['additionalProperty']);
    const section = (trainConfigSchema.properties as Record<string, { properties: object }>)[e.instancePath.slice(1)];
    return `${path}: unknown field '${field}'${didYouMean(field, Object.keys(section ? section.properties : trainConfigSchema.properties))}`;
  }
  if (e.keyword === 'enum')
    return `${path}: must be one of ${(e.params['allowedValues'] as unknown[]).map((v) => JSON.stringify(v)).join(', ')}`;
  return `${path}: ${e.message ?? 'is invalid'}`;
}

/** Any subset of a type's fields, at every depth. */
export type DeepPartial<T> = T extends object ? { [K in keyof T]?: DeepPartial<T[K]> } : T;
/** What resolveConfig takes: any sections and fields of TrainConfig (a misspelt one fails type-checking). */
export type TrainConfigInput = DeepPartial<TrainConfig>;

/**
 * Merges a partial configuration over the defaults, validates it, and checks cross-field rules.
 * Plain JavaScript (or parsed JSON) is checked at run time: unknown fields are errors there too.
 */
export function resolveConfig(partial: TrainConfigInput = {}): TrainConfig {
  if (partial === null || typeof partial !== 'object' || Array.isArray(partial))
    throw new InvalidArgumentError('config: must be a JSON object', 'config');
  // Own keys of the schema only: `__proto__` (which JSON.parse makes an own key) would otherwise set
  // the merged object's prototype and slip past the schema.
  const unknown = Object.keys(partial).filter((k) => !Object.hasOwn(trainConfigSchema.properties, k));
  const sectionNames = Object.keys(trainConfigSchema.properties);
  if (unknown.length)
    throw new InvalidArgumentError(
      `invalid configuration:\n  ${unknown.map((k) => `config: unknown field '${k}'${didYouMean(k, sectionNames)}`).join('\n  ')}`,
      'config',
    );
  const merged: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(defaultConfig)) merged[k] = { ...v };
  for (const [k, v] of Object.entries(partial as Record<string, unknown>)) {
    if (v === undefined) continue; // a section left undefined keeps its defaults, as a missing one
    merged[k] = v !== null && typeof v === 'object' && !Array.isArray(v) ? { ...(merged[k] as object), ...v } : v;
  }
  if (!validate(merged)) {
    throw new InvalidArgumentError(`invalid configuration:\n  ${(validate.errors ?? []).map(describe).join('\n  ')}`, 'config');
  }
  const c = merged as unknown as TrainConfig;
  const rules: [boolean, string][] = [
    [c.model.topK <= c.model.experts, `config.model.topK: ${c.model.topK} is more than config.model.experts (${c.model.experts})`],
    [
      c.model.experts % c.model.groups === 0,
      `config.model.groups: ${c.model.groups} does not divide config.model.experts (${c.model.experts})`,
    ],
    [
      c.model.topkGroups <= c.model.groups,
      `config.model.topkGroups: ${c.model.topkGroups} is more than config.model.groups (${c.model.groups})`,
    ],
    // Group-limited routing ranks a group by the sum of its best groupTop scores, by default topK/topkGroups.
    [
      c.model.groups === 1 || c.model.groupTop !== null || c.model.topK % c.model.topkGroups === 0,
      `config.model.topkGroups: ${c.model.topkGroups} does not divide config.model.topK (${c.model.topK}); set config.model.groupTop, or a topkGroups that divides it`,
    ],
    [
      c.model.groups === 1 || (c.model.groupTop ?? Math.floor(c.model.topK / c.model.topkGroups)) <= c.model.experts / c.model.groups,
      `config.model.groupTop: a group's score sums its best ${c.model.groupTop ?? `${Math.floor(c.model.topK / c.model.topkGroups)} (topK/topkGroups, its default when null)`} but a group has ${Math.floor(c.model.experts / c.model.groups)} experts (config.model.experts / groups)`,
    ],
    [
      c.model.groups === 1 || c.model.topK <= c.model.topkGroups * (c.model.experts / c.model.groups),
      `config.model.topK: ${c.model.topK} is more than the ${c.model.topkGroups * (c.model.experts / c.model.groups)} experts of the config.model.topkGroups = ${c.model.topkGroups} groups a token keeps`,
    ],
    // Expert choice is balanced by construction and chooses among all experts.
    [
      c.model.routing !== 'expert-choice' || c.model.groups === 1,
      `config.model.groups: must be 1 with routing 'expert-choice' (received ${c.model.groups})`,
    ],
    [
      c.model.routing !== 'expert-choice' || (c.balance.auxLossCoef === 0 && c.balance.seqAuxLossCoef === 0),
      `config.balance.auxLossCoef and seqAuxLossCoef: must be 0 with routing 'expert-choice' (balanced by construction)`,
    ],
    // MoELayer's rule, named by field here: a renormalised single weight is a constant.
    [
      c.model.normalize !== true || c.model.topK > 1,
      `config.model.normalize: true with config.model.topK 1 makes every weight config.model.routeScale, so the router would get no gradient; set it false`,
    ],
    [!c.model.sharedGate || c.model.sharedFfn > 0, `config.model.sharedGate: needs a shared expert (config.model.sharedFfn > 0)`],
    [
      c.model.routeWeightsOn === 'output' || (c.model.topK === 1 && c.model.routing === 'token-choice'),
      `config.model.routeWeightsOn 'input': needs config.model.topK 1 and token-choice routing (received topK ${c.model.topK}, routing '${c.model.routing}')`,
    ],
    [
      c.model.activation === 'swiglu' || c.model.fp8Dispatch === false,
      `config.model.fp8Dispatch: not taken with config.model.activation 'clamped-swiglu'`,
    ],
    // One fp32 scale per FP8_BLOCK values of a row.
    [
      c.model.fp8Dispatch === false || c.model.hidden % FP8_BLOCK === 0,
      `config.model.fp8Dispatch: needs config.model.hidden to be a multiple of ${FP8_BLOCK} (received ${c.model.hidden})`,
    ],
    // gpt-oss's expert biases come with its clamped SwiGLU (MoELayer's rule, named by field here).
    [
      !c.model.expertBias || c.model.activation === 'clamped-swiglu',
      `config.model.expertBias: needs config.model.activation 'clamped-swiglu' (gpt-oss's; received '${c.model.activation}')`,
    ],
    // The dW products add into f32 only, so micro-batches cannot accumulate bf16 gradients.
    [
      c.train.weightGradDtype === 'f32' || c.train.microBatches === 1,
      `config.train.weightGradDtype 'bf16': needs config.train.microBatches 1 (micro-batches accumulate into f32 gradients; received ${c.train.microBatches})`,
    ],
    [c.optimizer.minLr <= c.optimizer.lr, `config.optimizer.minLr: ${c.optimizer.minLr} is above config.optimizer.lr (${c.optimizer.lr})`],
    [
      c.optimizer.eps >= F32_MIN_NORMAL,
      `config.optimizer.eps: ${c.optimizer.eps} is below float32's smallest normal number, ${F32_MIN_NORMAL} (AdamW computes in float32)`,
    ],
    [c.balance.seqAuxLossCoef === 0 || c.balance.seqLen !== null, `config.balance.seqLen: needed when seqAuxLossCoef > 0`],
    [
      c.balance.seqLen === null || c.data.tokensPerStep % c.balance.seqLen === 0,
      `config.balance.seqLen: ${c.balance.seqLen} does not divide config.data.tokensPerStep (${c.data.tokensPerStep})`,
    ],
  ];
  const broken = rules.filter(([ok]) => !ok).map(([, m]) => m);
  if (broken.length) throw new InvalidArgumentError(`invalid configuration:\n  ${broken.join('\n  ')}`, 'config');
  return c;
}

/**
 * Bytes a rank of a `ranks`-rank run of `c` needs, roughly and from above, before anything is
 * allocated: parameters at 20 bytes each (fp32 master, two AdamW moments, gradient, compute copy),
 * the activations a step keeps for backward (fp32, doubled for their gradients), and the data task's
 * cluster maps (host memory, also on the device with data.onDevice). An absurd configuration
 * (`--model.experts 1e6`) then fails at once with the fields to change, not deep in an allocation.
 */
export function estimateMemory(c: TrainConfig, ranks = 1): { params: number; activations: number; data: number } {
  const m = c.model;
  const ep = m.epSize ?? ranks;
  const H = m.hidden,
    E = m.experts,
    F = m.ffn,
    S = m.sharedFfn,
    k = m.topK;
  const El = Math.ceil(E / ep);
  // The activations a backward keeps are one forward's: a micro-batch of each rank's share.
  const T = Math.ceil(c.data.tokensPerStep / ranks / c.train.microBatches);
  const perLayer =
    H * E + E + El * 3 * H * F + 3 * H * S + H + (m.sharedGate ? H : 0) + (m.routerBias ? E : 0) + (m.expertBias ? El * (2 * F + H) : 0);
  // Each parameter: an f32 master, its bf16 copy, two f32 moments and an f32 gradient (20 bytes);
  // the experts' gradients in bf16 take 2 of those 4.
  const experts = El * 3 * H * F + 3 * H * S;
  const params = (m.layers * perLayer + H * H) * 20 - (c.train.weightGradDtype === 'bf16' ? m.layers * experts * 2 : 0);
  // Per layer: x, norms and residuals [T,H]; logits, scores, aux gradients [T,E]; the routed rows,
  // the experts' inputs/outputs [T·k,H] and their SwiGLU halves [T·k,3F]; the shared expert [T,3S].
  // With train.recompute the layers keep less, and the one in backward holds it all again.
  const routedKept = { none: 2 * H + 3 * F, experts: H, layer: 0 }[c.train.recompute];
  // A gated shared expert also keeps its output [T,H] (unless recomputed) and the gate [T,3].
  const gateKept = m.sharedGate ? 3 : 0;
  const sharedKept = 3 * S + (m.sharedGate ? H : 0);
  const kept = T * (4 * H + 3 * E + gateKept + (c.train.recompute === 'none' ? sharedKept : 0)) + T * k * routedKept;
  const whole = T * (4 * H + 3 * E + gateKept + sharedKept) + T * k * (2 * H + 3 * F);
  const activations = ((m.layers - 1) * kept + whole) * 4 * 2;
  const data = c.data.clusters * H * (H + 1) * 4;
  return { params, activations, data };
}

/** `moe-ep train --help`: the options, then every field with its default and description (from the schema), in 100 columns. */
export function trainHelp(): string {
  const options: [string, string][] = [
    ['--config FILE', 'read the configuration from a JSON file with the sections below (flags override it)'],
    ['--steps N', 'the same as --train.steps N'],
    ['--device auto|cpu|cuda', 'the same as --train.device'],
    ['--out DIR', 'the run folder (--train.out)'],
    ['--resume [DIR]', 'continue from the newest checkpoint in checkpoint.dir, or from DIR (--checkpoint.resume)'],
    ['--overwrite', 'replace the run already in the run folder (its metrics, report, config and checkpoints)'],
    ['--timeout-ms N', 'the same as --train.timeoutMs N'],
    ['--no-progress', 'no progress bar: a line every 5% of the run (--train.progress false)'],
    ['-h, --help', 'this help'],
  ];
  const sections = Object.entries(trainConfigSchema.properties).map(([name, schema]): [string, [string, string][]] => [
    name,
    Object.entries(schema.properties as Record<string, { description?: string; enum?: readonly string[] }>).map(
      ([field, f]): [string, string] => {
        const value = (defaultConfig as unknown as Record<string, Record<string, unknown>>)[name]?.[field];
        return [`--${name}.${field} ${JSON.stringify(value)}`, `${f.description ?? ''}${f.enum ? ` (${f.enum.join(' | ')})` : ''}`];
      },
    ),
  ]);
  const left = Math.max(...[...options, ...sections.flatMap(([, rows]) => rows)].map(([l]) => l.length));
  return [
    'usage: moe-ep train [--config FILE] [--section.field VALUE ...] [options]',
    '',
    'Trains the MoE model on the embedded synthetic task: on the CPU, on the GPU when one is usable, and',
    'under mpirun with the experts spread over the ranks. Writes metrics.jsonl, config.json, report.html',
    'and checkpoints/ into the run folder (--out, default runs/<time>).',
    '',
    'options:',
    ...helpTable(options, left),
    '',
    'fields: --section.field VALUE (default shown; VALUE is read as JSON when it parses, else as text)',
    ...sections.flatMap(([name, rows]) => ['', `${name}:`, ...helpTable(rows, left)]),
  ].join('\n');
}

/** Two columns: `left` wide, then the text wrapped to 100 columns. */
export function helpTable(rows: readonly (readonly [string, string])[], left: number, width = 100): string[] {
  const lines: string[] = [];
  const indent = ' '.repeat(2 + left + 2);
  for (const [l, text] of rows) {
    let line = `  ${l.padEnd(left)}  `;
    let fresh = true;
    for (const word of text.split(' ')) {
      if (!fresh && line.length + 1 + word.length > width) {
        lines.push(line);
        line = indent;
        fresh = true;
      }
      line += (fresh ? '' : ' ') + word;
      fresh = false;
    }
    lines.push(line.trimEnd());
  }
  return lines;
}

/**
 * Command-line overrides: `--section.field value` (values parsed as JSON when they parse, else
 * strings), plus the short forms `--steps`, `--device`, `--out`, `--resume`, `--timeout-ms`, `--no-progress`.
 */
export function overridesFromArgs(args: string[]): Record<string, Record<string, unknown>> {
  const out: Record<string, Record<string, unknown>> = {};
  const short: Record<string, string> = {
    steps: 'train.steps',
    device: 'train.device',
    out: 'train.out',
    resume: 'checkpoint.resume',
    'timeout-ms': 'train.timeoutMs',
  };
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] as string;
    if (!arg.startsWith('--')) throw new InvalidArgumentError(`unexpected argument '${arg}'`, 'train');
    let key = arg.slice(2);
    let value: unknown;
    if (key === 'no-progress') {
      key = 'train.progress';
      value = false;
    } else if (key === 'resume' && (args[i + 1] === undefined || (args[i + 1] as string).startsWith('--'))) {
      value = 'latest'; // --resume alone: the newest checkpoint in checkpoint.dir
    } else {
      const eq = key.indexOf('=');
      let raw: string | undefined;
      if (eq >= 0) {
        raw = key.slice(eq + 1);
        key = key.slice(0, eq);
        if (key === 'no-progress' || key === 'overwrite')
          throw new InvalidArgumentError(`'--${key}' takes no value; received '${arg}'`, 'train');
      } else {
        raw = args[++i];
        // `--out --no-progress`: the value is missing and the next flag would be taken for it.
        if (raw !== undefined && /^--[A-Za-z]/.test(raw))
          throw new InvalidArgumentError(
            `'--${key}' needs a value, and '${raw}' looks like the next flag (for a value that starts with '--', write --${key}=${raw})`,
            'train',
          );
      }
      if (raw === undefined) throw new InvalidArgumentError(`'--${key}' needs a value`, 'train');
      value = raw; // parsed below, once the field (and so its type) is known
    }
    key = short[key] ?? key;
    const [sectionName, field, ...rest] = key.split('.');
    if (!sectionName || !field || rest.length) {
      // A bare name: one of the shortcuts misspelt, or a field given without its section.
      const named = [...Object.keys(short), 'no-progress', 'config', 'overwrite'];
      const fieldsOf = Object.entries(trainConfigSchema.properties as Record<string, { properties: object }>).flatMap(([sec, v]) =>
        Object.keys(v.properties).map((f) => `${sec}.${f}`),
      );
      const shortcut = rest.length ? undefined : closestName(key, named);
      const asField = rest.length ? [] : fieldsOf.filter((f) => closestName(key, [f.slice(f.indexOf('.') + 1)]) !== undefined);
      const guess = shortcut ?? (asField.length ? asField.join("' or '--") : undefined);
      throw new InvalidArgumentError(
        `'--${key}' must name section.field (e.g. --model.experts 16) or be one of --${named.join(', --')}` +
          (guess ? ` (did you mean '--${guess}'?)` : ''),
        'train',
      );
    }
    // Checked against the schema before anything is assigned: `--__proto__.x` must not reach Object.prototype.
    const sections = trainConfigSchema.properties as Record<string, { properties: object }>;
    if (!Object.hasOwn(sections, sectionName))
      throw new InvalidArgumentError(
        `'--${key}': unknown section '${sectionName}'${didYouMean(sectionName, Object.keys(sections))} (one of ${Object.keys(sections).join(', ')})`,
        'train',
      );
    const fields = (sections[sectionName] as { properties: object }).properties;
    if (!Object.hasOwn(fields, field))
      throw new InvalidArgumentError(
        `'--${key}': config.${sectionName}: unknown field '${field}'${didYouMean(field, Object.keys(fields))}`,
        'train',
      );
    (out[sectionName] ??= {})[field] =
      typeof value === 'string' ? parseValue(value, (fields as Record<string, object>)[field] as object) : value;
  }
  return out;
}

/**
 * A command-line value for a field of the schema: JSON when it parses (numbers, booleans, null),
 * else the string; for a field that holds a string or null (a folder: train.out, checkpoint.dir,
 * checkpoint.resume) the string as written, so that `--out 123` names the folder 123.
 */
function parseValue(raw: string, schema: object): unknown {
  const types = 'anyOf' in schema ? (schema.anyOf as { type?: string }[]).map((t) => t.type) : [(schema as { type?: string }).type];
  if (types.every((t) => t === 'string' || t === 'null')) return raw === 'null' && types.includes('null') ? null : raw;
  try {
    return JSON.parse(raw);
  } catch {
    return raw;
  }
}
