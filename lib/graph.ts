/**
 * CUDA graphs: the work a function queues on a stream, captured once and replayed as one launch
 * (native/core/graph.h, native/addon/graph_binding.cc). A decode step of a few small kernels costs
 * more in launches and host work than on the GPU; replayed from a graph it costs one launch.
 *
 *   const graph = CudaGraph.capture(stream, () => f(x));   // nothing runs yet: the work is recorded
 *   x.copy_(next);                                          // new inputs go into the captured buffers
 *   graph.replay();                                         // runs it; graph.outputs holds f's result
 *
 * What capture needs:
 * - A Stream (the legacy default stream cannot be captured). `fn` runs with it as the current
 *   stream of its device, synchronously (a promise is refused), and its ops are recorded, not run:
 *   the outputs hold their values only after the first replay().
 * - No host waits and no host<->device copies inside `fn`: toArray(), item(), synchronize(),
 *   Tensor.fromArray() of a device tensor, a dropless permute's counts read on the host. Each is
 *   refused with a CudaError naming it; the capture ends cleanly and CudaGraph.capture throws a
 *   GraphCaptureError saying what broke it. The stream is usable afterwards. Errors `fn` catches
 *   itself still fail the capture.
 * - Fixed shapes and addresses: every replay runs the same kernels on the same memory (kernel
 *   options set later do not change a captured graph). Write new inputs into the tensors the
 *   capture read (a device copy) before replay().
 *
 * Memory: tensors allocated inside `fn` come from a pool private to the graph (the caching
 * allocator routes every allocation on a capturing stream there), so no one else can be handed
 * memory the replays write to; `fn`'s temporaries are freed into that pool when `fn` returns
 * (tidy) and reused within the capture. Tensors `fn` returns (`outputs`) are the caller's to
 * dispose and stay valid across replays. dispose() releases the pool to the general cache, ordered
 * after the replays already queued. Tensors made before the capture that the graph reads or writes
 * (inputs, weights, workspaces) must outlive the graph: pass them in `retain` and the graph keeps
 * their memory until it is disposed, whatever happens to the tensors. `poolBytes` is what the pool
 * holds; memoryStats().graphPoolBytes sums all pools.
 *
 * Capture mode: thread-local. Unsafe CUDA calls on this (the capturing) thread fail the capture;
 * other threads (NCCL, MPI helpers) are not restricted, as they would be in global mode.
 */
import { cuda, type Device } from './device.js';
import { CudaError, DisposedError, invalidArgument, InvalidArgumentError } from './errors.js';
import { type GraphHandle, native } from './native.js';
import { Stream, withStream } from './stream.js';
import { Tensor, tidy } from './tensor.js';
import { checkOptions, checkStream, checkTensor } from './validate.js';

export interface CaptureOptions {
  /**
   * Tensors made before the capture that the graph reads or writes (inputs, weights, buffers): the
   * graph keeps their memory alive until it is disposed, and frees it after its replays, even if the
   * tensors were disposed first.
   */
  retain?: readonly Tensor[];
}

/** A capture failed: the message says what broke it; `cause` is the error `fn` threw, if any. */
export class GraphCaptureError extends CudaError {
  constructor(message: string, op?: string, cause?: unknown) {
    super(message, op);
    if (cause !== undefined) this.cause = cause;
  }
}

export class CudaGraph<R = void> implements Disposable {
  readonly device: Device;
  /** What `fn` returned: tensors allocated in the capture, rewritten by every replay. The caller disposes them. */
  readonly outputs: R;
  #handle: GraphHandle | null;

  private constructor(handle: GraphHandle, device: Device, outputs: R) {
    this.#handle = handle;
    this.device = device;
    this.outputs = outputs;
  }

  /** True when this build has CUDA and a GPU is usable (graphs need both). */
  static isAvailable(): boolean {
    return cuda.isAvailable();
  }

