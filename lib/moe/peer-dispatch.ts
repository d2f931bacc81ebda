/**
 * Dispatch and combine through the peer-memory transport (lib/moe/peer-transport.ts), the phases of
 * the Dispatcher's 'ipc' path:
 *
 *   dispatch:  layout on the device (each token's position at each destination rank, the counts
 *              sent to every rank) → [dropless: the received counts, read once on the host]
 *              → each token row pushed once per destination rank → expanded there into
 *              local-expert-major rows (fp8 rows dequantised on the way), with their gate weights
 *   combine:   each expert rank sums its local experts' weighted outputs per (token, source rank)
 *              and writes one row back; the owner sums over ranks in fp32
 *   backward:  combineBackward pushes dy like a dispatch (d_rows = w·dy and the gate-weight
 *              gradients computed where the expert outputs are); dispatchBackward is a combine
 *              with weights 1.
 *
 * Received rows are ordered by local expert, then source rank, then the source's token order;
 * capacity mode gives every (expert, source) segment exactly roundUp(C, align) rows, so nothing is
 * read on the host and the step can be captured in a CUDA graph.
 */
import { type CapacityResult } from './capacity.js';
import { FP8_BLOCK } from './fp8.js';
import { type PeerNeed, PeerTransport } from './peer-transport.js';
import { type Device } from '../device.js';
import { type DType, dtypeSize } from '../dtype.js';
import { invalidArgument } from '../errors.js';
import { keep, Tensor } from '../tensor.js';
import { trace } from '../trace.js';

/** The layout of one step through the peer transport, kept for combine and the backward passes. */
export interface PeerDispatchHandle extends Disposable {
  readonly transport: 'ipc';
  /** Rows per local expert, padding included, and their offsets [El+1] (i32, on the device). */
  readonly localRows: number[];
  readonly localOffsets: Tensor;
  /** Rows per (source rank, local expert), row-major [P][El] (capacity mode: the segment size). */
  readonly recvCounts: number[];
  /** @internal Owner side: pos [T,P] (token's position at each rank, -1: not sent), dest [T,k] (entry's rank). */
  readonly pos: Tensor;
  readonly dest: Tensor;
  /** @internal Expert side: rowSrc [N] ((source·cap + token)·k + entry, -1: padding), and per received (source, token, entry) its row and weight. */
  readonly rowSrc: Tensor;
  readonly recvRowOf: Tensor;
  readonly recvWeight: Tensor;
  readonly recvTokens: Tensor;
  dispose(): void;
}

export interface PeerDispatchOptions {
  numExperts: number;
  align: number;
  padToCapacity: boolean;
  /** Rows travel as fp8; 'keep': they arrive as fp8 with their scales (not dequantised). */
  fp8: boolean | 'keep';
  sms: number;
  /** Capacity mode's static offsets [El+1], made once per segment size (owned by the caller). */
  staticOffsets: (localExperts: number, P: number, segment: number, like: Tensor) => Tensor;
}

const roundUp = (v: number, a: number): number => Math.ceil(v / a) * a;

/** What the layout and row kernels of a dispatch take (the raw binding's positional order lives in rawLayout/rawRows only). */
interface RawDispatch {
  indices: Tensor;
  slot: Tensor;
  kept: Tensor;
  /** Capacity mode: rows per (local expert, source rank) segment; dropless: -1. */
  segment: number;
  align: number;
  sms: number;
  localExperts: number;
  pos: Tensor;
  dest: Tensor;
  /** Dropless only (null in capacity mode): the local offsets, segment starts and fill counters. */
  offsets: Tensor | null;
  segStart: Tensor | null;
  fill: Tensor | null;
}

interface RawDispatchRows extends RawDispatch {
  x: Tensor;
  weights: Tensor;
  fp8: boolean;
  rows: Tensor;
  /** fp8 rows kept: their scales [N, H/128] (rows is then fp8e4m3). */
  rowScales: Tensor | null;
  rowWeights: Tensor;
  rowSrc: Tensor;
  recvRowOf: Tensor;
  recvWeight: Tensor;
  recvTokens: Tensor;
}

