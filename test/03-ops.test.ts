// The CPU reference ops against float64 loops written here, on fresh random inputs, with outputs
// poisoned before each run so an unwritten element fails.
import { describe, expect, it } from 'vitest';

import { type DType, ops, Tensor } from '../lib/index.js';
import { ACTIVATION_OPS, ACTIVATIONS, activationGradRef, activationRef, erf, firstActivationMismatch } from './activation-reference.js';
import { f32, freshSeed, poisoned, relErr, tolerance, values } from './helpers.js';

const cpu = 'cpu' as const;
const floatTypes: DType[] = ['f32', 'bf16', 'f16'];

function randomInput(shape: number[], dtype: DType, low = -2, high = 2): Tensor {
  using f = Tensor.rand(shape, { seed: freshSeed(), low, high, device: cpu });
  return f.cast(dtype);
}

/** The float64 value the addon should produce for a result stored in `dtype`: rounded via a cast. */
function roundTo(ref: number[], dtype: DType): number[] {
  using t = Tensor.fromArray(Float32Array.from(ref), { device: cpu });
  return t.cast(dtype).toNumbers();
}

describe.each(floatTypes)('elementwise %s', (dtype) => {
  it('add with alpha, mul, scale, and a broadcast bias', () => {
    using a = randomInput([37, 53], dtype);
    using b = randomInput([37, 53], dtype);
    using bias = randomInput([53], dtype);
    const av = values(a);
    const bv = values(b);
    const biasv = values(bias);
    const cases: [string, (out: Tensor) => void, number[]][] = [
      ['add', (out) => ops.add(a, b, { out, alpha: -0.5 }), av.map((x, i) => f32(x + f32(-0.5 * (bv[i] as number))))],
      ['mul', (out) => ops.mul(a, b, { out }), av.map((x, i) => f32(x * (bv[i] as number)))],
      ['scale', (out) => ops.scale(a, 3.25, { out }), av.map((x) => f32(3.25 * x))],
      ['bias', (out) => ops.add(a, bias, { out }), av.map((x, i) => f32(x + (biasv[i % 53] as number)))],
    ];
    for (const [name, run, ref] of cases) {
      using out = poisoned([37, 53], dtype, cpu);
      run(out);
      // The op computes in fp32 and rounds once into dtype: exact agreement with the oracle.
      expect(values(out), name).toEqual(roundTo(ref, dtype));
    }
  });
});

/** Values where the formulas turn: zeros, the tails where 1 + erf and 1 + tanh cancel, overflow of exp, NaN and infinities. */
const ACTIVATION_EDGES = [
  0,
  -0,
  1e-3,
  -1e-3,
  1,
  -1,
  3,
  -3,
  6,
  -6,
  10,
  -10,
  20,
  -20,
  50,
  -50,
  88,
  -88,
  100,
  -100,
  1e20,
  -1e20,
  NaN,
  Infinity,
  -Infinity,
];

describe('erf (the oracle of the activations)', () => {
  it('matches tabulated values to 1e-12', () => {
    // Abramowitz and Stegun, table 7.1, and erf(−x) = −erf(x)
    const table: [number, number][] = [
      [0, 0],
      [0.1, 0.1124629160182849],
      [0.5, 0.5204998778130465],
      [1, 0.8427007929497149],
      [2, 0.9953222650189527],
      [2.5, 0.999593047982555],
      [3, 0.9999779095030014],
      [4, 0.9999999845827421],
    ];
    for (const [x, want] of table) {
      expect(Math.abs(erf(x) - want), `erf(${x})`).toBeLessThan(1e-12);
      expect(Math.abs(erf(-x) + want), `erf(${-x})`).toBeLessThan(1e-12);
    }
  });
});