  /**
   * Captures what `fn` queues on `stream` (made the current stream while `fn` runs). Throws
   * GraphCaptureError naming what broke the capture, UnavailableError without CUDA or for a CPU
   * stream. See the module doc.
   */
  static capture<R>(stream: Stream, fn: () => R, options: CaptureOptions = {}): CudaGraph<R> {
    const op = 'CudaGraph.capture';
    options = checkOptions(options, op, { retain: true });
    checkStream(stream, op);
    if (stream.disposed) throw new DisposedError(`${op}: 'stream' was disposed and cannot be used`, op);
    if (typeof fn !== 'function') invalidArgument(op, `'fn' must be a function; received ${fn === null ? 'null' : typeof fn}`);
    const retain = options.retain ?? [];
    if (!Array.isArray(retain)) invalidArgument(op, `'retain' must be an array of tensors`);
    retain.forEach((t, i) => {
      checkTensor(t, op, `retain[${i}]`);
      if (!t.device.equals(stream.device))
        invalidArgument(op, `'retain[${i}]' is on ${t.device.toString()} but 'stream' is on ${stream.device.toString()}`);
    });
    const handle = new (native().GraphHandle)(stream.handle); // the capture is open from here
    // The outer scope owns what fn returns until the capture has ended: if it fails, those
    // tensors (made inside the capture, never run) are disposed with it; tensors fn returns that
    // were made before the capture are not in the scope and stay the caller's.
    const outputs = tidy(() => {
      let r: R;
      try {
        for (const t of retain) handle.retain(t.handle);
        r = withStream(stream, () =>
          tidy(() => {
            const v = fn();
            if (v instanceof Promise) {
              v.catch(() => undefined);
              throw new InvalidArgumentError(
                `${op}: 'fn' returned a promise; a capture is synchronous (it records what fn queues before returning)`,
                op,
              );
            }
            return v;
          }),
        );
      } catch (e) {
        const broken = handle.abortCapture();
        handle.dispose();
        if (broken) {
          throw new GraphCaptureError(
            `${op}: the capture was broken by ${broken}. Nothing was captured and the stream is no longer capturing`,
            op,
            e,
          );
        }
        throw e;
      }
      try {
        handle.endCapture();
      } catch (e) {
        handle.dispose();
        if (e instanceof CudaError) throw new GraphCaptureError(e.message, op, e);
        throw e;
      }
      return r;
    });
    return new CudaGraph(handle, stream.device, outputs);
  }

  /** @internal */
  get handle(): GraphHandle {
    if (this.#handle === null) throw new DisposedError('CudaGraph: the graph was disposed and cannot be used', 'CudaGraph');
    return this.#handle;
  }

  /**
   * Runs the captured work on `stream` (default: the device's current stream), after the work
   * queued there before and after earlier replays of this graph. The host does not wait.
   */
  replay(stream?: Stream): void {
    const op = 'CudaGraph.replay';
    if (stream !== undefined) {
      checkStream(stream, op);
      if (!stream.device.equals(this.device))
        invalidArgument(op, `'stream' is on ${stream.device.toString()} but the graph is on ${this.device.toString()}`);
    }
    this.handle.replay(stream ? stream.handle : null);
  }

  /** Bytes of device memory in the graph's private pool (what it allocated while capturing). */
  get poolBytes(): number {
    return this.handle.poolBytes();
  }
  /** Nodes in the captured graph (kernels, copies, memsets). */
  get nodeCount(): number {
    return this.handle.nodeCount();
  }
  /** replay() calls so far. */
  get replays(): number {
    return this.handle.replays();
  }
  get disposed(): boolean {
    return this.#handle === null;
  }
  /**
   * Frees the graph and releases its pool (and what it retained) to the caching allocator, ordered
   * after the replays already queued; the host does not wait. `outputs` stay the caller's.
   */
  dispose(): void {
    this.#handle?.dispose();
    this.#handle = null;
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
