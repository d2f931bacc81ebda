/**
 * Basic ops (the public `ops` namespace: add, mul, scale, sum, max, matmul, the activations relu,
 * silu, gelu with their backward passes, and cat), each with a CPU
 * reference and a CUDA kernel behind it (native/ops/basic/<op>/; cat is copies into views of its
 * result, through the copy kernel). Every op allocates its result unless
 * `out` is given; `out` lets callers reuse memory (and lets tests poison outputs before a run).
 * Shapes, dtypes and devices are checked natively, with errors that name the op and the argument.
 */
import { type DType } from './dtype.js';
import { invalidArgument, plain } from './errors.js';
import { checkNumber, checkOneOf, checkOptions, checkResultDType, checkSeparate, checkTensor, withOutput } from './validate.js';
import { native } from './native.js';
import { ACTIVATION, BINARY_OP, REDUCE_OP } from './native-codes.js';
import { Tensor } from './tensor.js';

export interface OutOption {
  out?: Tensor;
}

/** Allocates the result: a's shape and dtype unless given, on a's device. */
const resultLike =
  (a: Tensor, shape: readonly number[] = a.shape, dtype: DType = a.dtype) =>
  (): Tensor =>
    Tensor.empty(shape, { dtype, device: a.device });

/** out = a + alpha·b. `b` may also be a trailing part of a's shape (a bias over rows). */
export function add(a: Tensor, b: Tensor, options: OutOption & { alpha?: number } = {}): Tensor {
  options = checkOptions(options, 'add', { out: true, alpha: true });
  checkTensor(a, 'add', 'a');
  checkTensor(b, 'add', 'b');
  const alpha = checkNumber(options.alpha ?? 1, 'add', 'alpha', { finite: false });
  return withOutput('add', options.out, resultLike(a), (out) => {
    checkSeparate('add', { out }, { a, b }, { sameAllowed: true });
    native().binary(BINARY_OP.add, a.handle, b.handle, out.handle, alpha);
  });
}

/** out = a ⊙ b (elementwise; `b` may be a trailing part of a's shape). */
export function mul(a: Tensor, b: Tensor, options: OutOption = {}): Tensor {
  options = checkOptions(options, 'mul', { out: true });
  checkTensor(a, 'mul', 'a');
  checkTensor(b, 'mul', 'b');
  return withOutput('mul', options.out, resultLike(a), (out) => {
    checkSeparate('mul', { out }, { a, b }, { sameAllowed: true });
    native().binary(BINARY_OP.mul, a.handle, b.handle, out.handle, 1);
  });
}

/** out = alpha·a. */
export function scale(a: Tensor, alpha: number, options: OutOption = {}): Tensor {
  options = checkOptions(options, 'scale', { out: true });
  checkTensor(a, 'scale', 'a');
  checkNumber(alpha, 'scale', 'alpha', { finite: false });
  return withOutput('scale', options.out, resultLike(a), (out) => {
    checkSeparate('scale', { out }, { a }, { sameAllowed: true });
    native().scale(a.handle, alpha, out.handle);
  });
}

// ---- activations: fp32 math, one rounding into x's dtype (f32, bf16 or f16), as torch defines them.
// Each backward takes the forward's input x (not its output) and returns dx = dy·f'(x).

/** GELU's two forms, torch's `approximate` argument: 'none' x·Φ(x) (erf), 'tanh' its tanh approximation. */
export type GeluApproximate = 'none' | 'tanh';
const GELU_APPROXIMATE: readonly GeluApproximate[] = ['none', 'tanh'];
/** The dtypes a float result (sum, matmul) may be asked for, and an integer sum. */
const FLOAT_RESULTS: readonly DType[] = ['f32', 'bf16', 'f16'];
const INT_RESULTS: readonly DType[] = ['i32', 'i64'];

function geluKind(options: { approximate?: GeluApproximate }, op: string): number {
  const approximate = checkOneOf(options.approximate ?? 'none', op, 'approximate', GELU_APPROXIMATE);
  return approximate === 'tanh' ? ACTIVATION.geluTanh : ACTIVATION.gelu;
}

function activate(kind: number, op: string, x: Tensor, out: Tensor | undefined): Tensor {
  checkTensor(x, op, 'x');
  return withOutput(op, out, resultLike(x), (o) => {
    checkSeparate(op, { out: o }, { x }, { sameAllowed: true });
    native().activation(kind, x.handle, o.handle);
  });
}

