/**
 * Dense training ops: RMSNorm and its backward, the MSE and cross-entropy losses, the fused AdamW
 * step, the sum of squares (for a global gradient norm) and DeepSeek-V3's balance-bias update.
 * Each has a CPU reference and a CUDA kernel (native/ops/train/rmsnorm, loss, adamw, sqnorm, balance);
 * this file checks the arguments, allocates the outputs that were not passed in `out`, and calls in.
 * None of them syncs with the host.
 *
 * Shapes and dtypes:
 *   rmsnorm            x [T,H] f32|bf16, weight [H] f32 → y [T,H] (x's dtype), rstd [T] f32
 *   rmsnormBackward    dy [T,H] (x's dtype), x, weight, rstd → dx [T,H] (x's dtype), dWeight [H] f32
 *   mseLoss            pred [T,N] f32|bf16, target [T,N] f32|bf16 → loss f32[1], grad [T,N] (pred's dtype)
 *   crossEntropyLoss   pred [T,N] f32|bf16, target [T] i32 → loss f32[1], grad [T,N], correct i32[1]
 *   adamwStep          param, expAvg, expAvgSq f32, grad f32|bf16 (same numel), paramBf16 bf16 (optional); in place
 *   sumOfSquares       x f32|bf16 (any shape) → f32[1]
 *   balanceBiasUpdate  bias [E] f32 (in place), load [E] i32|f32
 */
import { invalidArgument } from '../errors.js';
import { F32_MIN_NORMAL } from '../dtype.js';
import {
  checkBoolean,
  checkFloat32,
  checkKeys,
  checkMatrix,
  checkNumber,
  checkOptionalTensor,
  checkOptions,
  checkSeparate,
  checkTensor,
  withOutput,
  withOutputs,
} from '../validate.js';
import { native } from '../native.js';
import { Tensor } from '../tensor.js';

// ------------------------------------------------------------------------------------------ RMSNorm

export interface RmsNormOutputs {
  /** [T,H], x's dtype. */
  y: Tensor;
  /** [T] f32: 1/sqrt(mean(x²) + eps) per row, saved for the backward. */
  rstd: Tensor;
}

export interface RmsNormOptions {
  /** Added to mean(x²) under the square root. Default 1e-6. */
  eps?: number;
  out?: Partial<RmsNormOutputs>;
}

/** RMSNorm over the last dimension: y = x / sqrt(mean(x²) + eps) · weight. */
export function rmsnorm(x: Tensor, weight: Tensor, options: RmsNormOptions = {}): RmsNormOutputs {
  const op = 'rmsnorm';
  options = checkOptions(options, op, { eps: true, out: true });
  checkTensor(x, op, 'x');
  checkTensor(weight, op, 'weight');
  const [T] = checkMatrix(x, op, 'x');
  const eps = checkNumber(options.eps ?? 1e-6, op, 'eps', { min: 0 });
  return withOutputs<RmsNormOutputs>(
    op,
    options.out,
    {
      y: () => Tensor.empty(x.shape, { dtype: x.dtype, device: x.device }),
      rstd: () => Tensor.empty([T], { dtype: 'f32', device: x.device }),
    },
    (o) => {
      checkSeparate(op, { 'out.y': o.y, 'out.rstd': o.rstd }, { x, weight });
      native().rmsnormForward(x.handle, weight.handle, eps, o.y.handle, o.rstd.handle);
    },
  );
}

export interface RmsNormGradients {
  /** [T,H], x's dtype. */
  dx: Tensor;
  /** [H] f32. */
  dWeight: Tensor;
}

export interface RmsNormBackwardOptions {
  /** Add into out.dWeight instead of overwriting it (dx is always written). Needs out.dWeight. */
  accumulate?: boolean;
  out?: Partial<RmsNormGradients>;
}

