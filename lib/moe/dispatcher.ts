/**
 * The token dispatcher: ships every routed row to the rank that owns its expert and brings the
 * results back. Three transports, chosen at the first dispatch (`transport`, default 'auto'):
 *
 *   local   one rank: dispatch is the permute (rows grouped by expert), combine the weighted
 *           unpermute; no host read in dropless mode with align 1 or in capacity mode.
 *   ipc     ranks whose GPUs reach each other's memory (one host: NVLink peer access, or several
 *           processes on one GPU): each token row is pushed once per destination rank straight
 *           into the peer's buffer and expanded there by local expert (lib/moe/peer-dispatch.ts).
 *   nccl    the communicator's all-to-all (NCCL, or MPI on the CPU and when 'ipc' is unavailable):
 *             dispatch: permute (rows grouped by global expert) → counts exchanged (dropless only;
 *                       one deliberate host sync) → all-to-all-v of rows and gate weights →
 *                       regroup from (source rank, local expert) to (local expert, source rank)
 *             combine:  regroup back → all-to-all-v back → weighted unpermute (fp32).
 *
 * Experts are sharded contiguously: with E experts over P ranks, rank p owns experts
 * p·E/P … (p+1)·E/P − 1 (local expert l is global expert p·E/P + l). Every transport delivers a
 * local expert's rows contiguously (localOffsets) for the grouped GEMM.
 *
 * The layout of one step is kept in a DispatchHandle, so combine and both backward passes reuse it
 * without recounting: the backward of dispatch is a combine without weights, the backward of
 * combine is a dispatch. Through 'ipc', combine weights each row by the gate weight that travelled
 * with it in dispatch (the `weights` argument must be the dispatched ones).
 *
 * Capacity mode with padToCapacity moves fixed-size segments: nothing is read back to the host and
 * the maps are cached per shape, so a step can be captured in a CUDA graph. Every rank must then
 * have the same capacity C = ceil(cf·T·k/E), i.e. the same number of tokens T (equal micro-batches);
 * the communicator reports a mismatch of C as an error naming the peer. Through 'ipc' the receivers'
 * kernels compare T itself (a source with more tokens than the receiver's T would lose rows there),
 * so it refuses unequal T even where C happens to agree: the next call into the transport throws,
 * the transport then aborted.
 * Dropless mode must learn how many rows arrive: it reads the counts once per step (the one host
 * wait, named below).
 *
 * Overlap: with `commStream`, every phase above runs on that stream, ordered after the caller's
 * work by an event (lib/parallel/overlap.ts). The *Async methods return a CommWork whose wait() makes the
 * caller's stream wait for the result, so compute queued in between (the shared expert, another
 * micro-batch) overlaps the communication; the plain methods wait at once and stay correct without
 * the caller doing anything. Without `commStream` both run on the current stream.
 */
import { type CommWork, type CommWorkOptions, launch } from '../parallel/overlap.js';
import { type DType, dtypeSize } from '../dtype.js';
import { invalidArgument, InvalidArgumentError, usedAfterDispose, shown } from '../errors.js';
import {
  checkContiguous,
  checkBoolean,
  checkKeys,
  checkNonNegativeInt,
  checkOptions,
  checkPositiveInt,
  checkStream,
  checkTensor,
  checkTensors,
} from '../validate.js';
import { Event, Stream } from '../stream.js';
import { keep, Tensor, tensorsIn, tidy } from '../tensor.js';
import { type CapacityResult } from './capacity.js';
import { dequantizeFp8, FP8_BLOCK, type Fp8Rows, quantizeFp8 } from './fp8.js';
import { MAX_ALIGN, permute, permuteBackward, type PermuteResult, unpermute, unpermuteBackward } from './permute.js';
import { type PeerDispatchHandle, peerCombine, peerCombineBackward, peerDispatch, peerRowBytes } from './peer-dispatch.js';
import { PeerTransport } from './peer-transport.js';
import { Communicator } from '../parallel/communicator.js';
import { native } from '../native.js';
import { trace } from '../trace.js';

/** What the dispatcher needs from a communicator (lib/parallel/communicator.ts provides it). */
export interface ExpertParallelGroup {
  readonly rank: number;
  readonly size: number;
  /** Equal row chunks per peer: send and recv are [size·n, …]. */
  allToAll(send: Tensor, recv: Tensor): unknown;
  /** Rows for peer p are contiguous, in order of p; counts are on the host. */
  allToAllV(send: Tensor, sendRows: number[], recv: Tensor, recvRows: number[]): unknown;
}

/** An exchange moves bytes: a recv of another dtype would be a cast (copy_ converts), which no peer does. */
function checkSameBytes(op: string, send: Tensor, recv: Tensor): void {
  if (send.dtype !== recv.dtype)
    invalidArgument(op, `'recv' is ${recv.dtype} but 'send' is ${send.dtype}; an exchange moves bytes, it does not convert`);
}

/** A group of one: what a single process without a launcher uses. */
export const singleRankGroup: ExpertParallelGroup = {
  rank: 0,
  size: 1,
  allToAll: (send, recv) => {
    checkTensors('allToAll', { send, recv });
    checkSameBytes('allToAll', send, recv);
    return (recv as Tensor).copy_(send);
  },
  allToAllV: (send, sendRows, recv, recvRows) => {
    checkTensors('allToAllV', { send, recv });
    // One rank: one count each way, its tensor's rows (as Communicator.single() has them).
    for (const [name, rows, t] of [
      ['sendRows', sendRows, send],
      ['recvRows', recvRows, recv],
    ] as const) {
      const n = Array.isArray(rows) && rows.length === 1 ? rows[0] : undefined;
      if (n !== t.shape[0])
        invalidArgument(
          'allToAllV',
          `'${name}' must be [${String(t.shape[0])}] (one rank: the rows of its tensor); received ${shown(rows)}`,
        );
    }
    if (sendRows[0] !== recvRows[0])
      invalidArgument('allToAllV', `one rank sends ${sendRows[0]} rows to itself but expects ${recvRows[0]}`);
    checkSameBytes('allToAllV', send, recv);
    return (recv as Tensor).copy_(send);
  },
};