describe.each(floatTypes)('activations %s', (dtype) => {
  it.each(ACTIVATIONS)('%s forward and backward against float64, random and edge inputs, outputs poisoned', (kind) => {
    const seed = freshSeed();
    using r = Tensor.rand([37, 53], { seed, low: -8, high: 8, device: cpu });
    using edges = Tensor.fromArray(ACTIVATION_EDGES, { device: cpu });
    using xf = Tensor.empty([37 * 53 + ACTIVATION_EDGES.length], { device: cpu });
    xf.narrow(0, 0, 37 * 53).copy_(r.view(-1));
    xf.narrow(0, 37 * 53, ACTIVATION_EDGES.length).copy_(edges);
    using x = xf.cast(dtype);
    using dyf = Tensor.rand(x.shape, { seed: seed + 1, low: -2, high: 2, device: cpu });
    using dy = dyf.cast(dtype);
    const xs = values(x);
    const dys = values(dy);
    const { forward, backward } = ACTIVATION_OPS[kind];
    using y = poisoned(x.shape, dtype, cpu);
    forward(x, y);
    using dx = poisoned(x.shape, dtype, cpu);
    backward(dy, x, dx);
    for (const [what, got, ref, dyArg] of [
      ['forward', values(y), xs.map((v) => activationRef(kind, v)), undefined],
      ['backward', values(dx), xs.map((v, i) => activationGradRef(kind, dys[i] as number, v)), dys],
    ] as const) {
      const bad = firstActivationMismatch(dtype, got, ref, xs, dyArg);
      const detail = bad < 0 ? '' : ` at ${bad}: x ${xs[bad]}, dy ${dys[bad]}, got ${got[bad]}, float64 ${ref[bad]}`;
      expect(bad, `${kind} ${what} ${dtype} (seed ${seed})${detail}`).toBe(-1);
    }
  });

  it('in place: out may be the input (forward) or dy (backward)', () => {
    using x = randomInput([5, 7], dtype, -4, 4);
    using dy = randomInput([5, 7], dtype);
    using y = ops.silu(x);
    using dx = ops.geluBackward(dy, x, { approximate: 'tanh' });
    using xc = x.clone();
    ops.silu(xc, { out: xc });
    expect(values(xc)).toEqual(values(y));
    using dyc = dy.clone();
    ops.geluBackward(dyc, x, { out: dyc, approximate: 'tanh' });
    expect(values(dyc)).toEqual(values(dx));
  });
});

describe('elementwise integers', () => {
  it('adds and multiplies i32 and i64 exactly', () => {
    for (const dtype of ['i32', 'i64'] as const) {
      using a = Tensor.fromArray([1, -2, 3, 40000], { dtype, device: cpu });
      using b = Tensor.fromArray([5, 6, -7, 40000], { dtype, device: cpu });
      expect(ops.add(a, b, { alpha: 2 }).toNumbers()).toEqual([11, 10, -11, 120000]);
      expect(ops.mul(a, b).toNumbers()).toEqual([5, -12, -21, 1_600_000_000]);
    }
  });
});

describe.each(floatTypes)('reductions %s', (dtype) => {
  it.each([0, 1, 2, -1])('sum and max over dim %i', (dim) => {
    const shape = [5, 17, 9];
    using a = randomInput(shape, dtype);
    const av = values(a);
    const d = dim < 0 ? dim + 3 : dim;
    const outShape = shape.filter((_, i) => i !== d);
    const n = shape[d] as number;
    const inner = shape.slice(d + 1).reduce((x, y) => x * y, 1);
    const outer = shape.slice(0, d).reduce((x, y) => x * y, 1);
    const sumRef: number[] = [];
    const maxRef: number[] = [];
    for (let o = 0; o < outer; o++)
      for (let k = 0; k < inner; k++) {
        let s = 0;
        let m = -Infinity;
        for (let j = 0; j < n; j++) {
          const v = av[(o * n + j) * inner + k] as number;
          s += v;
          m = Math.max(m, v);
        }
        sumRef.push(s);
        maxRef.push(m);
      }
    using s = poisoned(outShape, 'f32', cpu);
    ops.sum(a, dim, { out: s });
    expect(relErr(values(s), sumRef)).toBeLessThan(1e-6);
    using m = poisoned(outShape, dtype, cpu);
    ops.max(a, dim, { out: m });
    expect(values(m)).toEqual(maxRef);
  });
});

/** torch.cat in plain loops: row-major values of each input, joined along dim d. */
function catRef(inputs: { shape: number[]; values: number[] }[], d: number): number[] {
  const outer = (inputs[0] as { shape: number[] }).shape.slice(0, d).reduce((x, y) => x * y, 1);
  const out: number[] = [];
  for (let o = 0; o < outer; o++)
    for (const { shape, values: v } of inputs) {
      const chunk = shape.slice(d).reduce((x, y) => x * y, 1); // input's elements per outer index
      for (let j = 0; j < chunk; j++) out.push(v[o * chunk + j] as number);
    }
  return out;
}