function activateBackward(kind: number, op: string, dy: Tensor, x: Tensor, out: Tensor | undefined): Tensor {
  checkTensor(dy, op, 'dy');
  checkTensor(x, op, 'x');
  return withOutput(op, out, resultLike(x), (o) => {
    checkSeparate(op, { out: o }, { dy, x }, { sameAllowed: true });
    native().activationBackward(kind, dy.handle, x.handle, o.handle);
  });
}

/** max(x, 0); NaN stays NaN. `out` may be x. */
export function relu(x: Tensor, options: OutOption = {}): Tensor {
  options = checkOptions(options, 'relu', { out: true });
  return activate(ACTIVATION.relu, 'relu', x, options.out);
}

/** dx = dy where x > 0 (or x is NaN, as torch's threshold_backward), else 0. */
export function reluBackward(dy: Tensor, x: Tensor, options: OutOption = {}): Tensor {
  options = checkOptions(options, 'reluBackward', { out: true });
  return activateBackward(ACTIVATION.relu, 'reluBackward', dy, x, options.out);
}

/** x·σ(x) (SiLU, swish). `out` may be x. */
export function silu(x: Tensor, options: OutOption = {}): Tensor {
  options = checkOptions(options, 'silu', { out: true });
  return activate(ACTIVATION.silu, 'silu', x, options.out);
}

/** dx = dy·σ(x)·(1 + x·(1 − σ(x))). */
export function siluBackward(dy: Tensor, x: Tensor, options: OutOption = {}): Tensor {
  options = checkOptions(options, 'siluBackward', { out: true });
  return activateBackward(ACTIVATION.silu, 'siluBackward', dy, x, options.out);
}

/** x·Φ(x) = ½x(1 + erf(x/√2)), or with `approximate: 'tanh'` ½x(1 + tanh(√(2/π)(x + 0.044715x³))). */
export function gelu(x: Tensor, options: OutOption & { approximate?: GeluApproximate } = {}): Tensor {
  options = checkOptions(options, 'gelu', { out: true, approximate: true });
  return activate(geluKind(options, 'gelu'), 'gelu', x, options.out);
}

/** dx = dy·GELU'(x), for the same `approximate` as the forward. */
export function geluBackward(dy: Tensor, x: Tensor, options: OutOption & { approximate?: GeluApproximate } = {}): Tensor {
  options = checkOptions(options, 'geluBackward', { out: true, approximate: true });
  return activateBackward(geluKind(options, 'geluBackward'), 'geluBackward', dy, x, options.out);
}

function reduced(a: Tensor, dim: number, op: string): number[] {
  if (!Number.isInteger(dim) || dim < -a.ndim || dim >= a.ndim) {
    invalidArgument(op, `'dim' = ${plain(dim)} is out of range for a tensor of rank ${a.ndim}`);
  }
  const d = dim < 0 ? dim + a.ndim : dim;
  return a.shape.filter((_, i) => i !== d);
}

/** Sum along `dim` (that dimension removed). Floating sums accumulate in fp32 or better. */
export function sum(a: Tensor, dim: number, options: OutOption & { dtype?: DType } = {}): Tensor {
  options = checkOptions(options, 'sum', { out: true, dtype: true });
  checkTensor(a, 'sum', 'a');
  // Integers sum into integers, floats into floats (the addon's rule).
  checkResultDType(options.dtype, 'sum', a.dtype === 'i32' || a.dtype === 'i64' ? INT_RESULTS : FLOAT_RESULTS);
  const make = resultLike(a, reduced(a, dim, 'sum'), options.dtype ?? a.dtype);
  return withOutput('sum', options.out, make, (out) => native().reduce(REDUCE_OP.sum, a.handle, dim, out.handle));
}

/** Maximum along `dim` (that dimension removed); NaN propagates. */
export function max(a: Tensor, dim: number, options: OutOption = {}): Tensor {
  options = checkOptions(options, 'max', { out: true });
  checkTensor(a, 'max', 'a');
  const make = resultLike(a, reduced(a, dim, 'max'));
  return withOutput('max', options.out, make, (out) => native().reduce(REDUCE_OP.max, a.handle, dim, out.handle));
}

