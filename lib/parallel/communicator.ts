/**
 * Communicator: a group of ranks and the collectives expert parallelism needs, on tensors.
 * Backends: 'single' (one rank), 'mpi' (host memory; CUDA tensors staged through pinned memory),
 * 'nccl' (one GPU per rank). Create one with init() (lib/parallel/init.ts) or the static factories.
 *
 * Rules: tensors are contiguous with dim >= 1; counts are rows (dim 0); every rank passes the same
 * dtype and row shape. Ranks that break the rules in a call (other sizes, dtype, op, root, another
 * call altogether, allToAllV counts that do not pair up) get an InvalidArgumentError on every rank
 * naming the peers and both values, before any data moves (native/comm/communicator.h: agree());
 * the communicator stays usable. Every collective honours `timeoutMs` (default 300 000; 0 = none): past it a
 * TimeoutError names the op, this rank and (where known) the peers not heard from, and the
 * communicator is aborted (later calls throw at once).
 *
 * NCCL moves device memory only: a host tensor given to an NCCL communicator (a stop flag, a
 * checkpoint's metadata, a metric read on the host) goes through a copy on the communicator's GPU
 * and back, which costs a host synchronisation; keep bulk data on the GPU.
 */
import { invalidArgument, shown } from '../errors.js';
import { checkOptions, checkTensor, checkTimeoutMs } from '../validate.js';
import { type CommHandle, native } from '../native.js';
import { COLLECTIVE_REDUCE } from '../native-codes.js';
import { Tensor } from '../tensor.js';
import { Device } from '../device.js';

export type Backend = 'single' | 'mpi' | 'nccl';
export type ReduceOp = 'sum' | 'max' | 'min' | 'avg';

export const DEFAULT_TIMEOUT_MS = 300_000;

function checkRows(rows: unknown, op: string, name: string): number[] {
  if (!Array.isArray(rows)) invalidArgument(op, `'${name}' must be an array of row counts, one per rank`);
  return rows as number[];
}

export class Communicator implements Disposable {
  #handle: CommHandle | null;
  readonly rank: number;
  readonly size: number;
  readonly backend: Backend;
  /** NCCL: the GPU its collectives run on (host tensors are staged there); null otherwise. */
  readonly device: Device | null;
  /** Released with the communicator (e.g. its peer-memory transport). */
  #onDispose: (() => void)[] = [];

  /** @internal Wraps a native handle; use init() or the static factories. */
  constructor(handle: CommHandle, device: Device | null = null) {
    this.#handle = handle;
    this.rank = handle.rank();
    this.size = handle.size();
    this.backend = handle.backend();
    this.device = this.backend === 'nccl' ? device : null;
  }

  /** The one-rank communicator: collectives are local copies with the same checks. */
  static single(): Communicator {
    return new Communicator(native().commSingle());
  }

  /** MPI_COMM_WORLD (a duplicate). Initialises MPI on first use unless the application did. */
  static mpi(options: { timeoutMs?: number } = {}): Communicator {
    options = checkOptions(options, 'Communicator.mpi', { timeoutMs: true });
    return new Communicator(native().commMpi(checkTimeoutMs(options.timeoutMs ?? DEFAULT_TIMEOUT_MS, 'commMpi')));
  }

  /** NCCL on cuda:`device`; `uniqueId` (128 bytes) comes from rank 0's Communicator.ncclUniqueId(). */
  static nccl(rank: number, size: number, uniqueId: Uint8Array, device: number, options: { timeoutMs?: number } = {}): Communicator {
    options = checkOptions(options, 'Communicator.nccl', { timeoutMs: true });
    const handle = native().commNccl(rank, size, uniqueId, device, checkTimeoutMs(options.timeoutMs ?? DEFAULT_TIMEOUT_MS, 'commNccl'));
    return new Communicator(handle, Device.cuda(device));
  }

  /** A fresh NCCL unique id (call on rank 0, share with the others). */
  static ncclUniqueId(): Uint8Array {
    return native().ncclUniqueId();
  }