export interface DispatcherConfig {
  /** Global number of experts E (a multiple of the group size). */
  numExperts: number;
  group?: ExpertParallelGroup;
  /** Pad every expert segment to a multiple of this many rows (e.g. the GEMM tile). */
  align?: number;
  /** Fixed-size segments of exactly C rows (capacity mode): no host synchronisation. */
  padToCapacity?: boolean;
  /**
   * Dispatch rows as fp8 e4m3 with one fp32 scale per 128 values (half the bytes of bf16).
   * true: rows are dequantised to x's dtype on arrival. 'keep': they arrive as they travelled,
   * `rows` fp8e4m3 and `scales` [rows, H/128] f32 (quantizeFp8's format, DeepEP's fp8 dispatch),
   * for expertsForward / groupedGemm('NN'), which take them (through a bf16 copy: 'keep' halves the
   * bytes dispatch writes, and the experts pay the dequantise that true does on arrival). Combine
   * and both backward passes stay in x's dtype. Needs a hidden size that is a multiple of 128.
   */
  fp8?: boolean | 'keep';
  /**
   * Run dispatch, combine and their backward passes (permute, count exchange, all-to-alls,
   * regrouping, unpermute) on this stream, on the tensors' device, so the caller can overlap them
   * with compute through the *Async methods. The caller owns the stream. On the CPU the work is
   * complete when a call returns; the host-blocking MPI communicator has finished its exchanges.
   */
  commStream?: Stream;
  /**
   * How rows travel between ranks: 'auto' (default: 'ipc' when the group is a Communicator whose
   * ranks' GPUs can all address each other's memory, else the communicator's all-to-all), 'ipc'
   * (required: an error says why when it cannot be used) or 'nccl' (the communicator's all-to-all,
   * also when that communicator is MPI). One rank needs no transport ('local'), unless 'ipc' is
   * asked for: then its rows go through the peer-memory kernels to itself (to profile or test them
   * in one process).
   */
  transport?: TransportChoice;
  /** SMs the 'ipc' kernels may occupy (DeepEP's num_sms; default: all). */
  transportSms?: number;
}

export type TransportChoice = 'auto' | 'ipc' | 'nccl';
/** What a dispatcher moves rows with: one rank ('local'), peer memory, or the group's all-to-all. */
export type TransportKind = 'local' | 'ipc' | 'nccl' | 'mpi' | 'group';

export interface DispatchBackwardOptions extends CommWorkOptions {
  /**
   * Another gradient of x [T,H] in dRows' dtype (the router's): dx = Σ_j dRows(t,j) + add[t]. The
   * local and all-to-all transports sum it with the rows (one rounding, no extra pass over dx);
   * 'ipc' adds it to the peer combine's result. With a comm stream it is read after the work queued
   * on the caller's stream before the call, while the row exchange waits only for `after`.
   */
  add?: Tensor;
}

/** The permute's layout, kept for combine and the backward passes; its rows are freed once sent. */
export type DispatchLayout = Omit<PermuteResult, 'rows'>;

/** The layout of one step, reused by combine and the backward passes. Dispose it after backward. */
export type DispatchHandle = ExchangeDispatchHandle | PeerDispatchHandle;
export type { PeerDispatchHandle };

/** A step's layout through the local or all-to-all transport. */
export interface ExchangeDispatchHandle extends Disposable {
  readonly transport: 'local' | 'exchange';
  readonly permuted: DispatchLayout;
  /** Rows sent to / received from each peer. */
  readonly sendRows: number[];
  readonly recvRows: number[];
  /** Rows per (source rank, local expert), row-major [P][El]. */
  readonly recvCounts: number[];
  /** Rows per local expert after regrouping, and their offsets [El+1] (i32, on the rows' device). */
  readonly localRows: number[];
  readonly localOffsets: Tensor;
  /** Gathers from (source, expert) order into (expert, source) order, and back; null when P = 1. */
  readonly toExpertOrder: Tensor | null;
  readonly toSourceOrder: Tensor | null;
  dispose(): void;
}

export interface Dispatched {
  /** Rows for the local experts, expert-contiguous: [Σ localRows, H] (fp8e4m3 with fp8 'keep'). */
  rows: Tensor;
  /** fp8 'keep' only: the rows' scales [Σ localRows, H/128] f32, one per 128 values (0 for padding). */
  scales?: Tensor;
  /** The gate weight of each of those rows [Σ localRows] f32 (0 for padding). */
  weights: Tensor;
  handle: DispatchHandle;
}

/** The layout phase of a dispatch through the all-to-all (Dispatcher.planExchange). */
interface ExchangePlan {
  /** fp8: x's rows quantised (freed once the rows are sent). */
  quantized: Fp8Rows | null;
  /** Rows in global-expert order, to send, and the layout the handle keeps. */
  permuted: PermuteResult;
  /** fp8: the rows' per-128 scales in the permuted layout. */
  scaleRows: Tensor | null;
  sendRows: number[];
  recvRows: number[];
  /** Rows per (source rank, local expert), row-major [P][El]. */
  recvCounts: number[];
  localRows: number[];
  toExpert: Tensor | null;
  toSource: Tensor | null;
  offsets: Tensor;
  /** Capacity mode: the maps are shared through the cache, released with this; null: they belong to the step. */
  release: (() => void) | null;
}

/** What the exchange phase delivers: rows, the scales of kept fp8 rows, the gate weights. */
interface ReceivedRows {
  rows: Tensor;
  scales: Tensor | null;
  weights: Tensor;
}

const roundUp = (v: number, a: number): number => Math.ceil(v / a) * a;
/** Entries per token the peer-memory transport carries (one warp lane each; native kMaxTopK). */
const PEER_MAX_TOP_K = 32;