/** The layout kernel: each token's position at each destination rank, and the counts (read on the host when dropless). */
function rawLayout(t: PeerTransport, a: RawDispatch) {
  return t.handle.dispatchLayout(
    a.indices.handle,
    a.slot.handle,
    a.kept.handle,
    a.segment,
    a.align,
    a.sms,
    a.localExperts,
    a.pos.handle,
    a.dest.handle,
    a.offsets?.handle ?? null,
    a.segStart?.handle ?? null,
    a.fill?.handle ?? null,
  );
}

/** The row kernels: each token row pushed once per destination rank and expanded there. */
function rawRows(t: PeerTransport, a: RawDispatchRows): void {
  t.handle.dispatchRows(
    a.x.handle,
    a.indices.handle,
    a.slot.handle,
    a.weights.handle,
    a.pos.handle,
    a.dest.handle,
    a.segment,
    a.align,
    a.sms,
    a.localExperts,
    a.fp8,
    a.segStart?.handle ?? null,
    a.fill?.handle ?? null,
    a.offsets?.handle ?? null,
    a.rows.handle,
    a.rowWeights.handle,
    a.rowSrc.handle,
    a.recvRowOf.handle,
    a.recvWeight.handle,
    a.recvTokens.handle,
    a.rowScales?.handle ?? null,
  );
}

/** The payload bytes of one token row: x's row, or its fp8 values then their scales 16-byte aligned. */
export function peerRowBytes(x: Tensor, fp8: boolean): number {
  const H = x.shape[1] as number;
  return fp8 ? roundUp(H, 16) + (H / FP8_BLOCK) * 4 : H * dtypeSize[x.dtype];
}

