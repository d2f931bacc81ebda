/**
 * MoEInference: the MoE layer for serving. Forward only, compute-dtype weights only (no fp32
 * masters, no gradients, no saved activations), token choice with every router option
 * (softmax/sigmoid, selection-only bias, group-limited top-k, normalisation, route scale), an
 * optional shared expert and Qwen2-MoE's sigmoid gate on it. Built from the training layer's ops:
 *
 *   logits = x·Wr (f32) → routerForward → capacity → permute → grouped GEMM SwiGLU (no saved
 *   pre-activations) → grouped GEMM → unpermute (fp32 accumulate, one write per token)
 *   [+ shared expert, scaled per token by sigmoid(x·g) when sharedGate]
 *
 * On the CPU it computes what MoELayer.forward computes, with the same kernels in the same order.
 *
 * Fixed buffers (one rank): every intermediate of a forward lives in a workspace made once per
 * token count T and reused by later forwards with the same T (the most recent `maxWorkspaces`
 * are kept): nothing is allocated per step except the result (none with `out`) and, on a GPU, the
 * small scratch capacity() and the grouped GEMM take from the caching allocator inside (served from
 * its cache after the first step, stream-ordered; on the CPU there is none). Rows are bounded
 * by the worst case known on the host before the step: dropless, R = T·k (every assignment kept,
 * expert segments back to back, the grouped GEMM reading the offsets on the device); with a
 * capacity factor, R = E·C (fixed C-row segments). Neither reads anything back to the host on a GPU,
 * so the step can be captured in a CUDA graph per T bucket: captureDecode(T) warms up, captures one
 * step into a graph (lib/graph.ts) with fixed input and output buffers, and forward() of T then
 * replays it (a device copy in, one graph launch, a device copy out: no host synchronisation, no
 * allocation). Callers that serve varying batch sizes pad x to a few bucket sizes so the workspaces
 * (and graphs) stay few.
 *
 * Several ranks (an expert-parallel `group`): routing and the shared expert use the workspace.
 * With a capacity factor on GPUs that reach each other's memory (the 'ipc' peer-memory transport:
 * one host, or ranks sharing one GPU), the rows take the low-latency path: dispatch into fixed
 * (local expert, source rank) segments of C rows, the experts, and combine, all into buffers of the
 * workspace (lib/moe/peer-dispatch.ts peerDecodeBuffers), with the transport's step counters on the
 * device: no host synchronisation and no allocation per step, so captureDecode(T) works on every
 * rank (each rank captures its own graph; every rank must then call forward with the same T in the
 * same order, as for any collective). Every rank's T must be equal (pad to the bucket). Otherwise
 * (dropless, or the rows travel by NCCL/MPI) the rows go through the Dispatcher
 * (lib/moe/dispatcher.ts), eagerly: it allocates per step, and dropless it reads the counts once per
 * step (the dispatcher's one deliberate host synchronisation); captureDecode refuses and says why.
 *
 * Faults across ranks: a wait that times out (the communicator's timeoutMs) or sees a peer give up
 * is recorded by the kernels in pinned host memory. An eager step throws it at its next transport
 * call; a replayed graph cannot throw, so forward() checks before every replay: the failure of a
 * replay surfaces as a TimeoutError from the next forward() (after the device finished waiting). A
 * rank whose T differs from the others' is seen on the device too: an InvalidArgumentError naming the
 * ranks and both counts, at the next transport call.
 *
 * Workspace bytes per T on one rank, R = rowsFor(T): 8·T·E (logits, scores) + 16·T·k (indices,
 * weights, slot, rowOf) + 8·R (rowWeight, rowToken) + 2·R·(2H + F) (rows, expert outputs,
 * activations) + with a shared expert 2·T·(Fs + H), with its gate 2·T·H + 20·T + 12 more, with
 * routeWeightsOn 'input' 2·T·H + 8·T more, with the clamped SwiGLU 4·R·F more (the first
 * projection's [R,2F], not fused), plus 12·E + 32 bytes of counters; f32 layers double the 2-byte
 * terms. workspaceBytes(T) gives the exact figure. Nothing else is held beyond the weights. On the
 * low-latency path across ranks the workspace holds, instead of the one-rank rows, with N = El·P·C:
 * 2·N·(2H + F) (rows, expert outputs, activations; with the clamped SwiGLU 4·N·F more) + 8·N +
 * 4·T·(P + k) + 8·P·T·k + 4·(P + El + 1) bytes (made at the first
 * forward of T), and the communicator's peer transport holds one buffer shared by every layer on it
 * (decodeGraphs()' transportBytes; sized for the largest T and grown collectively).
 */
import { checkDeviceUsable, Device, type DeviceLike, getDefaultDevice } from '../device.js';
import { dtypeSize } from '../dtype.js';
import { invalidArgument, shown, UnavailableError, unknownNames, usedAfterDispose } from '../errors.js';
import { CudaGraph } from '../graph.js';
import { Stream } from '../stream.js';
import { checkGroupAgrees, choiceField, numberField, optionalField } from '../parallel/group-agrees.js';
import {
  checkBoolean,
  checkContiguous,
  checkKeys,
  checkNonNegativeInt,
  checkOneOf,
  checkOptions,
  checkPositiveInt,
  checkSeparate,
  checkTensor,
} from '../validate.js';
import { keep, Tensor, tidy } from '../tensor.js';
import { capacity, DROP_POLICIES, type DropPolicy, expertCapacity } from '../moe/capacity.js';
import { checkGroup, Dispatcher, type ExpertParallelGroup, type TransportChoice } from '../moe/dispatcher.js';
import { type PeerDecodeBuffers, peerCombineInto, peerDecodeBuffers, peerDecodeNeed, peerDispatchInto } from '../moe/peer-dispatch.js';
import { type PeerTransport } from '../moe/peer-transport.js';
import { add } from '../basic-ops.js';
import { clampedExpertsForward } from '../moe/clamped-experts.js';
import {
  EXPERT_ACTIVATIONS,
  type ExpertActivationKind,
  type ExpertBlockOptions,
  EXPERT_OPTION_KEYS,
  resolveExpertOptions,
} from '../moe/expert-bias-activation.js';
import { Epilogue, groupedGemm, groupedGemmEpilogue } from '../moe/grouped-gemm.js';
import { MoELayer, SHARED_GATE_ROUTER } from '../moe/layer.js';
import { permute, unpermute } from '../moe/permute.js';
import {
  resolveRouterConfig,
  type ResolvedRouterConfig,
  checkRouteWeightsOn,
  ROUTE_WEIGHTS_ON,
  type RouteWeightsOn,
  routerFieldsOf,
  routerForward,
  type ScoreFunction,
} from '../moe/router.js';
import { type HfMoECheckpoint, type HfMoEWeights } from './hf-checkpoint.js';
import { type HF_ACTIVATION_FIELDS, type HfLayerField, layerFieldsOf } from './hf-config.js';

