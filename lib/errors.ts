/**
 * Errors thrown by moe-ep. The native addon creates instances of these classes directly (they are
 * registered with it when it loads), so `instanceof` works for errors from native code too.
 * Every error carries `kind` and, where known, `op` (the operation that failed).
 */
export type ErrorKind =
  | 'InvalidArgument'
  | 'Disposed'
  | 'Cuda'
  | 'OutOfMemory'
  | 'Nccl'
  | 'Unavailable'
  | 'Timeout'
  | 'Checkpoint'
  | 'Internal';

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

/** Throws an InvalidArgumentError naming the op and the argument, in the addon's wording. */
export function invalidArgument(op: string, message: string): never {
  throw new InvalidArgumentError(`${op}: ${message}`, op);
}

/** `options` as given, or {} when omitted; anything but a plain object (null, a number…) is refused. */
export function checkOptions<T extends object>(options: T | undefined, op: string): T {
  if (options === undefined) return {} as T;
  if (options === null || typeof options !== 'object' || Array.isArray(options)) {
    invalidArgument(op, `'options' must be an object; received ${options === null ? 'null' : Array.isArray(options) ? 'an array' : typeof options}`);
  }
  return options;
}