/** Rows of x for the local experts of every rank. `transport` comes from PeerTransport.for(). */
export function peerDispatch(
  transport: PeerTransport,
  x: Tensor,
  indices: Tensor,
  weights: Tensor,
  cap: CapacityResult,
  o: PeerDispatchOptions,
): { rows: Tensor; scales: Tensor | null; weights: Tensor; handle: PeerDispatchHandle } {
  const P = transport.comm.size;
  const El = o.numExperts / P;
  const [T, k] = indices.shape as [number, number];
  const H = x.shape[1] as number;
  const capacityMode = o.padToCapacity;
  const segment = capacityMode ? roundUp(cap.capacity as number, o.align) : -1;
  const fp8 = o.fp8 !== false;
  const need: PeerNeed = { tokens: T, rowBytes: Math.max(peerRowBytes(x, fp8), H * dtypeSize[x.dtype]), topK: k, localExperts: El };
  const dev = { device: x.device };
  const made: Tensor[] = [];
  const track = (t: Tensor): Tensor => (made.push(t), t);
  try {
    trace.mark('dispatch (ipc): start', x.device);
    // Capacity mode: every rank has the same T, so growing on it is a decision all ranks share.
    // Dropless: only the count exchange tells every rank the largest T (grown below).
    let t = transport.grownFor(capacityMode ? need : { ...need, tokens: 0 });
    const pos = track(Tensor.empty([T, P], { dtype: 'i32', ...dev }));
    const dest = track(Tensor.empty([T, k], { dtype: 'i32', ...dev }));
    const offsets = capacityMode ? null : track(Tensor.empty([El + 1], { dtype: 'i32', ...dev }));
    const segStart = capacityMode ? null : track(Tensor.empty([El * P], { dtype: 'i32', ...dev }));
    const fill = capacityMode ? null : track(Tensor.empty([El], { dtype: 'i32', ...dev }));
    const args: RawDispatch = {
      indices,
      slot: cap.slot,
      kept: cap.keptPerExpert,
      segment,
      align: o.align,
      sms: o.sms,
      localExperts: El,
      pos,
      dest,
      offsets,
      segStart,
      fill,
    };
    const layout = () => rawLayout(t, args);
    let counts = layout();
    if (!capacityMode && counts.maxTokens > t.capacity.tokens) {
      t = t.grownFor({ ...need, tokens: counts.maxTokens });
      counts = layout();
    }
    trace.mark(capacityMode ? 'dispatch (ipc): layout' : 'dispatch (ipc): layout, counts read', x.device);
    const N = counts.rows;
    const mapCap = Math.max(1, capacityMode ? T : Math.max(...counts.tokensFrom));
    const keep = o.fp8 === 'keep';
    const rows = track(Tensor.empty([N, H], { dtype: keep ? 'fp8e4m3' : x.dtype, ...dev }));
    const rowScales = keep ? track(Tensor.empty([N, H / FP8_BLOCK], { dtype: 'f32', ...dev })) : null;
    const rowWeights = track(Tensor.empty([N], { dtype: 'f32', ...dev }));
    const rowSrc = track(Tensor.empty([N], { dtype: 'i32', ...dev }));
    const recvRowOf = track(Tensor.empty([P, mapCap, k], { dtype: 'i32', ...dev }));
    const recvWeight = track(Tensor.empty([P, mapCap, k], { dtype: 'f32', ...dev }));
    const recvTokens = track(Tensor.empty([P], { dtype: 'i32', ...dev }));
    rawRows(t, { ...args, x, weights, fp8, rows, rowScales, rowWeights, rowSrc, recvRowOf, recvWeight, recvTokens });
    trace.mark('dispatch (ipc): rows pushed and expanded', x.device);
    // Segment sizes on the host: static in capacity mode, read with the counts in dropless mode.
    const recvCounts = Array.from({ length: P * El }, (_, i) => {
      const p = Math.floor(i / El),
        l = i % El;
      return counts.segmentRows[l * P + p] as number;
    });
    const localRows = Array.from({ length: El }, (_, l) => {
      let n = 0;
      for (let p = 0; p < P; p++) n += counts.segmentRows[l * P + p] as number;
      return capacityMode ? n : roundUp(n, o.align);
    });
    const localOffsets = offsets ?? o.staticOffsets(El, P, segment, x);
    segStart?.dispose();
    fill?.dispose();
    const owned = [pos, dest, rowSrc, recvRowOf, recvWeight, recvTokens, localOffsets];
    const handle: PeerDispatchHandle = {
      transport: 'ipc',
      localRows,
      localOffsets,
      recvCounts,
      pos,
      dest,
      rowSrc,
      recvRowOf,
      recvWeight,
      recvTokens,
      dispose: () => {
        for (const tensor of owned) tensor.dispose();
      },
      [Symbol.dispose]() {
        this.dispose();
      },
    };
    return { rows, scales: rowScales, weights: rowWeights, handle };
  } catch (e) {
    for (const tensor of made) tensor.dispose();
    throw e;
  }
}

function checkRows(op: string, rows: Tensor, handle: PeerDispatchHandle, name: string): void {
  const N = handle.rowSrc.shape[0] as number;
  if (rows.ndim !== 2 || rows.shape[0] !== N)
    invalidArgument(op, `'${name}' [${rows.shape.join(',')}] must be [${N}, H]: one row per row dispatch() delivered`);
}

const needFor = (handle: PeerDispatchHandle, rows: Tensor): PeerNeed => ({
  tokens: 0, // the dispatch sized the transport for every rank's tokens
  rowBytes: (rows.shape[1] as number) * dtypeSize[rows.dtype],
  topK: handle.dest.shape[1] as number,
  localExperts: 1,
});