/** Backward of rmsnorm: dx and dWeight from dy, the forward's x and weight and its saved rstd. */
export function rmsnormBackward(
  dy: Tensor,
  x: Tensor,
  weight: Tensor,
  rstd: Tensor,
  options: RmsNormBackwardOptions = {},
): RmsNormGradients {
  const op = 'rmsnormBackward';
  options = checkOptions(options, op, { accumulate: true, out: true });
  checkTensor(dy, op, 'dy');
  checkTensor(x, op, 'x');
  checkTensor(weight, op, 'weight');
  checkTensor(rstd, op, 'rstd');
  const [, H] = checkMatrix(x, op, 'x');
  const accumulate = checkBoolean(options.accumulate ?? false, op, 'accumulate');
  if (accumulate && options.out?.dWeight === undefined) invalidArgument(op, `'accumulate' needs 'out.dWeight' to add into`);
  return withOutputs<RmsNormGradients>(
    op,
    options.out,
    {
      dx: () => Tensor.empty(x.shape, { dtype: x.dtype, device: x.device }),
      dWeight: () => Tensor.empty([H], { dtype: 'f32', device: x.device }),
    },
    (o) => {
      checkSeparate(op, { 'out.dx': o.dx, 'out.dWeight': o.dWeight }, { dy, x, weight, rstd });
      native().rmsnormBackward(dy.handle, x.handle, weight.handle, rstd.handle, o.dx.handle, o.dWeight.handle, accumulate);
    },
  );
}

// ------------------------------------------------------------------------------------------- losses

export interface LossResult {
  /** f32[1]. */
  loss: Tensor;
  /** d loss / d pred, pred's shape and dtype; null when not asked for. */
  grad: Tensor | null;
}

export interface LossOutputs {
  loss?: Tensor;
  grad?: Tensor;
}

function wantGrad(options: { grad?: boolean; out?: LossOutputs }, op: string): boolean {
  const grad = checkBoolean(options.grad ?? true, op, 'grad');
  if (!grad && options.out?.grad !== undefined) invalidArgument(op, `'out.grad' is given but 'grad' is false`);
  return grad;
}

export interface MseLossOptions {
  /** Also write the gradient. Default true. */
  grad?: boolean;
  out?: LossOutputs;
}

/**
 * MSE: loss = mean over all elements of (pred − target)²; grad = 2(pred − target)/numel. `grad` is a
 * Tensor unless `{ grad: false }` is passed (then null), as the overloads tell TypeScript.
 */
export function mseLoss(pred: Tensor, target: Tensor, options: MseLossOptions & { grad: false }): LossResult & { grad: null };
export function mseLoss(pred: Tensor, target: Tensor, options?: MseLossOptions & { grad?: true }): LossResult & { grad: Tensor };
export function mseLoss(pred: Tensor, target: Tensor, options?: MseLossOptions): LossResult;
export function mseLoss(pred: Tensor, target: Tensor, options: MseLossOptions = {}): LossResult {
  const op = 'mseLoss';
  options = checkOptions(options, op, { grad: true, out: true });
  checkTensor(pred, op, 'pred');
  checkTensor(target, op, 'target');
  const grad = wantGrad(options, op);
  const make: Record<string, () => Tensor> = { loss: () => Tensor.empty([1], { dtype: 'f32', device: pred.device }) };
  if (grad) make['grad'] = () => Tensor.empty(pred.shape, { dtype: pred.dtype, device: pred.device });
  const o = withOutputs<Record<string, Tensor>>(op, options.out, make, (t) => {
    checkSeparate(op, { 'out.loss': t['loss'], 'out.grad': t['grad'] }, { pred, target });
    native().mseLoss(pred.handle, target.handle, (t['loss'] as Tensor).handle, t['grad']?.handle ?? null);
  });
  return { loss: o['loss'] as Tensor, grad: o['grad'] ?? null };
}

export interface CrossEntropyResult extends LossResult {
  /** i32[1]: rows not ignored whose argmax (ties: the lower class) is the target. */
  correct: Tensor;
}

export interface CrossEntropyOptions {
  /** Rows with this target are skipped (no loss, zero gradient, not counted). Default −100. */
  ignoreIndex?: number;
  /** Also write the gradient. Default true. */
  grad?: boolean;
  out?: LossOutputs & { correct?: Tensor };
}

