/**
 * MoELayer: router → capacity → permute → dispatch → experts → combine → unpermute, forward and
 * backward, with one config validated up front.
 *
 * Parameters (fp32 master copies; `dtype` compute copies refreshed by refreshComputeWeights()):
 *   router   Wr [H, E]              replicated on every rank (gradients all-reduced by the trainer)
 *   bias     [E]                    selection-only balancing bias (state, no gradient)
 *   experts  w13 [El, H, 2F]        W1 and W3 interleaved by column (see experts.ts); w2 [El, F, H]
 *            the El = E/P experts this rank owns (global experts rank·El … rank·El + El − 1)
 *   shared   w13 [1, H, 2Fs], w2 [1, Fs, H]   optional dense SwiGLU every token passes through
 *            gate [H] (sharedGate)        its output scaled per token by sigmoid(x·gate)
 * Weights are drawn from Philox streams indexed by global position, so a rank's experts are
 * exactly its slice of the same global weights at any expert-parallel size.
 *
 * With `commStream`, the dispatcher's communication runs on its own stream and the layer queues
 * independent compute in between (lib/parallel/overlap.ts), the same arithmetic in the same order:
 *   forward:  routing → [dispatch ∥ shared expert] → experts → combine
 *   backward: [combine backward ∥ shared expert backward] → experts backward
 *             → [dispatch backward's row exchange ∥ router backward and its dx product]
 *             → [dispatch backward's per-token sum (+ the router's dx) ∥ router weight gradient]
 * The compute is queued before the communication call, ordered after its inputs by an event, so
 * it overlaps even when the call blocks the host (dropless counts, MPI, NCCL with a timeout).
 */
import { checkDeviceUsable, Device, type DeviceLike, getDefaultDevice } from '../device.js';
import { type CommWork } from '../parallel/overlap.js';
import { checkGroupAgrees, choiceField, numberField, optionalField } from '../parallel/group-agrees.js';
import { Event, Stream } from '../stream.js';
import { type DType } from '../dtype.js';
import { DisposedError, invalidArgument, usedAfterDispose, shown } from '../errors.js';
import {
  checkApart,
  checkBoolean,
  checkContiguous,
  checkFloat32,
  checkGradBuffer,
  checkKeys,
  checkNonNegativeInt,
  checkNonNegativeNumber,
  checkOneOf,
  checkOptions,
  checkPositiveInt,
  checkTensor,
} from '../validate.js';
import { keep, Tensor, tidy } from '../tensor.js';
import { capacity, type CapacityResult, DROP_POLICIES, type DropPolicy } from './capacity.js';
import { checkGroup, type DispatchHandle, Dispatcher, type ExpertParallelGroup, type TransportChoice } from './dispatcher.js';
import { clampedExpertsBackward, clampedExpertsForward } from './clamped-experts.js';
import { EXPERT_ACTIVATIONS, type ExpertBlockOptions, EXPERT_OPTION_KEYS, resolveExpertOptions } from './expert-bias-activation.js';
import { sum } from '../basic-ops.js';
import { checkWeightGradDType, expertsActivations, expertsBackward, expertsForward, type WeightGradDType } from './experts.js';
import { FP8_BLOCK, type Fp8Rows } from './fp8.js';
import { groupedGemm } from './grouped-gemm.js';
import { unpermute, unpermuteBackward } from './permute.js';
import {
  balanceLoss,
  expertChoiceForward,
  resolveRouterConfig,
  type ResolvedRouterConfig,
  checkRouteWeightsOn,
  ROUTE_WEIGHTS_ON,
  type RouteWeightsOn,
  routerBackward,
  routerEntropy,
  routerForward,
  type RouterConfig,
  routerFieldsOf,
  zLoss,
} from './router.js';
import { trace } from '../trace.js';

/**
 * The router's fields, gpt-oss's options (ExpertBlockOptions: in the training layer the biases are
 * learned, starting at 0, and the clamped activation takes no fp8Dispatch; its experts run
 * unfused, lib/moe/clamped-experts.ts), plus:
 */
export interface MoELayerConfig extends RouterConfig, ExpertBlockOptions {
  hidden: number;
  ffn: number;
  /**
   * Token choice: per-expert capacity factor, C = min(ceil(cf·T·k/E), T·k); omitted: dropless. Expert choice:
   * the paper's c, C = min(T, ceil(T·cf/E)) tokens per expert (default topK: the compute of top-k token
   * choice); fixed C-row segments always, each rank choosing among its own T tokens.
   */
  capacityFactor?: number;
  dropPolicy?: DropPolicy;
  /** Fixed-size expert segments (capacity mode only): no host synchronisation in the layer. */
  padToCapacity?: boolean;
  /** FFN size of the shared expert; 0 or omitted: none. */
  sharedFfn?: number;
  /**
   * Scale the shared expert's output per token by sigmoid(x·g), g [H] a learned gate (Qwen2-MoE's
   * and Qwen3-Next's shared_expert_gate). Needs sharedFfn. Default false.
   */
  sharedGate?: boolean;
  /**
   * Where a token's router weight w applies: 'output' (default), y = Σ_j w_j·E_j(x); or 'input',
   * Llama 4's y = E(w·x), token choice with topK 1 only. Backward gives w's gradient ⟨d(w·x), x⟩.
   */
  routeWeightsOn?: RouteWeightsOn;
  /** Expert-parallel group (default: this process alone). */
  group?: ExpertParallelGroup;
  /**
   * Overlap communication with compute: the dispatcher's all-to-alls run on this stream (true: a
   * stream the layer creates on its device and disposes), the shared expert and the router
   * backward on the current stream meanwhile. Outputs are unchanged. Default: off.
   */
  commStream?: Stream | boolean;
  /** How rows travel between ranks (Dispatcher's `transport`: 'auto' | 'ipc' | 'nccl'; default 'auto'). */
  transport?: TransportChoice;
  /** SMs the 'ipc' transport's kernels may occupy (default: all). */
  transportSms?: number;
  /**
   * Dispatch the routed rows as fp8 e4m3 with one fp32 scale per 128 values (the Dispatcher's
   * `fp8`; DeepSeek-V3's fp8 dispatch): half the bytes on the wire, `hidden` a multiple of 128.
   * true: rows are dequantised to `dtype` on arrival; 'keep': the experts take the e4m3 rows and
   * their scales (the first GEMM reads them through a dtype copy), and backward keeps them, half
   * the memory of the saved rows. The experts then compute on the quantised rows; the router, the
   * shared expert, the combine and every gradient stay in `dtype`. Default false.
   */
  fp8Dispatch?: boolean | 'keep';
  /**
   * What the forward keeps for backward, against what backward computes again (activation
   * recomputation, as Megatron-Core's recompute modules offer for the MoE layer; M routed rows on
   * this rank):
   *   'none'    (default) everything: the dispatched rows [M,H], the experts' SwiGLU input and
   *             output [M,3F] and their output rows [M,H], the shared expert's [T,3S] (and its
   *             output [T,H] with sharedGate, whose gradient reads it).
   *   'experts' the dispatched rows and the routing: backward first runs the experts' two forward
   *             GEMMs again (and the shared expert's first; both with sharedGate): M·(3F+H) + T·3S
   *             (+ T·H with sharedGate) fewer values kept, for about a third more GEMM work in a step.
   *   'layer'   the routing alone (indices, weights, scores, the capacity layout): backward also
   *             dispatches x again (a second all-to-all), so a further M·H fewer values are kept.
   * Every kernel is deterministic and the routing is not recomputed, so the gradients are the same
   * bits as with 'none'. x must stay alive until backward, as always.
   */
  recompute?: Recompute;
  /**
   * The dtype of the experts' weight gradients (w13, w2 and the shared expert's): 'f32' (default)
   * or 'bf16', what torch's autograd gives bf16 weights and Megatron-Core's default (its
   * grad_reduce_in_fp32 off): half the gradient memory and bytes written, faster dW products, each
   * gradient within one bf16 rounding of the f32 one (the GPU's bf16 dW kernels may sum in another
   * order). backward's `out` buffers for them then are bf16, and
   * `accumulate` is refused (the products add into f32 only). The router's, the gate's and the
   * biases' gradients stay f32 (small, and the router's logits are f32).
   */
  weightGradDtype?: WeightGradDType;
  /** Compute dtype: bf16 (default; required on the GPU) or f32 (CPU only). */
  dtype?: DType;
  device?: DeviceLike;
  /** Seed of the weights' Philox streams (default 1234). */
  seed?: number;
  /** Auxiliary losses' coefficients (0: off). */
  auxLossCoef?: number;
  seqAuxLossCoef?: number;
  /** Tokens per sequence for the sequence-wise loss. */
  seqLen?: number;
  zLossCoef?: number;
}