/** gpt-oss's options (ExpertBlockOptions) take their weights as `weights.routerBias`, `w13Bias` and `w2Bias`. */
export interface MoEInferenceConfig extends ExpertBlockOptions {
  hidden: number;
  ffn: number;
  numExperts: number;
  topK: number;
  /** Router options, as in RouterConfig (token choice only). */
  scoreFunction?: ScoreFunction;
  groups?: number;
  topkGroups?: number;
  groupTop?: number;
  normalize?: boolean;
  routeScale?: number;
  /** The layer holds a selection-only bias [E] f32 (DeepSeek-V3's e_score_correction_bias). Default false. */
  selectionBias?: boolean;
  /** Width of the shared expert (0 or omitted: none). */
  sharedFfn?: number;
  /** Scale the shared expert's output per token by sigmoid(x·g), g [H] (Qwen2-MoE). Needs sharedFfn. */
  sharedGate?: boolean;
  /**
   * Where the router's weight w applies: 'output' (default), y = Σ_j w_j·E_j(x); or 'input', Llama
   * 4's y = Σ_j E_j(w_j·x), for topK 1 only (with k > 1 each expert would take its own scaled copy).
   */
  routeWeightsOn?: RouteWeightsOn;
  /** Per-expert capacity C = ceil(cf·T·k/E) in fixed segments; omitted: dropless. cf = E/k never drops. */
  capacityFactor?: number;
  dropPolicy?: DropPolicy;
  /** Expert-parallel group (default: this process alone); the weights hold this rank's E/P experts. */
  group?: ExpertParallelGroup;
  transport?: TransportChoice;
  transportSms?: number;
  /** bf16 (default) or f32 (CPU only). */
  dtype?: 'bf16' | 'f32';
  device?: DeviceLike;
  /** Workspaces kept (one per token count seen; default 8). */
  maxWorkspaces?: number;
}

/**
 * The weights an MoEInference holds (and owns: it disposes them). Shapes as in HfMoEWeights;
 * HfMoECheckpoint.readLayer's result passes as it is (its firstExpert and localExperts are checked
 * against this rank's place in the group, its dispose is not called).
 */
export interface MoEInferenceWeights {
  router: Tensor;
  bias?: Tensor | null;
  w13: Tensor;
  w2: Tensor;
  sharedW13?: Tensor | null;
  sharedW2?: Tensor | null;
  sharedGate?: Tensor | null;
  routerBias?: Tensor | null;
  w13Bias?: Tensor | null;
  w2Bias?: Tensor | null;
}

const WEIGHT_TENSORS = ['router', 'bias', 'w13', 'w2', 'sharedW13', 'sharedW2', 'sharedGate', 'routerBias', 'w13Bias', 'w2Bias'] as const;

/** The config field each optional weight needs, for the error naming it. */
const WEIGHT_FLAG: Partial<Record<(typeof WEIGHT_TENSORS)[number], string>> = {
  bias: "'selectionBias'",
  sharedW13: "'sharedFfn'",
  sharedW2: "'sharedFfn'",
  sharedGate: "'sharedGate'",
  routerBias: "'routerBias'",
  w13Bias: "'expertBias'",
  w2Bias: "'expertBias'",
};

/** The weights' keys: the tensors, and readLayer's bookkeeping, which must name this rank's experts. */
function checkWeightKeys(weights: object, op: string, firstExpert: number, localExperts: number): void {
  const known = [...WEIGHT_TENSORS, 'firstExpert', 'localExperts', 'dispose'];
  const names = Object.keys(weights);
  if (names.some((n) => !known.includes(n))) invalidArgument(op, `'weights': ${unknownNames(names, known, 'key')}`);
  const w = weights as { firstExpert?: unknown; localExperts?: unknown };
  for (const [key, want] of [
    ['firstExpert', firstExpert],
    ['localExperts', localExperts],
  ] as const) {
    const given: unknown = w[key];
    if (given !== undefined && given !== want)
      invalidArgument(
        op,
        `'weights.${key}' is ${shown(given)} but this rank holds experts ${firstExpert}…${firstExpert + localExperts - 1} (${localExperts} of them): read the layer with this rank's { rank, worldSize }`,
      );
  }
}

export interface MoEInferenceForwardOptions {
  /** Write y here ([T,H], the layer's dtype and device) instead of allocating it. */
  out?: Tensor;
}

/** What a captured decode step holds beyond the weights (MoEInference.captureDecode). */
export interface DecodeGraphInfo {
  /** The token count the graph was captured for. */
  T: number;
  /** The workspace of T, which the graph owns (it left the eager workspaces' LRU). */
  workspaceBytes: number;
  /** The captured input and output buffers, [T,H] each in the layer's dtype. */
  ioBytes: number;
  /** The graph's private memory pool: the scratch capacity() and the grouped GEMMs allocate inside. */
  poolBytes: number;
  /** Nodes (kernels, memsets, copies) in the graph. */
  nodes: number;
  /**
   * Across ranks (the low-latency path): device bytes of the communicator's peer-transport buffer
   * on this rank, shared by every layer and graph on that communicator (0 with one rank).
   */
  transportBytes: number;
}

/** A decode step captured in a CUDA graph for one token count. */
interface DecodeGraph {
  T: number;
  graph: CudaGraph;
  ws: Workspace;
  /** The captured input: forward(x) copies x here, then replays. */
  x: Tensor;
  /** The captured output. */
  y: Tensor;
  /** Across ranks: the transport the graph's kernels address, and its generation at capture. */
  peer: PeerTransport | null;
  generation: number;
}

