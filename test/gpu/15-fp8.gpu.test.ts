// FP8 row quantisation: the CUDA kernels against the CPU reference (the same conversion code, so
// the fp8 bytes and the scales match exactly); dequantised rows within e4m3 precision.
//
// [4096, 7168] is 29M values: compared as typed arrays with a plain loop, since expect().toEqual on
// arrays that size (and Array.from on them) takes minutes.
import { describe, expect, it } from 'vitest';

import { Tensor, tidy } from '../../lib/index.js';
import { dequantizeFp8, quantizeFp8 } from '../../lib/moe/fp8.js';
import { floats, freshSeed, relErr } from '../helpers.js';
import { hasGpu } from './gpu.js';

/** Where two arrays first differ (-0 and 0 differ, NaN equals NaN), or -1 when identical. */
function firstDifference(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return i;
  return -1;
}
function expectIdentical(a: ArrayLike<number>, b: ArrayLike<number>, what: string): void {
  const i = firstDifference(a, b);
  expect(i, `${what}: first difference at ${i}: ${String(a[i])} vs ${String(b[i])}`).toBe(-1);
}

describe.skipIf(!hasGpu)('fp8 quantisation on the GPU', () => {
  it.each([[1, 128], [4096, 7168], [333, 384]])('[%i, %i] bf16 rows', (R, H) => {
    tidy(() => {
      const c = Tensor.randn([R, H], { seed: freshSeed(), std: 3, device: 'cpu' }).cast('bf16');
      const g = c.to('cuda:0');
      const qc = quantizeFp8(c), qg = quantizeFp8(g);
      expectIdentical(qg.q.toArray() as Uint8Array, qc.q.toArray() as Uint8Array, 'fp8 bytes');
      expectIdentical(floats(qg.scales), floats(qc.scales), 'scales');
      const back = dequantizeFp8(qg, 'bf16');
      expectIdentical(floats(back), floats(dequantizeFp8(qc, 'bf16')), 'dequantised');
      // e4m3 keeps 3 mantissa bits: a relative rounding error of at most 2^-4, RMS about 2.6e-2.
      expect(relErr(floats(back), floats(c))).toBeLessThan(0.05);
    });
  }, 120_000);
});
