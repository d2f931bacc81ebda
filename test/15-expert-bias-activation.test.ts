// The experts' bias and gpt-oss's clamped SwiGLU (lib/moe/expert-bias-activation.ts) against float64
// loops written here, on fresh random inputs (seeds in the test names' messages), with outputs
// poisoned first so an unwritten element fails.
import { describe, expect, it } from 'vitest';

import {
  clampedSwiglu,
  clampedSwigluBackward,
  type DType,
  expertBias,
  expertBiasBackward,
  GPT_OSS_ALPHA,
  GPT_OSS_LIMIT,
  memoryStats,
  Tensor,
} from '../lib/index.js';
import { expectInvalidArgument, freshSeed, poisoned, values } from './helpers.js';

const cpu = 'cpu' as const;
const floatTypes: DType[] = ['f32', 'bf16', 'f16'];
/** One unit in the last place of each dtype, relative, and the smallest step (f16's subnormals). */
const ulp: Record<string, number> = { f32: 2 ** -23, bf16: 2 ** -8, f16: 2 ** -11 };
const step: Record<string, number> = { f32: 2 ** -149, bf16: 2 ** -133, f16: 2 ** -24 };

function randomInput(shape: number[], dtype: DType, seed: number, low: number, high: number): Tensor {
  using f = Tensor.rand(shape, { seed, low, high, device: cpu });
  return f.cast(dtype);
}

/** gpt-oss's formula in float64 (NaN passes the clamps, as torch.clamp). */
function clampedSwigluRef(gate: number, up: number, alpha: number, limit: number): number {
  // The op takes alpha as a float32 (exp(−alpha·g) magnifies its rounding by |alpha·g|).
  alpha = Math.fround(alpha);
  const g = gate > limit ? limit : gate;
  const u = up > limit ? limit : up < -limit ? -limit : up;
  return (u + 1) * (g / (1 + Math.exp(-alpha * g)));
}

/**
 * `out` [n] against the float64 formula on the pairs (gate, up) of `h` [2n]: within the fp32 math's
 * error (a few roundings of each factor, scaled by |u| + 1 because u + 1 loses relative precision
 * near u = −1, plus exp's magnification |alpha·g| of the rounding of its argument), then one
 * rounding into dtype (and its smallest step, f16's subnormals).
 */
function expectClose(out: number[], h: number[], alpha: number, limit: number, dtype: DType, what: string): void {
  for (let i = 0; i < out.length; i++) {
    const gate = h[2 * i] as number,
      up = h[2 * i + 1] as number;
    const r = clampedSwigluRef(gate, up, alpha, limit);
    const o = out[i] as number;
    if (Number.isNaN(r)) {
      expect(o, `${what}: element ${i} should be NaN`).toBeNaN();
      continue;
    }
    const g = Math.min(gate, limit);
    const u = Math.max(-limit, Math.min(up, limit));
    const terms = (Math.abs(u) + 1) * Math.abs(g / (1 + Math.exp(-alpha * g)));
    const bound = ulp[dtype]! * Math.abs(r) + (8 + Math.abs(alpha * g)) * 2 ** -24 * terms + step[dtype]!;
    expect(Math.abs(o - r), `${what}: element ${i} = ${o}, expected ${r} (gate ${gate}, up ${up})`).toBeLessThanOrEqual(bound);
  }
}

