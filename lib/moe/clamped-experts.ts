/**
 * gpt-oss's experts, forward and backward: biases after both projections and the clamped SwiGLU
 * between (lib/moe/expert-bias-activation.ts), over expert-contiguous rows:
 *   g = a·W13 + b13[e]   [M,2F], gate and up interleaved by column (w13's layout)
 *   h = clampedSwiglu(g) [M,F]
 *   out = h·W2 + b2[e]   [M,H]
 * The grouped GEMM runs without an epilogue; the biases (where given: gpt-oss's expertBias) and
 * the activation are passes of their own. Backward: dW2 = hᵀ·dOut, db2 = Σ rows of dOut, dh = dOut·W2ᵀ, dg = clampedSwigluBackward,
 * db13 = Σ rows of dg, dW13 = aᵀ·dg, dA = dg·W13ᵀ (weight and bias gradients in f32; the weights'
 * in bf16 with `gradDtype`).
 */
import { invalidArgument } from '../errors.js';
import { checkApart, checkBoolean, checkGradBuffer, checkKeys, checkOptions, checkTensors } from '../validate.js';
import { Tensor } from '../tensor.js';
import { clampedSwiglu, clampedSwigluBackward, expertBias, expertBiasBackward } from './expert-bias-activation.js';
import { checkWeightGradDType, type WeightGradDType } from './experts.js';
import { groupedGemm } from './grouped-gemm.js';

/** The experts' weights: w13 [E,H,2F], w2 [E,F,H], and their biases w13Bias [E,2F], w2Bias [E,H] or none (one dtype). */
export interface ClampedExpertWeights {
  w13: Tensor;
  w2: Tensor;
  w13Bias?: Tensor | null;
  w2Bias?: Tensor | null;
}

/** The clamped SwiGLU's constants (gpt-oss: alpha 1.702, limit 7). */
export interface ClampedActivation {
  alpha: number;
  limit: number;
}

export interface ClampedExpertsForward {
  out: Tensor;
  /** Saved for backward: the first projection with its bias [M,2F], and the activations [M,F]. */
  g: Tensor;
  h: Tensor;
}

export interface ClampedExpertsGrads {
  dA: Tensor;
  dW13: Tensor;
  dW2: Tensor;
  /** Null without biases. */
  dW13Bias: Tensor | null;
  dW2Bias: Tensor | null;
}

/** Write g [M,2F], h [M,F] and out [M,H] here (a's dtype and device, contiguous) instead of new tensors. */
export interface ClampedExpertsForwardOptions {
  into?: { g: Tensor; h: Tensor; out: Tensor };
}

/**
 * Where the weight and bias gradients go (f32, of their weights' shapes), added with `accumulate`;
 * without the bias buffers the biases' gradients (with biases) are new tensors.
 */
export interface ClampedExpertsBackwardOptions {
  /** Where the gradients go: dW13 and dW2 in `gradDtype`, the biases' in f32. */
  out?: { dW13: Tensor; dW2: Tensor; dW13Bias?: Tensor; dW2Bias?: Tensor };
  /** Add into `out` (f32 weight gradients only). */
  accumulate?: boolean;
  /** dW13's and dW2's dtype (default 'f32'; experts.ts's WeightGradDType). The biases' stay f32. */
  gradDtype?: WeightGradDType;
}

/**
 * The weights' shapes against each other and the rows: a [M,H], w13 [E,H,2F], w2 [E,F,H], biases
 * [E,2F] and [E,H] (both or neither). Returns whether there are biases.
 */
