/**
 * Tensor: a typed, shaped view of memory on one device, owning a reference to native storage.
 *
 * Memory is released by dispose() (or `using t = ...`); a view keeps its storage alive until it
 * too is disposed. Garbage collection releases forgotten tensors eventually, but only as a
 * backstop: device memory is scarce and the GC does not see it, so dispose what you create.
 */
import { checkDeviceUsable, Device, type DeviceLike, getDefaultDevice } from './device.js';
import { type DType, dtypeFromCode, dtypeOfArray, dtypeSize, type StorageArray, storageView } from './dtype.js';
import { DisposedError, invalidArgument, shown } from './errors.js';
import { checkDType, checkFloat32, checkNonNegativeInt, checkNumber, checkOptions, checkStream, checkTensor } from './validate.js';
import { native, type TensorHandle } from './native.js';
import { BINARY_OP, DEVICE_TYPE, DTYPE_CODE, RANDOM_KIND } from './native-codes.js';
import { Stream } from './stream.js';

export interface CreateOptions {
  /** Default 'f32' (also when given as undefined). */
  dtype?: DType | undefined;
  /** Default getDefaultDevice() (also when given as undefined). */
  device?: DeviceLike | undefined;
}

export interface RandomOptions extends CreateOptions {
  /** Philox seed; without one the global generator (manualSeed) supplies seed and offset. */
  seed?: number;
  /**
   * With a seed: the counter of the first element (default 0). Element i draws counter offset + i,
   * so a slice of a larger tensor can be generated alone (an expert-parallel rank making its
   * experts' share of the global weights).
   */
  offset?: number;
}

function checkShape(shape: unknown, op: string): number[] {
  if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && (d as number) >= 0)) {
    invalidArgument(op, `'shape' must be an array of non-negative integers; received ${shown(shape)}`);
  }
  return shape as number[];
}

function contiguousStrides(shape: readonly number[]): number[] {
  const strides = new Array<number>(shape.length);
  let acc = 1;
  for (let i = shape.length - 1; i >= 0; i--) {
    strides[i] = acc;
    acc *= Math.max(shape[i] as number, 1);
  }
  return strides;
}

