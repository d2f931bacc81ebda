/**
 * The experts: one SwiGLU FFN per local expert over expert-contiguous rows,
 *   h = silu(a·W1) ⊙ (a·W3);  out = h·W2,
 * on the project's grouped GEMM with the activation fused into the first product's epilogue and
 * its derivative into the backward's.
 *
 * Shapes (E local experts, H hidden, F ffn, M rows grouped by offsets [E+1] i32):
 *   a [M,H] bf16 · w13 [E,H,2F] bf16 (W1 and W3 interleaved by column: 2i ← W1[:,i], 2i+1 ← W3[:,i])
 *   → g [M,2F] (saved pre-activations), h [M,F] · w2 [E,F,H] → out [M,H]
 * `a` may be fp8 rows ({ q, scales }: an fp8 'keep' dispatch); the first GEMM takes them through a
 * bf16 copy (grouped-gemm.ts), or against f32 weights (the CPU) through an f32 copy made here.
 */
import { invalidArgument, shown } from '../errors.js';
import { checkApart, checkBoolean, checkGradBuffer, checkKeys, checkOptions, checkTensor, checkTensors } from '../validate.js';
import { Tensor, tidy } from '../tensor.js';
import { dequantizeFp8, type Fp8Rows } from './fp8.js';
import { Epilogue, groupedGemm, groupedGemmEpilogue } from './grouped-gemm.js';

export interface ExpertsForward {
  out: Tensor;
  /** Saved for backward: pre-activations [M,2F] and activations [M,F]. */
  g: Tensor;
  h: Tensor;
}

export interface ExpertsGrads {
  dA: Tensor;
  dW13: Tensor;
  dW2: Tensor;
}

/**
 * The dtype of the experts' weight gradients. 'f32' (the default) keeps the products' fp32 sums;
 * 'bf16' rounds them once, as torch's autograd does for bf16 weights and Megatron-Core does by
 * default (grad_reduce_in_fp32 off): half the bytes written and kept, and faster dW products, at
 * bf16's precision. Accumulation over micro-batches needs 'f32' (the GEMMs add into f32 only).
 */
export type WeightGradDType = 'f32' | 'bf16';
export const WEIGHT_GRAD_DTYPES: readonly WeightGradDType[] = ['f32', 'bf16'];

/** A WeightGradDType, or an error naming `arg`; `accumulate` needs 'f32'. */
export function checkWeightGradDType(value: unknown, op: string, arg: string, accumulate = false): WeightGradDType {
  if (!WEIGHT_GRAD_DTYPES.includes(value as WeightGradDType))
    invalidArgument(op, `'${arg}' must be one of ${WEIGHT_GRAD_DTYPES.map((d) => `'${d}'`).join(', ')}; received ${shown(value)}`);
  if (accumulate && value !== 'f32')
    invalidArgument(
      op,
      `'accumulate' adds into f32 gradients only; '${arg}' is '${String(value)}' (use 'f32' to accumulate over micro-batches)`,
    );
  return value as WeightGradDType;
}

export interface ExpertsBackwardOptions {
  /**
   * Where dW13 and dW2 go: tensors of w13's and w2's shapes in `gradDtype` (contiguous, on their
   * device), which come back as the result's dW13 and dW2. Without `accumulate` the gradients
   * overwrite them.
   */
  out?: { dW13: Tensor; dW2: Tensor };
  /** Add the weight gradients into `out` (gradient accumulation over micro-batches; f32 only). */
  accumulate?: boolean;
  /** dW13's and dW2's dtype (default 'f32'; see WeightGradDType). */
  gradDtype?: WeightGradDType;
}

/** Interleaves W1 and W3 [E,H,F] (any device, bf16 or f32) into the w13 layout [E,H,2F]. */
export function interleaveW13(w1: Tensor, w3: Tensor): Tensor {
  checkTensor(w1, 'interleaveW13', 'w1');
  checkTensor(w3, 'interleaveW13', 'w3');
  if (w1.ndim !== 3 || w1.shape.join() !== w3.shape.join()) {
    invalidArgument('interleaveW13', `'w1' and 'w3' must both be [E,H,F], got [${w1.shape}] and [${w3.shape}]`);
  }
  if (w1.dtype !== w3.dtype || !w1.device.equals(w3.device))
    invalidArgument(
      'interleaveW13',
      `'w1' and 'w3' must share dtype and device; got ${w1.dtype} on ${w1.device.toString()} and ${w3.dtype} on ${w3.device.toString()}`,
    );
  const [E, H, F] = w1.shape as [number, number, number];
  const w13 = Tensor.empty([E, H, 2 * F], { dtype: w1.dtype, device: w1.device });
  try {
    tidy(() => {
      // A [E,H,F,2] view of w13: slot 0 takes W1, slot 1 takes W3.
      const pairs = w13.view(E, H, F, 2);
      // A strided w1 or w3 (a transposed checkpoint tensor) is copied first: view needs the layout.
      const dense = (t: Tensor): Tensor => (t.isContiguous ? t : t.contiguous());
      pairs.narrow(3, 0, 1).copy_(dense(w1).view(E, H, F, 1));
      pairs.narrow(3, 1, 1).copy_(dense(w3).view(E, H, F, 1));
    });
  } catch (e) {
    w13.dispose(); // those copies can run out of memory
    throw e;
  }
  return w13;
}