describe.each(floatTypes)('clampedSwiglu %s', (dtype) => {
  it('matches the float64 formula, values past the clamp on both sides included; NaN passes; limit Infinity clamps nothing', () => {
    const seed = freshSeed();
    const M = 7,
      F = 19;
    using h13 = randomInput([M, 2 * F], dtype, seed, -12, 12);
    const hv = values(h13);
    for (const [alpha, limit] of [
      [GPT_OSS_ALPHA, GPT_OSS_LIMIT],
      [0.5, 3],
      [1, Infinity],
    ] as const) {
      using out = poisoned([M, F], dtype, cpu);
      clampedSwiglu(h13, { alpha, limit, out });
      expectClose(values(out), hv, alpha, limit, dtype, `seed ${seed}, alpha ${alpha}, limit ${limit}`);
    }
    // Both sides of the clamps were exercised (|values| reach 12 > 7 > 3).
    expect(hv.some((v) => v > 7) && hv.some((v) => v < -7)).toBe(true);
    // The default constants are gpt-oss's, and a new output is made when none is given.
    using dflt = clampedSwiglu(h13);
    expect(dflt.shape).toEqual([M, F]);
    expectClose(values(dflt), hv, 1.702, 7, dtype, `seed ${seed}, defaults`);
    // NaN in the gate or in the up: NaN out (clamping must not turn it into the limit).
    using nan = Tensor.fromArray([NaN, 1, 1, NaN, 100, -100], { shape: [1, 6], dtype, device: cpu });
    using yt = clampedSwiglu(nan);
    const y = values(yt);
    expect(y[0]).toBeNaN();
    expect(y[1]).toBeNaN();
    expectClose([y[2] as number], [100, -100], GPT_OSS_ALPHA, GPT_OSS_LIMIT, dtype, 'clamped both ways');
  });
});

describe.each(floatTypes)('expertBias %s', (dtype) => {
  it("adds each row's expert bias, empty experts and the rows past the last offset (capacity padding) untouched", () => {
    const seed = freshSeed();
    const N = 13;
    // Experts 0..4 over rows 0..8 (expert 2 empty), rows 9..10 padding.
    const offsets = [0, 3, 3, 4, 9, 9];
    const M = 11,
      E = offsets.length - 1;
    using rows = randomInput([M, N], dtype, seed, -3, 3);
    using bias = randomInput([E, N], dtype, seed + 1, -3, 3);
    const rv = values(rows),
      bv = values(bias);
    using off = Tensor.fromArray(offsets, { dtype: 'i32', device: cpu });
    const returned = expertBias(rows, bias, off);
    expect(returned).toBe(rows);
    // The reference: fp32 sum rounded once into dtype (via a cast of the float32 values).
    const want = rv.slice();
    for (let e = 0; e < E; e++)
      for (let r = offsets[e] as number; r < (offsets[e + 1] as number); r++)
        for (let n = 0; n < N; n++) want[r * N + n] = Math.fround((rv[r * N + n] as number) + (bv[e * N + n] as number));
    using rounded = Tensor.fromArray(Float32Array.from(want), { shape: [M, N], device: cpu }).cast(dtype);
    expect(values(rows), `seed ${seed}`).toEqual(values(rounded));
  });

  it('offsets out of order or past the rows write nothing out of bounds; NaN-poisoned rows outside every range stay NaN', () => {
    using rows = poisoned([4, 2], dtype, cpu);
    using bias = Tensor.full([4, 2], 1, { dtype, device: cpu });
    // Expert 0: rows [2, 1) → none; expert 1: [1, 99) → clamped to [1, 4); expert 2: [99, −5) →
    // none; expert 3: [−5, 0) → clamped to [0, 0), none.
    using off = Tensor.fromArray([2, 1, 99, -5, 0], { dtype: 'i32', device: cpu });
    rows.narrow(0, 1, 3).copy_(Tensor.zeros([3, 2], { dtype, device: cpu }));
    expertBias(rows, bias, off);
    expect(values(rows)).toEqual([NaN, NaN, 1, 1, 1, 1, 1, 1]);
  });
});

