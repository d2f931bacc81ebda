/**
 * The peer-memory transport of a communicator (native/comm/peer/peer_transport.h has the protocol):
 * ranks whose GPUs can address each other's memory push each token row once per destination rank
 * straight into the destination's buffer; layout and counts stay on the device.
 *
 * One transport per communicator, shared by every Dispatcher on it (the buffers are sized for the
 * largest call, not per layer). Creating it is collective, at the first dispatch on the GPU: every
 * rank exports its buffer (CUDA IPC), the exports and each rank's needs are all-gathered through the
 * communicator, and the ranks keep it only if every rank can map every peer's buffer (one host; the
 * same GPU, or peer access between the GPUs). Otherwise the dispatcher falls back to the
 * communicator's all-to-all, and every rank agrees on that.
 *
 * Growth is collective too, and decided from what every rank knows at the same call: a larger
 * hidden size, top-k, or expert count (equal on every rank for one layer), the token count in
 * capacity mode (equal on every rank there), and in dropless mode the largest token count among the
 * sources, which the count exchange reports to every rank. Growing waits for the device, meets the
 * others at a barrier, and replaces every buffer: `generation` counts the replacements, so whoever
 * captured the old buffers' addresses in a CUDA graph (MoEInference.captureDecode) knows to capture
 * again (every rank sees the same growth at the same call, so every rank recaptures).
 */
import { hostname } from 'node:os';
import { readFileSync } from 'node:fs';

import { type Communicator } from '../parallel/communicator.js';
import { type Device } from '../device.js';
import { invalidArgument } from '../errors.js';
import { native, type PeerHandle } from '../native.js';
import { Tensor } from '../tensor.js';

/** What one call needs from the transport's buffers. */
export interface PeerNeed {
  tokens: number;
  rowBytes: number;
  topK: number;
  localExperts: number;
}

const FIELDS = ['tokens', 'rowBytes', 'topK', 'localExperts'] as const;
const roundUp = (v: number, a: number): number => Math.ceil(v / a) * a;

/** A 31-bit hash of this machine's identity (host name and boot id): ranks on other hosts differ. */
function hostKey(): number {
  let id = hostname();
  try {
    id += readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    // not Linux: the host name alone
  }
  let h = 2166136261;
  for (let i = 0; i < id.length; i++) h = Math.imul(h ^ id.charCodeAt(i), 16777619);
  return h >>> 1;
}

export class PeerTransport implements Disposable {
  readonly comm: Communicator;
  readonly device: Device;
  #handle: PeerHandle | null;
  #capacity: PeerNeed;
  #generation = 0;

  private constructor(comm: Communicator, device: Device, handle: PeerHandle, capacity: PeerNeed) {
    this.comm = comm;
    this.device = device;
    this.#handle = handle;
    this.#capacity = capacity;
  }

  /**
   * The communicator's transport, created (collectively) when `comm` has none yet; null when some
   * rank cannot reach its peers' memory (every rank returns null then; `why` gets the reason).
   */
  static for(comm: Communicator, device: Device, need: PeerNeed, why?: (reason: string) => void): PeerTransport | null {
    const known = registry.get(comm);
    if (known !== undefined) {
      if (typeof known === 'string') {
        why?.(known);
        return null;
      }
      // Token counts may differ between ranks: only creation (which takes every rank's maximum)
      // and the callers that know all ranks' counts grow on them.
      return known.grownFor({ ...need, tokens: 0 });
    }
    const made = PeerTransport.create(comm, device, need, null);
    if (typeof made === 'string') {
      why?.(made);
      registry.set(comm, made);
      return null;
    }
    registry.set(comm, made);
    comm.onDispose(() => {
      registry.delete(comm);
      made.dispose();
    });
    return made;
  }

  /**
   * Collective: agree on the capacity (the largest need of any rank, and at least `floor`), export,
   * check every rank reaches every peer, open. A string says why not (the same on every rank).
   */
  private static create(comm: Communicator, device: Device, need: PeerNeed, floor: PeerNeed | null): PeerTransport | string {
    if (!device.isCuda) return 'the tensors are on the CPU';
    const P = comm.size;
    if (P > 8) return `the peer-memory transport joins at most 8 ranks (one NVLink domain); this group has ${P}`;
    // Every rank's needs and host, gathered: each takes the same maxima and sees the same hosts.
    const mine = [...FIELDS.map((f) => Math.max(need[f], floor?.[f] ?? 0)), hostKey()];
    const all = gatherInts(comm, mine);
    const cap = Object.fromEntries(FIELDS.map((f, i) => [f, Math.max(...all.map((r) => r[i] as number))])) as unknown as PeerNeed;
    cap.tokens = roundUp(Math.max(cap.tokens, 1), 64);
    const hosts = new Set(all.map((r) => r[FIELDS.length]));
    if (hosts.size > 1) return `the ranks run on ${hosts.size} hosts; peer memory needs one`;
    // Every rank learns whether every rank got its buffer before anyone waits on an exchange.
    let handle: PeerHandle | null = null;
    let failure = '';
    try {
      handle = native().peerCreate(comm.rank, P, device.index, cap.tokens, cap.rowBytes, cap.topK, cap.localExperts, comm.timeoutMs);
    } catch (e) {
      failure = (e as Error).message;
    }
    const made = gatherInts(comm, [handle ? 1 : 0]);
    const failed = made.map((v, r) => (v[0] === 1 ? -1 : r)).filter((r) => r >= 0);
    if (handle === null || failed.length > 0) {
      handle?.dispose();
      return failure || `rank(s) ${failed.join(', ')} could not allocate the transport's buffer`;
    }
    try {
      const exports = gatherBytes(comm, handle.exportHandle());
      const mineWhy = handle.canReach(exports);
      const verdicts = gatherInts(comm, [mineWhy === null ? 1 : 0]);
      const refusing = verdicts.map((v, r) => (v[0] === 1 ? -1 : r)).filter((r) => r >= 0);
      if (refusing.length > 0) {
        handle.dispose();
        return mineWhy ?? `rank(s) ${refusing.join(', ')} cannot map their peers' memory`;
      }
      handle.open(exports);
      // Nobody writes into a peer's buffer before every rank has mapped every other.
      comm.barrier();
      return new PeerTransport(comm, device, handle, cap);
    } catch (e) {
      handle.dispose();
      throw e;
    }
  }