/** The buffers of one token count. */
interface Workspace {
  T: number;
  tensors: Tensor[];
  all: Tensor;
  router: { indices: Tensor; weights: Tensor; tokensPerExpert: Tensor; scores: Tensor; nanRows: Tensor };
  logits: Tensor;
  cap: { slot: Tensor; keptPerExpert: Tensor; dropped: Tensor; invalid: Tensor };
  /** One rank only: the permuted layout and the experts' buffers. */
  local: {
    rows: Tensor;
    offsets: Tensor;
    rowOf: Tensor;
    rowWeight: Tensor;
    rowToken: Tensor;
    invalid: Tensor;
    h: Tensor;
    /** The first projection's output [R,2F] where the activation is not fused into it, else null. */
    h13: Tensor | null;
    out: Tensor;
  } | null;
  shared: { h: Tensor; out: Tensor } | null;
  /** Across ranks, the low-latency path: the transport's buffers and the experts' (made at the first forward of T). */
  ep: { buf: PeerDecodeBuffers; h: Tensor; h13: Tensor | null; out: Tensor } | null;
  gate: {
    logit: Tensor;
    router: { indices: Tensor; weights: Tensor; tokensPerExpert: Tensor; scores: Tensor; nanRows: Tensor };
    scaled: Tensor;
  } | null;
  /** Row t → token t [T,1] (the one-row-per-token unpermutes of the gate and of routeWeightsOn 'input'), or null. */
  identity: Tensor | null;
  /** routeWeightsOn 'input': the scaled tokens w·x, and weights of 1 for the experts' outputs. */
  input: { scaled: Tensor; ones: Tensor } | null;
}

export class MoEInference implements Disposable {
  readonly config: Readonly<{
    hidden: number;
    ffn: number;
    numExperts: number;
    topK: number;
    selectionBias: boolean;
    sharedFfn: number;
    sharedGate: boolean;
    routeWeightsOn: RouteWeightsOn;
    routerBias: boolean;
    expertBias: boolean;
    activation: ExpertActivationKind;
    swigluAlpha: number;
    swigluLimit: number;
    capacityFactor: number | undefined;
    dropPolicy: DropPolicy;
    dtype: 'bf16' | 'f32';
    maxWorkspaces: number;
  }>;
  readonly router: ResolvedRouterConfig;
  readonly device: Device;
  readonly group: ExpertParallelGroup;
  readonly localExperts: number;
  /** The weights (router [1,H,E], bias [E] f32 or null, w13 [El,H,2F], w2 [El,F,H], shared, gate [1,H,1]). */
  readonly weights: Readonly<Required<MoEInferenceWeights>>;
  private readonly dispatcher: Dispatcher | null;
  private readonly gateRouter: ResolvedRouterConfig | null;
  private readonly workspaces = new Map<number, Workspace>();
  private readonly graphs = new Map<number, DecodeGraph>();
  #captureStream: Stream | null = null;
  /** Across ranks: the peer transport of the low-latency path, null when rows go through the Dispatcher; undefined until decided. */
  #lowLatency: PeerTransport | null | undefined = undefined;
  /** The group's layers were found to agree (checkGroupAgrees, at the first step on several ranks). */
  #groupAgrees = false;
  #disposed = false;

  /** Takes ownership of `weights` (checked against the config); dispose() frees them. */
  constructor(config: MoEInferenceConfig, weights: MoEInferenceWeights) {
    const op = 'MoEInference';
    if (config === null || typeof config !== 'object') invalidArgument(op, `'config' must be an object`);
    checkKeys(config, op, {
      hidden: true,
      ffn: true,
      numExperts: true,
      topK: true,
      scoreFunction: true,
      groups: true,
      topkGroups: true,
      groupTop: true,
      normalize: true,
      routeScale: true,
      selectionBias: true,
      sharedFfn: true,
      sharedGate: true,
      routeWeightsOn: true,
      ...EXPERT_OPTION_KEYS,
      capacityFactor: true,
      dropPolicy: true,
      group: true,
      transport: true,
      transportSms: true,
      dtype: true,
      device: true,
      maxWorkspaces: true,
    });
    const hidden = checkPositiveInt(config.hidden, op, 'hidden');
    const ffn = checkPositiveInt(config.ffn, op, 'ffn');
    this.router = resolveRouterConfig(routerFieldsOf(config));
    const E = this.router.numExperts;
    const sharedFfn = checkNonNegativeInt(config.sharedFfn ?? 0, op, 'sharedFfn');
    const sharedGate = checkBoolean(config.sharedGate ?? false, op, 'sharedGate');
    if (sharedGate && sharedFfn === 0) invalidArgument(op, `'sharedGate' needs a shared expert ('sharedFfn' > 0)`);
    const selectionBias = checkBoolean(config.selectionBias ?? false, op, 'selectionBias');
    const routeWeightsOn = checkRouteWeightsOn(config.routeWeightsOn, this.router, op);
    const { routerBias, expertBias, activation, swigluAlpha, swigluLimit } = resolveExpertOptions(config, op);
    const cf = config.capacityFactor;
    if (cf !== undefined && !(typeof cf === 'number' && Number.isFinite(cf) && cf > 0))
      invalidArgument(op, `'capacityFactor' must be a positive number (omit it for dropless); received ${String(cf)}`);
    const dropPolicy = checkOneOf(config.dropPolicy ?? 'probs', op, 'dropPolicy', DROP_POLICIES);
    const dtype = config.dtype ?? 'bf16';
    this.device = Device.parse(config.device ?? getDefaultDevice(), op);
    checkDeviceUsable(this.device, op);
    if (dtype !== 'bf16' && !(dtype === 'f32' && !this.device.isCuda))
      invalidArgument(op, `'dtype' must be 'bf16' (or 'f32' on the CPU); received ${String(dtype)}`);
    const maxWorkspaces = checkPositiveInt(config.maxWorkspaces ?? 8, op, 'maxWorkspaces');
    this.group = checkGroup(config.group, op);
    if (E % this.group.size !== 0)
      invalidArgument(op, `'numExperts' ${E} must be a multiple of the expert-parallel group size ${this.group.size}`);
    this.localExperts = E / this.group.size;
    this.config = Object.freeze({
      hidden,
      ffn,
      numExperts: E,
      topK: this.router.topK,
      selectionBias,
      sharedFfn,
      sharedGate,
      routeWeightsOn,
      routerBias,
      expertBias,
      activation,
      swigluAlpha,
      swigluLimit,
      capacityFactor: cf,
      dropPolicy,
      dtype,
      maxWorkspaces,
    });

    // The weights: shapes, dtypes and device checked before the layer takes them.
    if (weights === null || typeof weights !== 'object') invalidArgument(op, `'weights' must be an object of tensors`);
    const El = this.localExperts;
    checkWeightKeys(weights, op, this.group.rank * El, El);
    const want = (name: keyof MoEInferenceWeights, present: boolean, shape: number[], dt: string): Tensor | null => {
      const t = weights[name];
      if (!present) {
        if (t !== undefined && t !== null) invalidArgument(op, `'weights.${name}' is given but the config has none (${WEIGHT_FLAG[name]})`);
        return null;
      }
      checkTensor(t, op, `weights.${name}`);
      const w = t as Tensor;
      if (w.shape.join() !== shape.join())
        invalidArgument(op, `'weights.${name}' is [${w.shape.join(',')}]; expected [${shape.join(',')}]`);
      if (w.dtype !== dt) invalidArgument(op, `'weights.${name}' is ${w.dtype}; expected ${dt}`);
      if (!w.device.equals(this.device))
        invalidArgument(op, `'weights.${name}' is on ${w.device.toString()} but the layer is on ${this.device.toString()}`);
      if (!w.isContiguous) invalidArgument(op, `'weights.${name}' must be contiguous`);
      return w;
    };
    this.weights = Object.freeze({
      router: want('router', true, [1, hidden, E], dtype) as Tensor,
      bias: want('bias', selectionBias, [E], 'f32'),
      w13: want('w13', true, [El, hidden, 2 * ffn], dtype) as Tensor,
      w2: want('w2', true, [El, ffn, hidden], dtype) as Tensor,
      sharedW13: want('sharedW13', sharedFfn > 0, [1, hidden, 2 * sharedFfn], dtype),
      sharedW2: want('sharedW2', sharedFfn > 0, [1, sharedFfn, hidden], dtype),
      sharedGate: want('sharedGate', sharedGate, [1, hidden, 1], dtype),
      routerBias: want('routerBias', routerBias, [E], 'f32'),
      w13Bias: want('w13Bias', expertBias, [El, 2 * ffn], dtype),
      w2Bias: want('w2Bias', expertBias, [El, hidden], dtype),
    });
    for (const t of Object.values(this.weights)) if (t) keep(t);
    this.gateRouter = sharedGate ? SHARED_GATE_ROUTER : null;
    this.dispatcher =
      this.group.size > 1
        ? new Dispatcher({
            numExperts: E,
            group: this.group,
            padToCapacity: cf !== undefined,
            ...(config.transport === undefined ? {} : { transport: config.transport }),
            ...(config.transportSms === undefined ? {} : { transportSms: config.transportSms }),
          })
        : null;
  }

