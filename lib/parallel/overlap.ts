/**
 * Communication on its own stream, so the caller can overlap it with compute.
 *
 * runOnStream(commStream, fn) orders the communication after the producers' work on the caller's
 * (compute) stream with an event, runs `fn` on `commStream`, records an event there once it is
 * queued, and returns a CommWork (the Dispatcher's *Async methods are built on it). The result is
 * reachable only through wait(), waitOn(stream) or synchronize(), so a consumer cannot read it
 * before the communication is done:
 *
 *   const work = dispatcher.dispatchAsync(x, indices, weights, cap);   // all-to-alls on the comm stream
 *   const shared = expertsForward(x, …);                                // compute stream, meanwhile
 *   const { rows, handle } = work.wait();                               // compute stream waits (GPU side)
 *
 * The caching allocator reuses a freed block only on the stream it was allocated for, so crossing
 * tensors are marked with recordStream: the inputs for the comm stream (a caller may free them
 * while the communication still reads them) and, on wait, the results for the waiting stream (they
 * were allocated on the comm stream, which would otherwise reuse them under a pending reader).
 *
 * Without a comm stream, or on the CPU, the work is complete when the call returns and wait() costs
 * nothing. A host-blocking communicator (MPI, staging device buffers) has finished its exchanges
 * when the call returns; only the kernels around them may still be queued on the comm stream.
 */
import { type Device } from '../device.js';
import { DisposedError, invalidArgument } from '../errors.js';
import { checkEvent, checkOptions, checkStream } from '../validate.js';
import { Event, Stream, withStream } from '../stream.js';
import { Tensor, tensorsIn } from '../tensor.js';

export interface CommWorkOptions {
  /**
   * The comm stream waits for this event (recorded on the compute stream right after the inputs
   * were produced) instead of for everything queued so far: compute queued between that event and
   * this call then overlaps the communication even when the call itself blocks the host (the
   * dropless count exchange, an MPI exchange, an NCCL collective with a timeout). Default: an
   * event recorded at the call.
   */
  after?: Event;
}

export class CommWork<T> implements Disposable {
  readonly device: Device;
  /** Recorded on the comm stream after the work; null when it ran on the caller's stream (nothing to wait for). */
  readonly event: Event | null;
  // A plain field, not #private: tidy() looks through a returned CommWork and keeps its tensors.
  private result: T;
  private delivered = false;
  private released = false;
  private readonly release: (result: T) => void;

  /** @internal Made by runOnStream(). */
  constructor(device: Device, event: Event | null, result: T, release: (result: T) => void) {
    this.device = device;
    this.event = event;
    this.result = result;
    this.release = release;
  }

  /** True when the communication has completed (always on the CPU and without a comm stream). */
  query(): boolean {
    this.live('query');
    return this.event?.query() ?? true;
  }

  /** The result; work queued on the device's current stream from now on waits for it (the host does not). */
  wait(): T {
    return this.deliver('wait', undefined);
  }

  /** The result; work queued on `stream` from now on waits for it (the host does not). */
  waitOn(stream: Stream): T {
    checkStream(stream, 'CommWork.waitOn');
    if (!stream.device.equals(this.device))
      invalidArgument('CommWork.waitOn', `'stream' is on ${stream.device.toString()} but the work is on ${this.device.toString()}`);
    return this.deliver('waitOn', stream);
  }

  /** The result, after blocking the host until the communication has completed. */
  synchronize(): T {
    this.live('synchronize');
    this.event?.synchronize();
    return this.deliver('synchronize', undefined);
  }

  /** Frees the event; the result's tensors too unless wait/waitOn/synchronize handed them out. */
  dispose(): void {
    if (this.released) return;
    this.released = true;
    this.event?.dispose();
    // Never handed out: its tensors were only used on the comm stream, whose pool may reuse them.
    if (!this.delivered) this.release(this.result);
  }
  [Symbol.dispose](): void {
    this.dispose();
  }