export type Recompute = 'none' | 'experts' | 'layer';
export const RECOMPUTE_MODES: readonly Recompute[] = ['none', 'experts', 'layer'];

export interface MoEForward {
  y: Tensor;
  /** Tokens per global expert routed by this rank [E] i32, assignments dropped [1] i32. */
  tokensPerExpert: Tensor;
  dropped: Tensor;
  /** Expert choice: tokens of this rank chosen by 0, 1, …, E experts [E+1] i32; token choice: null. */
  expertsPerToken: Tensor | null;
  /** The auxiliary losses' total (f32 [1]; 0 when all are off). */
  auxLoss: Tensor;
  /** Mean per-token entropy of the routing distribution, nats (f32 [1]). */
  routerEntropy: Tensor;
  /** @internal what backward needs */
  saved: MoESaved;
}

/** Which layer made each forward's saved state: a backward needs its own layer's weights and routing. */
const forwardOwner = new WeakMap<object, MoELayer>();

interface MoESaved {
  /** The caller's input (not owned: the caller keeps it alive until backward). */
  x: Tensor;
  scores: Tensor;
  indices: Tensor;
  weights: Tensor;
  /** Expert choice: the router's slot [T,E] (which pairs carry a gradient). */
  slot: Tensor | null;
  dLogitsAux: Tensor | null;
  /** recompute 'layer': the capacity layout, to dispatch x again; otherwise null. */
  layout: SavedLayout | null;
  /** The dispatched rows and their layout; null with recompute 'layer'. */
  dispatched: DispatchedRows | null;
  /** The experts' pre-activations g [M,2F], activations h [M,F] and output rows; null with recompute. */
  experts: { g: Tensor; h: Tensor; out: Tensor } | null;
  /** The shared expert's g and h (and its output, with sharedGate); null without one or with recompute. */
  shared: { g: Tensor; h: Tensor; out: Tensor | null } | null;
  /** sharedGate: the gate's sigmoid (scores = weights [T,1] f32) and its indices [T,1]; null without. */
  gate: { scores: Tensor; indices: Tensor; weights: Tensor } | null;
}

interface DispatchedRows {
  handle: DispatchHandle;
  rows: Tensor;
  /** fp8Dispatch 'keep': the e4m3 rows' scales [rows, H/128] f32 (rows are then e4m3). */
  rowScales: Tensor | null;
}

/** What the dispatch reads of capacity()'s result (its counts of dropped and invalid assignments are not read). */
type SavedLayout = Omit<CapacityResult, 'dropped' | 'invalid'>;

export interface MoEGrads {
  dx: Tensor;
  router: Tensor; // [H, E] f32
  w13: Tensor; // [El, H, 2F] f32 (weightGradDtype)
  w2: Tensor; // [El, F, H] f32 (weightGradDtype)
  /** The shared expert's [1, H, 2S] and [1, S, H] (weightGradDtype), or null. */
  sharedW13: Tensor | null;
  sharedW2: Tensor | null;
  /** sharedGate's gradient [H] f32, or null. */
  sharedGate: Tensor | null;
  /** gpt-oss: the router bias's [E] and the experts' biases' [El,2F], [El,H] gradients (f32), or null. */
  routerBias: Tensor | null;
  w13Bias: Tensor | null;
  w2Bias: Tensor | null;
}

/** Buffers of the master weights' shapes for backward's weight gradients (its `out`): f32, the experts' weights' in weightGradDtype. */
export interface MoEGradBuffers {
  router: Tensor;
  w13: Tensor;
  w2: Tensor;
  /** With a shared expert (sharedFfn), both; without one, left out or null. */
  sharedW13?: Tensor | null;
  sharedW2?: Tensor | null;
  /** With sharedGate; without it, left out or null. */
  sharedGate?: Tensor | null;
  /** With routerBias and expertBias; without them, left out or null. */
  routerBias?: Tensor | null;
  w13Bias?: Tensor | null;
  w2Bias?: Tensor | null;
}

export interface MoEBackwardOptions {
  /**
   * Where the weight gradients go, instead of new tensors: they come back as the result's router,
   * w13, w2, sharedW13, sharedW2 and sharedGate (the caller's buffers: dispose them yourself, not through the
   * result). `dx` is always new.
   */
  out?: MoEGradBuffers;
  /**
   * Add the weight gradients into `out` (gradient accumulation over micro-batches): the GEMMs'
   * epilogues add them, with no gradient tensors made and no pass of their own. Zero `out` before
   * the first micro-batch.
   */
  accumulate?: boolean;
}

/** The layer's weights, masters or compute copies. */
interface LayerWeights {
  router: Tensor;
  w13: Tensor;
  w2: Tensor;
  sharedW13: Tensor | null;
  sharedW2: Tensor | null;
  sharedGate: Tensor | null;
  /** gpt-oss: the router's bias [E] (f32 in both), the experts' biases [El,2F] and [El,H]; null without. */
  routerBias: Tensor | null;
  w13Bias: Tensor | null;
  w2Bias: Tensor | null;
}

/**
 * The shared expert's gate as a router: one expert, top-1, sigmoid, not renormalised (its weight is
 * the sigmoid). MoEInference serves the gate through the same router.
 */
export const SHARED_GATE_ROUTER = resolveRouterConfig({ numExperts: 1, topK: 1, scoreFunction: 'sigmoid', normalize: false });