describe.each(floatTypes)('the backward ops %s', (dtype) => {
  it('clampedSwigluBackward: the derivative of the float64 formula (checked by finite differences), zero past each clamp, passing at its ends', () => {
    const seed = freshSeed();
    const M = 5,
      F = 23;
    using h13 = randomInput([M, 2 * F], dtype, seed, -10, 10);
    using dh = randomInput([M, F], dtype, seed + 1, -2, 2);
    // The clamps' ends exactly: gate 7 and up ±7 pass the gradient.
    h13
      .narrow(0, 0, 1)
      .narrow(1, 0, 6)
      .copy_(Tensor.fromArray([7, 7, 0.5, -7, 8, 9], { shape: [1, 6], dtype, device: cpu }));
    const hv = values(h13),
      dv = values(dh);
    for (const [alpha, limit] of [
      [GPT_OSS_ALPHA, GPT_OSS_LIMIT],
      [0.75, Infinity],
    ] as const) {
      using out = poisoned([M, 2 * F], dtype, cpu);
      clampedSwigluBackward(dh, h13, { alpha, limit, out });
      const got = values(out);
      const a = Math.fround(alpha);
      for (let i = 0; i < M * F; i++) {
        const gate = hv[2 * i] as number,
          up = hv[2 * i + 1] as number,
          d = dv[i] as number;
        // One-sided differences of the float64 forward, stepping into the clamp's range at its ends
        // (where torch's clamp passes the gradient: the derivative from the inside).
        const f = (g: number, u: number): number => clampedSwigluRef(g, u, alpha, limit);
        const eps = 1e-6;
        const fd = (at: (e: number) => number, step: number): number => (at(step) - at(0)) / step;
        const wantG = gate > limit ? 0 : d * fd((e) => f(gate + e, up), gate >= limit ? -eps : eps);
        const wantU = up > limit || up < -limit ? 0 : d * fd((e) => f(gate, up + e), up >= limit ? -eps : eps);
        // Checked against the closed form too (finite differences alone are loose).
        const g = Math.min(gate, limit),
          u = Math.max(-limit, Math.min(up, limit));
        const sg = 1 / (1 + Math.exp(-a * g));
        const closedG = gate > limit ? 0 : d * (u + 1) * (sg + a * g * sg * (1 - sg));
        const closedU = up > limit || up < -limit ? 0 : d * g * sg;
        expect(Math.abs(closedG - wantG), `seed ${seed}: d gate ${i} closed form against differences`).toBeLessThan(
          1e-3 * (1 + Math.abs(closedG)),
        );
        expect(Math.abs(closedU - wantU), `seed ${seed}: d up ${i} closed form against differences`).toBeLessThan(
          1e-3 * (1 + Math.abs(closedU)),
        );
        const bound = (v: number): number =>
          4 * ulp[dtype]! * Math.abs(v) + 64 * 2 ** -24 * (1 + Math.abs(d) * (Math.abs(u) + 1) * (1 + Math.abs(a * g))) + step[dtype]!;
        expect(Math.abs((got[2 * i] as number) - closedG), `seed ${seed}: d gate ${i}`).toBeLessThanOrEqual(bound(closedG));
        expect(Math.abs((got[2 * i + 1] as number) - closedU), `seed ${seed}: d up ${i}`).toBeLessThanOrEqual(bound(closedU));
      }
      if (limit === GPT_OSS_LIMIT) {
        // gate 7 and up 7 pass; up −7 passes; gate 8 and up 9 are cut.
        expect(got[0]).not.toBe(0);
        expect(got[1]).not.toBe(0);
        expect(got[3]).not.toBe(0);
        expect(got[4]).toBe(0);
        expect(got[5]).toBe(0);
      }
    }
  });

  it('expertBiasBackward: each expert the fp32 sum of its rows in order; empty experts zero, padding rows left out; accumulate adds', () => {
    const seed = freshSeed();
    const N = 9;
    const offsets = [0, 4, 4, 7, 12];
    const M = 14,
      E = offsets.length - 1;
    using dRows = randomInput([M, N], dtype, seed, -3, 3);
    const dv = values(dRows);
    using off = Tensor.fromArray(offsets, { dtype: 'i32', device: cpu });
    const want = new Array<number>(E * N).fill(0);
    for (let e = 0; e < E; e++)
      for (let n = 0; n < N; n++) {
        let sum = 0;
        for (let r = offsets[e] as number; r < (offsets[e + 1] as number); r++) sum = Math.fround(sum + (dv[r * N + n] as number));
        want[e * N + n] = sum;
      }
    using out = poisoned([E, N], 'f32', cpu);
    expertBiasBackward(dRows, off, { out });
    expect(values(out), `seed ${seed}`).toEqual(want);
    expertBiasBackward(dRows, off, { out, accumulate: true });
    expect(values(out), `seed ${seed}`).toEqual(want.map((v) => Math.fround(v + v)));
    using fresh = expertBiasBackward(dRows, off);
    expect(fresh.dtype).toBe('f32');
    expect(values(fresh)).toEqual(want);
  });
});