/** The Dispatcher whose dispatch() made each handle: one of another dispatcher (other experts, ranks or transport) is refused. */
const handleOwners = new WeakMap<object, Dispatcher>();

/** The handle's tensors (the communication reads them), after checking it is one of `owner`'s. */
function handleTensors(op: string, handle: DispatchHandle, owner: Dispatcher): Tensor[] {
  if (handle === null || typeof handle !== 'object' || !Tensor.isTensor(handle.localOffsets)) {
    invalidArgument(op, `'handle' must be the handle dispatch() returned`);
  }
  if (handleOwners.get(handle) !== owner) invalidArgument(op, `'handle' was not made by this Dispatcher's dispatch()`);
  if (handle.transport === 'ipc')
    return [handle.localOffsets, handle.pos, handle.dest, handle.rowSrc, handle.recvRowOf, handle.recvWeight, handle.recvTokens];
  if (!handle.permuted) invalidArgument(op, `'handle' must be the handle dispatch() returned`);
  return [
    ...tensorsIn(handle.permuted),
    handle.localOffsets,
    ...(handle.toExpertOrder ? [handle.toExpertOrder] : []),
    ...(handle.toSourceOrder ? [handle.toSourceOrder] : []),
  ];
}

/** Bounded caches: a layer sees few shapes, but nothing may grow without bound. */
const CACHE_ENTRIES = 16;
function cachePut<V>(cache: Map<string, V>, key: string, value: V, drop: (v: V) => void): void {
  if (cache.size >= CACHE_ENTRIES) {
    const [oldest, v] = cache.entries().next().value as [string, V];
    cache.delete(oldest);
    drop(v);
  }
  cache.set(key, value);
}

/**
 * The expert-parallel group a Dispatcher, MoELayer or MoEInference is given (undefined: this rank
 * alone): a Communicator, or an object with an integer rank in [0, size), allToAll and allToAllV.
 */
export function checkGroup(group: unknown, op: string): ExpertParallelGroup {
  if (group === undefined) return singleRankGroup;
  const g = group as ExpertParallelGroup;
  if (group === null || typeof group !== 'object' || typeof g.allToAll !== 'function' || typeof g.allToAllV !== 'function') {
    invalidArgument(op, `'group' must be an ExpertParallelGroup (a Communicator, or an object with rank, size, allToAll and allToAllV)`);
  }
  if (!Number.isSafeInteger(g.size) || g.size < 1 || !Number.isSafeInteger(g.rank) || g.rank < 0 || g.rank >= g.size) {
    invalidArgument(op, `'group' has rank ${String(g.rank)} and size ${String(g.size)}; expected 0 <= rank < size`);
  }
  return g;
}

/** Tensors shared by the handles that use them (cached layouts): freed when evicted and unused. */
class Shared {
  refs = 0;
  evicted = false;
  constructor(readonly tensors: (Tensor | null)[]) {
    for (const t of tensors) if (t) keep(t); // outlive the callers' tidy() scopes
  }
  acquire(): () => void {
    this.refs++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      if (--this.refs === 0 && this.evicted) this.free();
    };
  }
  evict(): void {
    this.evicted = true;
    if (this.refs === 0) this.free();
  }
  free(): void {
    for (const t of this.tensors) t?.dispose();
  }
}

export class Dispatcher {
  readonly numExperts: number;
  readonly group: ExpertParallelGroup;
  readonly localExperts: number;
  readonly align: number;
  readonly padToCapacity: boolean;
  readonly fp8: boolean | 'keep';
  readonly commStream: Stream | undefined;
  readonly transportChoice: TransportChoice;
  readonly transportSms: number;
  #transport: TransportKind | null = null;
  #transportReason = '';
  #peer: PeerTransport | null = null;
  #disposed = false;
  private mapCache = new Map<string, Shared>();

  constructor(config: DispatcherConfig) {
    const op = 'Dispatcher';
    if (config === null || typeof config !== 'object') invalidArgument(op, `'config' must be an object`);
    checkKeys(config, op, {
      numExperts: true,
      group: true,
      align: true,
      padToCapacity: true,
      fp8: true,
      commStream: true,
      transport: true,
      transportSms: true,
    });
    const group = checkGroup(config.group, op);
    checkPositiveInt(config.numExperts, op, 'numExperts');
    if (config.numExperts % group.size !== 0) {
      invalidArgument(op, `'numExperts' ${config.numExperts} must be a multiple of the expert-parallel group size ${group.size}`);
    }
    const align = checkPositiveInt(config.align ?? 1, op, 'align', { below: MAX_ALIGN + 1 });
    this.numExperts = config.numExperts;
    this.group = group;
    this.localExperts = config.numExperts / group.size;
    this.align = align;
    this.padToCapacity = checkBoolean(config.padToCapacity ?? false, op, 'padToCapacity');
    const fp8 = config.fp8 ?? false;
    if (fp8 !== true && fp8 !== false && fp8 !== 'keep') invalidArgument(op, `'fp8' must be true, false or 'keep'; received ${shown(fp8)}`);
    this.fp8 = fp8;
    this.commStream = config.commStream === undefined ? undefined : checkStream(config.commStream, op, 'commStream');
    const choice = config.transport ?? 'auto';
    if (choice !== 'auto' && choice !== 'ipc' && choice !== 'nccl')
      invalidArgument(op, `'transport' must be 'auto', 'ipc' or 'nccl'; received ${shown(choice)}`);
    if (choice === 'ipc' && !(group instanceof Communicator)) invalidArgument(op, `'transport' 'ipc' needs a Communicator as 'group'`);
    this.transportChoice = choice;
    this.transportSms = checkNonNegativeInt(config.transportSms ?? 0, op, 'transportSms', '(0: all SMs)');
    if (group.size === 1 && choice !== 'ipc') this.#transport = 'local';
  }

  /** The transport rows travel by; null until the first dispatch with several ranks decides it. */
  get transport(): TransportKind | null {
    return this.#transport;
  }
  /** Why 'auto' did not pick 'ipc' (empty when it did, or before the first dispatch). */
  get transportReason(): string {
    return this.#transportReason;
  }

