/**
 * Argument checks for the public functions, in one place and one wording. Each throws an
 * InvalidArgumentError naming the op and the argument — "<op>: '<arg>' must be <what>; received
 * <value>" — and returns the value, narrowed. Options objects are checked for unknown keys (named,
 * with the close match), and outputs a caller did not pass are allocated here (and released again
 * if the op throws).
 *
 * Shapes, dtypes and devices of tensors are checked natively, where the arithmetic is; what a
 * function alone checks (a shape it needs before allocating, a relation between two arguments)
 * stays with it.
 */
import { type DType, DTYPES, F32_MAX } from './dtype.js';
import { DisposedError, invalidArgument, plain, shown, unknownNames } from './errors.js';
// tensor.ts and stream.ts import this module too; their classes are only used when a check runs,
// after every module has loaded.
import { Event, Stream } from './stream.js';
import { Tensor } from './tensor.js';

const received = (v: unknown): string => plain(v);

// ---------------------------------------------------------------------------------- options objects

/**
 * Every field of an options type, each mapped to true. A list typed this way must name exactly the
 * type's fields (the compiler refuses one missing or extra), so a new option cannot be forgotten here.
 */
export type OptionKeys<T> = { readonly [K in keyof Required<T>]: true };

/**
 * Refuses keys of a plain-JavaScript options or config object that its type does not have (a
 * misspelt `capacity_factor` would otherwise be silently ignored), naming them and the close match.
 */
export function checkKeys<T extends object>(options: T, op: string, known: NoInfer<OptionKeys<T>>): T {
  if (options === null || typeof options !== 'object' || Array.isArray(options)) {
    invalidArgument(
      op,
      `'options' must be an object; received ${options === null ? 'null' : Array.isArray(options) ? 'an array' : typeof options}`,
    );
  }
  // Allocation-free when every key is known: this runs on every tensor creation.
  for (const key in options) {
    if (!Object.hasOwn(known, key)) invalidArgument(op, unknownNames(Object.keys(options), Object.keys(known)));
  }
  return options;
}

/** `options` as given, or {} when omitted; anything but a plain object (null, a number…) or an unknown key is refused. */
export function checkOptions<T extends object>(options: T | undefined, op: string, known: NoInfer<OptionKeys<T>>): T {
  if (options === undefined) return {} as T;
  return checkKeys(options, op, known);
}

// ------------------------------------------------------------------------------------------ tensors

export function checkTensor(t: unknown, op: string, arg: string): Tensor {
  if (!Tensor.isTensor(t))
    invalidArgument(
      op,
      `'${arg}' must be a Tensor; received ${t === null ? 'null' : t instanceof Tensor ? 'an object made from Tensor.prototype without its constructor' : typeof t}`,
    );
  if (t.disposed) throw new DisposedError(`${op}: '${arg}' was disposed and cannot be used`, op);
  return t;
}

/** A tensor whose rows the op reads as one dense block (a transposed view would be misread). */
export function checkContiguous(t: Tensor, op: string, arg: string): Tensor {
  if (!t.isContiguous) invalidArgument(op, `'${arg}' must be contiguous (${arg}.contiguous() makes a copy that is)`);
  return t;
}

/**
 * A buffer of `like`'s shape on its device, contiguous, of the gradients' dtype (f32 unless the
 * caller asked for bf16 weight gradients): where a weight's gradient is written or added
 * (backward's `out`).
 */
export function checkGradBuffer(
  op: string,
  arg: string,
  t: unknown,
  like: Tensor,
  dtype: 'f32' | 'bf16' = 'f32',
  dtypeFrom?: string,
): Tensor {
  const buf = checkTensor(t, op, arg);
  if (buf.dtype !== dtype || buf.shape.join() !== like.shape.join() || !buf.device.equals(like.device) || !buf.isContiguous)
    invalidArgument(
      op,
      `'${arg}' must be a contiguous ${dtype}${dtypeFrom ? ` (${dtypeFrom})` : ''} [${like.shape.join(',')}] on ${like.device.toString()}; received ${buf.isContiguous ? '' : 'a strided '}${buf.dtype} [${buf.shape.join(',')}] on ${buf.device.toString()}`,
    );
  return buf;
}

/** checkSeparate for several outputs that must also lie apart from each other. */
export function checkApart(op: string, outputs: Record<string, Tensor>, inputs: Record<string, Tensor | null | undefined>): void {
  const names = Object.keys(outputs);
  for (const [i, n] of names.entries())
    checkSeparate(op, { [n]: outputs[n] }, Object.fromEntries(names.slice(i + 1).map((m) => [m, outputs[m]])));
  checkSeparate(op, outputs, inputs);
}