/**
 * Cross-entropy with class targets: loss = mean over non-ignored rows of −log softmax(pred)[target];
 * grad = (softmax − onehot)/count (0 on ignored rows). With every row ignored, loss and grad are 0.
 * A target outside [0, N) that is not ignoreIndex throws on the CPU; on the GPU it makes the loss NaN.
 * `grad` is a Tensor unless `{ grad: false }` is passed (then null), as the overloads tell TypeScript.
 */
export function crossEntropyLoss(
  pred: Tensor,
  target: Tensor,
  options: CrossEntropyOptions & { grad: false },
): CrossEntropyResult & { grad: null };
export function crossEntropyLoss(
  pred: Tensor,
  target: Tensor,
  options?: CrossEntropyOptions & { grad?: true },
): CrossEntropyResult & { grad: Tensor };
export function crossEntropyLoss(pred: Tensor, target: Tensor, options?: CrossEntropyOptions): CrossEntropyResult;
export function crossEntropyLoss(pred: Tensor, target: Tensor, options: CrossEntropyOptions = {}): CrossEntropyResult {
  const op = 'crossEntropyLoss';
  options = checkOptions(options, op, { ignoreIndex: true, grad: true, out: true });
  checkTensor(pred, op, 'pred');
  checkTensor(target, op, 'target');
  const ignoreIndex = options.ignoreIndex ?? -100;
  if (!Number.isInteger(ignoreIndex) || ignoreIndex < -(2 ** 31) || ignoreIndex >= 2 ** 31) {
    invalidArgument(op, `'ignoreIndex' must be an i32 integer; received ${String(ignoreIndex)}`);
  }
  const grad = wantGrad(options, op);
  const make: Record<string, () => Tensor> = {
    loss: () => Tensor.empty([1], { dtype: 'f32', device: pred.device }),
    correct: () => Tensor.empty([1], { dtype: 'i32', device: pred.device }),
  };
  if (grad) make['grad'] = () => Tensor.empty(pred.shape, { dtype: pred.dtype, device: pred.device });
  const o = withOutputs<Record<string, Tensor>>(op, options.out, make, (t) => {
    checkSeparate(op, { 'out.loss': t['loss'], 'out.grad': t['grad'], 'out.correct': t['correct'] }, { pred, target });
    native().crossEntropyLoss(
      pred.handle,
      target.handle,
      ignoreIndex,
      (t['loss'] as Tensor).handle,
      t['grad']?.handle ?? null,
      (t['correct'] as Tensor).handle,
    );
  });
  return { loss: o['loss'] as Tensor, grad: o['grad'] ?? null, correct: o['correct'] as Tensor };
}

// -------------------------------------------------------------------------------------------- AdamW

export interface AdamWOptions {
  lr: number;
  /** Default 0.9. */
  beta1?: number;
  /** Default 0.999. */
  beta2?: number;
  /** Default 1e-8. */
  eps?: number;
  /** Decoupled weight decay: param ← param − lr·weightDecay·param. Default 0. */
  weightDecay?: number;
  /** The step number for bias correction: 1 on the first step. */
  step: number;
  /** Multiplies the gradient before use (e.g. min(1, maxNorm/globalNorm) for clipping). Default 1. */
  gradScale?: number;
  /** bf16 compute copy of param, refreshed in the same kernel. */
  paramBf16?: Tensor;
}

/**
 * One fused AdamW step, in place on param, expAvg, expAvgSq (and paramBf16). With g = gradScale·grad:
 *   param ← param − lr·wd·param;  m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²
 *   param ← param − lr/(1−β1^step) · m / (sqrt(v)/sqrt(1−β2^step) + eps)
 */