  /** Decided once, at the first dispatch (collective when it probes peer memory). */
  private chooseTransport(x: Tensor, topK: number): TransportKind {
    if (this.#transport !== null) return this.#transport;
    const group = this.group;
    const exchange: TransportKind = group instanceof Communicator ? (group.backend === 'nccl' ? 'nccl' : 'mpi') : 'group';
    let reason = '';
    if (this.transportChoice === 'nccl') reason = `'nccl' was requested`;
    else if (!x.device.isCuda) reason = 'the tensors are on the CPU';
    else if (topK > PEER_MAX_TOP_K)
      reason = `${topK} entries per token (expert choice routes every token to all E experts); the peer-memory transport takes up to ${PEER_MAX_TOP_K}`;
    else if (!(group instanceof Communicator)) reason = `the group is not a Communicator`;
    else {
      // Sized for this call (the first); combine's rows are x's dtype, at least as wide as fp8 rows.
      const H = x.shape[1] as number;
      const need = {
        tokens: x.shape[0] as number,
        rowBytes: Math.max(peerRowBytes(x, this.fp8 !== false), H * dtypeSize[x.dtype]),
        topK,
        localExperts: this.localExperts,
      };
      this.#peer = PeerTransport.for(group, x.device, need, (why) => (reason = why));
    }
    if (this.#peer === null && this.transportChoice === 'ipc') invalidArgument('dispatch', `'transport' 'ipc' cannot be used: ${reason}`);
    this.#transportReason = reason;
    this.#transport = this.#peer ? 'ipc' : exchange;
    return this.#transport;
  }

  /**
   * @internal The peer-memory transport this dispatcher moves rows with, or null when they travel
   * another way. Decides the transport first (collective at the first call on a GPU, like the first
   * dispatch): MoEInference's low-latency decode path drives the transport with buffers of its own.
   */
  peerTransportFor(x: Tensor, topK: number): PeerTransport | null {
    this.chooseTransport(x, topK);
    return this.#peer;
  }

  /** Ships x's routed rows to their experts' owners. `cap` comes from capacity() on this rank. */
  dispatch(x: Tensor, indices: Tensor, weights: Tensor, cap: CapacityResult): Dispatched {
    using work = this.dispatchAsync(x, indices, weights, cap);
    return work.wait();
  }

  /** dispatch() on the comm stream; the result arrives through the CommWork's wait(). */
  dispatchAsync(x: Tensor, indices: Tensor, weights: Tensor, cap: CapacityResult, options?: CommWorkOptions): CommWork<Dispatched> {
    const op = 'dispatch';
    this.checkLive(op);
    checkTensors(op, { x, indices, weights });
    // Strided ones failed inside permute, naming it: the kernels read each as one dense block.
    checkContiguous(x, op, 'x');
    checkContiguous(indices, op, 'indices');
    checkContiguous(weights, op, 'weights');
    if (cap === null || typeof cap !== 'object') invalidArgument(op, `'cap' must be the result of capacity()`);
    return launch(
      op,
      this.commStream,
      x.device,
      [x, indices, weights, ...tensorsIn(cap)],
      () => {
        const d = this.dispatchNow(x, indices, weights, cap);
        handleOwners.set(d.handle, this);
        return d;
      },
      options,
      (d) => {
        d.rows.dispose();
        d.scales?.dispose();
        d.weights.dispose();
        d.handle.dispose();
      },
    );
  }

  private dispatchNow(x: Tensor, indices: Tensor, weights: Tensor, cap: CapacityResult): Dispatched {
    const op = 'dispatch';
    if (cap.numExperts !== this.numExperts)
      invalidArgument(op, `'cap' was computed for ${cap.numExperts} experts; the dispatcher has ${this.numExperts}`);
    if (this.padToCapacity && cap.capacity === null) invalidArgument(op, `'padToCapacity' needs capacity() with a capacity factor`);
    if (x.ndim !== 2 || indices.ndim !== 2 || indices.shape[0] !== x.shape[0])
      invalidArgument(op, `'x' must be [T,H] and 'indices' [T,k] with the same T`);
    const transport = this.chooseTransport(x, indices.shape[1] as number);
    if (transport === 'ipc') {
      if ((indices.shape[1] as number) > PEER_MAX_TOP_K)
        invalidArgument(op, `the 'ipc' transport takes top-k up to ${PEER_MAX_TOP_K}; received ${indices.shape[1]}`);
      if (this.fp8 && (x.shape[1] as number) % FP8_BLOCK !== 0)
        invalidArgument(op, `fp8 rows need a hidden size that is a multiple of ${FP8_BLOCK}`);
      const { scales, ...d } = peerDispatch(this.#peer as PeerTransport, x, indices, weights, cap, {
        numExperts: this.numExperts,
        align: this.align,
        padToCapacity: this.padToCapacity,
        fp8: this.fp8,
        sms: this.transportSms,
        staticOffsets: (El, P, segment, like) => this.staticOffsets(El, P, segment, like),
      });
      return scales ? { ...d, scales } : d;
    }
    if (transport === 'local') return this.dispatchLocal(x, indices, weights, cap);
    return this.dispatchExchange(x, indices, weights, cap);
  }

  /**
   * One rank: the permute is the dispatch. Dropless with align 1 and capacity mode read nothing on
   * the host; the handle's host counts are read from the offsets only if someone asks for them.
   * FP8: x's T rows make the e4m3 round trip before the permute (the permute copies whole rows,
   * so this equals quantising the permuted rows, k times cheaper; nothing crosses a wire here), so
   * that one rank computes what several do. 'keep': the e4m3 rows are permuted, and their scales
   * beside them: half the bytes of the bf16 permute written.
   */
  private dispatchLocal(x: Tensor, indices: Tensor, weights: Tensor, cap: CapacityResult): Dispatched {
    trace.mark('dispatch: start', x.device);
    const keep = this.fp8 === 'keep';
    const quantized = this.fp8 !== false ? quantizeFp8(x) : null;
    let permuted: PermuteResult;
    let scales: Tensor | null = null;
    try {
      const source = quantized === null ? x : keep ? quantized.q : tidy(() => dequantizeFp8(quantized, x.dtype));
      try {
        permuted = permute(source, indices, weights, cap, { align: this.align, padToCapacity: this.padToCapacity });
      } finally {
        if (source !== x && source !== quantized?.q) source.dispose();
      }
      if (keep && quantized) {
        try {
          scales = this.permuteLike(quantized.scales, permuted);
        } catch (e) {
          for (const t of Object.values(permuted)) if (t instanceof Tensor) t.dispose();
          throw e;
        }
      }
    } finally {
      quantized?.q.dispose();
      quantized?.scales.dispose();
    }
    trace.mark('dispatch: permuted', x.device);
    const { rows, ...layout } = permuted;
    let counts: number[] | null = null;
    // Rows per expert, from the offsets (a deliberate read, on first access only).
    const segments = (): number[] => {
      if (counts === null) {
        const o = Array.from(layout.offsets.toArray() as Int32Array);
        counts = o.slice(1).map((v, e) => v - (o[e] as number));
      }
      return counts;
    };
    const handle: ExchangeDispatchHandle = {
      transport: 'local',
      permuted: layout,
      get sendRows() {
        return [layout.numRows];
      },
      get recvRows() {
        return [layout.numRows];
      },
      get recvCounts() {
        return segments().slice();
      },
      get localRows() {
        return segments().slice();
      },
      localOffsets: layout.offsets,
      toExpertOrder: null,
      toSourceOrder: null,
      dispose: () => {
        for (const t of Object.values(layout)) if (t instanceof Tensor) t.dispose();
      },
      [Symbol.dispose]() {
        this.dispose();
      },
    };
    const rowWeights = layout.rowWeight.view(-1);
    return scales ? { rows, scales, weights: rowWeights, handle } : { rows, weights: rowWeights, handle };
  }

  /**
   * Several ranks through the communicator's all-to-all, in three phases (see the module doc):
   * layout (planExchange: permute, counts, maps), exchange (exchangeRows: the all-to-all-v of rows
   * and gate weights) and regroup (regroup: from source-rank order into local-expert order).
   */
  private dispatchExchange(x: Tensor, indices: Tensor, weights: Tensor, cap: CapacityResult): Dispatched {
    trace.mark('dispatch: start', x.device);
    const plan = this.planExchange(x, indices, weights, cap);
    try {
      const got = tidy(() => this.regroup(this.exchangeRows(plan, x), plan.toExpert));
      const handle = this.exchangeHandle(plan);
      return got.scales
        ? { rows: got.rows, scales: got.scales, weights: got.weights, handle }
        : { rows: got.rows, weights: got.weights, handle };
    } catch (e) {
      for (const t of [...Object.values(plan.permuted), ...(plan.release ? [] : [plan.toExpert, plan.toSource, plan.offsets])])
        if (t instanceof Tensor) t.dispose();
      plan.release?.();
      throw e;
    } finally {
      plan.quantized?.q.dispose();
      plan.quantized?.scales.dispose();
      plan.scaleRows?.dispose();
    }
  }

  /**
   * Layout phase: x's routed rows permuted into global-expert order (fp8: quantised first), the rows
   * each rank sends and receives (dropless: counts exchanged, the one deliberate host read), and the
   * maps that regroup what arrives. Throws with nothing left allocated.
   */
  private planExchange(x: Tensor, indices: Tensor, weights: Tensor, cap: CapacityResult): ExchangePlan {
    const op = 'dispatch';
    const P = this.group.size;
    const El = this.localExperts;
    // FP8: the T token rows are quantised once before the permute rather than the T·k permuted rows
    // after it (k times less work; the same values, since the permute copies whole rows).
    const quantized = this.fp8 ? quantizeFp8(x) : null;
    let permuted: PermuteResult;
    let scaleRows: Tensor | null = null;
    try {
      permuted = permute(quantized ? quantized.q : x, indices, weights, cap, { align: this.align, padToCapacity: this.padToCapacity });
    } catch (e) {
      quantized?.q.dispose();
      quantized?.scales.dispose();
      throw e;
    }
    trace.mark('dispatch: permuted', x.device);
    try {
      if (quantized) scaleRows = this.permuteLike(quantized.scales, permuted);
      // Rows per global expert segment, as sent.
      let segment: number[];
      let recvCounts: number[];
      if (this.padToCapacity) {
        const C = roundUp(cap.capacity as number, this.align);
        segment = new Array<number>(this.numExperts).fill(C);
        recvCounts = new Array<number>(P * El).fill(C);
      } else {
        // Dropless: the segment sizes, read once on the host (the deliberate sync), then exchanged.
        segment = permuted.segmentRows;
        recvCounts = this.exchangeCounts(segment, x);
        trace.mark('dispatch: counts exchanged and read', x.device);
      }
      if (!Array.isArray(segment) || segment.length !== this.numExperts)
        invalidArgument(op, `the permute's segments do not match ${this.numExperts} experts`);
      const sendRows = Array.from({ length: P }, (_, p) => segment.slice(p * El, (p + 1) * El).reduce((a, b) => a + b, 0));
      const recvRows = Array.from({ length: P }, (_, p) => recvCounts.slice(p * El, (p + 1) * El).reduce((a, b) => a + b, 0));
      const localRows = Array.from({ length: El }, (_, l) =>
        Array.from({ length: P }, (_, p) => recvCounts[p * El + l] as number).reduce((a, b) => a + b, 0),
      );
      const { toExpert, toSource, offsets, release } = this.maps(recvCounts, localRows, x);
      trace.mark('dispatch: layout maps made', x.device);
      return { quantized, permuted, scaleRows, sendRows, recvRows, recvCounts, localRows, toExpert, toSource, offsets, release };
    } catch (e) {
      for (const t of Object.values(permuted)) if (t instanceof Tensor) t.dispose();
      quantized?.q.dispose();
      quantized?.scales.dispose();
      scaleRows?.dispose();
      throw e;
    }
  }

  /**
   * Exchange phase: the permuted rows (fp8: and their scales, dequantised on arrival to x's dtype
   * unless kept) and their gate weights, all-to-all-v; what arrives is in (source rank, local
   * expert) order.
   */
  private exchangeRows(plan: ExchangePlan, x: Tensor): ReceivedRows {
    const { permuted, scaleRows, sendRows, recvRows } = plan;
    const totalRecv = recvRows.reduce((a, b) => a + b, 0);
    const H = x.shape[1] as number;
    let rows: Tensor;
    let scales: Tensor | null = null;
    if (scaleRows && this.fp8 === 'keep') {
      rows = this.exchange(permuted.rows, sendRows, recvRows, [totalRecv, H]);
      scales = this.exchange(scaleRows, sendRows, recvRows, [totalRecv, H / FP8_BLOCK]);
    } else if (scaleRows) {
      rows = this.exchangeFp8({ q: permuted.rows, scales: scaleRows }, sendRows, recvRows, totalRecv, x.dtype);
    } else {
      rows = this.exchange(permuted.rows, sendRows, recvRows, [totalRecv, H]);
    }
    trace.mark('dispatch: rows exchanged', x.device);
    const weights = this.exchange(permuted.rowWeight.view(-1, 1), sendRows, recvRows, [totalRecv, 1]);
    trace.mark('dispatch: weights exchanged', x.device);
    return { rows, scales, weights };
  }

  /** Regroup phase: rows (and kept fp8 rows' scales) and weights from (source rank, local expert) into (local expert, source rank) order. */
  private regroup(received: ReceivedRows, toExpert: Tensor | null): ReceivedRows {
    const result: ReceivedRows = {
      rows: this.reorder(received.rows, toExpert),
      scales: received.scales ? this.reorder(received.scales, toExpert) : null,
      weights: this.reorder(received.weights, toExpert).view(-1),
    };
    trace.mark('dispatch: regrouped by local expert', received.rows.device);
    return result;
  }

  /**
   * The step's handle: the permuted rows have been sent, so it keeps only the layout (a step does not
   * hold T·k rows per layer until its backward) and the maps (cached ones through `release`).
   */
  private exchangeHandle(plan: ExchangePlan): ExchangeDispatchHandle {
    const { rows: sent, ...layout } = plan.permuted;
    sent.dispose();
    const { toExpert, toSource, offsets, release } = plan;
    return {
      transport: 'exchange',
      permuted: layout,
      sendRows: plan.sendRows,
      recvRows: plan.recvRows,
      recvCounts: plan.recvCounts,
      localRows: plan.localRows,
      localOffsets: offsets,
      toExpertOrder: toExpert,
      toSourceOrder: toSource,
      dispose: () => {
        for (const t of Object.values(layout)) if (t instanceof Tensor) t.dispose();
        // Capacity-mode maps are shared through the cache; dropless maps belong to this step.
        if (release) release();
        else for (const t of [toExpert, toSource, offsets]) t?.dispose();
      },
      [Symbol.dispose]() {
        this.dispose();
      },
    };
  }

  /** Brings expert outputs [Σ localRows, H] home and combines them: y[t] = Σ_j w[t,j]·out(t,j). */
  combine(expertOut: Tensor, handle: DispatchHandle, weights: Tensor): Tensor {
    using work = this.combineAsync(expertOut, handle, weights);
    return work.wait();
  }

  /** combine() on the comm stream. */
  combineAsync(expertOut: Tensor, handle: DispatchHandle, weights: Tensor, options?: CommWorkOptions): CommWork<Tensor> {
    const op = 'combine';
    this.checkLive(op);
    checkTensors(op, { expertOut, weights });
    checkContiguous(expertOut, op, 'expertOut');
    checkContiguous(weights, op, 'weights');
    const inputs = [expertOut, weights, ...handleTensors(op, handle, this)];
    return launch(
      op,
      this.commStream,
      expertOut.device,
      inputs,
      () =>
        tidy(() => {
          trace.mark('combine: start', expertOut.device);
          if (handle.transport === 'ipc') return peerCombine(this.peerFor(op), expertOut, handle, this.transportSms);
          const home = this.returnRows(expertOut, handle, op, 'expertOut');
          trace.mark('combine: rows home', expertOut.device);
          const y = unpermute(home, handle.permuted.rowOf, weights, { dtype: expertOut.dtype });
          trace.mark('combine: unpermuted', expertOut.device);
          return y;
        }),
      options,
    );
  }

  /**
   * Backward of combine: from dy [T,H] to the gradient w.r.t. the expert outputs (expert order) and
   * w.r.t. the gate weights [T,k]. `expertOut` is what combine received.
   */
  combineBackward(dy: Tensor, expertOut: Tensor, handle: DispatchHandle, weights: Tensor): { dExpertOut: Tensor; dWeights: Tensor } {
    using work = this.combineBackwardAsync(dy, expertOut, handle, weights);
    return work.wait();
  }

  /** combineBackward() on the comm stream. */
  combineBackwardAsync(
    dy: Tensor,
    expertOut: Tensor,
    handle: DispatchHandle,
    weights: Tensor,
    options?: CommWorkOptions,
  ): CommWork<{ dExpertOut: Tensor; dWeights: Tensor }> {
    const op = 'combineBackward';
    this.checkLive(op);
    checkTensors(op, { dy, expertOut, weights });
    checkContiguous(dy, op, 'dy');
    checkContiguous(expertOut, op, 'expertOut');
    checkContiguous(weights, op, 'weights');
    const inputs = [dy, expertOut, weights, ...handleTensors(op, handle, this)];
    return launch(
      op,
      this.commStream,
      dy.device,
      inputs,
      () =>
        tidy(() => {
          trace.mark('combineBackward: start', dy.device);
          if (handle.transport === 'ipc') return peerCombineBackward(this.peerFor(op), dy, expertOut, handle, this.transportSms);
          const home = this.returnRows(expertOut, handle, op, 'expertOut');
          trace.mark('combineBackward: expert outputs home', dy.device);
          const { dRows, dWeights } = unpermuteBackward(dy, home, weights, handle.permuted.rowOf, handle.permuted.rowToken, {
            dtype: expertOut.dtype,
          });
          const H = dy.shape[1] as number;
          const received = this.exchange(dRows, handle.sendRows, handle.recvRows, [handle.recvRows.reduce((a, b) => a + b, 0), H]);
          trace.mark('combineBackward: row gradients exchanged', dy.device);
          const dExpertOut = this.reorder(received, handle.toExpertOrder);
          trace.mark('combineBackward: regrouped', dy.device);
          return { dExpertOut, dWeights };
        }),
      options,
    );
  }

  /**
   * Backward of dispatch: from the gradient w.r.t. the dispatched rows (expert order) to dx [T,H],
   * plus `add` when given (see DispatchBackwardOptions).
   */
  dispatchBackward(dRows: Tensor, handle: DispatchHandle, options: { add?: Tensor } = {}): Tensor {
    using work = this.dispatchBackwardAsync(dRows, handle, options);
    return work.wait();
  }

  /** dispatchBackward() on the comm stream. */
  dispatchBackwardAsync(dRows: Tensor, handle: DispatchHandle, options: DispatchBackwardOptions = {}): CommWork<Tensor> {
    const op = 'dispatchBackward';
    this.checkLive(op);
    const { add, ...commOptions } = checkOptions(options, op, { after: true, add: true });
    checkTensors(op, { dRows });
    checkContiguous(dRows, op, 'dRows');
    const inputs = [dRows, ...handleTensors(op, handle, this)];
    if (add !== undefined) {
      // Checked here, before anything is queued, whichever transport runs: dx's dtype and shape.
      checkTensor(add, op, 'add');
      checkContiguous(add, op, 'add');
      const T = (handle.transport === 'ipc' ? handle.pos : handle.permuted.rowOf).shape[0] as number;
      const want = [T, dRows.shape[1] as number];
      if (add.dtype !== dRows.dtype || add.shape.join() !== want.join())
        invalidArgument(op, `'add' ${add.dtype} [${add.shape.join(',')}] must be ${dRows.dtype} [${want.join(',')}] like dx`);
      inputs.push(add);
    }
    // With a comm stream, `add` is read after what the caller queued before this call, while the
    // row exchange waits only for `after`: its producer overlaps the exchange.
    const addReady = add && this.commStream ? new Event(dRows.device) : null;
    addReady?.record();
    try {
      return launch(
        op,
        this.commStream,
        dRows.device,
        inputs,
        () =>
          tidy(() => {
            trace.mark('dispatchBackward: start', dRows.device);
            if (handle.transport === 'ipc') {
              const dx = peerCombine(this.peerFor(op), dRows, handle, this.transportSms, false);
              if (add) {
                addReady?.wait(); // the comm stream, current here
                dx.add_(add); // the peer kernel has no addend: one pass over dx in place
              }
              return dx;
            }
            const home = this.returnRows(dRows, handle, op, 'dRows');
            trace.mark('dispatchBackward: row gradients home', dRows.device);
            addReady?.wait(); // the comm stream, current here
            // `add` joins the per-token sum: no separate pass over dx.
            const dx = permuteBackward(home, handle.permuted.rowOf, { dtype: dRows.dtype, ...(add ? { add } : {}) });
            trace.mark('dispatchBackward: summed per token', dRows.device);
            return dx;
          }),
        commOptions,
      );
    } finally {
      addReady?.dispose(); // a wait already queued keeps it alive on the device
    }
  }

  private peerFor(op: string): PeerTransport {
    if (this.#peer === null) invalidArgument(op, `the handle came through the 'ipc' transport but this dispatcher has none`);
    return this.#peer;
  }

  /** Expert-order rows back to their home ranks, in the home's permuted order. */
  private returnRows(rows: Tensor, handle: ExchangeDispatchHandle, op: string, name: string): Tensor {
    const received = handle.recvRows.reduce((a, b) => a + b, 0);
    if (rows.ndim !== 2 || rows.shape[0] !== received) {
      invalidArgument(op, `'${name}' [${rows.shape.join(',')}] must be [${received}, H]: one row per row dispatch() delivered`);
    }
    const H = rows.shape[1] as number;
    const bySource = this.reorder(rows, handle.toSourceOrder);
    return this.exchange(bySource, handle.recvRows, handle.sendRows, [handle.permuted.numRows, H]);
  }

  /** counts[e] rows this rank sends to global expert e → rows each rank sends to my local experts. */
  private exchangeCounts(segment: number[], like: Tensor): number[] {
    if (this.group.size === 1) return segment.slice();
    return tidy(() => {
      const send = Tensor.fromArray(segment, { dtype: 'i32', device: like.device, shape: [this.numExperts] });
      const recv = Tensor.empty([this.numExperts], { dtype: 'i32', device: like.device });
      this.group.allToAll(send, recv);
      const counts = Array.from(recv.toArray() as Int32Array); // read on the host: part of the dropless sync
      // What the peers said is checked before anything is made its size: a negative count, or rows
      // past what i32 indexes, is a peer's fault (its memory or its code), named as such.
      const El = this.localExperts;
      let total = 0;
      counts.forEach((n, i) => {
        if (n < 0)
          invalidArgument(
            'dispatch',
            `rank ${Math.floor(i / El)} reported ${n} rows for local expert ${i % El} (a peer's counts must be >= 0)`,
          );
        total += n;
      });
      if (total > 2 ** 31 - 1)
        invalidArgument('dispatch', `the peers reported ${total} rows for this rank, more than i32 indexes (${counts.join(', ')})`);
      return counts;
    });
  }

  /** Permuted fp8 rows and their per-128 scales exchanged, then dequantised to `dtype`. */
  private exchangeFp8(rows: Fp8Rows, sendRows: number[], recvRows: number[], totalRecv: number, dtype: DType): Tensor {
    return tidy(() => {
      const H = rows.q.shape[1] as number;
      const recvQ = this.exchange(rows.q, sendRows, recvRows, [totalRecv, H]);
      const recvScales = this.exchange(rows.scales, sendRows, recvRows, [totalRecv, H / FP8_BLOCK]);
      return dequantizeFp8({ q: recvQ, scales: recvScales }, dtype);
    });
  }

  /** Rows of `t` ([T, n], one per token) in the permuted layout; padding rows are zeros. */
  private permuteLike(t: Tensor, permuted: PermuteResult): Tensor {
    const out = Tensor.empty([permuted.numRows, t.shape[1] as number], { dtype: t.dtype, device: t.device });
    try {
      native().permuteRows(t.handle, permuted.rowToken.handle, out.handle, permuted.rowOf.handle);
    } catch (e) {
      out.dispose();
      throw e;
    }
    return out;
  }

  private exchange(send: Tensor, sendRows: number[], recvRows: number[], shape: number[]): Tensor {
    // A group of one sends everything to itself: hand back a view, no copy.
    if (this.group.size === 1) return send.view(...shape);
    const recv = Tensor.empty(shape, { dtype: send.dtype, device: send.device });
    try {
      this.group.allToAllV(send, sendRows, recv, recvRows);
    } catch (e) {
      recv.dispose();
      // Fixed segments are sized from this rank's C alone: counts that disagree mean another C.
      if (this.padToCapacity && e instanceof InvalidArgumentError && /expects/.test(e.message))
        throw new InvalidArgumentError(
          `${e.message}. With padToCapacity every rank sends C rows per expert, so every rank needs the same capacity C = min(ceil(capacityFactor·T·k/E), T·k): the ranks' T or capacityFactor give different ones`,
          e.op,
        );
      throw e;
    }
    return recv;
  }

  private reorder(rows: Tensor, map: Tensor | null): Tensor {
    if (map === null) return rows;
    const out = Tensor.empty(rows.shape, { dtype: rows.dtype, device: rows.device });
    native().permuteRows(rows.handle, map.handle, out.handle);
    return out;
  }

  /** Capacity mode through 'ipc': offsets [El+1] of fixed (expert, source) segments, cached. */
  private staticOffsets(El: number, P: number, segment: number, like: Tensor): Tensor {
    const key = `ipc|${like.device.toString()}|${El}|${P}|${segment}`;
    let entry = this.mapCache.get(key);
    if (!entry) {
      const offsets = Array.from({ length: El + 1 }, (_, l) => l * P * segment);
      entry = new Shared([Tensor.fromArray(offsets, { dtype: 'i32', device: like.device })]);
      cachePut(this.mapCache, key, entry, (e) => e.evict());
    }
    // A view of the cached tensor would outlive an eviction: the handle gets its own copy instead.
    return (entry.tensors[0] as Tensor).clone();
  }

  /**
   * The (source, expert) ↔ (expert, source) gathers and the local expert offsets. Fixed
   * (capacity-mode) layouts are cached and shared by the handles using them (`release` when done);
   * dropless ones belong to the step.
   */
  private maps(
    recvCounts: number[],
    localRows: number[],
    like: Tensor,
  ): { toExpert: Tensor | null; toSource: Tensor | null; offsets: Tensor; release: (() => void) | null } {
    const key = this.padToCapacity ? `${like.device.toString()}|${recvCounts.join(',')}` : null;
    const cached = key === null ? undefined : this.mapCache.get(key);
    if (cached) {
      const [toExpert, toSource, offsets] = cached.tensors as [Tensor | null, Tensor | null, Tensor];
      return { toExpert, toSource, offsets, release: cached.acquire() };
    }
    const P = this.group.size;
    const El = this.localExperts;
    // Start of each (p, l) block in source order, and in expert order.
    const total = recvCounts.reduce((a, b) => a + b, 0);
    const sourceStart: number[] = [];
    let acc = 0;
    for (let i = 0; i < P * El; i++) {
      sourceStart.push(acc);
      acc += recvCounts[i] as number;
    }
    const offsetsHost = [0];
    for (const r of localRows) offsetsHost.push((offsetsHost[offsetsHost.length - 1] as number) + r);
    let toExpert: Tensor | null = null;
    let toSource: Tensor | null = null;
    if (P > 1) {
      const expertToSource = new Int32Array(total); // row in expert order ← row in source order
      const sourceToExpert = new Int32Array(total);
      let out = 0;
      for (let l = 0; l < El; l++)
        for (let p = 0; p < P; p++) {
          const n = recvCounts[p * El + l] as number;
          const src = sourceStart[p * El + l] as number;
          for (let i = 0; i < n; i++) {
            expertToSource[out] = src + i;
            sourceToExpert[src + i] = out;
            out++;
          }
        }
      toExpert = Tensor.fromArray(expertToSource, { device: like.device });
      toSource = Tensor.fromArray(sourceToExpert, { device: like.device });
    }
    const offsets = Tensor.fromArray(offsetsHost, { dtype: 'i32', device: like.device });
    if (key === null) return { toExpert, toSource, offsets, release: null };
    const entry = new Shared([toExpert, toSource, offsets]);
    cachePut(this.mapCache, key, entry, (e) => e.evict());
    return { toExpert, toSource, offsets, release: entry.acquire() };
  }

  /**
   * Releases cached layout maps (handles still holding one keep it until they are disposed). The
   * dispatcher refuses work afterwards (it would cache maps again that nothing frees).
   */
  dispose(): void {
    this.#disposed = true;
    for (const m of this.mapCache.values()) m.evict();
    this.mapCache.clear();
  }

  private checkLive(op: string): void {
    if (this.#disposed) usedAfterDispose(op, 'the dispatcher');
  }
}