function checkWeights(op: string, a: Tensor, w: ClampedExpertWeights, offsets: Tensor): boolean {
  if (w === null || typeof w !== 'object') invalidArgument(op, `'weights' must be { w13, w2, w13Bias?, w2Bias? }`);
  const biased = w.w13Bias !== undefined && w.w13Bias !== null;
  if (biased !== (w.w2Bias !== undefined && w.w2Bias !== null))
    invalidArgument(op, `'weights.w13Bias' and 'weights.w2Bias' come together: give both or neither`);
  checkTensors(op, {
    a,
    'weights.w13': w.w13,
    'weights.w2': w.w2,
    offsets,
    ...(biased ? { 'weights.w13Bias': w.w13Bias, 'weights.w2Bias': w.w2Bias } : {}),
  });
  if (w.w13.ndim !== 3 || (w.w13.shape[2] as number) % 2 !== 0)
    invalidArgument(op, `'weights.w13' must be [E,H,2F]; received [${w.w13.shape.join(',')}]`);
  const [E, H, F2] = w.w13.shape as [number, number, number];
  const want: [string, Tensor, number[]][] = [
    ['a', a, [a.shape[0] as number, H]],
    ['weights.w2', w.w2, [E, F2 / 2, H]],
    ...(biased
      ? ([
          ['weights.w13Bias', w.w13Bias as Tensor, [E, F2]],
          ['weights.w2Bias', w.w2Bias as Tensor, [E, H]],
        ] as [string, Tensor, number[]][])
      : []),
  ];
  for (const [name, t, shape] of want)
    if (t.shape.join() !== shape.join())
      invalidArgument(
        op,
        `'${name}' must be [${shape.join(',')}] ('weights.w13' is [${w.w13.shape.join(',')}]); received [${t.shape.join(',')}]`,
      );
  return biased;
}

/** Forward over expert-contiguous rows (offsets [E+1]); g and h take a's dtype. */
export function clampedExpertsForward(
  a: Tensor,
  w: ClampedExpertWeights,
  offsets: Tensor,
  act: ClampedActivation,
  options: ClampedExpertsForwardOptions = {},
): ClampedExpertsForward {
  const op = 'clampedExpertsForward';
  const biased = checkWeights(op, a, w, offsets);
  const into = checkOptions(options, op, { into: true }).into;
  if (into !== undefined && (into === null || typeof into !== 'object')) invalidArgument(op, `'into' must be { g, h, out }: tensors`);
  const M = a.shape[0] as number;
  const [, H, F2] = w.w13.shape as [number, number, number];
  const made: Tensor[] = [];
  /** A buffer of the caller's, or a new tensor this call disposes if it fails. */
  const buffer = (given: Tensor | undefined, shape: number[]): Tensor => {
    if (given !== undefined) return given;
    const t = Tensor.empty(shape, { dtype: a.dtype, device: a.device });
    made.push(t);
    return t;
  };
  try {
    const g = groupedGemm('NN', a, w.w13, offsets, { out: buffer(into?.g, [M, F2]) });
    if (biased) expertBias(g, w.w13Bias as Tensor, offsets);
    const h = clampedSwiglu(g, { alpha: act.alpha, limit: act.limit, out: buffer(into?.h, [M, F2 / 2]) });
    const out = groupedGemm('NN', h, w.w2, offsets, { out: buffer(into?.out, [M, H]) });
    if (biased) expertBias(out, w.w2Bias as Tensor, offsets);
    return { out, g, h };
  } catch (e) {
    for (const t of made) t.dispose();
    throw e;
  }
}