describe('cat', () => {
  it.each(['f32', 'bf16', 'i32'] as DType[])(
    '%s along every dim (and each negative one), with a transposed input and an empty one',
    (dtype) => {
      const seed = freshSeed();
      for (const dim of [0, 1, 2, -1, -2, -3]) {
        const d = dim < 0 ? dim + 3 : dim;
        const sizes = [3, 1, 0, 4];
        const inputs = sizes.map((n, i) => {
          const shape = [2, 5, 3];
          shape[d] = n;
          using f = Tensor.rand(shape, { seed: seed + i, low: -50, high: 50, device: cpu });
          return f.cast(dtype);
        });
        // The second input as a strided view with the same values: a transposed copy, transposed back.
        const [a0, a1] = inputs as [Tensor, Tensor];
        using a1T = a1.transpose(0, 2);
        using a1t = a1T.contiguous();
        const a1view = a1t.transpose(0, 2);
        expect(a1view.isContiguous).toBe(false);
        const ref = catRef(
          inputs.map((t) => ({ shape: [...t.shape], values: values(t) })),
          d,
        );
        const shape = [2, 5, 3];
        shape[d] = sizes.reduce((x, y) => x + y, 0);
        using out = poisoned(shape, dtype, cpu);
        ops.cat([a0, a1view, ...inputs.slice(2)], dim, { out });
        expect(values(out), `dim ${dim} seed ${seed}`).toEqual(ref);
        using made = ops.cat(inputs, dim);
        expect(made.shape).toEqual(shape);
        expect(values(made), `dim ${dim} seed ${seed} (allocated)`).toEqual(ref);
        for (const t of [...inputs, a1view]) t.dispose();
      }
    },
  );

  it('one input is a copy of it; a strided out is written through its view', () => {
    using a = Tensor.fromArray([1, 2, 3, 4, 5, 6], { shape: [2, 3], device: cpu });
    using b = Tensor.fromArray([7, 8], { shape: [2, 1], device: cpu });
    using one = ops.cat([a], 1);
    expect(one.sharesStorageWith(a)).toBe(false);
    expect(one.toNumbers()).toEqual([1, 2, 3, 4, 5, 6]);
    using backing = poisoned([4, 2], 'f32', cpu);
    const outT = backing.transpose(); // [2, 4], strided
    ops.cat([a, b], 1, { out: outT });
    expect(outT.toFloat32Array().length).toBe(8);
    using dense = outT.contiguous();
    expect(dense.toNumbers()).toEqual([1, 2, 3, 7, 4, 5, 6, 8]);
    outT.dispose();
  });
});

describe('reductions, edge cases', () => {
  it('max propagates NaN; sums integers exactly', () => {
    using a = Tensor.fromArray([1, NaN, 3, 4, 5, 6], { shape: [2, 3], device: cpu });
    const m = ops.max(a, 1).toNumbers();
    expect(Number.isNaN(m[0])).toBe(true);
    expect(m[1]).toBe(6);
    using i = Tensor.fromArray([2 ** 31 - 1, 1, 5], { dtype: 'i64', device: cpu });
    expect(ops.sum(i, 0).toNumbers()).toEqual([2 ** 31 + 5]);
  });
});

describe('matmul', () => {
  it.each([
    ['f32', 'f32'],
    ['bf16', 'f32'],
    ['bf16', 'bf16'],
    ['f16', 'f32'],
  ] as const)('%s inputs into %s, plain and transposed views, with accumulate', (inType, outType) => {
    const [M, K, N] = [23, 41, 19];
    using a = randomInput([M, K], inType);
    using bt = randomInput([N, K], inType); // b = btᵀ, a strided view
    using b = bt.transpose();
    const av = values(a);
    const btv = values(bt);
    const ref: number[] = [];
    for (let m = 0; m < M; m++)
      for (let n = 0; n < N; n++) {
        let s = 0;
        for (let k = 0; k < K; k++) s += (av[m * K + k] as number) * (btv[n * K + k] as number);
        ref.push(s);
      }
    using out = poisoned([M, N], outType, cpu);
    ops.matmul(a, b, { out });
    expect(relErr(values(out), ref)).toBeLessThan(outType === 'f32' ? 1e-6 : tolerance[outType]);
    ops.matmul(a, b, { out, accumulate: true });
    expect(
      relErr(
        values(out),
        ref.map((x) => 2 * x),
      ),
    ).toBeLessThan(outType === 'f32' ? 1e-6 : tolerance[outType]);
  });

  // The oracle of every GEMM kernel: each output is the double sum of its K products in the order
  // k = 0 … K−1, rounded once, whichever loop order the CPU uses for b's layout. The same sum in
  // JavaScript (doubles) gives the same bits.
  it.each([false, true])(
    'sums each output in order in double, rounded once: the same bits as a plain loop (b transposed: %s)',
    (transB) => {
      const [M, K, N] = [17, 300, 33];
      using a = randomInput([M, K], 'f32');
      using stored = randomInput(transB ? [N, K] : [K, N], 'f32');
      using b = transB ? stored.transpose() : stored.view(K, N);
      const av = values(a),
        sv = values(stored);
      const bAt = (k: number, n: number): number => (transB ? sv[n * K + k] : sv[k * N + n]) as number;
      const ref: number[] = [];
      for (let m = 0; m < M; m++)
        for (let n = 0; n < N; n++) {
          let s = 0;
          for (let k = 0; k < K; k++) s += (av[m * K + k] as number) * bAt(k, n);
          ref.push(Math.fround(s));
        }
      using out = poisoned([M, N], 'f32', cpu);
      ops.matmul(a, b, { out });
      expect(Array.from(out.toFloat32Array())).toEqual(ref);
    },
  );
});