describe('expertBias and clampedSwiglu: bad calls name the argument', () => {
  it('dtypes, shapes, layouts and options', () => {
    const live = memoryStats(cpu).liveBytes;
    {
      using rows = Tensor.zeros([4, 6], { dtype: 'bf16', device: cpu });
      using bias = Tensor.zeros([2, 6], { dtype: 'bf16', device: cpu });
      using off = Tensor.fromArray([0, 2, 4], { dtype: 'i32', device: cpu });
      using f32Bias = Tensor.zeros([2, 6], { device: cpu });
      using narrowBias = Tensor.zeros([2, 5], { dtype: 'bf16', device: cpu });
      using offF = Tensor.fromArray([0, 2, 4], { device: cpu });
      using off4 = Tensor.fromArray([0, 2, 4, 4], { dtype: 'i32', device: cpu });
      expectInvalidArgument(() => expertBias(rows, f32Bias, off), /expertBias: 'bias'.*dtype/);
      expectInvalidArgument(() => expertBias(rows, narrowBias, off), /expertBias: 'bias' .* must be \[E, 6\]/);
      expectInvalidArgument(() => expertBias(rows, bias, offF), /expertBias: 'offsets'.*dtype/);
      expectInvalidArgument(() => expertBias(rows, bias, off4), /expertBias: 'offsets' .* should have shape \[3\]/);
      // Views hold their storage until disposed.
      using strided = rows.transpose(0, 1);
      using odd = bias.narrow(1, 0, 5);
      expectInvalidArgument(() => expertBias(strided, bias, off), /expertBias: 'rows'/);
      expectInvalidArgument(() => expertBias(rows, null as never, off), /expertBias: 'bias'/);
      expectInvalidArgument(() => clampedSwiglu(odd), /clampedSwiglu: 'h13' \[2,5\] must be \[M, 2F\]/);
      expectInvalidArgument(() => clampedSwiglu(rows, { alpha: NaN }), /clampedSwiglu: 'alpha' must be a finite number/);
      expectInvalidArgument(() => clampedSwiglu(rows, { limit: 0 }), /clampedSwiglu: 'limit' = 0 must be greater than 0/);
      using small = Tensor.zeros([4, 2], { dtype: 'bf16', device: cpu });
      expectInvalidArgument(() => clampedSwiglu(rows, { out: small }), /clampedSwiglu: 'out' .* should have shape \[4,3\]/);
      expectInvalidArgument(() => clampedSwiglu(rows, { gate: 1 } as never), /clampedSwiglu: .*'gate'/);
      // In place or overlapping: refused (the kernel's threads would read what others wrote).
      using flat = Tensor.zeros([8], { dtype: 'bf16', device: cpu });
      using h = flat.view(2, 4);
      using inside = flat.narrow(0, 0, 4);
      using out = inside.view(2, 2);
      expectInvalidArgument(() => clampedSwiglu(h, { out }), /clampedSwiglu: 'out' overlaps 'h13' in memory/);
      using sameRows = rows.narrow(0, 0, 2);
      expectInvalidArgument(() => expertBias(rows, sameRows, off), /expertBias: 'rows' overlaps 'bias' in memory/);
      expectInvalidArgument(() => expertBiasBackward(rows, off, { accumulate: true }), /expertBiasBackward: 'accumulate' needs 'out'/);
      expectInvalidArgument(() => expertBiasBackward(rows, off, { out: bias }), /expertBiasBackward: 'out'.*dtype/);
      expectInvalidArgument(() => clampedSwigluBackward(bias, rows), /clampedSwigluBackward: 'dh' .* should have shape \[4,3\]/);
      expectInvalidArgument(() => clampedSwigluBackward(small, rows, { out: rows }), /clampedSwigluBackward: 'out' overlaps 'h13'/);
    }
    expect(memoryStats(cpu).liveBytes).toBe(live);
  });
});
