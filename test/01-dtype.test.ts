// Conversions between float32 and bf16, f16 and fp8 e4m3, checked against decoders written here in
// float64: decoding is exact, and encoding must pick the nearest value, ties to even.
import { describe, expect, it } from 'vitest';

import { Tensor } from '../lib/index.js';
import { bf16ToNumber, f16ToNumber, fp8ToNumber, freshSeed } from './helpers.js';

type Codec = { dtype: 'bf16' | 'f16' | 'fp8e4m3'; bits: number; decode: (b: number) => number; max: number; saturates: boolean };
const codecs: Codec[] = [
  { dtype: 'bf16', bits: 16, decode: bf16ToNumber, max: 3.3895313892515355e38, saturates: false },
  { dtype: 'f16', bits: 16, decode: f16ToNumber, max: 65504, saturates: false },
  { dtype: 'fp8e4m3', bits: 8, decode: fp8ToNumber, max: 448, saturates: true },
];

function rawArray(dtype: Codec['dtype'], n: number): Uint16Array | Uint8Array {
  return dtype === 'fp8e4m3' ? new Uint8Array(n) : new Uint16Array(n);
}

describe.each(codecs)('$dtype', ({ dtype, bits, decode, max, saturates }) => {
  it('decodes every bit pattern exactly', () => {
    const n = 2 ** bits;
    const raw = rawArray(dtype, n);
    for (let i = 0; i < n; i++) raw[i] = i;
    using t = Tensor.fromArray(raw, { dtype, device: 'cpu' });
    const got = t.toFloat32Array();
    for (let i = 0; i < n; i++) {
      const want = decode(i);
      if (Number.isNaN(want)) expect(Number.isNaN(got[i] as number), `pattern ${i}`).toBe(true);
      else expect(got[i], `pattern ${i}`).toBe(Math.fround(want));
    }
  });

  it('encodes to the nearest representable value, ties to even', () => {
    // Every finite positive code's neighbours give the decision boundaries; sample around them.
    const codes: number[] = [];
    for (let i = 0; i < 2 ** (bits - 1); i++) if (Number.isFinite(decode(i))) codes.push(i);
    const samples: number[] = [];
    const seed = freshSeed();
    let s = seed;
    const rnd = (): number => (s = (s * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
    for (let k = 0; k < 4000; k++) {
      const i = codes[Math.floor(rnd() * (codes.length - 1))] as number;
      const lo = decode(i);
      const hi = decode(i + 1);
      if (!Number.isFinite(hi)) continue;
      const mid = (lo + hi) / 2;
      const x = k % 4 === 0 ? mid : lo + (hi - lo) * rnd();
      if (Math.fround(x) !== x) continue; // only values a float32 holds exactly
      samples.push(x, -x);
    }
    using t = Tensor.fromArray(Float32Array.from(samples), { device: 'cpu' });
    using c = t.cast(dtype);
    const raw = c.toArray() as Uint16Array | Uint8Array;
    for (let i = 0; i < samples.length; i++) {
      const x = samples[i] as number;
      const code = raw[i] as number;
      const got = decode(code);
      const mag = code & ((1 << (bits - 1)) - 1);
      const err = Math.abs(got - x);
      // neither neighbour is closer; on a tie, the even code wins
      for (const nb of [mag - 1, mag + 1]) {
        if (nb < 0 || !Number.isFinite(decode(nb))) continue;
        const other = Math.sign(x) * decode(nb);
        const errNb = Math.abs(other - x);
        expect(err <= errNb, `seed ${seed}: ${x} -> code ${code} (${got}), neighbour ${other} is closer`).toBe(true);
        if (err === errNb) expect(mag % 2, `seed ${seed}: tie at ${x} must round to even`).toBe(0);
      }
    }
  });

  it(saturates ? 'saturates beyond the largest finite value' : 'overflows to infinity', () => {
    using t = Tensor.fromArray([max * 4, -max * 4, NaN, Infinity], { device: 'cpu' });
    const back = Array.from(t.cast(dtype).toFloat32Array());
    if (saturates) expect(back.slice(0, 2)).toEqual([max, -max]);
    else expect(back.slice(0, 2)).toEqual([Infinity, -Infinity]);
    expect(Number.isNaN(back[2])).toBe(true);
    expect(back[3]).toBe(saturates ? max : Infinity);
  });
});

describe('integer casts', () => {
  it('truncates floats toward zero and converts integers exactly', () => {
    using t = Tensor.fromArray([1.9, -1.9, 2.5, -0.5, 100], { device: 'cpu' });
    expect(Array.from(t.cast('i32').toArray() as Int32Array)).toEqual([1, -1, 2, 0, 100]);
    using big = Tensor.fromArray([2 ** 40, -(2 ** 40) - 3], { dtype: 'i64', device: 'cpu' });
    expect(Array.from(big.toArray() as BigInt64Array)).toEqual([2n ** 40n, -(2n ** 40n) - 3n]);
    expect(big.cast('f32').toNumbers()).toEqual([2 ** 40, Math.fround(-(2 ** 40) - 3)]);
  });

  // C++ leaves a float-to-int cast of NaN or of a value past the type's range undefined; the addon
  // saturates as the GPU's cvt.rzi does (NaN → 0, past either end → that end), on both paths.
  it('saturates floats past the integer range, and takes NaN to 0', () => {
    const sources = [NaN, Infinity, -Infinity, 3e9, -3e9, 2147483520, 2 ** 31, -(2 ** 31), 1e19, -1e19, 255.9, 256, -0.9, -1];
    const i32 = [
      0,
      2 ** 31 - 1,
      -(2 ** 31),
      2 ** 31 - 1,
      -(2 ** 31),
      2147483520,
      2 ** 31 - 1,
      -(2 ** 31),
      2 ** 31 - 1,
      -(2 ** 31),
      255,
      256,
      0,
      -1,
    ];
    const i64Max = 2n ** 63n - 1n;
    const i64Min = -(2n ** 63n);
    const i64 = [0n, i64Max, i64Min, 3000000000n, -3000000000n, 2147483520n, 2n ** 31n, -(2n ** 31n), i64Max, i64Min, 255n, 256n, 0n, -1n];
    const u8 = [0, 255, 0, 255, 0, 255, 255, 0, 255, 0, 255, 255, 0, 0];
    using t = Tensor.fromArray(sources, { device: 'cpu' });
    expect(Array.from(t.cast('i32').toArray() as Int32Array)).toEqual(i32);
    expect(Array.from(t.cast('i64').toArray() as BigInt64Array)).toEqual(i64);
    expect(Array.from(t.cast('u8').toArray() as Uint8Array)).toEqual(u8);
    for (const half of ['bf16', 'f16'] as const) {
      using h = t.cast(half);
      expect(Array.from(h.cast('i32').toArray() as Int32Array).slice(0, 3), half).toEqual([0, 2 ** 31 - 1, -(2 ** 31)]);
      expect(Array.from(h.cast('u8').toArray() as Uint8Array).slice(0, 3), half).toEqual([0, 255, 0]);
    }
  });
});