/**
 * Refuses an output whose memory overlaps an input's (`outputs` and `inputs`: argument name → tensor,
 * absent ones skipped): the kernels read their inputs while they write their outputs, in tiles and
 * out of order, so an output over an input would read values it had already overwritten. Views of
 * one allocation that lie apart are fine. With `sameAllowed` (elementwise ops, which read each
 * element before writing it) an output may also be exactly an input: the same elements.
 */
export function checkSeparate(
  op: string,
  outputs: Record<string, Tensor | null | undefined>,
  inputs: Record<string, Tensor | null | undefined>,
  { sameAllowed = false }: { sameAllowed?: boolean } = {},
): void {
  for (const [o, t] of Object.entries(outputs)) {
    if (!t) continue;
    for (const [i, u] of Object.entries(inputs)) {
      if (!u || !t.overlaps(u)) continue;
      if (!sameAllowed) invalidArgument(op, `'${o}' overlaps '${i}' in memory; the op needs a separate output`);
      if (!t.sameElementsAs(u))
        invalidArgument(op, `'${o}' overlaps '${i}' in memory without being the same elements; use a separate output, or '${i}' itself`);
    }
  }
}

/** A tensor, or undefined when the argument was left out. */
export function checkOptionalTensor(t: unknown, op: string, arg: string): Tensor | undefined {
  return t === undefined ? undefined : checkTensor(t, op, arg);
}

/** Each value of `args` (argument name → value) must be a Tensor. */
export function checkTensors(op: string, args: Record<string, unknown>): void {
  for (const [name, t] of Object.entries(args)) checkTensor(t, op, name);
}

/** A 2-D tensor's [rows, columns]. */
export function checkMatrix(t: Tensor, op: string, arg: string): [number, number] {
  if (t.ndim !== 2) invalidArgument(op, `'${arg}' has shape [${t.shape.join(',')}]; expected 2-D [rows, columns]`);
  return [t.shape[0] as number, t.shape[1] as number];
}

/** A dtype name (one of DTYPES). */
export function checkDType(value: unknown, op: string, arg = 'dtype'): DType {
  if (typeof value !== 'string' || !(DTYPES as readonly string[]).includes(value)) {
    invalidArgument(op, `'${arg}' must be one of ${DTYPES.join(', ')}; received ${shown(value)}`);
  }
  return value as DType;
}

/**
 * An op's `dtype` option, the dtype of a result it allocates: one of `allowed`, or undefined when
 * left out (named 'dtype': refused later, it would be blamed on the 'out' the caller never passed).
 */
export function checkResultDType(value: unknown, op: string, allowed: readonly DType[]): DType | undefined {
  if (value === undefined) return undefined;
  if (!(allowed as readonly unknown[]).includes(value))
    invalidArgument(op, `'dtype' must be one of ${allowed.join(', ')}; received ${shown(value)}`);
  return value as DType;
}

// ------------------------------------------------------------------------------- streams and events

export function checkStream(s: unknown, op: string, arg = 'stream'): Stream {
  if (!(s instanceof Stream)) invalidArgument(op, `'${arg}' must be a Stream; received ${received(s)}`);
  return s;
}

export function checkEvent(e: unknown, op: string, arg: string): Event {
  if (!(e instanceof Event)) invalidArgument(op, `'${arg}' must be an Event; received ${e === null ? 'null' : typeof e}`);
  return e;
}

// -------------------------------------------------------------------------------- numbers and flags

export interface NumberRange {
  /** Refuse ±Infinity as well as NaN (default true). */
  finite?: boolean;
  min?: number;
  /** `min` itself is refused. */
  minExclusive?: boolean;
}

/** A number (finite unless `finite: false`; never NaN), at least (or above) `min` when given. */
export function checkNumber(
  v: unknown,
  op: string,
  arg: string,
  { finite = true, min = -Infinity, minExclusive = false }: NumberRange = {},
): number {
  if (typeof v !== 'number' || Number.isNaN(v) || (finite && !Number.isFinite(v))) {
    invalidArgument(op, `'${arg}' must be a ${finite ? 'finite ' : ''}number; received ${received(v)}`);
  }
  if (v < min || (minExclusive && v === min))
    invalidArgument(op, `'${arg}' = ${v} must be ${minExclusive ? 'greater than' : 'at least'} ${min}`);
  return v;
}