/** The rows of fp8 rows, or the tensor itself; fp8 rows are checked to be { q, scales } tensors. */
function rowsTensor(op: string, a: Tensor | Fp8Rows): Tensor {
  if (Tensor.isTensor(a)) return a;
  if (a === null || typeof a !== 'object' || !Tensor.isTensor(a.q) || !Tensor.isTensor(a.scales))
    invalidArgument(op, `'a' must be a Tensor or fp8 rows { q, scales }; received ${a === null ? 'null' : typeof a}`);
  return a.q;
}

/**
 * Forward over expert-contiguous rows. Saved activations take a's dtype (bf16 on the GPU; f32 is
 * accepted on the CPU, where the reference runs in f32 for gradient checks); with fp8 rows, w13's.
 */
export function expertsForward(aRows: Tensor | Fp8Rows, w13: Tensor, w2: Tensor, offsets: Tensor): ExpertsForward {
  const op = 'expertsForward';
  const a = rowsTensor(op, aRows);
  checkShapes(op, { a, w13, w2, offsets });
  const { g, h } = activations(a, aRows, w13, offsets);
  try {
    const out = groupedGemm('NN', h, w2, offsets);
    return { out, g, h };
  } catch (e) {
    g.dispose();
    h.dispose();
    throw e;
  }
}

/**
 * The first half of expertsForward: g and h without the down projection (what a backward needs
 * of a forward that did not keep them, when nothing reads its output: a shared expert's).
 */
export function expertsActivations(aRows: Tensor | Fp8Rows, w13: Tensor, offsets: Tensor): { g: Tensor; h: Tensor } {
  const op = 'expertsActivations';
  const a = rowsTensor(op, aRows);
  checkShapes(op, { a, w13, offsets });
  return activations(a, aRows, w13, offsets);
}

/** g and h of checked arguments: `a` is aRows itself, or its e4m3 rows. */
function activations(a: Tensor, aRows: Tensor | Fp8Rows, w13: Tensor, offsets: Tensor): { g: Tensor; h: Tensor } {
  const M = a.shape[0] as number;
  const F2 = w13.shape[2] as number;
  const dtype = a === aRows ? a.dtype : w13.dtype;
  // The GEMM reads fp8 rows against bf16 weights; f32 weights (the CPU's reference runs) get the
  // rows dequantised here, to the same values.
  let f32Rows: Tensor | null = null;
  const g = Tensor.empty([M, F2], { dtype, device: a.device });
  let h: Tensor | null = null;
  try {
    h = Tensor.empty([M, F2 / 2], { dtype, device: a.device });
    if (a !== aRows && w13.dtype === 'f32') f32Rows = dequantizeFp8(aRows as Fp8Rows, 'f32');
    groupedGemmEpilogue('NN', Epilogue.SwiGLU, f32Rows ?? aRows, w13, offsets, h, g);
    return { g, h };
  } catch (e) {
    g.dispose();
    h?.dispose();
    throw e;
  } finally {
    f32Rows?.dispose();
  }
}

/**
 * The tensor arguments, and the shapes the layer's products agree on: a [M,H], w13 [E,H,2F] and
 * w2 [E,F,H] (the GEMMs check offsets and the rest, under their own names).
 */
function checkShapes(op: string, t: Record<string, unknown>): void {
  checkTensors(op, t);
  const a = t.a as Tensor,
    w13 = t.w13 as Tensor,
    w2 = t.w2 as Tensor | undefined;
  if (w13.ndim !== 3 || (w13.shape[2] as number) % 2 !== 0) {
    invalidArgument(op, `'w13' must be [E,H,2F] (W1 and W3 interleaved: an even last dimension); received [${w13.shape.join(',')}]`);
  }
  const [E, H, F2] = w13.shape as [number, number, number];
  if (a.ndim !== 2 || a.shape[1] !== H)
    invalidArgument(op, `'a' must be [M,${H}] (H from 'w13' [${w13.shape.join(',')}]); received [${a.shape.join(',')}]`);
  if (w2 !== undefined && (w2.ndim !== 3 || w2.shape[0] !== E || w2.shape[1] !== F2 / 2 || w2.shape[2] !== H))
    invalidArgument(op, `'w2' must be [${E},${F2 / 2},${H}] (w13 is [${w13.shape.join(',')}]); received [${w2.shape.join(',')}]`);
}