  get handle(): PeerHandle {
    if (this.#handle === null) invalidArgument('PeerTransport', 'the peer-memory transport was disposed');
    this.#handle.setTimeoutMs(this.comm.timeoutMs);
    return this.#handle;
  }
  get capacity(): Readonly<PeerNeed> {
    return this.#capacity;
  }
  get aborted(): boolean {
    return this.#handle?.isAborted() ?? false;
  }
  /** How many times the buffers were replaced (grownFor): graphs captured before a growth address freed memory. */
  get generation(): number {
    return this.#generation;
  }
  /**
   * Device bytes of this rank's buffer: per source rank, tokens × (two rows of `rowBytes` rounded up
   * to 16, and 16 bytes of metadata per top-k entry), plus the mail (64 + 4·localExperts bytes per
   * rank, cache-line rounded) and 1 KiB of counters (native layout_for, to within its 256-byte alignments).
   */
  get bufferBytes(): number {
    const c = this.#capacity;
    const P = this.comm.size;
    const row = roundUp(Math.max(c.rowBytes, 16), 16);
    return P * c.tokens * (2 * row + 16 * c.topK) + P * roundUp(64 + 4 * c.localExperts, 128) + 1024;
  }
  /**
   * Throws what the kernels recorded (in a replayed graph too), naming `op`: the TimeoutError of a
   * failed wait, or the InvalidArgumentError of a source that dispatched another T in capacity mode.
   */
  check(op: string): void {
    this.handle.check(op);
  }

  /**
   * This transport, grown first when `need` exceeds its capacity. Collective: call it only where
   * every rank reaches the same decision (see the module doc).
   */
  grownFor(need: PeerNeed): PeerTransport {
    if (FIELDS.every((f) => need[f] <= this.#capacity[f])) return this;
    const handle = this.handle;
    // Every rank's transport work done and every mapping closed before any buffer is freed (an
    // exporter may free its buffer only once every importer unmapped it).
    handle.closePeers();
    this.comm.barrier();
    // Double the tokens (amortised growth); the other sizes as needed.
    const floor = {
      ...this.#capacity,
      tokens: need.tokens > this.#capacity.tokens ? Math.max(need.tokens, 2 * this.#capacity.tokens) : this.#capacity.tokens,
    };
    handle.dispose();
    this.#handle = null;
    const made = PeerTransport.create(this.comm, this.device, need, floor);
    if (typeof made === 'string') throw new Error(`peer-memory transport: could not grow: ${made}`);
    this.#handle = made.#handle;
    this.#capacity = made.#capacity;
    this.#generation++;
    made.#handle = null;
    return this;
  }

  /** Tells the peers to stop waiting for this rank; later calls throw. */
  abort(): void {
    this.#handle?.abort();
  }

  dispose(): void {
    this.#handle?.dispose();
    this.#handle = null;
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

const registry = new WeakMap<Communicator, PeerTransport | string>();

/** All ranks' i32 rows of `values`, through the communicator (host tensors; NCCL stages them). */
function gatherInts(comm: Communicator, values: number[]): number[][] {
  using t = Tensor.fromArray(values, { dtype: 'i32', device: 'cpu', shape: [1, values.length] });
  using all = comm.allGather(t);
  const flat = all.toArray() as Int32Array;
  return Array.from({ length: comm.size }, (_, r) => Array.from(flat.subarray(r * values.length, (r + 1) * values.length)));
}

function gatherBytes(comm: Communicator, bytes: Uint8Array): Uint8Array[] {
  using t = Tensor.fromArray(bytes, { dtype: 'u8', device: 'cpu', shape: [1, bytes.length] });
  using all = comm.allGather(t);
  const flat = all.toArray() as Uint8Array;
  return Array.from({ length: comm.size }, (_, r) => flat.slice(r * bytes.length, (r + 1) * bytes.length));
}