export class MoELayer implements Disposable {
  readonly config: Readonly<
    Required<Omit<MoELayerConfig, 'capacityFactor' | 'group' | 'device' | 'seqLen' | 'commStream' | 'transport' | 'transportSms'>>
  > & {
    capacityFactor: number | undefined;
    seqLen: number | undefined;
  };
  readonly router: ResolvedRouterConfig;
  /**
   * The balance losses' router: a plain top-k of the scores over all experts, no bias, no groups
   * (DeepSeek-V3's eq. 18 and Megatron-Core count f_e so; the bias and the group limit steer
   * selection only). Null when no balance loss is on.
   */
  private readonly balanceRouter: ResolvedRouterConfig | null;
  readonly device: Device;
  readonly group: ExpertParallelGroup;
  readonly localExperts: number;
  readonly dispatcher: Dispatcher;
  #disposed = false;
  /** The group's layers were found to agree (checkGroupAgrees, at the first forward on several ranks). */
  #groupAgrees = false;
  /** fp32 master weights (sharedGate [H]). */
  readonly master: LayerWeights;
  /** Compute copies in `dtype` (router as [1, H, E] and sharedGate as [1, H, 1] for the one-group GEMMs). */
  readonly compute: LayerWeights;
  /** Selection-only balancing bias [E] f32. */
  readonly bias: Tensor;
  private readonly allOffsets: Map<number, Tensor> = new Map();
  private readonly tokenRowsCache: Map<number, Tensor> = new Map();
  private readonly onesCache: Map<number, Tensor> = new Map();
  /** The stream the layer made for `commStream: true` (disposed with the layer). */
  private readonly ownStream: Stream | undefined;

  constructor(config: MoELayerConfig) {
    const op = 'MoELayer';
    if (config === null || typeof config !== 'object') invalidArgument(op, `'config' must be an object`);
    checkKeys(config, op, {
      numExperts: true,
      topK: true,
      scoreFunction: true,
      groups: true,
      topkGroups: true,
      groupTop: true,
      normalize: true,
      routeScale: true,
      routing: true,
      hidden: true,
      ffn: true,
      capacityFactor: true,
      dropPolicy: true,
      padToCapacity: true,
      sharedFfn: true,
      sharedGate: true,
      routeWeightsOn: true,
      ...EXPERT_OPTION_KEYS,
      group: true,
      commStream: true,
      transport: true,
      transportSms: true,
      fp8Dispatch: true,
      recompute: true,
      weightGradDtype: true,
      dtype: true,
      device: true,
      seed: true,
      auxLossCoef: true,
      seqAuxLossCoef: true,
      seqLen: true,
      zLossCoef: true,
    });
    const hidden = checkPositiveInt(config.hidden, op, 'hidden');
    const ffn = checkPositiveInt(config.ffn, op, 'ffn');
    this.router = resolveRouterConfig({
      ...routerFieldsOf(config),
      // Expert choice reads capacityFactor as the paper's c (token choice's is the layer's own, below).
      ...(config.routing === 'expert-choice' && config.capacityFactor !== undefined ? { capacityFactor: config.capacityFactor } : {}),
    });
    const expertChoice = this.router.routing === 'expert-choice';
    // A lone weight divided by itself is routeScale for every token: routing would never learn.
    if (this.router.normalize && this.router.topK === 1)
      invalidArgument(
        op,
        `'normalize' with 'topK' 1 makes every weight ${this.router.routeScale} ('routeScale'), so the router would get no gradient; set it false`,
      );
    if (expertChoice) {
      // Fixed C-row segments, no host sync; balanced by construction, so no balance losses.
      if (config.padToCapacity === false)
        invalidArgument(op, `'padToCapacity' is always on with routing 'expert-choice' (every expert takes exactly C tokens)`);
      if (config.auxLossCoef || config.seqAuxLossCoef)
        invalidArgument(op, `'auxLossCoef' and 'seqAuxLossCoef' must be 0 with routing 'expert-choice' (balanced by construction)`);
    }
    if (
      config.capacityFactor !== undefined &&
      !(typeof config.capacityFactor === 'number' && config.capacityFactor > 0 && Number.isFinite(config.capacityFactor))
    ) {
      invalidArgument(
        op,
        `'capacityFactor' must be a finite positive number (omit it for dropless); received ${String(config.capacityFactor)}`,
      );
    }
    if (config.padToCapacity !== undefined) checkBoolean(config.padToCapacity, op, 'padToCapacity');
    // Weights come from the Philox streams seed·16 + 0…5: each must be an exact integer.
    if (config.seed !== undefined) {
      checkNonNegativeInt(config.seed, op, 'seed');
      if (config.seed > MAX_SEED)
        invalidArgument(op, `'seed' must be at most ${MAX_SEED} (the weights' streams are seed·16 + 0…5); received ${config.seed}`);
    }
    if (config.padToCapacity && config.capacityFactor === undefined && !expertChoice)
      invalidArgument(op, `'padToCapacity' needs 'capacityFactor'`);
    // Checked here, not at the first forward: a bad config fails where it is made.
    if (config.dropPolicy !== undefined) checkOneOf(config.dropPolicy, op, 'dropPolicy', DROP_POLICIES);
    const dtype = config.dtype ?? 'bf16';
    this.device = Device.parse(config.device ?? getDefaultDevice(), op);
    checkDeviceUsable(this.device, op);
    if (dtype !== 'bf16' && !(dtype === 'f32' && !this.device.isCuda))
      invalidArgument(op, `'dtype' must be 'bf16' (or 'f32' on the CPU); received ${String(dtype)}`);
    const sharedFfn = checkNonNegativeInt(config.sharedFfn ?? 0, op, 'sharedFfn');
    const sharedGate = checkBoolean(config.sharedGate ?? false, op, 'sharedGate');
    if (sharedGate && sharedFfn === 0) invalidArgument(op, `'sharedGate' needs a shared expert ('sharedFfn' > 0)`);
    const routeWeightsOn = checkRouteWeightsOn(config.routeWeightsOn, this.router, op);
    const { routerBias, expertBias, activation, swigluAlpha, swigluLimit } = resolveExpertOptions(config, op);
    if (activation === 'clamped-swiglu' && (config.fp8Dispatch ?? false) !== false)
      invalidArgument(op, `'fp8Dispatch' is not taken with the 'clamped-swiglu' activation (its first product reads the rows as they are)`);
    this.group = checkGroup(config.group, op);
    const E = this.router.numExperts;
    if (E % this.group.size !== 0)
      invalidArgument(op, `'numExperts' ${E} must be a multiple of the expert-parallel group size ${this.group.size}`);
    const seqLen = config.seqLen;
    if (seqLen !== undefined) checkPositiveInt(seqLen, op, 'seqLen');
    const fp8Dispatch = config.fp8Dispatch ?? false;
    if (fp8Dispatch !== true && fp8Dispatch !== false && fp8Dispatch !== 'keep')
      invalidArgument(op, `'fp8Dispatch' must be true, false or 'keep'; received ${shown(fp8Dispatch)}`);
    if (fp8Dispatch !== false && hidden % FP8_BLOCK !== 0)
      invalidArgument(
        op,
        `'fp8Dispatch' needs a 'hidden' that is a multiple of ${FP8_BLOCK} (one scale per ${FP8_BLOCK} values); received ${hidden}`,
      );
    this.config = {
      hidden,
      ffn,
      numExperts: E,
      topK: this.router.topK,
      scoreFunction: this.router.scoreFunction,
      groups: this.router.groups,
      topkGroups: this.router.topkGroups,
      groupTop: this.router.groupTop,
      normalize: this.router.normalize,
      routeScale: this.router.routeScale,
      routing: this.router.routing,
      capacityFactor: expertChoice ? this.router.capacityFactor : config.capacityFactor,
      dropPolicy: config.dropPolicy ?? 'probs',
      padToCapacity: expertChoice || (config.padToCapacity ?? false),
      sharedFfn,
      sharedGate,
      routeWeightsOn,
      routerBias,
      expertBias,
      activation,
      swigluAlpha,
      swigluLimit,
      fp8Dispatch,
      recompute: checkOneOf(config.recompute ?? 'none', op, 'recompute', RECOMPUTE_MODES),
      weightGradDtype: checkWeightGradDType(config.weightGradDtype ?? 'f32', op, 'weightGradDtype'),
      dtype,
      seed: config.seed ?? 1234,
      auxLossCoef: lossCoef(config.auxLossCoef, op, 'auxLossCoef'),
      seqAuxLossCoef: lossCoef(config.seqAuxLossCoef, op, 'seqAuxLossCoef'),
      seqLen,
      zLossCoef: lossCoef(config.zLossCoef, op, 'zLossCoef'),
    };
    if (this.config.seqAuxLossCoef > 0 && seqLen === undefined) invalidArgument(op, `'seqAuxLossCoef' needs 'seqLen'`);
    this.balanceRouter =
      this.config.auxLossCoef > 0 || this.config.seqAuxLossCoef > 0
        ? resolveRouterConfig({ numExperts: E, topK: this.router.topK, scoreFunction: this.router.scoreFunction })
        : null;
    this.localExperts = E / this.group.size;
    const cs = config.commStream ?? false;
    if (typeof cs !== 'boolean' && !(cs instanceof Stream))
      invalidArgument(op, `'commStream' must be a Stream or a boolean; received ${String(cs)}`);
    if (cs instanceof Stream && !cs.device.equals(this.device))
      invalidArgument(op, `'commStream' is on ${cs.device.toString()} but the layer is on ${this.device.toString()}`);
    this.ownStream = cs === true ? new Stream(this.device) : undefined;
    const commStream = cs instanceof Stream ? cs : this.ownStream;
    this.dispatcher = new Dispatcher({
      numExperts: E,
      group: this.group,
      padToCapacity: this.config.padToCapacity,
      fp8: fp8Dispatch,
      ...(commStream ? { commStream } : {}),
      ...(config.transport === undefined ? {} : { transport: config.transport }),
      ...(config.transportSms === undefined ? {} : { transportSms: config.transportSms }),
    });

    // Weights from Philox streams indexed by global position (see the module doc).
    const seed = this.config.seed;
    const El = this.localExperts;
    const first = this.group.rank * El;
    const device = this.device;
    const normal = (shape: number[], std: number, stream: number, offset = 0): Tensor =>
      Tensor.randn(shape, { std, seed: seed * 16 + stream, offset, device });
    this.master = {
      router: normal([hidden, E], 1 / Math.sqrt(hidden), 0),
      w13: normal([El, hidden, 2 * ffn], 1 / Math.sqrt(hidden), 1, first * hidden * 2 * ffn),
      w2: normal([El, ffn, hidden], 1 / Math.sqrt(ffn), 2, first * ffn * hidden),
      sharedW13: sharedFfn ? normal([1, hidden, 2 * sharedFfn], 1 / Math.sqrt(hidden), 3) : null,
      sharedW2: sharedFfn ? normal([1, sharedFfn, hidden], 1 / Math.sqrt(sharedFfn), 4) : null,
      sharedGate: sharedGate ? normal([hidden], 1 / Math.sqrt(hidden), 5) : null,
      routerBias: routerBias ? Tensor.zeros([E], { device }) : null,
      w13Bias: expertBias ? Tensor.zeros([El, 2 * ffn], { device }) : null,
      w2Bias: expertBias ? Tensor.zeros([El, hidden], { device }) : null,
    };
    this.bias = Tensor.zeros([E], { device });
    this.compute = {
      router: Tensor.empty([1, hidden, E], { dtype, device }),
      w13: Tensor.empty([El, hidden, 2 * ffn], { dtype, device }),
      w2: Tensor.empty([El, ffn, hidden], { dtype, device }),
      sharedW13: sharedFfn ? Tensor.empty([1, hidden, 2 * sharedFfn], { dtype, device }) : null,
      sharedW2: sharedFfn ? Tensor.empty([1, sharedFfn, hidden], { dtype, device }) : null,
      sharedGate: sharedGate ? Tensor.empty([1, hidden, 1], { dtype, device }) : null,
      // The logits are f32: so is the bias added to them.
      routerBias: routerBias ? Tensor.empty([E], { device }) : null,
      w13Bias: expertBias ? Tensor.empty([El, 2 * ffn], { dtype, device }) : null,
      w2Bias: expertBias ? Tensor.empty([El, hidden], { dtype, device }) : null,
    };
    this.refreshComputeWeights();
  }