  /**
   * An inference copy of a training layer: its compute-dtype weights (and balancing bias) cloned,
   * the same router options, capacity factor, drop policy and group. Token choice only, without
   * fp8Dispatch (serving dispatches unquantised rows).
   */
  static fromLayer(layer: MoELayer, options: { maxWorkspaces?: number } = {}): MoEInference {
    if (!(layer instanceof MoELayer))
      invalidArgument('MoEInference.fromLayer', `'layer' must be a MoELayer; received ${layer === null ? 'null' : typeof layer}`);
    options = checkOptions(options, 'MoEInference.fromLayer', { maxWorkspaces: true });
    const c = layer.config;
    if (c.routing !== 'token-choice')
      invalidArgument(
        'MoEInference.fromLayer',
        `routing '${c.routing}' is not served (expert choice needs the whole batch's tokens; serving is token choice)`,
      );
    // A served copy must compute what the layer computes, and serving dispatches unquantised rows.
    if (c.fp8Dispatch !== false)
      invalidArgument(
        'MoEInference.fromLayer',
        `the layer's fp8Dispatch ${JSON.stringify(c.fp8Dispatch)} is not served: MoEInference dispatches rows unquantised, so its outputs would differ from the layer's (new MoEInference(config, weights) serves the same weights unquantised)`,
      );
    const weights = tidy(() => ({
      router: layer.compute.router.clone(),
      bias: layer.bias.clone(),
      w13: layer.compute.w13.clone(),
      w2: layer.compute.w2.clone(),
      sharedW13: layer.compute.sharedW13?.clone() ?? null,
      sharedW2: layer.compute.sharedW2?.clone() ?? null,
      sharedGate: layer.compute.sharedGate?.clone() ?? null,
      routerBias: layer.compute.routerBias?.clone() ?? null,
      w13Bias: layer.compute.w13Bias?.clone() ?? null,
      w2Bias: layer.compute.w2Bias?.clone() ?? null,
    }));
    try {
      return new MoEInference(
        {
          hidden: c.hidden,
          ffn: c.ffn,
          numExperts: c.numExperts,
          topK: c.topK,
          scoreFunction: c.scoreFunction,
          groups: c.groups,
          topkGroups: c.topkGroups,
          groupTop: c.groupTop,
          normalize: c.normalize,
          routeScale: c.routeScale,
          selectionBias: true,
          sharedFfn: c.sharedFfn,
          sharedGate: c.sharedGate,
          routeWeightsOn: c.routeWeightsOn,
          routerBias: c.routerBias,
          expertBias: c.expertBias,
          activation: c.activation,
          ...(c.activation === 'clamped-swiglu' ? { swigluAlpha: c.swigluAlpha, swigluLimit: c.swigluLimit } : {}),
          ...(c.capacityFactor === undefined ? {} : { capacityFactor: c.capacityFactor }),
          dropPolicy: c.dropPolicy,
          group: layer.group,
          dtype: c.dtype as 'bf16' | 'f32',
          device: layer.device,
          ...(options.maxWorkspaces === undefined ? {} : { maxWorkspaces: options.maxWorkspaces }),
        },
        weights,
      );
    } catch (e) {
      for (const t of Object.values(weights)) t?.dispose();
      throw e;
    }
  }