/** Backward of clampedExpertsForward given dOut [M,H] (see the module doc). */
export function clampedExpertsBackward(
  dOut: Tensor,
  a: Tensor,
  w: ClampedExpertWeights,
  offsets: Tensor,
  saved: { g: Tensor; h: Tensor },
  act: ClampedActivation,
  options: ClampedExpertsBackwardOptions = {},
): ClampedExpertsGrads {
  const op = 'clampedExpertsBackward';
  const biased = checkWeights(op, a, w, offsets);
  if (saved === null || typeof saved !== 'object') invalidArgument(op, `'saved' must be clampedExpertsForward's { g, h }`);
  checkTensors(op, { dOut, 'saved.g': saved.g, 'saved.h': saved.h });
  const M = a.shape[0] as number;
  const [, H, F2] = w.w13.shape as [number, number, number];
  for (const [name, t, shape] of [
    ['dOut', dOut, [M, H]],
    ['saved.g', saved.g, [M, F2]],
    ['saved.h', saved.h, [M, F2 / 2]],
  ] as const)
    if (t.shape.join() !== shape.join()) invalidArgument(op, `'${name}' must be [${shape.join(',')}]; received [${t.shape.join(',')}]`);
  options = checkOptions(options, op, { out: true, accumulate: true, gradDtype: true });
  const accumulate = checkBoolean(options.accumulate ?? false, op, 'accumulate');
  const gradDtype = checkWeightGradDType(options.gradDtype ?? 'f32', op, 'gradDtype', accumulate);
  const into = options.out;
  if (accumulate && into === undefined) invalidArgument(op, `'accumulate' needs 'out' to add into`);
  if (into !== undefined) {
    if (into === null || typeof into !== 'object')
      invalidArgument(op, `'out' must be { dW13, dW2, dW13Bias, dW2Bias }: ${gradDtype} weight and f32 bias gradients`);
    checkKeys(into, op, { dW13: true, dW2: true, dW13Bias: true, dW2Bias: true });
    if ((into.dW13Bias === undefined) !== (into.dW2Bias === undefined))
      invalidArgument(op, `'out.dW13Bias' and 'out.dW2Bias' come together: give both or neither`);
    if (into.dW13Bias && !biased) invalidArgument(op, `'out.dW13Bias' and 'out.dW2Bias' were given but the weights have no biases`);
    const bufs: Record<string, Tensor> = {
      'out.dW13': checkGradBuffer(op, 'out.dW13', into.dW13, w.w13, gradDtype),
      'out.dW2': checkGradBuffer(op, 'out.dW2', into.dW2, w.w2, gradDtype),
      ...(into.dW13Bias && into.dW2Bias
        ? {
            'out.dW13Bias': checkGradBuffer(op, 'out.dW13Bias', into.dW13Bias, w.w13Bias as Tensor),
            'out.dW2Bias': checkGradBuffer(op, 'out.dW2Bias', into.dW2Bias, w.w2Bias as Tensor),
          }
        : {}),
    };
    checkApart(op, bufs, {
      dOut,
      a,
      'saved.g': saved.g,
      'saved.h': saved.h,
      w13: w.w13,
      w2: w.w2,
      w13Bias: w.w13Bias ?? null,
      w2Bias: w.w2Bias ?? null,
    });
  }
  const gemmOut = (buf: Tensor | undefined) => (buf ? { out: buf, accumulate } : { dtype: gradDtype });
  const made: Tensor[] = [];
  const keep = <T extends Tensor>(t: T): T => {
    made.push(t);
    return t;
  };
  let dh: Tensor | null = null;
  let dg: Tensor | null = null;
  try {
    const dW2 = keep(groupedGemm('TN', saved.h, dOut, offsets, gemmOut(into?.dW2)));
    const biasGrad = (d: Tensor, buf: Tensor | undefined): Tensor | null =>
      biased ? keep(expertBiasBackward(d, offsets, buf ? { out: buf, accumulate } : {})) : null;
    const dW2Bias = biasGrad(dOut, into?.dW2Bias);
    dh = groupedGemm('NT', dOut, w.w2, offsets, { dtype: a.dtype });
    dg = clampedSwigluBackward(dh, saved.g, { alpha: act.alpha, limit: act.limit });
    const dW13Bias = biasGrad(dg, into?.dW13Bias);
    const dW13 = keep(groupedGemm('TN', a, dg, offsets, gemmOut(into?.dW13)));
    const dA = groupedGemm('NT', dg, w.w13, offsets, { dtype: a.dtype });
    return { dA, dW13, dW2, dW13Bias, dW2Bias };
  } catch (e) {
    // The caller's buffers stay the caller's.
    for (const t of made) if (!into || !Object.values(into).includes(t)) t.dispose();
    throw e;
  } finally {
    dh?.dispose();
    dg?.dispose();
  }
}
