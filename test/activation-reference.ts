// The activations of ops.relu/silu/gelu and their gradients in float64, written from their
// definitions (torch's F.relu, F.silu, F.gelu), as the oracle of the CPU reference (test 03); the
// tolerance by which an fp32 computation rounded into a dtype may differ from it; and the public ops
// by name, for test 03 and GPU test 01.
import { type DType, ops, type Tensor } from '../lib/index.js';

export type ActivationName = 'relu' | 'silu' | 'gelu' | 'geluTanh';
export const ACTIVATIONS: readonly ActivationName[] = ['relu', 'silu', 'gelu', 'geluTanh'];

/** The public op for each activation: forward and backward. */
export const ACTIVATION_OPS: Record<
  ActivationName,
  { forward: (x: Tensor, out: Tensor) => Tensor; backward: (dy: Tensor, x: Tensor, out: Tensor) => Tensor }
> = {
  relu: { forward: (x, out) => ops.relu(x, { out }), backward: (dy, x, out) => ops.reluBackward(dy, x, { out }) },
  silu: { forward: (x, out) => ops.silu(x, { out }), backward: (dy, x, out) => ops.siluBackward(dy, x, { out }) },
  gelu: { forward: (x, out) => ops.gelu(x, { out }), backward: (dy, x, out) => ops.geluBackward(dy, x, { out }) },
  geluTanh: {
    forward: (x, out) => ops.gelu(x, { out, approximate: 'tanh' }),
    backward: (dy, x, out) => ops.geluBackward(dy, x, { out, approximate: 'tanh' }),
  },
};

/** erf(x) to about 1e-13: its Maclaurin series below 2.5, 1 − erfc(x) by erfc's continued fraction above. */
export function erf(x: number): number {
  if (Number.isNaN(x)) return NaN;
  const a = Math.abs(x);
  if (a < 2.5) {
    let term = x;
    let sum = x;
    for (let n = 1; n < 200; n++) {
      term *= (-x * x) / n;
      const add = term / (2 * n + 1);
      sum += add;
      if (Math.abs(add) < 1e-17 * Math.abs(sum)) break;
    }
    return (2 / Math.sqrt(Math.PI)) * sum;
  }
  if (a === Infinity) return Math.sign(x);
  // erfc(a) = exp(−a²)/√π · 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + …)))), evaluated from the tail.
  let frac = a;
  for (let n = 120; n >= 1; n--) frac = a + n / 2 / frac;
  const erfc = Math.exp(-a * a) / Math.sqrt(Math.PI) / frac;
  return Math.sign(x) * (1 - erfc);
}

const SQRT_2_OVER_PI = Math.sqrt(2 / Math.PI);
const GELU_CUBIC = 0.044715;

/** f(x) in float64. */
export function activationRef(kind: ActivationName, x: number): number {
  switch (kind) {
    case 'relu':
      return x > 0 || Number.isNaN(x) ? x : 0;
    case 'silu':
      return x / (1 + Math.exp(-x));
    case 'gelu':
      return 0.5 * x * (1 + erf(x / Math.SQRT2));
    case 'geluTanh':
      return 0.5 * x * (1 + Math.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x ** 3)));
  }
}

/** dy·f'(x) in float64 (relu: dy unless x ≤ 0, so a NaN x passes dy, as torch). */
export function activationGradRef(kind: ActivationName, dy: number, x: number): number {
  switch (kind) {
    case 'relu':
      return x <= 0 ? 0 : dy;
    case 'silu': {
      const s = 1 / (1 + Math.exp(-x));
      return dy * s * (1 + x * (1 - s));
    }
    case 'gelu':
      return dy * (0.5 * (1 + erf(x / Math.SQRT2)) + (x * Math.exp(-0.5 * x * x)) / Math.sqrt(2 * Math.PI));
    case 'geluTanh': {
      // An infinite x gives NaN (0·inf), as the erf form and torch.
      const t = Math.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x ** 3));
      return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * GELU_CUBIC * x * x));
    }
  }
}

/**
 * How far an fp32 evaluation stored in `dtype` may be from the exact value `ref`: one unit in the
 * last place of the dtype (the final rounding, a tie allowed either way; for f32 a few ulp of expf,
 * erff and tanhf), plus an absolute 1e-6·(1 + min(|x|, 100))·|dy| for the cancellation in 1 + erf and 1 + tanh
 * where x ≪ 0 (values near 0 computed from terms near 1) and f16's subnormals.
 */
export function activationTolerance(dtype: DType, ref: number, x: number, dy = 1): number {
  const relative = dtype === 'bf16' ? 2 ** -7 : dtype === 'f16' ? 2 ** -10 : 4e-6;
  return relative * Math.abs(ref) + 1e-6 * (1 + Math.min(Math.abs(x), 100)) * Math.max(1, Math.abs(dy));
}

/** The first index where `got` is not `ref` within the tolerance (NaN and infinities exactly), or -1. */
export function firstActivationMismatch(dtype: DType, got: number[], ref: number[], xs: number[], dys?: number[]): number {
  return got.findIndex((g, i) => {
    const r = ref[i] as number;
    // NaN and infinite results, and every result of a NaN or infinite x (relu's backward passes dy there), exactly.
    if (!Number.isFinite(r) || !Number.isFinite(xs[i] as number)) return !(g === r || (Number.isNaN(g) && Number.isNaN(r)));
    return !(Math.abs(g - r) <= activationTolerance(dtype, r, xs[i] as number, dys?.[i]));
  });
}