  /** @internal */
  get handle(): CommHandle {
    if (this.#handle === null) invalidArgument('communicator', 'the communicator was disposed');
    return this.#handle;
  }
  get disposed(): boolean {
    return this.#handle === null;
  }
  /** True after a timeout, a mismatched call or abort(): every collective then throws at once. */
  get aborted(): boolean {
    return this.#handle?.isAborted() ?? false;
  }

  get timeoutMs(): number {
    return this.handle.timeoutMs();
  }
  set timeoutMs(ms: number) {
    this.handle.setTimeoutMs(checkTimeoutMs(ms, 'timeoutMs'));
  }

  /** In place: t = op over ranks of t. */
  allReduce(t: Tensor, op: ReduceOp = 'sum'): Tensor {
    checkTensor(t, 'allReduce', 't');
    const code = Object.hasOwn(COLLECTIVE_REDUCE, op) ? COLLECTIVE_REDUCE[op] : undefined;
    if (code === undefined) invalidArgument('allReduce', `'op' must be sum, max, min or avg; received ${shown(op)}`);
    this.#staged([t], [t], ([d]) => this.handle.allReduce(d!.handle, code));
    return t;
  }

  /** out[r·rows + i] = rank r's t[i]; `out` [size·rows, ...] is created when not given. */
  allGather(t: Tensor, out?: Tensor): Tensor {
    checkTensor(t, 'allGather', 't');
    if (out !== undefined && out !== null) checkTensor(out, 'allGather', 'out');
    if (t.ndim === 0) invalidArgument('allGather', `'t' is a scalar; collectives count rows along dim 0`);
    const o = out ?? Tensor.empty([t.shape[0]! * this.size, ...t.shape.slice(1)], { dtype: t.dtype, device: t.device });
    try {
      this.#staged([t], [o], ([dt, dout]) => this.handle.allGather(dt!.handle, dout!.handle));
    } catch (e) {
      if (!out) o.dispose();
      throw e;
    }
    return o;
  }

  /** In place: every rank's t becomes root's t. */
  broadcast(t: Tensor, root: number): Tensor {
    checkTensor(t, 'broadcast', 't');
    // (The binding takes a 32-bit int: 2^32 would be rank 0.)
    if (!Number.isSafeInteger(root) || root < 0 || root >= this.size)
      invalidArgument('broadcast', `'root' ${String(root)} is not a rank of this communicator of size ${this.size}`);
    this.#staged([t], [t], ([d]) => this.handle.broadcast(d!.handle, root));
    return t;
  }

  barrier(): void {
    this.handle.barrier();
  }

  /** Equal chunks: chunk p of send ([size·n, ...]) goes to rank p; chunk p of recv comes from p. */
  allToAll(send: Tensor, recv?: Tensor): Tensor {
    checkTensor(send, 'allToAll', 'send');
    if (recv !== undefined && recv !== null) checkTensor(recv, 'allToAll', 'recv');
    const r = recv ?? Tensor.empty(send.shape, { dtype: send.dtype, device: send.device });
    try {
      this.#staged([send], [r], ([ds, dr]) => this.handle.allToAll(ds!.handle, dr!.handle));
    } catch (e) {
      if (!recv) r.dispose();
      throw e;
    }
    return r;
  }

  /**
   * Ragged all-to-all: sendRows[p] rows of send (peers in order, contiguous) go to rank p;
   * recvRows[p] rows of recv come from rank p. Counts are host numbers the caller exchanged first
   * (e.g. with allToAll of an i32/i64 tensor of counts); sums must match the tensors' rows.
   */
  allToAllV(send: Tensor, sendRows: number[], recv: Tensor, recvRows: number[]): Tensor {
    checkTensor(send, 'allToAllV', 'send');
    checkTensor(recv, 'allToAllV', 'recv');
    const rows = [checkRows(sendRows, 'allToAllV', 'sendRows'), checkRows(recvRows, 'allToAllV', 'recvRows')] as const;
    this.#staged([send], [recv], ([ds, dr]) => this.handle.allToAllV(ds!.handle, rows[0], dr!.handle, rows[1]));
    return recv;
  }

  /**
   * Ranks passing the same color form a new communicator, ordered by key (ties by rank). Collective:
   * every rank calls it. color -1 takes no part and gets null.
   */
  split(color: number, key: number = this.rank): Communicator | null {
    const h = this.handle.split(color, key);
    if (h === null) return null;
    return new Communicator(h, this.device);
  }

  /**
   * Runs `collective` with each host tensor among `inputs` and `outputs` replaced by one on this
   * NCCL communicator's GPU: inputs are copied there, outputs are made there and copied back after.
   * A tensor in both lists (in place) is copied both ways. Other backends, and device tensors, pass
   * straight through, so a tensor on the wrong GPU still gets the native error.
   */
  #staged(inputs: Tensor[], outputs: Tensor[], collective: (onDevice: Tensor[]) => void): void {
    const device = this.device;
    if (device === null || [...inputs, ...outputs].every((t) => t.device.isCuda)) {
      collective([...inputs, ...outputs]);
      return;
    }
    const made = new Map<Tensor, Tensor>(); // host tensor → its device stand-in (one each, even when aliased)
    try {
      const stage = (t: Tensor): Tensor => {
        if (t.device.isCuda) return t;
        let d = made.get(t);
        if (!d) {
          d = inputs.includes(t) ? t.copyTo({ device }) : Tensor.empty(t.shape, { dtype: t.dtype, device });
          made.set(t, d);
        }
        return d;
      };
      collective([...inputs.map(stage), ...outputs.map(stage)]);
      for (const t of outputs) {
        const d = made.get(t);
        if (d) t.copy_(d);
      }
    } finally {
      for (const d of made.values()) d.dispose();
    }
  }

  /** Marks this communicator unusable (NCCL: aborts its work). Local; peers are not told. */
  abort(): void {
    this.#handle?.abort();
  }

  /** @internal Runs `release` when the communicator is disposed (resources built on it). */
  onDispose(release: () => void): void {
    this.#onDispose.push(release);
  }

  dispose(): void {
    const releases = this.#onDispose.splice(0);
    for (const release of releases.reverse()) release();
    this.#handle?.dispose();
    this.#handle = null;
  }
  [Symbol.dispose](): void {
    this.dispose();
  }

  toString(): string {
    return `Communicator(${this.backend}, rank ${this.rank} of ${this.size})`;
  }
}

/**
 * An optional `comm` option of a collective (saveCheckpoint): undefined or null (none), or a
 * Communicator (a look-alike object failed inside the first collective with a raw TypeError).
 */
export function checkOptionalCommunicator(comm: unknown, op: string, arg = 'comm'): Communicator | undefined {
  if (comm === undefined || comm === null) return undefined;
  if (!(comm instanceof Communicator))
    invalidArgument(op, `'${arg}' must be a Communicator (from init() or Communicator's factories); received ${shown(comm)}`);
  return comm;
}