/** y [T,H] = Σ_j w[t,j]·expertOut[row(t,j)], summed per rank on the expert side, then over ranks here. */
export function peerCombine(
  transport: PeerTransport,
  expertOut: Tensor,
  handle: PeerDispatchHandle,
  sms: number,
  withWeights = true,
): Tensor {
  const op = withWeights ? 'combine' : 'dispatchBackward';
  checkRows(op, expertOut, handle, withWeights ? 'expertOut' : 'dRows');
  const t = transport.grownFor(needFor(handle, expertOut));
  const T = handle.pos.shape[0] as number;
  const y = Tensor.empty([T, expertOut.shape[1] as number], { dtype: expertOut.dtype, device: expertOut.device });
  try {
    t.handle.combine(
      expertOut.handle,
      handle.recvRowOf.handle,
      withWeights ? handle.recvWeight.handle : null,
      handle.recvTokens.handle,
      handle.pos.handle,
      y.handle,
      sms,
    );
  } catch (e) {
    y.dispose();
    throw e;
  }
  trace.mark(`${op} (ipc): rows home and summed`, expertOut.device);
  return y;
}

/** Backward of combine: dy to the expert ranks, d(expertOut) = w·dy there, d(weights) [T,k] back home. */
export function peerCombineBackward(
  transport: PeerTransport,
  dy: Tensor,
  expertOut: Tensor,
  handle: PeerDispatchHandle,
  sms: number,
): { dExpertOut: Tensor; dWeights: Tensor } {
  const op = 'combineBackward';
  checkRows(op, expertOut, handle, 'expertOut');
  const T = handle.pos.shape[0] as number;
  if (dy.ndim !== 2 || dy.shape[0] !== T || dy.shape[1] !== expertOut.shape[1]) {
    invalidArgument(op, `'dy' [${dy.shape.join(',')}] must be [${T}, ${expertOut.shape[1]}]`);
  }
  const need = needFor(handle, expertOut);
  const t = transport.grownFor({ ...need, rowBytes: Math.max(need.rowBytes, (dy.shape[1] as number) * dtypeSize[dy.dtype]) });
  const dExpertOut = Tensor.empty(expertOut.shape, { dtype: expertOut.dtype, device: expertOut.device });
  const dWeights = Tensor.empty(handle.dest.shape, { dtype: 'f32', device: expertOut.device });
  try {
    t.handle.combineBackward(
      dy.handle,
      expertOut.handle,
      handle.rowSrc.handle,
      handle.recvWeight.handle,
      handle.pos.handle,
      handle.dest.handle,
      dExpertOut.handle,
      dWeights.handle,
      sms,
    );
  } catch (e) {
    dExpertOut.dispose();
    dWeights.dispose();
    throw e;
  }
  trace.mark('combineBackward (ipc): dy pushed, gradients back', dy.device);
  return { dExpertOut, dWeights };
}

/**
 * The low-latency decode path through the peer transport: capacity mode with every buffer made
 * once per token count (peerDecodeBuffers) and reused by every step, so a step allocates nothing,
 * reads nothing on the host and can be captured in a CUDA graph (MoEInference.captureDecode).
 * Every rank must run the same T (its fixed segments are C = capacity rows per (local expert,
 * source rank)), in the same order of calls.
 *
 * Per rank and token count T, with N = El·P·C received rows: pos [T,P] + dest [T,k] i32, rows
 * [N,H] in x's dtype, rowWeights + rowSrc [N], recvRowOf + recvWeight [P,T,k], recvTokens [P],
 * offsets [El+1] (static: l·P·C).
 */
export interface PeerDecodeBuffers {
  readonly T: number;
  readonly topK: number;
  /** Rows per (local expert, source rank): the capacity C. */
  readonly segment: number;
  readonly localExperts: number;
  readonly pos: Tensor;
  readonly dest: Tensor;
  /** The experts' input [N,H], local expert major, then source rank, then the source's slot. */
  readonly rows: Tensor;
  readonly rowWeights: Tensor;
  readonly rowSrc: Tensor;
  readonly recvRowOf: Tensor;
  readonly recvWeight: Tensor;
  readonly recvTokens: Tensor;
  /** [El+1] i32: local expert l's rows start at l·P·C. */
  readonly offsets: Tensor;
  /** Every tensor above, for disposal and for a graph's `retain`. */
  readonly tensors: readonly Tensor[];
}

