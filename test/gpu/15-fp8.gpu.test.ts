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
  it.each([
    [1, 128],
    [4096, 7168],
    [333, 384],
  ])(
    '[%i, %i] bf16 rows',
    (R, H) => {
      tidy(() => {
        const c = Tensor.randn([R, H], { seed: freshSeed(), std: 3, device: 'cpu' }).cast('bf16');
        const g = c.to('cuda:0');
        const qc = quantizeFp8(c),
          qg = quantizeFp8(g);
        expectIdentical(qg.q.toArray() as Uint8Array, qc.q.toArray() as Uint8Array, 'fp8 bytes');
        expectIdentical(floats(qg.scales), floats(qc.scales), 'scales');
        const back = dequantizeFp8(qg, 'bf16');
        expectIdentical(floats(back), floats(dequantizeFp8(qc, 'bf16')), 'dequantised');
        // e4m3 keeps 3 mantissa bits: a relative rounding error of at most 2^-4, RMS about 2.6e-2.
        expect(relErr(floats(back), floats(c))).toBeLessThan(0.05);
      });
    },
    120_000,
  );

  // Values chosen where conversions can differ. Block 0 has an amax of exactly 448, so its scale is
  // 1 and the values are the e4m3 inputs themselves: rounding ties (to even), ties in the subnormal
  // range, the smallest values that round to zero or up, signed zeros. Block 1 holds NaN (which the
  // amax skips, and which stays NaN). Block 2 is a scaled ramp. The kernels use the hardware
  // conversion instructions, the CPU the portable code: bytes, scales and values must be identical.
  // (Not covered: infinities and NaN with the sign bit set, whose results are NaN with a sign that
  // depends on the platform's division, x86 and the GPU differ there; NaN is NaN either way.)
  it.each(['f32', 'bf16'] as const)('crafted edge values (%s rows)', (dtype) => {
    tidy(() => {
      const special = [
        448,
        -448,
        1.0625,
        1.1875,
        -1.0625,
        2 ** -10,
        3 * 2 ** -10,
        -(2 ** -10),
        2 ** -11,
        1.5 * 2 ** -10,
        2 ** -9,
        2 ** -6,
        0.9375 * 2 ** -6,
        0.96875 * 2 ** -6,
        240,
        248,
        232,
        0,
        -0,
        0.5 + 2 ** -5,
        13 * 2 ** -5,
        416,
        432,
        440,
      ];
      const H = 384;
      const data = new Float32Array(3 * H);
      for (let r = 0; r < 3; r++) {
        for (let i = 0; i < H; i++) {
          const block = Math.floor(i / 128);
          let v: number;
          if (block === 0) v = i < special.length ? (special[i] as number) : ((i * 37) % 89) - 44;
          else if (block === 1) v = i % 5 === 0 ? NaN : ((i * 7) % 23) - 11;
          else v = (((i * 13) % 31) - 15) * 2 ** (r - 3);
          data[r * H + i] = v;
        }
      }
      const c = Tensor.fromArray(data, { shape: [3, H], device: 'cpu' }).cast(dtype);
      const g = c.to('cuda:0');
      const qc = quantizeFp8(c),
        qg = quantizeFp8(g);
      expectIdentical(qg.q.toArray() as Uint8Array, qc.q.toArray() as Uint8Array, 'fp8 bytes');
      expectIdentical(floats(qg.scales), floats(qc.scales), 'scales');
      for (const out of ['f32', 'bf16'] as const) {
        expectIdentical(floats(dequantizeFp8(qg, out)), floats(dequantizeFp8(qc, out)), `dequantised to ${out}`);
      }
    });
  });
});
