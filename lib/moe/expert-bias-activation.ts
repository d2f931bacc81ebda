/**
 * The experts' biases and gpt-oss's clamped SwiGLU, for experts that are not plain SwiGLU MLPs
 * (gpt-oss: h13 = a·W13 + b13[e]; h = clampedSwiglu(h13); out = h·W2 + b2[e]). The grouped GEMM
 * runs without an epilogue; these ops work on its output rows in the expert-contiguous layout.
 *
 *   expertBias(rows [M,N], bias [E,N], offsets [E+1] i32)   rows[r] += bias[e] for offsets[e] ≤ r < offsets[e+1]
 *   clampedSwiglu(h13 [M,2F]) → [M,F]                        gate and up interleaved by column (w13's layout):
 *       g = min(gate, limit); u = clamp(up, −limit, limit); h = (u + 1) · g · sigmoid(alpha · g)
 *
 * Backward (training):
 *   expertBiasBackward(dRows [M,N], offsets) → dBias [E,N] f32     Σ of each expert's rows, in order
 *   clampedSwigluBackward(dh [M,F], h13 [M,2F]) → dh13 [M,2F]      a clamp passes the gradient within
 *       its bounds, ends included (torch.clamp's backward); ∂h/∂g = (u + 1)·(s + alpha·g·s·(1 − s)),
 *       ∂h/∂u = g·s, s = sigmoid(alpha·g)
 *
 * fp32 math, one rounding into the tensors' dtype (f32, bf16 or f16). The offsets stay on the
 * device (no host read): the kernels clamp each expert's range into the rows, so rows past
 * offsets[E] (capacity padding) are left as they are.
 */
import { invalidArgument } from '../errors.js';
import { native } from '../native.js';
import { Tensor } from '../tensor.js';
import {
  checkBoolean,
  checkFloat32,
  checkNumber,
  checkOneOf,
  checkOptions,
  checkSeparate,
  checkTensor,
  checkTensors,
  withOutput,
} from '../validate.js';

/** The experts' activations: SwiGLU (fused into the grouped GEMM) or gpt-oss's clamped SwiGLU. */
export type ExpertActivationKind = 'swiglu' | 'clamped-swiglu';
export const EXPERT_ACTIVATIONS: readonly ExpertActivationKind[] = ['swiglu', 'clamped-swiglu'];

/** gpt-oss's constants (its config's swiglu_limit is the limit). */
export const GPT_OSS_ALPHA = 1.702;
export const GPT_OSS_LIMIT = 7;

/** gpt-oss's options, which both layers take (MoELayer's and MoEInference's). */
export interface ExpertBlockOptions {
  /** A bias [E] f32 on the router's logits (it chooses and weighs). Default false. */
  routerBias?: boolean;
  /** The experts' biases after each projection, [El,2F] (interleaved as w13) and [El,H]; needs 'clamped-swiglu'. Default false. */
  expertBias?: boolean;
  /**
   * The experts' activation: 'swiglu' (default: silu(gate)·up, fused into the first grouped GEMM)
   * or 'clamped-swiglu', gpt-oss's (clamp(u, ±limit) + 1)·g·sigmoid(alpha·g), g = min(gate, limit),
   * with `swigluAlpha` (1.702) and `swigluLimit` (7).
   */
  activation?: ExpertActivationKind;
  swigluAlpha?: number;
  swigluLimit?: number;
}

/** Their keys, for the layers' lists of the config keys they take. */
export const EXPERT_OPTION_KEYS = { routerBias: true, expertBias: true, activation: true, swigluAlpha: true, swigluLimit: true } as const;

/**
 * Those options checked and resolved, errors naming the field under `op`: the constants belong to
 * the clamped activation, and the experts' biases need it (the plain SwiGLU is fused into the
 * grouped GEMM's epilogue, where no bias can go before it).
 */
export function resolveExpertOptions(config: ExpertBlockOptions, op: string): Required<ExpertBlockOptions> {
  const routerBias = checkBoolean(config.routerBias ?? false, op, 'routerBias');
  const expertBias = checkBoolean(config.expertBias ?? false, op, 'expertBias');
  const activation = checkOneOf(config.activation ?? 'swiglu', op, 'activation', EXPERT_ACTIVATIONS);
  if (activation === 'swiglu' && (config.swigluAlpha !== undefined || config.swigluLimit !== undefined))
    invalidArgument(op, `'swigluAlpha' and 'swigluLimit' set the 'clamped-swiglu' activation; the activation is 'swiglu'`);
  const swigluAlpha = checkFloat32(checkNumber(config.swigluAlpha ?? GPT_OSS_ALPHA, op, 'swigluAlpha'), op, 'swigluAlpha');
  const swigluLimit = checkNumber(config.swigluLimit ?? GPT_OSS_LIMIT, op, 'swigluLimit', { finite: false, min: 0, minExclusive: true });
  if (expertBias && activation === 'swiglu')
    invalidArgument(
      op,
      `'expertBias' needs the 'clamped-swiglu' activation (gpt-oss's): the fused SwiGLU has no place for a bias before it`,
    );
  return { routerBias, expertBias, activation, swigluAlpha, swigluLimit };
}

