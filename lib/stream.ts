/**
 * Streams and events. On a CUDA device they are CUDA streams and events; on the CPU they exist and
 * complete at once, so code that overlaps communication with compute runs unchanged there.
 */
import { Device, type DeviceLike, getDefaultDevice } from './device.js';
import { DisposedError, invalidArgument } from './errors.js';
import { checkBoolean, checkEvent, checkOptions, checkStream } from './validate.js';
import { type EventHandle, native, type StreamHandle } from './native.js';

export class Stream implements Disposable {
  readonly device: Device;
  #handle: StreamHandle | null;

  constructor(device: DeviceLike = getDefaultDevice()) {
    this.device = Device.parse(device, 'Stream');
    this.#handle = new (native().StreamHandle)(...this.device.code);
  }

  /** @internal */
  get handle(): StreamHandle {
    if (this.#handle === null) throw new DisposedError('Stream: the stream was disposed and cannot be used', 'Stream');
    return this.#handle;
  }
  /** Blocks until all work queued on this stream has completed. */
  synchronize(): void {
    this.handle.synchronize();
  }
  /** True when all work queued on this stream has completed. */
  query(): boolean {
    return this.handle.query();
  }
  /** Work queued on this stream after this call waits for `event`. */
  waitEvent(event: Event): void {
    checkEvent(event, 'Stream.waitEvent', 'event');
    this.handle.waitEvent(event.handle);
  }
  /** Records a new event on this stream and returns it. */
  recordEvent(options: { timing?: boolean } = {}): Event {
    options = checkOptions(options, 'Stream.recordEvent', { timing: true });
    const e = new Event(this.device, options);
    e.record(this);
    return e;
  }
  get disposed(): boolean {
    return this.#handle === null;
  }
  /**
   * Hands the CUDA stream back to its device's pool, without waiting: work queued on it still runs,
   * and a later Stream may get the same CUDA stream (ordered after that work). CUDA streams are
   * never destroyed, so tensors marked as used on this one (recordStream, runOnStream) may be freed
   * after this call.
   */
  dispose(): void {
    this.#handle?.dispose();
    this.#handle = null;
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

export class Event implements Disposable {
  readonly device: Device;
  /** Created with `timing: true` (elapsedTime reads it). */
  readonly timing: boolean;
  #handle: EventHandle | null;

  constructor(device: DeviceLike = getDefaultDevice(), options: { timing?: boolean } = {}) {
    options = checkOptions(options, 'Event', { timing: true });
    this.device = Device.parse(device, 'Event');
    this.timing = checkBoolean(options.timing ?? false, 'Event', 'timing');
    this.#handle = new (native().EventHandle)(...this.device.code, this.timing);
  }

  /** @internal */
  get handle(): EventHandle {
    if (this.#handle === null) throw new DisposedError('Event: the event was disposed and cannot be used', 'Event');
    return this.#handle;
  }
  /** Records the event on `stream`, or on the device's current stream. */
  record(stream?: Stream): void {
    if (stream !== undefined) checkStream(stream, 'Event.record');
    this.handle.record(stream ? stream.handle : currentStreamHandle(this.device));
  }
  /** Blocks the host until the work recorded before this event has completed. */
  synchronize(): void {
    this.handle.synchronize();
  }
  query(): boolean {
    return this.handle.query();
  }
  /**
   * Work queued on `stream` (default: the device's current stream) after this call waits for the
   * event; the host does not wait. Nothing to wait for on the CPU.
   */
  wait(stream?: Stream): void {
    if (stream !== undefined) checkStream(stream, 'Event.wait');
    this.handle.block(stream ? stream.handle : null);
  }
  /** Milliseconds from this event to `end` (both created with `timing: true`, recorded and complete). */
  elapsedTime(end: Event): number {
    const op = 'Event.elapsedTime';
    checkEvent(end, op, 'end');
    const handle = this.handle;
    // CPU events complete when recorded and hold no time: say so, not that timing was not asked for.
    if (!this.device.isCuda || !end.device.isCuda)
      invalidArgument(op, `events on the CPU hold no times (CPU work completes as it is queued); time events on a CUDA device`);
    if (!this.timing || !end.timing) invalidArgument(op, `both events must be created with { timing: true }`);
    return handle.elapsedTime(end.handle);
  }
  get disposed(): boolean {
    return this.#handle === null;
  }
  dispose(): void {
    this.#handle?.dispose();
    this.#handle = null;
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

const currentStreams = new Map<number, Stream>();

function currentStreamHandle(device: Device): StreamHandle | null {
  if (!device.isCuda) return null;
  const s = currentStreams.get(device.index);
  return s && !s.disposed ? s.handle : null;
}

/** The stream ops on `device` are queued on now (undefined: the device's default stream). */
export function currentStream(device: DeviceLike = getDefaultDevice()): Stream | undefined {
  const d = Device.parse(device, 'currentStream');
  const s = d.isCuda ? currentStreams.get(d.index) : undefined;
  // Disposed inside withStream: ops fall back to the default stream (the addon cleared it).
  return s && !s.disposed ? s : undefined;
}

/**
 * Runs `fn` with `stream` as the current stream of its device: tensors allocated and ops launched
 * on that device inside `fn` use it. The previous stream is restored afterwards, also when `fn`
 * throws, and when it returns a promise, once that settles.
 */
export function withStream<T>(stream: Stream, fn: () => T): T {
  const op = 'withStream';
  checkStream(stream, op);
  if (stream.disposed) throw new DisposedError(`${op}: 'stream' was disposed and cannot be used`, op);
  if (typeof fn !== 'function') invalidArgument(op, `'fn' must be a function`);
  if (!stream.device.isCuda) return fn();
  const index = stream.device.index;
  const previous = currentStreams.get(index);
  const restore = (): void => {
    if (previous) currentStreams.set(index, previous);
    else currentStreams.delete(index);
    native().setCurrentStream(index, previous && !previous.disposed ? previous.handle : null);
  };
  native().setCurrentStream(index, stream.handle);
  currentStreams.set(index, stream);
  let result: T;
  try {
    result = fn();
  } catch (e) {
    restore();
    throw e;
  }
  if (result instanceof Promise) return result.finally(restore) as T;
  restore();
  return result;
}
