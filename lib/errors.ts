/**
 * Errors thrown by moe-ep. The native addon creates instances of these classes directly (they are
 * registered with it when it loads), so `instanceof` works for errors from native code too.
 * Every error carries `kind` and, where known, `op` (the operation that failed).
 */
export type ErrorKind =
  'InvalidArgument' | 'Disposed' | 'Cuda' | 'OutOfMemory' | 'Nccl' | 'Unavailable' | 'Timeout' | 'Checkpoint' | 'Internal';

export class MoeError extends Error {
  kind: ErrorKind = 'Internal';
  op?: string;
  constructor(message: string, op?: string) {
    super(message);
    this.name = new.target.name;
    if (op !== undefined) this.op = op;
  }
}

/** A bad argument: wrong dtype, shape, device, layout or value. Nothing was done. */
export class InvalidArgumentError extends MoeError {
  override kind: ErrorKind = 'InvalidArgument';
}
/** A tensor, stream or event used after dispose(). */
export class DisposedError extends MoeError {
  override kind: ErrorKind = 'Disposed';
}
/** A CUDA runtime call failed; the message holds the CUDA error name and string. */
export class CudaError extends MoeError {
  override kind: ErrorKind = 'Cuda';
}
/** An allocation failed even after the allocator released its cache. The allocator stays usable. */
export class OutOfMemoryError extends MoeError {
  override kind: ErrorKind = 'OutOfMemory';
}
/** An NCCL call failed. */
export class NcclError extends MoeError {
  override kind: ErrorKind = 'Nccl';
}
/** What the call needs is not there: no GPU, no driver, no NCCL, or a CPU-only build. */
export class UnavailableError extends MoeError {
  override kind: ErrorKind = 'Unavailable';
}
/**
 * A collective did not complete within its communicator's timeout. The message names the op, this
 * rank and, where known, the peers not heard from; the communicator is aborted afterwards.
 */
export class TimeoutError extends MoeError {
  override kind: ErrorKind = 'Timeout';
}
/**
 * A checkpoint or safetensors file is missing, damaged or of another format: the message names the
 * directory, the file and (where known) the tensor.
 */
export class CheckpointError extends MoeError {
  override kind: ErrorKind = 'Checkpoint';
}
/** A broken invariant inside moe-ep: please report it. */
export class InternalError extends MoeError {
  override kind: ErrorKind = 'Internal';
}

/** The table handed to the addon: one constructor per native error kind. */
export const errorClasses: Record<ErrorKind, new (message: string) => MoeError> = {
  InvalidArgument: InvalidArgumentError,
  Disposed: DisposedError,
  Cuda: CudaError,
  OutOfMemory: OutOfMemoryError,
  Nccl: NcclError,
  Unavailable: UnavailableError,
  Timeout: TimeoutError,
  Checkpoint: CheckpointError,
  Internal: InternalError,
};

/**
 * A value as an error message quotes it, JSON where it can be; never throws, whatever the value
 * (a BigInt, a Symbol, an object without a prototype, one whose getters throw).
 */
export function shown(v: unknown): string {
  try {
    return JSON.stringify(v, (_k, x: unknown) => (typeof x === 'bigint' ? `${x}n` : x)) ?? plain(v);
  } catch {
    return plain(v);
  }
}

/** String(v), or the value's kind where String throws. */
export function plain(v: unknown): string {
  try {
    return typeof v === 'symbol' ? v.toString() : String(v);
  } catch {
    return Object.prototype.toString.call(v);
  }
}

/** Throws an InvalidArgumentError naming the op and the argument, in the addon's wording. */
export function invalidArgument(op: string, message: string): never {
  throw new InvalidArgumentError(`${op}: ${message}`, op);
}

/** Throws a DisposedError naming the op and what was disposed (`what`: "the layer", "the tensor"…). */
export function usedAfterDispose(op: string, what: string): never {
  throw new DisposedError(`${op}: ${what} was disposed and cannot be used`, op);
}

/** The candidate closest to `name` (same letters ignoring case and _ or -, else at most ~1 edit in 4), if any. */
export function closestName(name: string, candidates: readonly string[]): string | undefined {
  const fold = (s: string): string => s.toLowerCase().replace(/[-_\s]/g, '');
  const folded = fold(name);
  let best: string | undefined;
  let bestDistance = Math.max(1, Math.floor(folded.length / 4)) + 1;
  for (const c of candidates) {
    const d = fold(c) === folded ? 0 : editDistance(folded, fold(c));
    if (d < bestDistance) {
      best = c;
      bestDistance = d;
    }
  }
  return best;
}

/** Optimal string alignment distance (Levenshtein with adjacent transpositions). */
function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) =>
    Array.from({ length: b.length + 1 }, (_, j) => (i === 0 ? j : j === 0 ? i : 0)),
  );
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let v = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) v = Math.min(v, d[i - 2]![j - 2]! + 1);
      d[i]![j] = v;
    }
  }
  return d[a.length]![b.length]!;
}

/** "unknown option 'x' (did you mean 'y'?)" for each name not in `known`; '' when all are known. */
export function unknownNames(names: readonly string[], known: readonly string[], what = 'option'): string {
  const unknown = names.filter((n) => !known.includes(n));
  if (unknown.length === 0) return '';
  const each = unknown.map((n) => {
    const close = closestName(n, known);
    return `'${n}'${close ? ` (did you mean '${close}'?)` : ''}`;
  });
  return `unknown ${what}${unknown.length > 1 ? 's' : ''} ${each.join(', ')}; expected ${known.length ? known.map((k) => `'${k}'`).join(', ') : 'none'}`;
}