  /**
   * Decoder layer `layer`'s MoE block from a Hugging Face checkpoint (default: the first layer with
   * one, `ckpt.model.moeLayers[0]`): this rank's experts only (its place in `group`), in `dtype` on
   * `device`, with the family's router options.
   */
  static fromHf(
    ckpt: HfMoECheckpoint,
    layer?: number,
    options: Omit<MoEInferenceConfig, HfLayerField | (typeof HF_ACTIVATION_FIELDS)[number] | 'selectionBias'> = {},
  ): MoEInference {
    options = checkOptions(options, 'MoEInference.fromHf', {
      capacityFactor: true,
      dropPolicy: true,
      group: true,
      transport: true,
      transportSms: true,
      dtype: true,
      device: true,
      maxWorkspaces: true,
    });
    const group = checkGroup(options.group, 'MoEInference.fromHf');
    const device = options.device ?? getDefaultDevice();
    const b = ckpt.block;
    const index = layer ?? ckpt.model.moeLayers[0];
    if (index === undefined) invalidArgument('MoEInference.fromHf', `the checkpoint ${ckpt.dir} has no layer with an MoE block`);
    const w: HfMoEWeights = ckpt.readLayer(index, { rank: group.rank, worldSize: group.size, dtype: options.dtype ?? 'bf16', device });
    try {
      return new MoEInference(
        {
          ...options,
          device,
          ...layerFieldsOf(b),
          selectionBias: b.selectionBias,
        },
        {
          router: w.router,
          bias: w.bias,
          w13: w.w13,
          w2: w.w2,
          sharedW13: w.sharedW13,
          sharedW2: w.sharedW2,
          sharedGate: w.sharedGate,
          routerBias: w.routerBias,
          w13Bias: w.w13Bias,
          w2Bias: w.w2Bias,
        },
      );
    } catch (e) {
      w.dispose();
      throw e;
    }
  }

  /** Rows the experts' buffers hold for T tokens on one rank: T·k dropless, E·C with a capacity factor. */
  rowsFor(T: number): number {
    checkNonNegativeInt(T, 'MoEInference.rowsFor', 'T');
    const { numExperts: E, topK: k, capacityFactor: cf } = this.config;
    return cf === undefined ? T * k : E * expertCapacity(T, k, E, cf);
  }

  private workspace(T: number): Workspace {
    const hit = this.workspaces.get(T);
    if (hit) {
      // Most recently used last.
      this.workspaces.delete(T);
      this.workspaces.set(T, hit);
      return hit;
    }
    if (this.workspaces.size >= this.config.maxWorkspaces) {
      const [oldT, old] = this.workspaces.entries().next().value as [number, Workspace];
      this.workspaces.delete(oldT);
      // Freed in stream order: kernels still queued on the stream finish before the memory is reused.
      for (const t of old.tensors) t.dispose();
    }
    const { hidden: H, ffn: F, numExperts: E, topK: k, sharedFfn: Fs, dtype } = this.config;
    const device = this.device;
    const tensors: Tensor[] = [];
    const make = (shape: number[], dt: 'f32' | 'i32' | 'bf16' = 'f32'): Tensor => {
      const t = keep(Tensor.empty(shape, { dtype: dt, device }));
      tensors.push(t);
      return t;
    };
    try {
      const all = keep(Tensor.fromArray([0, T], { dtype: 'i32', device }));
      tensors.push(all);
      const routerOut = (n: number, kk: number) => ({
        indices: make([T, kk], 'i32'),
        weights: make([T, kk]),
        tokensPerExpert: make([n], 'i32'),
        scores: make([T, n]),
        nanRows: make([2], 'i32'),
      });
      const cdt = dtype as 'f32' | 'bf16';
      const R = this.rowsFor(T);
      const ws: Workspace = {
        T,
        tensors,
        all,
        logits: make([T, E]),
        router: routerOut(E, k),
        cap: { slot: make([T, k], 'i32'), keptPerExpert: make([E], 'i32'), dropped: make([1], 'i32'), invalid: make([1], 'i32') },
        local: this.dispatcher
          ? null
          : {
              rows: make([R, H], cdt),
              offsets: make([E + 1], 'i32'),
              rowOf: make([T, k], 'i32'),
              rowWeight: make([R]),
              rowToken: make([R], 'i32'),
              invalid: make([1], 'i32'),
              h: make([R, F], cdt),
              h13: this.fusedSwiglu ? null : make([R, 2 * F], cdt),
              out: make([R, H], cdt),
            },
        shared: Fs > 0 ? { h: make([T, Fs], cdt), out: make([T, H], cdt) } : null,
        ep: null,
        gate: null,
        input: null,
        identity: null,
      };
      if (this.config.sharedGate || this.config.routeWeightsOn === 'input') {
        ws.identity = keep(
          Tensor.fromArray(
            Int32Array.from({ length: T }, (_, t) => t),
            { dtype: 'i32', shape: [T, 1], device },
          ),
        );
        tensors.push(ws.identity);
      }
      if (this.config.sharedGate) ws.gate = { logit: make([T, 1]), router: routerOut(1, 1), scaled: make([T, H], cdt) };
      if (this.config.routeWeightsOn === 'input') {
        const ones = keep(Tensor.full([T, 1], 1, { device }));
        tensors.push(ones);
        ws.input = { scaled: make([T, H], cdt), ones };
      }
      this.workspaces.set(T, ws);
      return ws;
    } catch (e) {
      for (const t of tensors) t.dispose();
      throw e;
    }
  }

  /** T tokens route T·topK rows (E·C with a capacity factor), which the kernels index with int32. */
  private checkRoutedRows(T: number, op: string): void {
    const { topK } = this.config;
    const limit = 2 ** 31 - 1;
    if (T * topK > limit)
      invalidArgument(op, `${T} tokens route ${T * topK} rows (topK ${topK}); at most 2^31 − 1 fit the kernels' int32 indices`);
    const rows = this.rowsFor(T);
    if (rows > limit)
      invalidArgument(op, `${T} tokens make ${rows} expert rows (numExperts × capacity); at most 2^31 − 1 fit the kernels' int32 indices`);
  }