  /** Copies the fp32 masters into the compute copies (after every optimizer step). */
  refreshComputeWeights(): void {
    if (this.#disposed) usedAfterDispose('MoELayer.refreshComputeWeights', 'the layer');
    tidy(() => {
      this.compute.router.copy_(this.master.router.view(1, this.config.hidden, this.config.numExperts));
      this.compute.w13.copy_(this.master.w13);
      this.compute.w2.copy_(this.master.w2);
      if (this.compute.sharedW13 && this.master.sharedW13) this.compute.sharedW13.copy_(this.master.sharedW13);
      if (this.compute.sharedW2 && this.master.sharedW2) this.compute.sharedW2.copy_(this.master.sharedW2);
      if (this.compute.sharedGate && this.master.sharedGate)
        this.compute.sharedGate.copy_(this.master.sharedGate.view(1, this.config.hidden, 1));
      for (const k of ['routerBias', 'w13Bias', 'w2Bias'] as const) {
        const c = this.compute[k];
        const m = this.master[k];
        if (c && m) c.copy_(m);
      }
    });
  }

  /** Offsets [0, T] for one-group products over all T tokens (router, shared expert). */
  private wholeBatch(T: number): Tensor {
    return cachedPerTokenCount(this.allOffsets, T, () => Tensor.fromArray([0, T], { dtype: 'i32', device: this.device }));
  }

  /** x [T, H] in the compute dtype → y [T, H]. Keep the result until backward, then dispose its tensors. */
  forward(x: Tensor): MoEForward {
    const op = 'MoELayer.forward';
    if (this.#disposed) usedAfterDispose(op, 'the layer');
    const { hidden, dtype } = this.config;
    checkTensor(x, op, 'x');
    if (x.ndim !== 2 || x.shape[1] !== hidden) invalidArgument(op, `'x' must be [T, ${hidden}]; received [${x.shape.join(', ')}]`);
    checkContiguous(x, op, 'x');
    if (x.dtype !== dtype) invalidArgument(op, `'x' is ${x.dtype} but the layer computes in ${dtype}`);
    if (!x.device.equals(this.device))
      invalidArgument(op, `'x' is on ${x.device.toString()} but the layer is on ${this.device.toString()}`);
    this.checkGroupAgrees(op);
    const T = x.shape[0] as number;
    return tidy(() => {
      const all = this.wholeBatch(T);
      trace.mark('layer forward: start', x.device);
      const logits = groupedGemm('NN', x, this.compute.router, all, { dtype: 'f32' });
      // gpt-oss: the router's bias on the logits (it chooses and weighs; its gradient is Σ_t dLogits).
      if (this.compute.routerBias) logits.add_(this.compute.routerBias);
      // Expert choice: each expert takes its top-C of this rank's T tokens; the T×E (token, expert)
      // pairs then take token choice's T×k path (capacity layout, dispatch, experts, combine).
      const ec = this.router.routing === 'expert-choice' ? expertChoiceForward(logits, this.router) : null;
      const r = ec ?? routerForward(logits, this.router, { bias: this.bias });
      // Auxiliary losses: their gradients are collected into dLogitsAux now, added in backward.
      const auxLoss = Tensor.zeros([1], { device: this.device });
      let dLogitsAux: Tensor | null = null;
      const { auxLossCoef, seqAuxLossCoef, zLossCoef, seqLen } = this.config;
      if (auxLossCoef > 0 || seqAuxLossCoef > 0 || zLossCoef > 0) {
        const d = Tensor.zeros([T, this.config.numExperts], { device: this.device });
        dLogitsAux = d;
        // f_e counts each token's plain top-k, not its routed experts (this.balanceRouter).
        const counted = this.balanceRouter ? routerForward(logits, this.balanceRouter).indices : null;
        if (counted && auxLossCoef > 0) auxLoss.add_(balanceLoss(r.scores, counted, this.router, { coefficient: auxLossCoef, dLogits: d }));
        if (counted && seqAuxLossCoef > 0)
          auxLoss.add_(balanceLoss(r.scores, counted, this.router, { coefficient: seqAuxLossCoef, seqLen: seqLen as number, dLogits: d }));
        if (zLossCoef > 0) auxLoss.add_(zLoss(logits, { coefficient: zLossCoef, dLogits: d }));
      }
      // Expert choice: every expert keeps exactly its C chosen tokens, numbered by the router's slot.
      const none = (): Tensor => Tensor.zeros([1], { dtype: 'i32', device: this.device });
      const cap = ec
        ? {
            slot: ec.slot,
            keptPerExpert: ec.tokensPerExpert,
            dropped: none(),
            invalid: none(),
            capacity: ec.capacity,
            numExperts: this.config.numExperts,
          }
        : capacity(r.indices, r.weights, {
            numExperts: this.config.numExperts,
            ...(this.config.capacityFactor === undefined ? {} : { capacityFactor: this.config.capacityFactor }),
            dropPolicy: this.config.dropPolicy,
          });
      // The dispatch waits for the routing only: the shared expert, queued next, overlaps it.
      trace.mark('layer forward: routed', x.device);
      using routed = this.markProduced();
      let shared: { g: Tensor; h: Tensor; out: Tensor } | null = null;
      if (this.compute.sharedW13 && this.compute.sharedW2) shared = expertsForward(x, this.compute.sharedW13, this.compute.sharedW2, all);
      // sharedGate: sigmoid(x·g) per token through the router (one expert, top-1), applied as a
      // one-row-per-token unpermute: fp32 products, one rounding (as MoEInference does).
      let gate: MoESaved['gate'] = null;
      let sharedOut = shared?.out ?? null;
      if (shared && this.compute.sharedGate) {
        const logit = groupedGemm('NN', x, this.compute.sharedGate, all, { dtype: 'f32' });
        const g = routerForward(logit, SHARED_GATE_ROUTER);
        gate = { scores: g.scores, indices: g.indices, weights: g.weights };
        sharedOut = unpermute(shared.out, this.tokenRows(T), g.weights);
      }
      // routeWeightsOn 'input' (Llama 4, top-1): the experts take w·x, their outputs come back with weight 1.
      const { xIn, wOut } = this.expertInput(x, r.weights);
      const { rows, scales, handle } = settle(this.dispatcher.dispatchAsync(xIn, r.indices, wOut, cap, routed ? { after: routed } : {}));
      const dispatched: DispatchedRows = { handle, rows, rowScales: scales ?? null };
      const experts = this.expertsForward(dispatched);
      trace.mark('layer forward: experts', x.device);
      const y = this.dispatcher.combine(experts.out, handle, wOut);
      if (sharedOut) addInto(y, sharedOut);
      // What is not saved here is released by tidy() once the queued kernels no longer need it
      // (the allocator reuses memory in stream order), and made again by backward (restore()).
      const { recompute } = this.config;
      const saved: MoESaved = {
        x,
        scores: r.scores,
        indices: r.indices,
        weights: r.weights,
        slot: ec?.slot ?? null,
        dLogitsAux,
        layout:
          recompute === 'layer'
            ? {
                slot: cap.slot,
                // Expert choice returns these counts as tokensPerExpert, which the caller may release.
                keptPerExpert: ec ? cap.keptPerExpert.clone() : cap.keptPerExpert,
                capacity: cap.capacity,
                numExperts: cap.numExperts,
              }
            : null,
        dispatched: recompute === 'layer' ? null : dispatched,
        experts: recompute === 'none' ? experts : null,
        // The gate's gradient reads the shared expert's output: kept with it.
        shared: shared && recompute === 'none' ? { g: shared.g, h: shared.h, out: gate ? shared.out : null } : null,
        gate,
      };
      if (recompute === 'layer') handle.dispose();
      forwardOwner.set(saved, this);
      const entropy = routerEntropy(r.scores);
      trace.mark('layer forward: end', x.device);
      return {
        y,
        tokensPerExpert: r.tokensPerExpert,
        dropped: cap.dropped,
        expertsPerToken: ec?.expertsPerToken ?? null,
        auxLoss,
        routerEntropy: entropy,
        saved,
      };
    });
  }

  /**
   * dy [T, H] → dx and the parameter gradients (f32; the experts' weights' in `weightGradDtype`).
   * Releases the forward's saved tensors.
   */
  backward(fwd: MoEForward, dy: Tensor, options: MoEBackwardOptions = {}): MoEGrads {
    const op = 'MoELayer.backward';
    if (this.#disposed) usedAfterDispose(op, 'the layer');
    options = checkOptions(options, op, { out: true, accumulate: true });
    const accumulate = checkBoolean(options.accumulate ?? false, op, 'accumulate');
    if (accumulate && options.out === undefined) invalidArgument(op, `'accumulate' needs 'out' to add into`);
    if (accumulate && this.config.weightGradDtype !== 'f32')
      invalidArgument(
        op,
        `'accumulate' adds into f32 gradients only; this layer's 'weightGradDtype' is '${this.config.weightGradDtype}' (build it with 'f32' to accumulate over micro-batches)`,
      );
    const saved: unknown = fwd !== null && typeof fwd === 'object' ? fwd.saved : undefined;
    const owner = saved !== null && typeof saved === 'object' ? forwardOwner.get(saved) : undefined;
    if (owner === undefined) invalidArgument(op, `'fwd' must be what forward() returned`);
    if (owner !== this) invalidArgument(op, `'fwd' came from another MoELayer's forward(); pass this layer's`);
    const s = fwd.saved;
    // A forward's saved tensors serve one backward (which releases them), or disposeSaved.
    if (s.indices.disposed)
      throw new DisposedError(
        `${op}: this forward's saved tensors were released by an earlier backward() or disposeSaved(): run forward() again`,
        op,
      );
    checkTensor(dy, op, 'dy');
    if (dy.shape.join() !== s.x.shape.join())
      invalidArgument(op, `'dy' [${dy.shape.join(',')}] must have the shape of the forward's 'x' [${s.x.shape.join(',')}]`);
    // The combine's backward takes dy in the layer's dtype or in f32.
    if ((dy.dtype !== s.x.dtype && dy.dtype !== 'f32') || !dy.device.equals(s.x.device) || !dy.isContiguous)
      invalidArgument(
        op,
        `'dy' must be a contiguous ${s.x.dtype}${s.x.dtype === 'f32' ? '' : ' or f32'} tensor on ${s.x.device.toString()}, as the forward's 'x'; received ${dy.isContiguous ? '' : 'a strided '}${dy.dtype} on ${dy.device.toString()}`,
      );
    // Backward reads x (the router's weight gradient, the shared expert's, recomputation): a
    // released x fails here, named, before anything is queued.
    if (s.x.disposed) throw new DisposedError(`${op}: the forward's 'x' was disposed; keep it until backward, which reads it`, op);
    // Checked against each other, dy, the saved input and the layer's own tensors before any
    // product runs: a refused call leaves the buffers and the forward as they were.
    const into = options.out === undefined ? undefined : this.checkGradBuffers(options.out, op, { dy, x: s.x });
    const T = s.x.shape[0] as number;
    // A handle the backward's re-dispatch made (recompute 'layer'), released after the step.
    const restored: { handle: DispatchHandle | null } = { handle: null };
    try {
      return tidy(() => {
        const all = this.wholeBatch(T);
        trace.mark('layer backward: start', dy.device);
        const { dispatched, experts, shared } = this.restore(s, all, restored);
        const { handle } = dispatched;
        // The combine backward waits for dy only: the shared expert's backward overlaps it.
        using dyReady = this.markProduced();
        let sharedGrads: { dA: Tensor; dW13: Tensor; dW2: Tensor } | null = null;
        let gateGrads: { dx: Tensor; dGate: Tensor } | null = null;
        if (shared && this.compute.sharedW13 && this.compute.sharedW2) {
          // sharedGate: y += σ·S, so S's gradient is σ·dy and σ's is <dy, S> per token (the
          // unpermute's backward), then the sigmoid's (the router's) and the gate GEMM's.
          // The shared expert's GEMMs take dy in the layer's dtype (backward accepts an f32 dy).
          let dShared = dy.dtype === this.config.dtype ? dy : dy.cast(this.config.dtype);
          if (s.gate && shared.out && this.compute.sharedGate) {
            const tokens = this.tokenRows(T);
            const u = unpermuteBackward(dy, shared.out, s.gate.weights, tokens, tokens.view(T));
            dShared = u.dRows;
            gateGrads = this.gateBackward(u.dWeights, s.gate, s.x, all, into?.sharedGate ?? null, accumulate);
          }
          sharedGrads = expertsBackward(dShared, s.x, this.compute.sharedW13, this.compute.sharedW2, all, shared, {
            ...(into?.sharedW13 && into.sharedW2 ? { out: { dW13: into.sharedW13, dW2: into.sharedW2 }, accumulate } : {}),
            gradDtype: this.config.weightGradDtype,
          });
        }
        const onInput = this.config.routeWeightsOn === 'input';
        const combined = onInput ? this.ones(T) : s.weights;
        const { dExpertOut, dWeights: dCombined } = settle(
          this.dispatcher.combineBackwardAsync(dy, experts.out, handle, combined, dyReady ? { after: dyReady } : {}),
        );
        const eg = this.expertsBackward(dExpertOut, dispatched, experts, into, accumulate);
        trace.mark('layer backward: experts', dy.device);
        // The dispatch backward waits for the experts' backward only: the router's overlaps it.
        using dAReady = this.markProduced();
        // routeWeightsOn 'input': the rows were w·x, so the dispatch backward gives d(w·x) first;
        // the unpermute's backward splits it into w·d(w·x) for x and ⟨d(w·x), x⟩ for w (the
        // router's backward then waits for the row exchange: no overlap in this mode).
        let dWeights = dCombined;
        let dxScaled: Tensor | null = null;
        if (onInput) {
          const dIn = settle(this.dispatcher.dispatchBackwardAsync(eg.dA, handle, dAReady ? { after: dAReady } : {}));
          const tokens = this.tokenRows(T);
          const u = unpermuteBackward(dIn, s.x, s.weights, tokens, tokens.view(T));
          dWeights = u.dWeights;
          dxScaled = u.dRows;
        }
        const dLogits = routerBackward(
          dWeights,
          { scores: s.scores, indices: s.indices, ...(s.slot ? { slot: s.slot } : {}) },
          this.router,
        );
        if (s.dLogitsAux) dLogits.add_(s.dLogitsAux);
        // gpt-oss: the router bias's gradient, Σ over the tokens of dLogits.
        let dRouterBias: Tensor | null = null;
        if (this.master.routerBias) {
          if (into?.routerBias) {
            using total = sum(dLogits, 0);
            if (accumulate) into.routerBias.add_(total);
            else into.routerBias.copy_(total);
            dRouterBias = into.routerBias;
          } else dRouterBias = sum(dLogits, 0);
        }
        // Router input gradient dLogits · Wrᵀ, summed into dx by the dispatch backward's per-token
        // sum (no pass of its own); queued before it, so its producer overlaps the row exchange.
        const dLogitsC = dLogits.cast(this.config.dtype);
        const dxRouter = groupedGemm('NT', dLogitsC, this.compute.router, all, { dtype: eg.dA.dtype });
        const dxWork = dxScaled
          ? null
          : this.dispatcher.dispatchBackwardAsync(eg.dA, handle, { ...(dAReady ? { after: dAReady } : {}), add: dxRouter });
        // Router weight gradient dWr = xᵀ · dLogits, queued after: it overlaps the dispatch backward.
        let dRouter: Tensor;
        try {
          const { hidden: H, numExperts: E } = this.config;
          if (into) {
            // The product is [1, H, E] (one group): added through a view of the caller's [H, E].
            using routerOut = into.router.view(1, H, E);
            groupedGemm('TN', s.x, dLogitsC, all, { out: routerOut, accumulate });
            dRouter = into.router;
          } else dRouter = groupedGemm('TN', s.x, dLogitsC, all, { dtype: 'f32' }).view(H, E);
        } catch (e) {
          dxWork?.dispose();
          throw e;
        }
        let dx: Tensor;
        if (dxWork) dx = settle(dxWork);
        else {
          dx = dxScaled as Tensor;
          addInto(dx, dxRouter);
        }
        let sharedW13: Tensor | null = null;
        let sharedW2: Tensor | null = null;
        if (sharedGrads) {
          addInto(dx, sharedGrads.dA);
          sharedW13 = sharedGrads.dW13;
          sharedW2 = sharedGrads.dW2;
        }
        if (gateGrads) addInto(dx, gateGrads.dx);
        trace.mark('layer backward: end', dy.device);
        return {
          dx,
          router: dRouter,
          w13: eg.dW13,
          w2: eg.dW2,
          sharedW13,
          sharedW2,
          sharedGate: gateGrads?.dGate ?? null,
          routerBias: dRouterBias,
          w13Bias: eg.dW13Bias,
          w2Bias: eg.dW2Bias,
        };
      });
    } finally {
      restored.handle?.dispose();
      disposeSaved(fwd);
    }
  }

  /**
   * What backward needs that the forward did not keep (config.recompute), made again from what it
   * did: the dispatch of x with the saved routing ('layer'), then the experts' forward over those
   * rows and the shared expert's activations. The same kernels on the same inputs: the same bits.
   * A handle dispatched here goes into `made` as soon as it exists: the caller disposes it (it may
   * hold the dispatcher's cached layouts, released only by its dispose).
   */
  private restore(
    s: MoESaved,
    all: Tensor,
    made: { handle: DispatchHandle | null },
  ): { dispatched: DispatchedRows; experts: { g: Tensor; h: Tensor; out: Tensor }; shared: MoESaved['shared'] } {
    // The dispatch waits for what was queued before this mark only: the shared expert's activations,
    // queued next, overlap it (as in the forward: compute first, then the call that may block the host).
    using queued = s.dispatched === null ? this.markProduced() : undefined;
    const shared = s.shared ?? this.sharedActivations(s.x, all);
    let dispatched = s.dispatched;
    if (dispatched === null) {
      const layout = s.layout as SavedLayout;
      // Placeholders for the counts the dispatch does not read (the forward returned the real ones).
      const none = (): Tensor => Tensor.zeros([1], { dtype: 'i32', device: this.device });
      const again = { ...layout, dropped: none(), invalid: none() };
      // The same rows as the forward's: w·x again with routeWeightsOn 'input' (the same kernel, the same bits).
      const { xIn, wOut } = this.expertInput(s.x, s.weights);
      const { rows, scales, handle } = settle(this.dispatcher.dispatchAsync(xIn, s.indices, wOut, again, queued ? { after: queued } : {}));
      made.handle = handle;
      dispatched = { rows, rowScales: scales ?? null, handle };
    }
    const d = dispatched;
    const experts = s.experts ?? this.expertsForward(d);
    return { dispatched: d, experts, shared };
  }

  /**
   * The shared expert's activations made again (recompute): g and h, and its output too with
   * sharedGate (the gate's gradient reads it); null without a shared expert.
   */
  private sharedActivations(x: Tensor, all: Tensor): MoESaved['shared'] {
    const { sharedW13, sharedW2, sharedGate } = this.compute;
    if (!sharedW13 || !sharedW2) return null;
    if (sharedGate) return expertsForward(x, sharedW13, sharedW2, all);
    return { ...expertsActivations(x, sharedW13, all), out: null };
  }

  /**
   * The shared expert gate's backward from dσ [T,1] (the unpermute's dWeights): dz = σ(1-σ)·dσ
   * (the router's backward), then dx = dz·gᵀ [T,H] and dg = xᵀ·dz [H] (into `out`, added with
   * `accumulate`, or a new f32 tensor).
   */
  private gateBackward(
    dSigmoid: Tensor,
    gate: NonNullable<MoESaved['gate']>,
    x: Tensor,
    all: Tensor,
    out: Tensor | null,
    accumulate: boolean,
  ): { dx: Tensor; dGate: Tensor } {
    const g = this.compute.sharedGate as Tensor;
    const H = this.config.hidden;
    const dLogit = routerBackward(dSigmoid, { scores: gate.scores, indices: gate.indices }, SHARED_GATE_ROUTER).cast(this.config.dtype);
    const dx = groupedGemm('NT', dLogit, g, all);
    if (out) {
      using view = out.view(1, H, 1);
      groupedGemm('TN', x, dLogit, all, { out: view, accumulate });
      return { dx, dGate: out };
    }
    return { dx, dGate: groupedGemm('TN', x, dLogit, all, { dtype: 'f32' }).view(H) };
  }

  /** The routed experts on the dispatched rows: the fused SwiGLU, or gpt-oss's (clamped-experts.ts). */
  private expertsForward(d: DispatchedRows): { g: Tensor; h: Tensor; out: Tensor } {
    const c = this.compute;
    if (this.config.activation === 'swiglu') return expertsForward(expertRows(d), c.w13, c.w2, d.handle.localOffsets);
    return clampedExpertsForward(d.rows, c, d.handle.localOffsets, { alpha: this.config.swigluAlpha, limit: this.config.swigluLimit });
  }

  /** The routed experts' backward (into the caller's buffers with `into`), the biases' gradients null without them. */
  private expertsBackward(
    dOut: Tensor,
    d: DispatchedRows,
    saved: { g: Tensor; h: Tensor },
    into: MoEGradBuffers | undefined,
    accumulate: boolean,
  ): { dA: Tensor; dW13: Tensor; dW2: Tensor; dW13Bias: Tensor | null; dW2Bias: Tensor | null } {
    const c = this.compute;
    const offsets = d.handle.localOffsets;
    if (this.config.activation === 'swiglu')
      return {
        ...expertsBackward(dOut, expertRows(d), c.w13, c.w2, offsets, saved, {
          ...(into ? { out: { dW13: into.w13, dW2: into.w2 }, accumulate } : {}),
          gradDtype: this.config.weightGradDtype,
        }),
        dW13Bias: null,
        dW2Bias: null,
      };
    const act = { alpha: this.config.swigluAlpha, limit: this.config.swigluLimit };
    const out = into
      ? {
          out: { dW13: into.w13, dW2: into.w2, ...(into.w13Bias && into.w2Bias ? { dW13Bias: into.w13Bias, dW2Bias: into.w2Bias } : {}) },
          accumulate,
        }
      : {};
    return clampedExpertsBackward(dOut, d.rows, c, offsets, saved, act, { ...out, gradDtype: this.config.weightGradDtype });
  }

  /**
   * What the routed experts take and the weights their outputs come back with: x and the router's
   * weights; with routeWeightsOn 'input' (top-1), w·x per token (a one-row-per-token unpermute: fp32
   * products, one rounding) and weights of 1.
   */
  private expertInput(x: Tensor, weights: Tensor): { xIn: Tensor; wOut: Tensor } {
    if (this.config.routeWeightsOn === 'output') return { xIn: x, wOut: weights };
    const T = x.shape[0] as number;
    return { xIn: unpermute(x, this.tokenRows(T), weights), wOut: this.ones(T) };
  }

  /** Weights [T,1] f32 of 1 (routeWeightsOn 'input': the experts' outputs added as they are), cached per T. */
  private ones(T: number): Tensor {
    return cachedPerTokenCount(this.onesCache, T, () => Tensor.full([T, 1], 1, { device: this.device }));
  }

  /** Rows [T,1] i32 holding 0…T-1: the shared gate's one-row-per-token unpermute (cached per T, as wholeBatch). */
  private tokenRows(T: number): Tensor {
    const rows = (): Tensor =>
      Tensor.fromArray(
        Int32Array.from({ length: T }, (_, i) => i),
        { dtype: 'i32', shape: [T, 1], device: this.device },
      );
    return cachedPerTokenCount(this.tokenRowsCache, T, rows);
  }

  /**
   * backward's `out`: each an f32 buffer (the experts' weights': weightGradDtype) of its master's shape, contiguous, on the layer's device,
   * apart from every other and from dy, the saved input and the layer's own tensors (the masters
   * themselves have the right shapes, and would silently take the gradients).
   */
  private checkGradBuffers(given: unknown, op: string, inputs: { dy: Tensor; x: Tensor }): MoEGradBuffers {
    const keys = ['router', 'w13', 'w2', 'sharedW13', 'sharedW2', 'sharedGate', 'routerBias', 'w13Bias', 'w2Bias'] as const;
    if (given === null || typeof given !== 'object' || Array.isArray(given))
      invalidArgument(
        op,
        `'out' must be { router, w13, w2 } (and sharedW13, sharedW2 with a shared expert, sharedGate with its gate, routerBias, w13Bias, w2Bias with the biases): f32 tensors (${this.config.weightGradDtype} for the experts' weights)`,
      );
    for (const k of Object.keys(given))
      if (!(keys as readonly string[]).includes(k)) invalidArgument(op, `'out' has an unknown key '${k}' (it takes ${keys.join(', ')})`);
    const b = given as MoEGradBuffers;
    const named: Record<string, Tensor> = {};
    for (const key of keys) {
      const master = this.master[key];
      const buf = b[key];
      if (master === null) {
        if (buf !== undefined && buf !== null)
          invalidArgument(
            op,
            `'out.${key}' was given but the layer has ${
              key === 'routerBias'
                ? 'no router bias'
                : key === 'w13Bias' || key === 'w2Bias'
                  ? 'no expert biases'
                  : `no shared expert${key === 'sharedGate' && this.master.sharedW13 ? ' gate' : ''}`
            }`,
          );
        continue;
      }
      if (buf === undefined || buf === null) invalidArgument(op, `'out.${key}' is missing: give a buffer for every weight gradient`);
      const experts = key === 'w13' || key === 'w2' || key === 'sharedW13' || key === 'sharedW2';
      named[`out.${key}`] = checkGradBuffer(
        op,
        `out.${key}`,
        buf,
        master,
        experts ? this.config.weightGradDtype : 'f32',
        experts && this.config.weightGradDtype !== 'f32' ? "the layer's weightGradDtype" : undefined,
      );
    }
    const own: Record<string, Tensor | null> = { bias: this.bias };
    for (const k of keys) {
      own[`master.${k}`] = this.master[k];
      own[`compute.${k}`] = this.compute[k];
    }
    checkApart(op, named, { dy: inputs.dy, "the forward's x": inputs.x, ...own });
    return b;
  }

  /**
   * The first forward on several ranks compares the layer's configuration across the group (one
   * small all-to-all): ranks built with another topK, capacity or recompute would otherwise route
   * and exchange inconsistently without an error, or wait for each other forever. Every rank sees
   * every rank's values, so all refuse together, naming the fields.
   */
  private checkGroupAgrees(op: string): void {
    if (this.#groupAgrees || this.group.size === 1) return;
    const c = this.config;
    const n = numberField;
    checkGroupAgrees(this.group, this.device, op, 'layers', [
      n('hidden', c.hidden),
      n('ffn', c.ffn),
      n('numExperts', c.numExperts),
      n('topK', c.topK),
      choiceField('routing', c.routing, ['token-choice', 'expert-choice']),
      choiceField('scoreFunction', c.scoreFunction, ['softmax', 'sigmoid']),
      n('groups', c.groups),
      n('topkGroups', c.topkGroups),
      n('groupTop', c.groupTop),
      choiceField('normalize', c.normalize, [false, true]),
      n('routeScale', c.routeScale),
      optionalField('capacityFactor', c.capacityFactor),
      choiceField('dropPolicy', c.dropPolicy, DROP_POLICIES),
      choiceField('padToCapacity', c.padToCapacity, [false, true]),
      n('sharedFfn', c.sharedFfn),
      choiceField('sharedGate', c.sharedGate, [false, true]),
      choiceField('routeWeightsOn', c.routeWeightsOn, ROUTE_WEIGHTS_ON),
      choiceField('routerBias', c.routerBias, [false, true]),
      choiceField('expertBias', c.expertBias, [false, true]),
      choiceField('activation', c.activation, EXPERT_ACTIVATIONS),
      n('swigluAlpha', c.swigluAlpha),
      n('swigluLimit', c.swigluLimit),
      choiceField('fp8Dispatch', c.fp8Dispatch, [false, true, 'keep']),
      choiceField('recompute', c.recompute, RECOMPUTE_MODES),
      choiceField('dtype', c.dtype, ['f32', 'bf16']),
      n('seed', c.seed),
      n('auxLossCoef', c.auxLossCoef),
      n('seqAuxLossCoef', c.seqAuxLossCoef),
      optionalField('seqLen', c.seqLen),
      n('zLossCoef', c.zLossCoef),
    ]);
    this.#groupAgrees = true;
  }

  /**
   * With a comm stream: an event on the current stream marking the inputs of the next
   * communication as produced, so compute queued after it need not finish before that
   * communication starts. Without one: undefined (the communication runs in line).
   */
  private markProduced(): Event | undefined {
    if (!this.dispatcher.commStream) return undefined;
    const e = new Event(this.device);
    e.record();
    return e;
  }

  get disposed(): boolean {
    return this.#disposed;
  }
  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    for (const t of [
      ...Object.values(this.master),
      ...Object.values(this.compute),
      this.bias,
      ...this.allOffsets.values(),
      ...this.tokenRowsCache.values(),
      ...this.onesCache.values(),
    ])
      t?.dispose();
    this.allOffsets.clear();
    this.tokenRowsCache.clear();
    this.onesCache.clear();
    this.dispatcher.dispose();
    this.ownStream?.dispose();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** Releases what a forward kept for backward (backward calls this itself). */
export function disposeSaved(fwd: MoEForward): void {
  const saved: unknown = fwd !== null && typeof fwd === 'object' ? fwd.saved : undefined;
  if (saved === null || typeof saved !== 'object' || !forwardOwner.has(saved))
    invalidArgument('disposeSaved', `'fwd' must be what MoELayer.forward() returned`);
  const s = fwd.saved;
  s.dispatched?.handle.dispose();
  for (const t of [
    s.scores,
    s.indices,
    s.weights,
    s.slot,
    s.dLogitsAux,
    s.layout?.slot,
    s.layout?.keptPerExpert,
    s.dispatched?.rows,
    s.dispatched?.rowScales,
    s.experts?.out,
    s.experts?.g,
    s.experts?.h,
    s.shared?.g,
    s.shared?.h,
    s.shared?.out,
    s.gate?.scores,
    s.gate?.indices,
    s.gate?.weights,
  ])
    t?.dispose();
}

/** The largest seed whose weight streams (seed·16 + 0…5) are exact integers. */
const MAX_SEED = Math.floor((Number.MAX_SAFE_INTEGER - 15) / 16);

/** A balance loss's coefficient: non-negative, and a float32 (the losses are computed in float32). */
function lossCoef(v: number | undefined, op: string, arg: string): number {
  return checkFloat32(checkNonNegativeNumber(v ?? 0, op, arg), op, arg);
}

/**
 * The tensor of token count T in `cache`, made by `make` the first time (kept: it outlives any
 * tidy()). A few token counts recur (training, serving buckets): the latest 16 are kept. An evicted
 * tensor may still be read by queued kernels; the allocator reuses it only after them (stream order).
 */
function cachedPerTokenCount(cache: Map<number, Tensor>, T: number, make: () => Tensor): Tensor {
  let t = cache.get(T);
  if (!t) {
    if (cache.size >= 16) {
      const [oldT, old] = cache.entries().next().value as [number, Tensor];
      cache.delete(oldT);
      old.dispose();
    }
    t = keep(make());
    cache.set(T, t);
  }
  return t;
}

/** The rows the experts read: e4m3 with their scales (fp8Dispatch 'keep'), or the rows themselves. */
function expertRows(d: DispatchedRows): Tensor | Fp8Rows {
  return d.rowScales ? { q: d.rows, scales: d.rowScales } : d.rows;
}

/** The communication's result, the current stream ordered after it; the work's event freed. */
function settle<T>(work: CommWork<T>): T {
  try {
    return work.wait();
  } finally {
    work.dispose();
  }
}

/** a += b in a's dtype (b is cast when it differs), in place: `a` is a fresh result the caller owns. */
function addInto(a: Tensor, b: Tensor): void {
  tidy(() => {
    a.add_(b.dtype === a.dtype ? b : b.cast(a.dtype));
  });
}