export function adamwStep(param: Tensor, grad: Tensor, expAvg: Tensor, expAvgSq: Tensor, options: AdamWOptions): void {
  const op = 'adamw';
  checkTensor(param, op, 'param');
  checkTensor(grad, op, 'grad');
  checkTensor(expAvg, op, 'expAvg');
  checkTensor(expAvgSq, op, 'expAvgSq');
  if (options === null || typeof options !== 'object') invalidArgument(op, `the options (lr, step, ...) must be an object`);
  checkKeys(options, op, {
    lr: true,
    beta1: true,
    beta2: true,
    eps: true,
    weightDecay: true,
    step: true,
    gradScale: true,
    paramBf16: true,
  });
  // The kernel computes in float32: every number must be one (an eps that rounds to 0, or a rate
  // that rounds to infinity, turned every parameter into NaN or infinity).
  const lr = checkFloat32(checkNumber(options.lr, op, 'lr', { min: 0 }), op, 'lr');
  const beta1 = checkNumber(options.beta1 ?? 0.9, op, 'beta1', { min: 0 });
  const beta2 = checkNumber(options.beta2 ?? 0.999, op, 'beta2', { min: 0 });
  if (beta1 >= 1 || beta2 >= 1) invalidArgument(op, `'beta1' = ${beta1} and 'beta2' = ${beta2} must be below 1`);
  const eps = checkFloat32(checkNumber(options.eps ?? 1e-8, op, 'eps', { min: 0, minExclusive: true }), op, 'eps');
  if (eps < F32_MIN_NORMAL) invalidArgument(op, `'eps' = ${eps} is below float32's smallest normal number, ${F32_MIN_NORMAL}`);
  const weightDecay = checkFloat32(checkNumber(options.weightDecay ?? 0, op, 'weightDecay', { min: 0 }), op, 'weightDecay');
  const step = options.step;
  if (!Number.isSafeInteger(step) || step < 1)
    invalidArgument(op, `'step' must be an integer ≥ 1 (the first step is 1); received ${String(step)}`);
  const gradScale = checkFloat32(checkNumber(options.gradScale ?? 1, op, 'gradScale'), op, 'gradScale');
  const paramBf16 = checkOptionalTensor(options.paramBf16, op, 'paramBf16');
  // Each tensor its own memory: the update reads each one once and writes param, the moments and
  // the bf16 copy; two of them in one place would mix (expAvg as expAvgSq gave wrong parameters).
  const written = { param, expAvg, expAvgSq, paramBf16 };
  const names = Object.keys(written) as (keyof typeof written)[];
  names.forEach((name, i) =>
    checkSeparate(op, { [name]: written[name] }, { grad, ...Object.fromEntries(names.slice(i + 1).map((n) => [n, written[n]])) }),
  );
  native().adamwStep(
    param.handle,
    grad.handle,
    expAvg.handle,
    expAvgSq.handle,
    paramBf16?.handle ?? null,
    lr,
    beta1,
    beta2,
    eps,
    weightDecay,
    step,
    gradScale,
  );
}

// ----------------------------------------------------------------------------------- norms, balance

export interface SumOfSquaresOptions {
  /** f32[1] to write (or add) into. */
  out?: Tensor;
  /** Add to out[0] instead of overwriting it. Needs `out`. */
  accumulate?: boolean;
}

/**
 * Σ x² into an f32[1] (added to `out` with `accumulate`): sum it over a model's gradients, all-reduce,
 * and sqrt on the host for the global gradient norm.
 */
export function sumOfSquares(x: Tensor, options: SumOfSquaresOptions = {}): Tensor {
  const op = 'sumOfSquares';
  options = checkOptions(options, op, { out: true, accumulate: true });
  checkTensor(x, op, 'x');
  const accumulate = checkBoolean(options.accumulate ?? false, op, 'accumulate');
  if (accumulate && options.out === undefined) invalidArgument(op, `'accumulate' needs 'out' to add into`);
  return withOutput(
    op,
    options.out,
    () => Tensor.empty([1], { dtype: 'f32', device: x.device }),
    (out) => native().sumOfSquares(x.handle, out.handle, accumulate),
  );
}

/**
 * Auxiliary-loss-free balancing (DeepSeek-V3), in place: bias[e] += gamma·sign(mean(load) − load[e]),
 * sign(0) = 0. `load` [E] (i32 or f32) must already be all-reduced across ranks. Returns `bias`.
 */
export function balanceBiasUpdate(bias: Tensor, load: Tensor, gamma: number): Tensor {
  const op = 'balanceBiasUpdate';
  checkTensor(bias, op, 'bias');
  checkTensor(load, op, 'load');
  checkFloat32(checkNumber(gamma, op, 'gamma'), op, 'gamma');
  native().balanceBiasUpdate(bias.handle, load.handle, gamma);
  return bias;
}