  /** Bytes of the buffers a forward of T tokens uses (made on first use of T, then reused; a captured T's are its graph's). */
  workspaceBytes(T: number): number {
    const op = 'MoEInference.workspaceBytes';
    if (this.#disposed) usedAfterDispose(op, 'the layer');
    checkPositiveInt(T, op, 'T');
    this.checkRoutedRows(T, op);
    const ws = this.graphs.get(T)?.ws ?? this.workspace(T);
    return bytesOf(ws.tensors);
  }

  /** Bytes of the weights this rank holds. */
  get weightBytes(): number {
    if (this.#disposed) usedAfterDispose('MoEInference.weightBytes', 'the layer');
    return Object.values(this.weights).reduce((s, t) => s + (t ? t.numel * dtypeSize[t.dtype] : 0), 0);
  }

  /** Frees the workspaces and the captured decode graphs (the next forward of each T makes its own workspace again). */
  releaseWorkspaces(): void {
    this.releaseGraphs();
    for (const ws of this.workspaces.values()) for (const t of ws.tensors) t.dispose();
    this.workspaces.clear();
  }

  /**
   * Captures the decode step for T tokens (CUDA) in a CUDA graph: later forwards of T
   * tokens copy x into the captured input, replay the graph (one launch, no host work per kernel,
   * no host synchronisation, no allocation) and copy the captured output into `out` (or a new
   * tensor). Before capturing it runs the step once eagerly on the current stream (a warm-up: the
   * one-time queries and kernel settings happen there, not in the capture); the capture runs on a
   * stream of the layer's own. T's workspace moves into the graph (the eager workspaces' LRU no
   * longer evicts it). Returns what the graph holds; capturing a T again returns the same graph.
   *
   * Memory beyond the weights per captured T: workspaceBytes(T) + 2·T·H·2 bytes of captured input
   * and output + the graph's pool (the scratch capacity() and the grouped GEMMs allocate inside:
   * their sort buffers and tile starts; decodeGraphs() gives its size). releaseGraphs() or
   * releaseWorkspaces() free it.
   *
   * Across ranks (an expert-parallel group): collective, like forward. Every rank captures its own
   * graph for the same T in the same order; the warm-up step runs on every rank and sizes the peer
   * transport's buffers for T (collectively; a growth makes every rank capture its earlier graphs
   * again, here or at their next forward). Needs a capacity factor and the 'ipc' peer-memory
   * transport: dropless, or rows travelling by NCCL/MPI, throw an UnavailableError saying why (those
   * run eagerly). All ranks must then replay together: forward(x) of T on every rank, in the same
   * order as every other collective call on the communicator.
   */
  captureDecode(T: number): DecodeGraphInfo {
    const op = 'MoEInference.captureDecode';
    if (this.#disposed) usedAfterDispose(op, 'the layer');
    checkPositiveInt(T, op, 'T');
    // First, across ranks: a rank whose configuration differs (another capacity factor) would
    // otherwise refuse below on its own while the others wait in the exchange.
    this.checkGroupAgrees(op);
    this.checkRoutedRows(T, op);
    if (!this.device.isCuda)
      throw new UnavailableError(`${op}: CUDA graphs need a CUDA device; this layer is on ${this.device.toString()}`, op);
    if (this.dispatcher && this.config.capacityFactor === undefined) {
      const { numExperts: E, topK: k } = this.config;
      throw new UnavailableError(
        `${op}: a dropless layer across ranks (an expert-parallel group of ${this.group.size}) cannot be captured: every step learns on the host how many rows each rank sends here (to size the experts' rows), which a replayed graph cannot do. Give the layer a 'capacityFactor' (fixed segments of C = ceil(cf·T·k/E) rows per expert and source rank; cf = E/k = ${E / k} never drops) to capture it, or run its steps eagerly`,
        op,
      );
    }
    const have = this.graphs.get(T);
    if (have) return graphInfo(have);
    const ws = this.workspace(T);
    this.workspaces.delete(T); // the graph's from now on
    const { hidden: H, dtype } = this.config;
    const made: Tensor[] = [];
    try {
      const x = keep(Tensor.zeros([T, H], { dtype, device: this.device }));
      made.push(x);
      const y = keep(Tensor.empty([T, H], { dtype, device: this.device }));
      made.push(y);
      // The warm-up. Across ranks it is collective: it decides the transport (at the layer's first
      // step) and grows the transport's buffers to T's worst case before anything is captured.
      this.run(x, ws, y);
      let peer: PeerTransport | null = null;
      if (this.dispatcher) {
        peer = this.#lowLatency ?? null;
        if (peer === null) {
          const d = this.dispatcher;
          throw new UnavailableError(
            `${op}: across ranks only the 'ipc' peer-memory transport can be captured (its step counters live on the device); this group's rows travel by '${d.transport ?? 'nccl'}'${d.transportReason ? ` (${d.transportReason})` : ''}, whose all-to-all path allocates and talks to the host each step: it runs eagerly. Capture needs GPUs of one host that can address each other's memory (or ranks sharing one GPU) and 'transport' 'auto' or 'ipc'`,
            op,
          );
        }
      }
      const g = this.captureGraph(T, ws, x, y, peer);
      this.graphs.set(T, g);
      // Graphs captured before this warm-up grew the transport address freed buffers: again.
      this.refreshGraphs();
      return graphInfo(g);
    } catch (e) {
      for (const t of made) t.dispose();
      for (const t of ws.tensors) t.dispose();
      throw e;
    }
  }

  /** One step of T through `ws` captured on the layer's capture stream. */
  private captureGraph(T: number, ws: Workspace, x: Tensor, y: Tensor, peer: PeerTransport | null): DecodeGraph {
    this.#captureStream ??= new Stream(this.device);
    const weights = Object.values(this.weights).filter((t): t is Tensor => t !== null);
    const generation = peer?.generation ?? 0;
    const graph = CudaGraph.capture(
      this.#captureStream,
      () => {
        this.run(x, ws, y);
      },
      { retain: [...ws.tensors, x, y, ...weights] },
    );
    return { T, graph, ws, x, y, peer, generation };
  }

  /**
   * Captures again the graphs whose transport grew since their capture (its buffers were replaced).
   * Every rank sees a growth at the same collective call, so every rank does this at the same point.
   */
  private refreshGraphs(): void {
    for (const g of this.graphs.values()) {
      if (g.peer === null || g.generation === g.peer.generation) continue;
      g.graph.dispose(); // after the replays queued so far; the buffers stay (they are the layer's)
      const fresh = this.captureGraph(g.T, g.ws, g.x, g.y, g.peer);
      g.graph = fresh.graph;
      g.generation = fresh.generation;
    }
  }

  /** The captured decode steps and what each holds beyond the weights. */
  decodeGraphs(): DecodeGraphInfo[] {
    return [...this.graphs.values()].map(graphInfo);
  }

  /** Frees the captured decode graphs with their workspaces and buffers (forwards of those T run eagerly again). */
  releaseGraphs(): void {
    for (const g of this.graphs.values()) {
      g.graph.dispose(); // releases its pool after the replays queued so far
      for (const t of [...g.ws.tensors, g.x, g.y]) t.dispose();
    }
    this.graphs.clear();
  }

  /** y [T,H] for x [T,H] (the layer's dtype and device). No host synchronisation on a GPU (see the module doc). */
  forward(x: Tensor, options: MoEInferenceForwardOptions = {}): Tensor {
    const op = 'MoEInference.forward';
    if (this.#disposed) usedAfterDispose(op, 'the layer');
    options = checkOptions(options, op, { out: true });
    const { hidden: H, dtype } = this.config;
    checkTensor(x, op, 'x');
    if (x.ndim !== 2 || x.shape[1] !== H) invalidArgument(op, `'x' must be [T, ${H}]`);
    checkContiguous(x, op, 'x');
    if (x.dtype !== dtype) invalidArgument(op, `'x' is ${x.dtype} but the layer computes in ${dtype}`);
    if (!x.device.equals(this.device))
      invalidArgument(op, `'x' is on ${x.device.toString()} but the layer is on ${this.device.toString()}`);
    const T = x.shape[0] as number;
    if (T === 0) invalidArgument(op, `'x' has no tokens`);
    this.checkRoutedRows(T, op);
    const out = options.out;
    if (out !== undefined) {
      checkTensor(out, op, 'out');
      if (out.shape.join() !== x.shape.join() || out.dtype !== dtype || !out.device.equals(this.device) || !out.isContiguous) {
        invalidArgument(
          op,
          `'out' must be a contiguous ${dtype} [${x.shape.join(',')}] on ${this.device.toString()}; received ${out.dtype} [${out.shape.join(',')}] on ${out.device.toString()}`,
        );
      }
      if (out.sharesStorageWith(x)) invalidArgument(op, `'out' shares memory with 'x'`);
      // Nor the layer's own weights: written there, every later output would be wrong.
      checkSeparate(op, { out }, Object.fromEntries(WEIGHT_TENSORS.map((k) => [`weights.${k}`, this.weights[k]])));
    }
    this.checkGroupAgrees(op);
    const g = this.graphs.get(T);
    if (g) {
      if (g.peer) {
        // Across ranks: a wait that failed in an earlier replay (recorded by the kernels in pinned
        // host memory: a host read, not a device wait) is thrown here; and a transport that grew
        // since the capture means capturing again (every rank grew at the same call).
        g.peer.check(op);
        if (g.generation !== g.peer.generation) this.refreshGraphs();
      }
      // The captured step: device copies in and out around one graph launch, all on the current stream.
      g.x.copy_(x);
      g.graph.replay();
      return out ? out.copy_(g.y) : g.y.clone();
    }
    return this.run(x, this.workspace(T), out);
  }

  /**
   * The first step on several ranks (forward or captureDecode) compares the layer's configuration
   * across the group, before the first exchange: ranks holding another topK, capacity or router
   * would route and exchange inconsistently without an error. All refuse together, naming the fields.
   */
  private checkGroupAgrees(op: string): void {
    if (this.#groupAgrees || this.group.size === 1) return;
    const c = this.config;
    const r = this.router;
    const n = numberField;
    const yesNo = [false, true];
    checkGroupAgrees(this.group, this.device, op, 'layers', [
      n('hidden', c.hidden),
      n('ffn', c.ffn),
      n('numExperts', c.numExperts),
      n('topK', c.topK),
      choiceField('scoreFunction', r.scoreFunction, ['softmax', 'sigmoid']),
      n('groups', r.groups),
      n('topkGroups', r.topkGroups),
      n('groupTop', r.groupTop),
      choiceField('normalize', r.normalize, yesNo),
      n('routeScale', r.routeScale),
      choiceField('selectionBias', c.selectionBias, yesNo),
      n('sharedFfn', c.sharedFfn),
      choiceField('sharedGate', c.sharedGate, yesNo),
      choiceField('routeWeightsOn', c.routeWeightsOn, ROUTE_WEIGHTS_ON),
      choiceField('routerBias', c.routerBias, yesNo),
      choiceField('expertBias', c.expertBias, yesNo),
      choiceField('activation', c.activation, EXPERT_ACTIVATIONS),
      n('swigluAlpha', c.swigluAlpha),
      n('swigluLimit', c.swigluLimit),
      optionalField('capacityFactor', c.capacityFactor),
      choiceField('dropPolicy', c.dropPolicy, DROP_POLICIES),
      choiceField('dtype', c.dtype, ['f32', 'bf16']),
    ]);
    this.#groupAgrees = true;
  }

  /** One forward of x (checked by the caller) through the workspace `ws` of its token count. */
  private run(x: Tensor, ws: Workspace, out: Tensor | undefined): Tensor {
    const { dtype, numExperts: E } = this.config;
    const w = this.weights;
    return tidy(() => {
      groupedGemm('NN', x, w.router, ws.all, { out: ws.logits });
      // gpt-oss: the router's bias on the logits (it chooses and weighs).
      if (w.routerBias) add(ws.logits, w.routerBias, { out: ws.logits });
      const r = routerForward(ws.logits, this.router, { ...(w.bias ? { bias: w.bias } : {}), out: ws.router });
      const cap = capacity(r.indices, r.weights, {
        numExperts: E,
        ...(this.config.capacityFactor === undefined ? {} : { capacityFactor: this.config.capacityFactor }),
        dropPolicy: this.config.dropPolicy,
        out: ws.cap,
      });
      // routeWeightsOn 'input' (Llama 4, top-1): the experts take w·x (a one-row-per-token
      // unpermute: fp32 products, one rounding) and their outputs come back with weight 1.
      let xIn = x;
      let wOut = r.weights;
      if (ws.input && ws.identity) {
        xIn = unpermute(x, ws.identity, r.weights, { out: ws.input.scaled });
        wOut = ws.input.ones;
      }
      let y: Tensor;
      if (ws.local) {
        const l = ws.local;
        const p = permute(xIn, r.indices, wOut, cap, {
          padToCapacity: this.config.capacityFactor !== undefined,
          out: { rows: l.rows, offsets: l.offsets, rowOf: l.rowOf, rowWeight: l.rowWeight, rowToken: l.rowToken, invalid: l.invalid },
        });
        this.experts(p.rows, p.offsets, l.h13, l.h, l.out);
        y = unpermute(l.out, p.rowOf, wOut, out ? { out } : {});
      } else if (this.lowLatencyTransport(x)) {
        y = this.runLowLatency(this.#lowLatency as PeerTransport, xIn, ws, r.indices, wOut, cap.slot, cap.keptPerExpert, out);
      } else {
        const d = this.dispatcher as Dispatcher;
        const { rows, handle } = d.dispatch(xIn, r.indices, wOut, cap);
        try {
          const M = rows.shape[0] as number;
          const h = Tensor.empty([M, this.config.ffn], { dtype, device: this.device });
          const h13 = this.fusedSwiglu ? null : Tensor.empty([M, 2 * this.config.ffn], { dtype, device: this.device });
          const expertOut = Tensor.empty([M, this.config.hidden], { dtype, device: this.device });
          this.experts(rows, handle.localOffsets, h13, h, expertOut);
          y = d.combine(expertOut, handle, wOut);
          if (out) y = out.copy_(y);
        } finally {
          handle.dispose();
        }
      }
      if (ws.shared && w.sharedW13 && w.sharedW2) {
        groupedGemmEpilogue('NN', Epilogue.SwiGLU, x, w.sharedW13, ws.all, ws.shared.h, null);
        groupedGemm('NN', ws.shared.h, w.sharedW2, ws.all, { out: ws.shared.out });
        let s = ws.shared.out;
        if (ws.gate && ws.identity && w.sharedGate && this.gateRouter) {
          // sigmoid(x·g) per token through the router (one expert, top-1, sigmoid, not normalised),
          // applied as a one-row-per-token unpermute: fp32 products, one rounding.
          const g = ws.gate;
          groupedGemm('NN', x, w.sharedGate, ws.all, { out: g.logit });
          const gr = routerForward(g.logit, this.gateRouter, { out: g.router });
          s = unpermute(s, ws.identity, gr.weights, { out: g.scaled });
        }
        y.add_(s);
      }
      return y;
    });
  }

  /**
   * Across ranks: the peer transport of the low-latency path, or null when rows go through the
   * Dispatcher (dropless, on the CPU, or the group's all-to-all). Decided at the first step, which
   * is collective (every rank reaches the same answer).
   */
  private lowLatencyTransport(x: Tensor): PeerTransport | null {
    if (this.#lowLatency === undefined) {
      const d = this.dispatcher;
      this.#lowLatency =
        d && this.config.capacityFactor !== undefined && this.device.isCuda ? d.peerTransportFor(x, this.config.topK) : null;
    }
    return this.#lowLatency;
  }

  /** Whether the experts' activation is the plain SwiGLU fused into the first grouped GEMM (no biases). */
  private get fusedSwiglu(): boolean {
    return this.config.activation === 'swiglu' && !this.config.expertBias;
  }

  /**
   * The routed experts on expert-contiguous `rows` (`offsets` per local expert) into `out`: the
   * first projection with the SwiGLU fused into it, or (gpt-oss) the projection into `h13`, its
   * biases and the clamped SwiGLU into `h`; then the second projection and its biases.
   */
  private experts(rows: Tensor, offsets: Tensor, h13: Tensor | null, h: Tensor, out: Tensor): void {
    const w = this.weights;
    if (h13 === null) {
      groupedGemmEpilogue('NN', Epilogue.SwiGLU, rows, w.w13, offsets, h, null);
      groupedGemm('NN', h, w.w2, offsets, { out });
    } else
      clampedExpertsForward(
        rows,
        w,
        offsets,
        { alpha: this.config.swigluAlpha, limit: this.config.swigluLimit },
        { into: { g: h13, h, out } },
      );
  }

  /**
   * The low-latency step across ranks: dispatch into T's fixed segments, the experts, and combine
   * into y (`out` or a new tensor), through the workspace's buffers. No host read; nothing
   * allocated but the result (and the scratch the grouped GEMMs take from the caching allocator).
   */
  private runLowLatency(
    peer: PeerTransport,
    x: Tensor,
    ws: Workspace,
    indices: Tensor,
    weights: Tensor,
    slot: Tensor,
    kept: Tensor,
    out: Tensor | undefined,
  ): Tensor {
    const { hidden: H, ffn: F, numExperts: E, topK: k, dtype } = this.config;
    const T = ws.T;
    const El = this.localExperts;
    const sms = (this.dispatcher as Dispatcher).transportSms;
    // Every rank has the same T, so the growth decision (collective) is the same everywhere.
    const t = peer.grownFor(peerDecodeNeed(T, k, H, dtype, El));
    if (ws.ep === null) {
      const segment = expertCapacity(T, k, E, this.config.capacityFactor as number);
      const buf = peerDecodeBuffers({ P: this.group.size, localExperts: El, T, topK: k, hidden: H, segment, dtype }, this.device);
      ws.tensors.push(...buf.tensors);
      const N = buf.rows.shape[0] as number;
      const h = keep(Tensor.empty([N, F], { dtype, device: this.device }));
      ws.tensors.push(h);
      const o = keep(Tensor.empty([N, H], { dtype, device: this.device }));
      ws.tensors.push(o);
      const h13 = this.fusedSwiglu ? null : keep(Tensor.empty([N, 2 * F], { dtype, device: this.device }));
      if (h13) ws.tensors.push(h13);
      ws.ep = { buf, h, h13, out: o };
    }
    const ep = ws.ep;
    peerDispatchInto(t, x, indices, weights, slot, kept, ep.buf, sms);
    this.experts(ep.buf.rows, ep.buf.offsets, ep.h13, ep.h, ep.out);
    const y = out ?? Tensor.empty([T, H], { dtype, device: this.device });
    peerCombineInto(t, ep.out, ep.buf, y, sms);
    return y;
  }

  dispose(): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.releaseWorkspaces();
    for (const t of Object.values(this.weights)) t?.dispose();
    this.dispatcher?.dispose();
    this.#captureStream?.dispose();
    this.#captureStream = null;
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

function bytesOf(tensors: readonly Tensor[]): number {
  return tensors.reduce((s, t) => s + t.numel * dtypeSize[t.dtype], 0);
}

function graphInfo(g: DecodeGraph): DecodeGraphInfo {
  return {
    T: g.T,
    workspaceBytes: bytesOf(g.ws.tensors),
    ioBytes: bytesOf([g.x, g.y]),
    poolBytes: g.graph.poolBytes,
    nodes: g.graph.nodeCount,
    transportBytes: g.peer?.bufferBytes ?? 0,
  };
}