/** What a decode step of T tokens needs from the transport (the bucket's worst case). */
export function peerDecodeNeed(T: number, topK: number, hidden: number, dtype: DType, localExperts: number): PeerNeed {
  return { tokens: T, rowBytes: hidden * dtypeSize[dtype], topK, localExperts };
}

/** Makes the buffers of a decode step (eagerly: the offsets are copied from the host). */
export function peerDecodeBuffers(
  o: { P: number; localExperts: number; T: number; topK: number; hidden: number; segment: number; dtype: DType },
  device: Device,
): PeerDecodeBuffers {
  const { P, localExperts: El, T, topK: k, hidden: H, segment } = o;
  const made: Tensor[] = [];
  const make = (shape: number[], dtype: DType): Tensor => {
    const t = keep(Tensor.empty(shape, { dtype, device }));
    made.push(t);
    return t;
  };
  try {
    const N = El * P * segment;
    const b = {
      T,
      topK: k,
      segment,
      localExperts: El,
      pos: make([T, P], 'i32'),
      dest: make([T, k], 'i32'),
      rows: make([N, H], o.dtype),
      rowWeights: make([N], 'f32'),
      rowSrc: make([N], 'i32'),
      recvRowOf: make([P, T, k], 'i32'),
      recvWeight: make([P, T, k], 'f32'),
      recvTokens: make([P], 'i32'),
      offsets: keep(
        Tensor.fromArray(
          Array.from({ length: El + 1 }, (_, l) => l * P * segment),
          { dtype: 'i32', device },
        ),
      ),
      tensors: made,
    };
    made.push(b.offsets);
    return b;
  } catch (e) {
    for (const t of made) t.dispose();
    throw e;
  }
}

/**
 * Dispatch into `b`: layout on the device, each token row pushed once per destination rank, expanded
 * there into b.rows (fixed segments, padding zeroed). No host read, no allocation. `slot` and
 * `kept` come from capacity() with a capacity factor on this rank's tokens.
 */
export function peerDispatchInto(
  transport: PeerTransport,
  x: Tensor,
  indices: Tensor,
  weights: Tensor,
  slot: Tensor,
  kept: Tensor,
  b: PeerDecodeBuffers,
  sms: number,
): void {
  const args: RawDispatch = {
    indices,
    slot,
    kept,
    segment: b.segment,
    align: 1,
    sms,
    localExperts: b.localExperts,
    pos: b.pos,
    dest: b.dest,
    offsets: null,
    segStart: null,
    fill: null,
  };
  rawLayout(transport, args);
  rawRows(transport, {
    ...args,
    x,
    weights,
    fp8: false,
    rows: b.rows,
    rowScales: null,
    rowWeights: b.rowWeights,
    rowSrc: b.rowSrc,
    recvRowOf: b.recvRowOf,
    recvWeight: b.recvWeight,
    recvTokens: b.recvTokens,
  });
  trace.mark('dispatch (ipc, low latency): rows pushed and expanded', x.device);
}

/** Combine of the step dispatched into `b`: y [T,H] = Σ_j w[t,j]·expertOut[row(t,j)] (fp32 sums), written into y. */
export function peerCombineInto(transport: PeerTransport, expertOut: Tensor, b: PeerDecodeBuffers, y: Tensor, sms: number): void {
  transport.handle.combine(expertOut.handle, b.recvRowOf.handle, b.recvWeight.handle, b.recvTokens.handle, b.pos.handle, y.handle, sms);
  trace.mark('combine (ipc, low latency): rows home and summed', expertOut.device);
}