/** Adds each row's expert bias in place (`rows` returned). */
export function expertBias(rows: Tensor, bias: Tensor, offsets: Tensor): Tensor {
  const op = 'expertBias';
  checkTensors(op, { rows, bias, offsets });
  // Written in place: a bias or offsets inside the rows would change as they are read.
  checkSeparate(op, { rows }, { bias, offsets });
  native().expertBias(rows.handle, bias.handle, offsets.handle);
  return rows;
}

export interface ClampedSwigluOptions {
  /** The sigmoid's slope (default gpt-oss's 1.702). */
  alpha?: number;
  /** The clamp (default gpt-oss's 7; Infinity: none). */
  limit?: number;
  /** Write h [M,F] here. */
  out?: Tensor;
}

/** h [M,F] from h13 [M,2F] (see the module doc). */
export function clampedSwiglu(h13: Tensor, options: ClampedSwigluOptions = {}): Tensor {
  const op = 'clampedSwiglu';
  options = checkOptions(options, op, { alpha: true, limit: true, out: true });
  checkTensor(h13, op, 'h13');
  const alpha = checkFloat32(checkNumber(options.alpha ?? GPT_OSS_ALPHA, op, 'alpha'), op, 'alpha');
  const limit = checkNumber(options.limit ?? GPT_OSS_LIMIT, op, 'limit', { finite: false, min: 0, minExclusive: true });
  if (h13.ndim !== 2 || (h13.shape[1] as number) % 2 !== 0)
    invalidArgument(op, `'h13' [${h13.shape.join(',')}] must be [M, 2F]: gate and up interleaved by column`);
  const [M, F2] = h13.shape as [number, number];
  return withOutput(
    op,
    options.out,
    () => Tensor.empty([M, F2 / 2], { dtype: h13.dtype, device: h13.device }),
    (out) => {
      // Threads write out[i] while others read h13[2i], h13[2i + 1]: no overlap, not even in place.
      checkSeparate(op, { out }, { h13 });
      native().clampedSwiglu(h13.handle, out.handle, alpha, limit);
    },
  );
}

export interface ExpertBiasBackwardOptions {
  /** Write (or with `accumulate`, add) the gradient here: [E,N] f32. */
  out?: Tensor;
  accumulate?: boolean;
}

/** Each expert's bias gradient [E,N] f32 (E = offsets' length − 1): the sum of its rows of dRows. */
export function expertBiasBackward(dRows: Tensor, offsets: Tensor, options: ExpertBiasBackwardOptions = {}): Tensor {
  const op = 'expertBiasBackward';
  options = checkOptions(options, op, { out: true, accumulate: true });
  checkTensors(op, { dRows, offsets });
  const accumulate = checkBoolean(options.accumulate ?? false, op, 'accumulate');
  if (accumulate && options.out === undefined) invalidArgument(op, `'accumulate' needs 'out' to add into`);
  if (dRows.ndim !== 2 || offsets.ndim !== 1 || (offsets.shape[0] as number) < 1)
    invalidArgument(op, `'dRows' [${dRows.shape.join(',')}] must be [M, N] and 'offsets' [${offsets.shape.join(',')}] [E+1]`);
  const E = (offsets.shape[0] as number) - 1;
  return withOutput(
    op,
    options.out,
    () => Tensor.empty([E, dRows.shape[1] as number], { device: dRows.device }),
    (out) => {
      checkSeparate(op, { out }, { dRows, offsets });
      native().expertBiasBackward(dRows.handle, offsets.handle, out.handle, accumulate);
    },
  );
}

/** dh13 [M,2F] from dh [M,F] and the forward's h13 (see the module doc). */
export function clampedSwigluBackward(dh: Tensor, h13: Tensor, options: ClampedSwigluOptions = {}): Tensor {
  const op = 'clampedSwigluBackward';
  options = checkOptions(options, op, { alpha: true, limit: true, out: true });
  checkTensors(op, { dh, h13 });
  const alpha = checkFloat32(checkNumber(options.alpha ?? GPT_OSS_ALPHA, op, 'alpha'), op, 'alpha');
  const limit = checkNumber(options.limit ?? GPT_OSS_LIMIT, op, 'limit', { finite: false, min: 0, minExclusive: true });
  return withOutput(
    op,
    options.out,
    () => Tensor.empty([...h13.shape], { dtype: h13.dtype, device: h13.device }),
    (out) => {
      checkSeparate(op, { out }, { dh, h13 });
      native().clampedSwigluBackward(dh.handle, h13.handle, out.handle, alpha, limit);
    },
  );
}