function numelOf(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

/** Integer dtypes narrower than a JS safe integer: the values they hold. */
const INT_RANGE: Partial<Record<DType, [number, number]>> = { i32: [-(2 ** 31), 2 ** 31 - 1], u8: [0, 255] };

/**
 * Open tidy() scopes, innermost last. Every tensor created while a scope is open is recorded in it,
 * so tidy() can dispose the intermediates that the function did not return.
 */
const scopes: Set<Tensor>[] = [];

/**
 * @internal The tensors in `value` (a tensor, or inside arrays and plain objects), as tidy() finds them.
 * Only data properties are followed: a getter is never called, since one may do work (the one-rank
 * dispatch handle's row counts read the offsets back to the host, a whole-device wait).
 */
export function tensorsIn(value: unknown, found: Set<Tensor> = new Set(), depth = 0): Set<Tensor> {
  if (value instanceof Tensor) found.add(value);
  else if (ArrayBuffer.isView(value))
    return found; // typed arrays and Buffers hold numbers (and one descriptor per element)
  else if (Array.isArray(value)) {
    if (depth < 10) for (const v of value) tensorsIn(v, found, depth + 1);
  } else if (depth < 10 && value !== null && typeof value === 'object') {
    for (const d of Object.values(Object.getOwnPropertyDescriptors(value)))
      if (d.enumerable && 'value' in d) tensorsIn(d.value, found, depth + 1);
  }
  return found;
}

/**
 * Runs `fn` and disposes every tensor created inside it except those it returns (a tensor, or
 * tensors inside a returned array or plain object, up to 10 levels deep, through data properties:
 * a tensor reachable only through a getter is disposed, and no getter is called) and those passed
 * to keep(). Intermediates such as views created inline (`a.transpose()`) are released too. Scopes
 * nest; `fn` must be synchronous.
 */
export function tidy<T>(fn: () => T): T {
  if (typeof fn !== 'function') invalidArgument('tidy', `'fn' must be a function; received ${fn === null ? 'null' : typeof fn}`);
  // Refused before it runs: once started, an async function would go on using tensors tidy disposed.
  const kind = Object.prototype.toString.call(fn); // not fn.constructor: a function may have no prototype
  if (kind === '[object AsyncFunction]' || kind === '[object AsyncGeneratorFunction]')
    invalidArgument('tidy', `'fn' is an async function; tidy scopes are synchronous (await outside the scope, or dispose explicitly)`);
  const scope = new Set<Tensor>();
  scopes.push(scope);
  let result: T;
  try {
    result = fn();
  } catch (e) {
    scopes.pop();
    for (const t of scope) t.dispose();
    throw e;
  }
  scopes.pop();
  if (result instanceof Promise) {
    for (const t of scope) t.dispose();
    // A promise from a plain function: its rejection (likely, its tensors now disposed) is this throw's, not an unhandled one.
    result.catch(() => undefined);
    throw new TypeError('tidy: the function returned a promise; tidy scopes are synchronous');
  }
  const kept = tensorsIn(result, new Set());
  const parent = scopes[scopes.length - 1];
  for (const t of scope) {
    if (!kept.has(t)) t.dispose();
    else parent?.add(t);
  }
  return result;
}

/** Exempts a tensor from disposal by the enclosing tidy() scopes. */
export function keep<T extends Tensor>(t: T): T {
  for (const s of scopes) s.delete(t);
  return t;
}

/** The global random stream: calls without an explicit seed draw consecutive counters from it. */
const generator = { seed: 0x5eed, offset: 0 };

/** Seeds the global generator: later rand/randn calls without a seed are reproducible. */
export function manualSeed(seed: number): void {
  checkNonNegativeInt(seed, 'manualSeed', 'seed');
  generator.seed = seed;
  generator.offset = 0;
}

export class Tensor implements Disposable {
  readonly shape: readonly number[];
  readonly strides: readonly number[];
  readonly dtype: DType;
  readonly device: Device;
  readonly isContiguous: boolean;
  #handle: TensorHandle | null;

  /**
   * @internal Wraps a native handle; use the static constructors. `known` skips asking the addon
   * for the layout of a tensor just made here (one N-API round trip less per op output).
   */
  constructor(handle: TensorHandle, known?: { shape: number[]; dtype: DType; device: Device }) {
    this.#handle = handle;
    if (known) {
      this.shape = Object.freeze(known.shape.slice());
      this.strides = Object.freeze(contiguousStrides(known.shape));
      this.dtype = known.dtype;
      this.device = known.device;
      this.isContiguous = true;
    } else {
      const d = handle.describe();
      this.shape = Object.freeze(d.shape);
      this.strides = Object.freeze(d.strides);
      this.dtype = dtypeFromCode(d.dtype);
      this.device = d.deviceType === DEVICE_TYPE.cpu ? Device.cpu : Device.cuda(d.deviceIndex);
      this.isContiguous = d.contiguous;
    }
    scopes[scopes.length - 1]?.add(this);
  }

  // ------------------------------------------------------------------------------ creation
  /** Uninitialised memory (its contents are whatever was there). */
  static empty(shape: readonly number[], options: CreateOptions = {}): Tensor {
    options = checkOptions(options, 'Tensor.empty', { dtype: true, device: true });
    return Tensor.allocate(shape, options, 'empty');
  }

  /** empty() for the creators: their own name in the errors (zeros with dtype 'f64' named empty). */
  private static allocate(shape: readonly number[], options: CreateOptions, op: string): Tensor {
    const dtype = checkDType(options.dtype ?? 'f32', op);
    const device = Device.parse(options.device ?? getDefaultDevice(), op);
    checkDeviceUsable(device, op);
    const dims = checkShape(shape, op);
    return new Tensor(native().tensorEmpty(dims, DTYPE_CODE[dtype], ...device.code), { shape: dims, dtype, device });
  }

  static full(shape: readonly number[], value: number, options: CreateOptions = {}): Tensor {
    options = checkOptions(options, 'Tensor.full', { dtype: true, device: true });
    return Tensor.filled(shape, value, options, 'full');
  }

  private static filled(shape: readonly number[], value: number, options: CreateOptions, op: string): Tensor {
    if (typeof value !== 'number') invalidArgument(op, `'value' must be a number; received ${typeof value}`);
    return Tensor.allocate(shape, options, op).fill_(value);
  }

  static zeros(shape: readonly number[], options: CreateOptions = {}): Tensor {
    options = checkOptions(options, 'Tensor.zeros', { dtype: true, device: true });
    return Tensor.filled(shape, 0, options, 'zeros');
  }

  /** Uniform in [low, high) (default [0, 1)), from the Philox stream `seed`. */
  static rand(shape: readonly number[], options: RandomOptions & { low?: number; high?: number } = {}): Tensor {
    options = checkOptions(options, 'Tensor.rand', { dtype: true, device: true, seed: true, offset: true, low: true, high: true });
    const low = checkRandomParam(options.low ?? 0, 'rand', 'low');
    const high = checkRandomParam(options.high ?? 1, 'rand', 'high');
    const t = Tensor.allocate(shape, options, 'rand');
    return t.random_(RANDOM_KIND.uniform, low, high, options.seed, options.offset);
  }

  /** Normal with `mean` and `std` (default 0 and 1), from the Philox stream `seed`. */
  static randn(shape: readonly number[], options: RandomOptions & { mean?: number; std?: number } = {}): Tensor {
    options = checkOptions(options, 'Tensor.randn', { dtype: true, device: true, seed: true, offset: true, mean: true, std: true });
    const mean = checkRandomParam(options.mean ?? 0, 'randn', 'mean');
    const std = checkRandomParam(options.std ?? 1, 'randn', 'std');
    if (std < 0) invalidArgument('randn', `'std' must be ≥ 0; received ${std}`);
    const t = Tensor.allocate(shape, options, 'randn');
    return t.random_(RANDOM_KIND.normal, mean, std, options.seed, options.offset);
  }

  /**
   * From values: a TypedArray holding the dtype's raw values (Uint16Array for bf16/f16 bits,
   * Uint8Array for fp8 bits), or plain numbers, which are converted (rounded for bf16/f16/fp8).
   * `shape` defaults to [data.length].
   */
  static fromArray(data: ArrayLike<number> | ArrayBufferView, options: CreateOptions & { shape?: readonly number[] } = {}): Tensor {
    const op = 'fromArray';
    options = checkOptions(options, op, { dtype: true, device: true, shape: true });
    const device = Device.parse(options.device ?? getDefaultDevice(), op);
    const length = data !== null && typeof data === 'object' ? (data as ArrayLike<unknown>).length : undefined;
    if (typeof length !== 'number') invalidArgument(op, `'data' must be an array of numbers or a TypedArray`);
    const shape = checkShape(options.shape ?? [length], op);
    if (numelOf(shape) !== length)
      invalidArgument(op, `'data' has ${length} values but shape [${shape.join(',')}] holds ${numelOf(shape)}`);
    let typed = ArrayBuffer.isView(data) ? (data as ArrayBufferView) : undefined;
    if (typed && typed.buffer instanceof SharedArrayBuffer) {
      // The addon takes bytes from an ArrayBuffer only: a TypedArray over shared memory is copied
      // (a DataView has no length: refused above).
      typed = (typed as unknown as { slice(): ArrayBufferView }).slice();
    }
    const implied = typed ? dtypeOfArray(typed) : undefined;
    if (typed instanceof Uint16Array && options.dtype !== 'bf16' && options.dtype !== 'f16') {
      invalidArgument(op, `a Uint16Array holds raw bf16 or f16 bits: pass dtype 'bf16' or 'f16'`);
    }
    const dtype = checkDType(options.dtype ?? implied ?? 'f32', op);
    const raw = typed && rawArrayMatches(typed, dtype);
    if (typed && raw) return new Tensor(native().tensorFromBuffer(typed, shape, DTYPE_CODE[dtype], ...device.code));
    // Plain numbers (or a TypedArray of another type), checked one by one before anything the size
    // of `data` is made (an array-like's length alone may be absurd); then integers go straight into
    // the dtype's own array, other numbers through f32, converted natively (rounded for bf16/f16/fp8).
    const values = data as ArrayLike<unknown>;
    const integral = dtype === 'i32' || dtype === 'i64' || dtype === 'u8';
    const range = INT_RANGE[dtype];
    // Every read goes through valueAt, the copy's too: a getter or a Proxy may answer differently
    // the second time, and the copy must store only what was checked.
    const valueAt = (i: number): number => {
      let v = values[i];
      // A BigInt64Array's values into another integer dtype: as numbers, where a number holds them exactly.
      if (typeof v === 'bigint' && integral) {
        if (v > BigInt(Number.MAX_SAFE_INTEGER) || v < -BigInt(Number.MAX_SAFE_INTEGER))
          invalidArgument(op, `'data'[${i}] = ${v} ${range ? `does not fit ${dtype}` : 'is beyond 2^53: pass a BigInt64Array for i64'}`);
        v = Number(v);
      }
      if (typeof v !== 'number' || (integral && !Number.isInteger(v))) {
        invalidArgument(op, `'data'[${i}] = ${String(v)} is not ${integral ? 'an integer' : 'a number'} (dtype ${dtype})`);
      }
      if (range && (v < range[0] || v > range[1])) invalidArgument(op, `'data'[${i}] = ${v} does not fit ${dtype}`);
      if (dtype === 'i64' && !Number.isSafeInteger(v))
        invalidArgument(op, `'data'[${i}] = ${v} is beyond 2^53, where numbers skip integers: pass a BigInt64Array for i64`);
      return v;
    };
    for (let i = 0; i < length; i++) valueAt(i);
    /** A host array of `length` values of data (a RangeError from an allocation too large for the process named). */
    const copied = <A extends Int32Array | Uint8Array | Float32Array | BigInt64Array>(make: (n: number) => A): A => {
      let a: A;
      try {
        a = make(length);
      } catch (e) {
        if (e instanceof RangeError) invalidArgument(op, `'data': ${length} values do not fit in one host array here (${e.message})`);
        throw e;
      }
      if (a instanceof BigInt64Array) for (let i = 0; i < length; i++) a[i] = BigInt(valueAt(i));
      else if (typed && !(typed instanceof BigInt64Array || typed instanceof BigUint64Array)) a.set(typed as unknown as ArrayLike<number>);
      else for (let i = 0; i < length; i++) a[i] = valueAt(i);
      return a;
    };
    if (dtype === 'i32')
      return new Tensor(
        native().tensorFromBuffer(
          copied((n) => new Int32Array(n)),
          shape,
          DTYPE_CODE.i32,
          ...device.code,
        ),
      );
    if (dtype === 'u8')
      return new Tensor(
        native().tensorFromBuffer(
          copied((n) => new Uint8Array(n)),
          shape,
          DTYPE_CODE.u8,
          ...device.code,
        ),
      );
    if (dtype === 'i64')
      return new Tensor(
        native().tensorFromBuffer(
          copied((n) => new BigInt64Array(n)),
          shape,
          DTYPE_CODE.i64,
          ...device.code,
        ),
      );
    const f32 = copied((n) => new Float32Array(n));
    if (dtype === 'f32') return new Tensor(native().tensorFromBuffer(f32, shape, DTYPE_CODE.f32, ...device.code));
    const host = new Tensor(native().tensorFromBuffer(f32, shape, DTYPE_CODE.f32, ...Device.cpu.code));
    try {
      const out = Tensor.empty(shape, { dtype, device });
      native().copy(out.handle, host.handle);
      return out;
    } finally {
      host.dispose();
    }
  }

  /**
   * @internal A Tensor made by this class (the private slot present), not merely an object whose
   * prototype is Tensor's (`Object.create(Tensor.prototype)` passed instanceof and then threw a raw
   * TypeError reading the slot).
   */
  static isTensor(v: unknown): v is Tensor {
    return v instanceof Tensor && #handle in v;
  }

  // ---------------------------------------------------------------------------- properties
  /** @internal The native handle; throws once disposed. */
  get handle(): TensorHandle {
    return this.live('tensor');
  }
  /** The handle for method `op` (named in the error once disposed, where `handle` names no op). */
  private live(op: string): TensorHandle {
    if (this.#handle === null) throw new DisposedError(`${op}: the tensor was disposed and cannot be used`, op);
    return this.#handle;
  }
  get disposed(): boolean {
    return this.#handle === null;
  }
  get ndim(): number {
    return this.shape.length;
  }
  get numel(): number {
    return numelOf(this.shape);
  }

  // --------------------------------------------------------------------------------- views
  /** Same elements, new shape (one dimension may be -1). Contiguous tensors only. */
  view(...shape: number[]): Tensor {
    return new Tensor(this.live('view').view(shape));
  }
  /** Elements [start, start + length) along `dim`, sharing storage. */
  narrow(dim: number, start: number, length: number): Tensor {
    const handle = this.live('narrow');
    checkDim(this, dim, 'narrow', 'dim');
    return new Tensor(handle.narrow(dim, start, length));
  }
  /** Swaps two dimensions, sharing storage (the result is usually not contiguous). */
  transpose(dim0 = 0, dim1 = 1): Tensor {
    const handle = this.live('transpose');
    checkDim(this, dim0, 'transpose', 'dim0');
    checkDim(this, dim1, 'transpose', 'dim1');
    return new Tensor(handle.transpose(dim0, dim1));
  }
  sharesStorageWith(other: Tensor): boolean {
    const handle = this.live('sharesStorageWith');
    checkTensor(other, 'sharesStorageWith', 'other');
    return handle.sharesStorage(other.handle);
  }
  /**
   * @internal Whether the two reach common memory: the same storage and intersecting byte extents
   * (from the first element to the last; views that interleave without touching count as overlapping).
   * Views of one allocation that lie apart do not.
   */
  overlaps(other: Tensor): boolean {
    if (this.numel === 0 || other.numel === 0 || !this.sharesStorageWith(other)) return false;
    const [a0, a1] = byteExtent(this);
    const [b0, b1] = byteExtent(other);
    return a0 < b1 && b0 < a1;
  }
  /**
   * @internal Whether the two are views of the very same elements: the same storage, first element,
   * shape and strides (an elementwise op may write such an output while it reads the input).
   */
  sameElementsAs(other: Tensor): boolean {
    if (!this.sharesStorageWith(other) || this.numel !== other.numel || this.ndim !== other.ndim) return false;
    if (this.numel === 0) return true;
    return (
      byteExtent(this)[0] === byteExtent(other)[0] &&
      this.shape.every((n, i) => n === other.shape[i]) &&
      this.strides.every((s, i) => s === other.strides[i])
    );
  }
  /**
   * Marks this tensor's memory as used on `stream` (default: its device's current stream). The
   * caching allocator reuses a freed block only on the stream it was allocated for; after this, it
   * also waits until the work queued on `stream` when the tensor is freed has finished. Needed when
   * a tensor crosses streams (CommWork does it for communication's inputs and results). No effect
   * on the CPU.
   */
  recordStream(stream?: Stream): this {
    const handle = this.live('recordStream');
    if (stream !== undefined) checkStream(stream, 'recordStream');
    handle.recordStream(stream ? stream.handle : null);
    return this;
  }

  // ------------------------------------------------------------------------------- copies
  /** A contiguous tensor with these values in `dtype` on `device` (a new tensor, always). */
  copyTo(options: CreateOptions = {}): Tensor {
    options = checkOptions(options, 'Tensor.copyTo', { dtype: true, device: true });
    return this.copied(options, 'copyTo');
  }
  /** copyTo for the methods built on it: their own name in the errors. */
  private copied(options: CreateOptions, op: string): Tensor {
    const handle = this.live(op);
    const out = Tensor.allocate(this.shape, { dtype: options.dtype ?? this.dtype, device: options.device ?? this.device }, op);
    native().copy(out.handle, handle);
    return out;
  }
  /** A copy on `device`. */
  to(device: DeviceLike): Tensor {
    // Left out (or null), `device` would fall through to this tensor's own: a silent same-device copy.
    if (device === undefined || device === null)
      invalidArgument('to', `'device' is required (e.g. 'cpu', 'cuda:0'); received ${String(device)}`);
    return this.copied({ device }, 'to');
  }
  /** Converted to `dtype` (a copy). */
  cast(dtype: DType): Tensor {
    return this.copied({ dtype: checkDType(dtype, 'cast') }, 'cast');
  }
  contiguous(): Tensor {
    return this.copied({}, 'contiguous');
  }
  clone(): Tensor {
    return this.copied({}, 'clone');
  }
  /** Copies `src` into this tensor (shapes must match; dtype and device may differ). */
  copy_(src: Tensor): this {
    checkTensor(this, 'copy', 'dst');
    checkTensor(src, 'copy', 'src');
    withSeparate(this, src, (s) => native().copy(this.handle, s.handle));
    return this;
  }
  /** this += alpha·other in place (same dtype; `other` may be a trailing part of this shape). */
  add_(other: Tensor, alpha = 1): this {
    checkTensor(this, 'add', 'a');
    checkTensor(other, 'add', 'other');
    withSeparate(this, other, (o) => native().binary(BINARY_OP.add, this.handle, o.handle, this.handle, alpha));
    return this;
  }
  fill_(value: number): this {
    native().fill(this.live('fill_'), value);
    return this;
  }
  /** @internal kind RANDOM_KIND.uniform: uniform(p0, p1); RANDOM_KIND.normal: normal(p0, p1). */
  random_(kind: 0 | 1, p0: number, p1: number, seed?: number, offset = 0): this {
    const handle = this.live('random_'); // before the global stream advances
    if (seed === undefined) {
      seed = generator.seed;
      offset = generator.offset;
      generator.offset += this.numel;
    }
    native().random(handle, kind, p0, p1, seed, offset);
    return this;
  }

  // ------------------------------------------------------------------------------ reading
  /** The raw values in row-major order (bf16/f16 as Uint16Array bits). Waits for the device. */
  toArray(): StorageArray {
    return storageView(this.dtype, this.live('toArray').toBuffer());
  }
  /** The values as float32 (converted natively for bf16, f16 and fp8). */
  toFloat32Array(): Float32Array {
    this.live('toFloat32Array');
    if (this.dtype === 'f32') return this.toArray() as Float32Array;
    const f = this.copyTo({ dtype: 'f32', device: 'cpu' });
    try {
      return f.toArray() as Float32Array;
    } finally {
      f.dispose();
    }
  }
  /** Plain numbers (i64 values beyond 2^53 lose precision). */
  toNumbers(): number[] {
    this.live('toNumbers');
    const a = this.dtype === 'i64' ? Array.from(this.toArray() as BigInt64Array, Number) : Array.from(this.toFloat32OrInt());
    return a;
  }
  /** The single value of a one-element tensor. */
  item(): number {
    this.live('item');
    if (this.numel !== 1) invalidArgument('item', `the tensor has ${this.numel} elements; item() needs exactly one`);
    return this.toNumbers()[0] as number;
  }
  private toFloat32OrInt(): ArrayLike<number> {
    return this.dtype === 'i32' || this.dtype === 'u8' ? (this.toArray() as Int32Array | Uint8Array) : this.toFloat32Array();
  }

  // ------------------------------------------------------------------------------ lifetime
  /** Releases this tensor's reference to its memory now. Further use throws DisposedError. */
  dispose(): void {
    this.#handle?.dispose();
    this.#handle = null;
  }
  [Symbol.dispose](): void {
    this.dispose();
  }

  toString(): string {
    if (this.disposed) return 'Tensor(disposed)';
    return `Tensor(${this.dtype}[${this.shape.join(',')}] ${this.device.toString()}${this.isContiguous ? '' : ' strided'})`;
  }
}

function rawArrayMatches(a: ArrayBufferView, dtype: DType): boolean {
  switch (dtype) {
    case 'f32':
      return a instanceof Float32Array;
    case 'bf16':
    case 'f16':
      return a instanceof Uint16Array;
    case 'i32':
      return a instanceof Int32Array;
    case 'i64':
      return a instanceof BigInt64Array;
    case 'u8':
    case 'fp8e4m3':
      return a instanceof Uint8Array;
  }
}

/** [first, last + 1) bytes of a non-empty view within its storage (strides are never negative here). */
function byteExtent(t: Tensor): [number, number] {
  const d = t.handle.describe();
  let last = d.offset;
  d.shape.forEach((n, i) => (last += (n - 1) * (d.strides[i] as number)));
  const size = dtypeSize[t.dtype];
  return [d.offset * size, (last + 1) * size];
}

/**
 * run(src), with src first copied aside when it overlaps dst's memory: the element-wise
 * kernels write dst while they read src, so a transposed or shifted view of dst would read values
 * already overwritten (t.copy_(t.transpose()) gave a wrong matrix). The very same elements (the same
 * tensor, or a view with its offset, shape and strides) are each read before written: no copy.
 */
function withSeparate(dst: Tensor, src: Tensor, run: (src: Tensor) => void): void {
  if (!src.overlaps(dst) || src.sameElementsAs(dst)) {
    run(src);
    return;
  }
  const aside = src.clone();
  try {
    run(aside);
  } finally {
    aside.dispose();
  }
}

/** A dimension of t: an integer in [-ndim, ndim) (the binding would wrap 2^32 to 0). */
function checkDim(t: Tensor, dim: unknown, op: string, arg: string): void {
  if (typeof dim !== 'number' || !Number.isInteger(dim) || dim < -t.ndim || dim >= t.ndim)
    invalidArgument(op, `'${arg}' must be an integer in [${-t.ndim}, ${t.ndim}) for a ${t.ndim}-D tensor; received ${String(dim)}`);
}

/** A distribution's parameter: a finite number within float32's range (the values are drawn in float32). */
function checkRandomParam(v: unknown, op: string, arg: string): number {
  return checkFloat32(checkNumber(v, op, arg), op, arg);
}