/**
 * The backward's operands against the weights (the products would otherwise take any K and return
 * gradients of the wrong shape): a and dOut [M,H], saved.g [M,2F] and saved.h [M,F], with H and F
 * from w13 [E,H,2F] (checkShapes has checked w2 against it).
 */
function checkBackwardShapes(a: Tensor, w13: Tensor, dOut: Tensor, saved: { g: Tensor; h: Tensor }): void {
  const op = 'expertsBackward';
  const [, H, F2] = w13.shape as [number, number, number];
  const M = a.shape[0] as number;
  const want: [string, Tensor, number[]][] = [
    ['a', a, [M, H]],
    ['dOut', dOut, [M, H]],
    ['saved.g', saved.g, [M, F2]],
    ['saved.h', saved.h, [M, F2 / 2]],
  ];
  for (const [name, t, shape] of want)
    if (t.ndim !== 2 || t.shape[0] !== shape[0] || t.shape[1] !== shape[1])
      invalidArgument(op, `'${name}' must be [${shape.join(',')}] (M from 'a', H and F from 'w13'); received [${t.shape.join(',')}]`);
}

/**
 * Backward of expertsForward given dOut [M,H]: dA [M,H], dW13 [E,H,2F] and dW2 [E,F,H] in f32 (or
 * bf16 with `gradDtype`).
 * fp8 rows are dequantised for dW13 (the forward's rows, as the forward multiplied them).
 */
export function expertsBackward(
  dOut: Tensor,
  aRows: Tensor | Fp8Rows,
  w13: Tensor,
  w2: Tensor,
  offsets: Tensor,
  saved: { g: Tensor; h: Tensor },
  options: ExpertsBackwardOptions = {},
): ExpertsGrads {
  const op = 'expertsBackward';
  if (saved === null || typeof saved !== 'object') invalidArgument(op, `'saved' must be expertsForward's { g, h }`);
  options = checkOptions(options, op, { out: true, accumulate: true, gradDtype: true });
  const rows = rowsTensor(op, aRows);
  checkShapes(op, { dOut, a: rows, w13, w2, offsets, 'saved.g': saved.g, 'saved.h': saved.h });
  checkBackwardShapes(rows, w13, dOut, saved);
  const accumulate = checkBoolean(options.accumulate ?? false, op, 'accumulate');
  const gradDtype = checkWeightGradDType(options.gradDtype ?? 'f32', op, 'gradDtype', accumulate);
  const into = options.out;
  if (accumulate && into === undefined) invalidArgument(op, `'accumulate' needs 'out' to add into`);
  if (into !== undefined) {
    if (into === null || typeof into !== 'object')
      invalidArgument(op, `'out' must be { dW13, dW2 }: ${gradDtype} tensors for the weight gradients`);
    checkKeys(into, op, { dW13: true, dW2: true });
    const bufs = {
      'out.dW13': checkGradBuffer(op, 'out.dW13', into.dW13, w13, gradDtype),
      'out.dW2': checkGradBuffer(op, 'out.dW2', into.dW2, w2, gradDtype),
    };
    // All before the first product, so a refused call changes nothing.
    checkApart(op, bufs, { dOut, a: rows, 'saved.g': saved.g, 'saved.h': saved.h, w13, w2 });
  }
  const a = rows === aRows ? rows : dequantizeFp8(aRows as Fp8Rows, w13.dtype);
  const M = a.shape[0] as number;
  let dG: Tensor | null = null;
  try {
    dG = Tensor.empty([M, w13.shape[2] as number], { dtype: a.dtype, device: a.device });
    // dh = dOut · W2ᵀ, with dSwiGLU fused: dg1 = dh·g3·silu'(g1), dg3 = dh·silu(g1)
    groupedGemmEpilogue('NT', Epilogue.DSwiGLU, dOut, w2, offsets, dG, saved.g);
    const dA = groupedGemm('NT', dG, w13, offsets);
    // Into the caller's buffers, or added to them by the GEMMs' epilogues (no gradient tensor, no pass of its own).
    const dW13 = groupedGemm('TN', a, dG, offsets, into ? { out: into.dW13, accumulate } : { dtype: gradDtype });
    const dW2 = groupedGemm('TN', saved.h, dOut, offsets, into ? { out: into.dW2, accumulate } : { dtype: gradDtype });
    return { dA, dW13, dW2 };
  } finally {
    dG?.dispose();
    if (a !== rows) a.dispose();
  }
}