/**
 * A finite number the native code will take as a float32 (a kernel's parameter): beyond float32's
 * range it would become infinity there.
 */
export function checkFloat32(v: number, op: string, arg: string): number {
  if (Math.abs(v) > F32_MAX) invalidArgument(op, `'${arg}' = ${v} is beyond float32's range (the op computes in float32)`);
  return v;
}

/** A finite number ≥ 0. */
export function checkNonNegativeNumber(v: unknown, op: string, arg: string): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0)
    invalidArgument(op, `'${arg}' must be a non-negative finite number; received ${received(v)}`);
  return v;
}

/** A finite number > 0; `hint` follows the requirement in the message. */
export function checkPositiveNumber(v: unknown, op: string, arg: string, hint = ''): number {
  if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0)
    invalidArgument(op, `'${arg}' must be a finite number > 0${hint && ` ${hint}`}; received ${received(v)}`);
  return v;
}

/** A safe integer ≥ 1, below `below` when given (e.g. 2 ** 31 for what the addon takes as i32). */
export function checkPositiveInt(v: unknown, op: string, arg: string, { below = Infinity }: { below?: number } = {}): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 1 || v >= below)
    invalidArgument(
      op,
      `'${arg}' must be ${below === Infinity ? 'a positive integer' : `an integer in [1, ${below - 1}]`}; received ${received(v)}`,
    );
  return v;
}

/** A safe integer ≥ 0; `hint` (say what 0 means) follows the requirement in the message. */
export function checkNonNegativeInt(v: unknown, op: string, arg: string, hint = ''): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0)
    invalidArgument(op, `'${arg}' must be a non-negative integer${hint && ` ${hint}`}; received ${received(v)}`);
  return v;
}

/** A timeout in milliseconds: a safe integer ≥ 0, 0 meaning none. */
export function checkTimeoutMs(v: unknown, op: string, arg = 'timeoutMs'): number {
  return checkNonNegativeInt(v, op, arg, '(0 = no timeout)');
}

export function checkBoolean(v: unknown, op: string, arg: string): boolean {
  if (typeof v !== 'boolean') invalidArgument(op, `'${arg}' must be a boolean; received ${received(v)}`);
  return v;
}

/** One of `allowed` (strings compared as given: an inherited name such as 'toString' is refused). */
export function checkOneOf<T extends string>(v: unknown, op: string, arg: string, allowed: readonly T[]): T {
  if (!(allowed as readonly unknown[]).includes(v))
    invalidArgument(op, `'${arg}' must be one of ${allowed.join(', ')}; received ${received(v)}`);
  return v as T;
}

// ------------------------------------------------------------------------------------------ outputs

/**
 * Takes each output from `given` (checked, named 'out.<key>') or allocates it with `make`, refuses
 * given outputs that overlap each other or `inputs`, runs `fn`, and disposes the tensors allocated
 * here again if `fn` throws.
 */
export function withOutputs<T extends { [K in keyof T]: Tensor }>(
  op: string,
  given: object | undefined,
  make: { [K in keyof T]: () => Tensor },
  fn: (o: T) => void,
  inputs: Record<string, Tensor | null | undefined> = {},
): T {
  if (given !== undefined && (given === null || typeof given !== 'object')) invalidArgument(op, `'out' must be an object of tensors`);
  const made: Tensor[] = [];
  const o = {} as T;
  try {
    const named: Record<string, Tensor> = {};
    for (const key of Object.keys(make) as (keyof T)[]) {
      const g = (given as Record<string, unknown> | undefined)?.[key as string];
      if (g !== undefined) o[key] = (named[`out.${String(key)}`] = checkTensor(g, op, `out.${String(key)}`)) as T[keyof T];
      else {
        const t = make[key]();
        made.push(t);
        o[key] = t as T[keyof T];
      }
    }
    // The caller's outputs lie apart from each other and from the inputs (one written over another
    // would give wrong results, silently).
    checkApart(op, named, inputs);
    fn(o);
  } catch (e) {
    for (const t of made) t.dispose();
    throw e;
  }
  return o;
}

/**
 * The one-output form: `given` (checked, named `arg`, default 'out') or a tensor from `make`; `fn`
 * writes it, and a tensor allocated here is disposed again if `fn` throws.
 */
export function withOutput(op: string, given: unknown, make: () => Tensor, fn: (out: Tensor) => void, arg = 'out'): Tensor {
  const out = given === undefined ? make() : checkTensor(given, op, arg);
  try {
    fn(out);
  } catch (e) {
    if (given === undefined) out.dispose();
    throw e;
  }
  return out;
}