  private live(op: string): void {
    if (this.released) throw new DisposedError(`CommWork.${op}: the work was disposed; wait for it before disposing it`, `CommWork.${op}`);
  }

  private deliver(op: string, stream: Stream | undefined): T {
    this.live(op);
    if (this.event) {
      this.event.wait(stream);
      for (const t of tensorsIn(this.result)) if (!t.disposed) t.recordStream(stream);
    }
    this.delivered = true;
    return this.result;
  }
}

export interface RunOnStreamOptions extends CommWorkOptions {
  /** Tensors made on the current stream that `fn` reads: marked for the allocator as used on `stream`. */
  inputs?: readonly Tensor[];
}

/**
 * Runs `fn` (collectives, copies, ops) with `stream` as its device's current stream, after the work
 * queued so far on the current stream (or `options.after`), and returns its result as a CommWork:
 *
 *   const work = runOnStream(comm, () => world.allReduce(grads), { inputs: [grads] });
 *   … compute on the current stream …
 *   work.wait();
 */
export function runOnStream<T>(stream: Stream, fn: () => T, options: RunOnStreamOptions = {}): CommWork<T> {
  const op = 'runOnStream';
  checkStream(stream, op);
  if (stream.disposed) throw new DisposedError(`${op}: 'stream' was disposed`, op);
  if (typeof fn !== 'function') invalidArgument(op, `'fn' must be a function`);
  options = checkOptions(options, op, { after: true, inputs: true });
  const inputs = options.inputs ?? [];
  if (!Array.isArray(inputs) || !inputs.every((t) => Tensor.isTensor(t))) invalidArgument(op, `'inputs' must be an array of Tensors`);
  for (const t of inputs)
    if (!t.device.equals(stream.device))
      invalidArgument(op, `'inputs' holds a tensor on ${t.device.toString()} but the stream is on ${stream.device.toString()}`);
  return launch(op, stream, stream.device, inputs, fn, options.after === undefined ? {} : { after: options.after });
}

/**
 * @internal runOnStream for the library's own callers: without a comm stream `fn` runs on the
 * current stream and the work is already complete. `op` names the caller in errors; `release`
 * frees a result that was never waited for (default: dispose its tensors, except the inputs).
 */
export function launch<T>(
  op: string,
  commStream: Stream | undefined,
  device: Device,
  inputs: readonly Tensor[],
  fn: () => T,
  options: CommWorkOptions = {},
  release?: (result: T) => void,
): CommWork<T> {
  const free =
    release ??
    ((result: T): void => {
      for (const t of tensorsIn(result)) if (!inputs.includes(t)) t.dispose();
    });
  options = checkOptions(options, op, { after: true });
  const after = options.after;
  if (after !== undefined) {
    checkEvent(after, op, 'after');
    if (!after.device.equals(device))
      invalidArgument(op, `'after' is an event on ${after.device.toString()} but the tensors are on ${device.toString()}`);
    if (after.disposed) throw new DisposedError(`${op}: 'after' was disposed`, op);
  }
  if (commStream === undefined) return new CommWork(device, null, fn(), free);
  if (commStream.disposed) throw new DisposedError(`${op}: 'commStream' was disposed`, op);
  if (!commStream.device.equals(device))
    invalidArgument(op, `'commStream' is on ${commStream.device.toString()} but the tensors are on ${device.toString()}`);
  if (after) commStream.waitEvent(after);
  else {
    // Everything queued on the compute stream so far, the inputs' producers among it.
    const ready = new Event(device);
    ready.record();
    commStream.waitEvent(ready);
    ready.dispose(); // the wait is already queued; CUDA frees the event once it has fired
  }
  for (const t of inputs) t.recordStream(commStream);
  const result = withStream(commStream, fn);
  // Results made from blocks of other streams (cached layouts, views of inputs) are used here too.
  for (const t of tensorsIn(result)) t.recordStream(commStream);
  return new CommWork(device, commStream.recordEvent(), result, free);
}