/** out[M,N] = a[M,K]·b[K,N] (+ out with `accumulate`), fp32 accumulation. Views such as transposes are fine. */
export function matmul(a: Tensor, b: Tensor, options: OutOption & { accumulate?: boolean; dtype?: DType } = {}): Tensor {
  options = checkOptions(options, 'matmul', { out: true, accumulate: true, dtype: true });
  checkResultDType(options.dtype, 'matmul', FLOAT_RESULTS);
  checkTensor(a, 'matmul', 'a');
  checkTensor(b, 'matmul', 'b');
  if (a.ndim !== 2 || b.ndim !== 2) invalidArgument('matmul', `expects 2-D tensors, got [${a.shape.join(',')}] and [${b.shape.join(',')}]`);
  if (options.accumulate && options.out === undefined) invalidArgument('matmul', `'accumulate' needs 'out'`);
  const make = resultLike(a, [a.shape[0] as number, b.shape[1] as number], options.dtype ?? a.dtype);
  return withOutput('matmul', options.out, make, (out) => {
    // The product reads a and b while it writes out: an overlapping out would feed back partial results.
    if (options.out !== undefined && (out.sharesStorageWith(a) || out.sharesStorageWith(b))) {
      invalidArgument('matmul', `'out' shares memory with 'a' or 'b'; the product needs a separate output`);
    }
    native().matmul(a.handle, b.handle, out.handle, options.accumulate ?? false);
  });
}

/**
 * The tensors joined along `dim` (torch.cat): one dtype and device, the same shape but in `dim`
 * (a tensor with 0 there adds nothing). Its backward is narrow views of the gradient:
 * `dy.narrow(dim, offset, n)` for each input. Inputs may be strided views; each is one copy into
 * its slice of the result, by the copy kernel (which takes strided views on both sides).
 */
export function cat(tensors: readonly Tensor[], dim = 0, options: OutOption = {}): Tensor {
  const op = 'cat';
  options = checkOptions(options, op, { out: true });
  if (!Array.isArray(tensors as unknown) || tensors.length === 0) invalidArgument(op, `'tensors' must be a non-empty array of tensors`);
  // An index loop, not forEach: a hole in the array ([a, , b]) is refused as tensors[1], not skipped.
  for (let i = 0; i < tensors.length; i++) checkTensor(tensors[i], op, `tensors[${i}]`);
  const first = tensors[0] as Tensor;
  if (first.ndim === 0) invalidArgument(op, `'tensors[0]' has no dimensions to join along`);
  if (!Number.isInteger(dim) || dim < -first.ndim || dim >= first.ndim)
    invalidArgument(op, `'dim' = ${plain(dim)} is out of range for tensors of rank ${first.ndim}`);
  const d = dim < 0 ? dim + first.ndim : dim;
  let joined = 0;
  tensors.forEach((t, i) => {
    if (t.dtype !== first.dtype) invalidArgument(op, `'tensors[${i}]' is ${t.dtype} but 'tensors[0]' is ${first.dtype}`);
    if (!t.device.equals(first.device))
      invalidArgument(op, `'tensors[${i}]' is on ${t.device.toString()} but 'tensors[0]' is on ${first.device.toString()}`);
    if (t.ndim !== first.ndim || t.shape.some((n, j) => j !== d && n !== first.shape[j]))
      invalidArgument(
        op,
        `'tensors[${i}]' has shape [${t.shape.join(',')}] but 'tensors[0]' has [${first.shape.join(',')}]; they may differ only in dim ${d}`,
      );
    joined += t.shape[d] as number;
  });
  const shape = first.shape.map((n, j) => (j === d ? joined : n));
  return withOutput(op, options.out, resultLike(first, shape), (out) => {
    if (out.shape.join() !== shape.join() || out.dtype !== first.dtype || !out.device.equals(first.device))
      invalidArgument(
        op,
        `'out' must be ${first.dtype} [${shape.join(',')}] on ${first.device.toString()}; received ${out.dtype} [${out.shape.join(',')}] on ${out.device.toString()}`,
      );
    checkSeparate(op, { out }, Object.fromEntries(tensors.map((t, i) => [`tensors[${i}]`, t])));
    let offset = 0;
    for (const t of tensors) {
      const n = t.shape[d] as number;
      if (n > 0 && t.numel > 0) {
        using slice = out.narrow(d, offset, n);
        slice.copy_(t);
      }
      offset += n;
    }
  });
}
