// Every CUDA op against the CPU reference on fresh random inputs, outputs poisoned before each run;
// live device bytes back at their baseline after each test.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import {
  clampedSwiglu,
  clampedSwigluBackward,
  type DType,
  expertBias,
  expertBiasBackward,
  memoryStats,
  ops,
  Tensor,
} from '../../lib/index.js';
import { ACTIVATION_OPS, ACTIVATIONS, firstActivationMismatch } from '../activation-reference.js';
import { freshSeed, poisoned, relErr, tolerance, values } from '../helpers.js';
import { hasGpu } from './gpu.js';

const gpu = 'cuda:0' as const;
const cpu = 'cpu' as const;
const floatTypes: DType[] = ['f32', 'bf16', 'f16'];

/** The same random values on both devices (drawn on the CPU, copied over). */
function pair(shape: number[], dtype: DType, low = -2, high = 2): [Tensor, Tensor] {
  using f = Tensor.rand(shape, { seed: freshSeed(), low, high, device: cpu });
  const c = f.cast(dtype);
  return [c, c.to(gpu)];
}

describe.skipIf(!hasGpu)('CUDA ops against the CPU reference', () => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
  });
  afterEach(() => {
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  it.each(['f32', 'bf16', 'f16', 'i32', 'i64', 'u8', 'fp8e4m3'] as DType[])('fill %s, contiguous and strided', (dtype) => {
    const value = dtype === 'u8' ? 200 : dtype.startsWith('i') ? -77 : 1.375;
    for (const shape of [
      [1000, 300],
      [7, 1],
      [0, 5],
    ]) {
      using g = poisoned(shape, dtype, gpu);
      g.fill_(value);
      expect(new Set(g.toNumbers()).size <= 1 && g.toNumbers().every((v) => v === value)).toBe(true);
    }
    using m = poisoned([64, 48], dtype, gpu);
    using col = m.narrow(1, 5, 3);
    col.fill_(value);
    using c = poisoned([64, 48], dtype, cpu);
    using ccol = c.narrow(1, 5, 3);
    ccol.fill_(value);
    expect(Array.from(m.toArray() as ArrayLike<unknown>)).toEqual(Array.from(c.toArray() as ArrayLike<unknown>));
  });

  it('copy and cast between every pair of dtypes, strided sources and destinations', () => {
    const types: DType[] = ['f32', 'bf16', 'f16', 'fp8e4m3', 'i32', 'i64', 'u8'];
    for (const from of types) {
      using f = Tensor.rand([37, 129], { seed: freshSeed(), low: 0, high: 100, device: cpu });
      using src = f.cast(from);
      using gsrc = src.to(gpu);
      for (const to of types) {
        using g = poisoned([129, 37], to, gpu);
        using gsrcT = gsrc.transpose();
        g.copy_(gsrcT);
        using c = poisoned([129, 37], to, cpu);
        using srcT = src.transpose();
        c.copy_(srcT);
        expect(Array.from(g.toArray() as ArrayLike<unknown>), `${from} -> ${to}`).toEqual(Array.from(c.toArray() as ArrayLike<unknown>));
      }
    }
  });

  it.each(['f32', 'bf16', 'i64'] as DType[])('cat %s along each dim, a transposed input among them, into a poisoned out', (dtype) => {
    for (const dim of [0, 1, -1]) {
      const d = dim < 0 ? dim + 3 : dim;
      const parts = [5, 1, 0, 130].map((n) => {
        const shape = [4, 33, 7];
        shape[d] = n;
        return pair(shape, dtype, -100, 100);
      });
      const [[c1, g1]] = [parts[1] as [Tensor, Tensor]];
      using c1T = c1.transpose(0, 2);
      using g1T = g1.transpose(0, 2);
      using c1t = c1T.contiguous();
      using g1t = g1T.contiguous();
      const cpuInputs = parts.map(([c]) => c);
      const gpuInputs = parts.map(([, g]) => g);
      cpuInputs[1] = c1t.transpose(0, 2);
      gpuInputs[1] = g1t.transpose(0, 2);
      const shape = [4, 33, 7];
      shape[d] = 136;
      using cOut = poisoned(shape, dtype, cpu);
      using gOut = poisoned(shape, dtype, gpu);
      ops.cat(cpuInputs, dim, { out: cOut });
      ops.cat(gpuInputs, dim, { out: gOut });
      expect(Array.from(gOut.toArray() as ArrayLike<unknown>), `dim ${dim}`).toEqual(Array.from(cOut.toArray() as ArrayLike<unknown>));
      for (const t of [...parts.flat(), cpuInputs[1] as Tensor, gpuInputs[1] as Tensor]) t.dispose();
    }
  });

  // The CPU saturates explicitly (a C++ cast is undefined there); the kernel must give the same bits.
  it('casts NaN, infinities and floats past the integer range as the CPU does (saturating)', () => {
    const edges = [NaN, Infinity, -Infinity, 3e9, -3e9, 2147483520, 2 ** 31, -(2 ** 31), 1e19, -1e19, 255.9, 256, -0.9, -1, 7.5];
    using f = Tensor.fromArray(edges, { device: cpu });
    for (const from of ['f32', 'bf16', 'f16', 'fp8e4m3'] as DType[]) {
      using src = f.cast(from);
      using gsrc = src.to(gpu);
      for (const to of ['i32', 'i64', 'u8'] as DType[]) {
        using g = poisoned([edges.length], to, gpu);
        g.copy_(gsrc);
        using c = src.cast(to);
        expect(Array.from(g.toArray() as ArrayLike<unknown>), `${from} -> ${to}`).toEqual(Array.from(c.toArray() as ArrayLike<unknown>));
      }
    }
  });

  it('moves data cpu -> cuda -> cpu unchanged, including strided views', () => {
    using a = Tensor.randn([333, 77], { seed: freshSeed(), device: cpu });
    using g = a.to(gpu);
    expect(g.device.toString()).toBe('cuda:0');
    expect(g.toNumbers()).toEqual(a.toNumbers());
    using gView = g.transpose();
    using gt = gView.to(cpu);
    using at = a.transpose().contiguous();
    expect(gt.toNumbers()).toEqual(at.toNumbers());
    using back = Tensor.zeros([77, 333], { device: gpu });
    using aView = a.transpose();
    back.copy_(aView); // host strided -> device contiguous
    expect(back.toNumbers()).toEqual(at.toNumbers());
  });

  it.each(floatTypes)('random %s: the same bits as the CPU for uniform, rounding-close for normal', (dtype) => {
    const seed = freshSeed();
    for (const [kind, opts] of [
      ['rand', { low: -3, high: 5 }],
      ['randn', { mean: 0.5, std: 2 }],
    ] as const) {
      using g = poisoned([1000, 301], dtype, gpu);
      using c = poisoned([1000, 301], dtype, cpu);
      const fill = (t: Tensor): Tensor =>
        kind === 'rand' ? t.random_(0, opts.low!, opts.high!, seed) : t.random_(1, opts.mean!, opts.std!, seed);
      void fill(g);
      void fill(c);
      const err = relErr(values(g), values(c));
      if (kind === 'rand') expect(err).toBe(0);
      else expect(err).toBeLessThan(dtype === 'f32' ? 1e-6 : tolerance[dtype]);
    }
  });

  describe.each(floatTypes)('%s', (dtype) => {
    it.each([
      [1000, 300],
      [4096, 1024],
      [7, 5],
    ])('add, mul, scale and bias on [%i, %i]', (rows, cols) => {
      const [a, ga] = pair([rows, cols], dtype);
      const [b, gb] = pair([rows, cols], dtype);
      const [bias, gbias] = pair([cols], dtype);
      const runs: [string, (x: Tensor, y: Tensor, z: Tensor, out: Tensor) => void][] = [
        ['add', (x, y, _z, out) => ops.add(x, y, { out, alpha: 0.75 })],
        ['mul', (x, y, _z, out) => ops.mul(x, y, { out })],
        ['scale', (x, _y, _z, out) => ops.scale(x, -1.5, { out })],
        ['bias', (x, _y, z, out) => ops.add(x, z, { out })],
      ];
      for (const [name, run] of runs) {
        using go = poisoned([rows, cols], dtype, gpu);
        using co = poisoned([rows, cols], dtype, cpu);
        run(ga, gb, gbias, go);
        run(a, b, bias, co);
        // Same fp32 arithmetic in the same order, one rounding into dtype: bit-identical.
        expect(values(go), name).toEqual(values(co));
      }
      for (const t of [a, ga, b, gb, bias, gbias]) t.dispose();
    });

    // [1000, 300]: 16-byte vectors only; [4099, 1031]: vectors and a scalar tail (an odd count);
    // 'offset': x one element into its buffer, not 16-byte aligned, so the scalar loop alone.
    it.each(ACTIVATIONS)(
      '%s forward and backward on [1000, 300], [4099, 1031], an unaligned view and the edges (NaN, ±inf, the tails)',
      (kind) => {
        const { forward, backward } = ACTIVATION_OPS[kind];
        const edges = [0, -0, 1e-3, -1e-3, 3, -3, 10, -10, 20, -20, 88, -88, 100, -100, 1e20, -1e20, NaN, Infinity, -Infinity];
        const cases: [string, number[]][] = [
          ['', [1000, 300]],
          ['', [4099, 1031]],
          ['offset', [777, 65]],
          ['edges', [edges.length]],
        ];
        for (const [name, shape] of cases) {
          const seed = freshSeed();
          using xf =
            name === 'edges' ? Tensor.fromArray(edges, { device: cpu }) : Tensor.rand(shape, { seed, low: -8, high: 8, device: cpu });
          using x = xf.cast(dtype);
          using gbuf = Tensor.empty([x.numel + 1], { dtype, device: gpu });
          using xflat = x.view(-1);
          using gview = gbuf.narrow(0, name === 'offset' ? 1 : 0, x.numel);
          gview.copy_(xflat);
          using gx = gview.view(...shape);
          using dyf = Tensor.rand(shape, { seed: seed + 1, low: -2, high: 2, device: cpu });
          using dy = dyf.cast(dtype);
          using gdy = dy.to(gpu);
          using gy = poisoned(shape, dtype, gpu);
          using cy = poisoned(shape, dtype, cpu);
          forward(gx, gy);
          forward(x, cy);
          using gdx = poisoned(shape, dtype, gpu);
          using cdx = poisoned(shape, dtype, cpu);
          backward(gdy, gx, gdx);
          backward(dy, x, cdx);
          const xs = values(x);
          const dys = values(dy);
          // expf, erff and tanhf differ by a few ulp between the GPU and the CPU: within one ulp of the
          // dtype after rounding (activation-reference.ts), NaN and infinities the same.
          for (const [what, g, c, dyArg] of [
            ['forward', values(gy), values(cy), undefined],
            ['backward', values(gdx), values(cdx), dys],
          ] as const) {
            const bad = firstActivationMismatch(dtype, g, c, xs, dyArg);
            const detail = bad < 0 ? '' : ` at ${bad}: x ${xs[bad]}, dy ${dys[bad]}, cuda ${g[bad]}, cpu ${c[bad]}`;
            expect(bad, `${kind} ${what} ${name} [${shape}] (seed ${seed})${detail}`).toBe(-1);
          }
          if (name === '') {
            // In place on the GPU: out = x (forward) and out = dy (backward) give the same bits.
            using gxi = gx.clone();
            forward(gxi, gxi);
            expect(values(gxi), `${kind} forward in place [${shape}]`).toEqual(values(gy));
            using gdyi = gdy.clone();
            backward(gdyi, gx, gdyi);
            expect(values(gdyi), `${kind} backward in place [${shape}]`).toEqual(values(gdx));
          }
        }
      },
    );

    it.each([[0], [1], [2]])('sum and max over dim %i of [33, 1000, 7] and rows of [4096, 7168]', (dim) => {
      for (const shape of [
        [33, 1000, 7],
        [4096, 7168],
      ]) {
        if (dim >= shape.length) continue;
        const [a, ga] = pair(shape, dtype);
        const outShape = shape.filter((_, i) => i !== dim);
        for (const [name, reduce, outType] of [
          ['sum', ops.sum, 'f32'],
          ['max', ops.max, dtype],
        ] as const) {
          using go = poisoned(outShape, outType, gpu);
          using co = poisoned(outShape, outType, cpu);
          reduce(ga, dim, { out: go });
          reduce(a, dim, { out: co });
          const err = relErr(values(go), values(co));
          expect(err, `${name} ${shape}`).toBeLessThan(name === 'max' ? 1e-12 : 1e-5);
        }
        a.dispose();
        ga.dispose();
      }
    });

    it.each([
      [1000, 300, 257],
      [128, 2048, 96],
      [1, 7, 1],
    ])('matmul [%i,%i]·[%i] plain, transposed and accumulating', (M, K, N) => {
      const [a, ga] = pair([M, K], dtype);
      const [bt, gbt] = pair([N, K], dtype);
      using b = bt.transpose();
      using gb = gbt.transpose();
      for (const outType of ['f32', dtype] as DType[]) {
        using go = poisoned([M, N], outType, gpu);
        using co = poisoned([M, N], outType, cpu);
        ops.matmul(ga, gb, { out: go });
        ops.matmul(a, b, { out: co });
        const tol = outType === 'f32' ? 1e-5 : tolerance[outType];
        expect(relErr(values(go), values(co))).toBeLessThan(tol);
        ops.matmul(ga, gb, { out: go, accumulate: true });
        ops.matmul(a, b, { out: co, accumulate: true });
        expect(relErr(values(go), values(co))).toBeLessThan(tol);
      }
      for (const t of [a, ga, bt, gbt]) t.dispose();
    });
  });

  it('integer add, mul and reductions match exactly', () => {
    for (const dtype of ['i32', 'i64'] as const) {
      using f = Tensor.rand([513, 65], { seed: freshSeed(), low: -1000, high: 1000, device: cpu });
      using a = f.cast(dtype);
      using ga = a.to(gpu);
      const same = (g: Tensor, c: Tensor): void => {
        using gg = g;
        using cc = c;
        expect(gg.toNumbers()).toEqual(cc.toNumbers());
      };
      same(ops.add(ga, ga, { alpha: 3 }), ops.add(a, a, { alpha: 3 }));
      same(ops.mul(ga, ga), ops.mul(a, a));
      same(ops.sum(ga, 0, { dtype: 'i64' }), ops.sum(a, 0, { dtype: 'i64' }));
      same(ops.max(ga, 1), ops.max(a, 1));
    }
  });

  it.each(floatTypes)(
    "expertBias and clampedSwiglu (gpt-oss's experts) %s: as the CPU; padding rows and out-of-order offsets untouched",
    (dtype) => {
      // expertBias: 6 experts over 1000 rows (one empty), rows past the last offset left as they are.
      const offsets = [0, 1, 300, 300, 640, 901, 990];
      const [rows, grows] = pair([1000, 96], dtype);
      const [bias, gbias] = pair([6, 96], dtype);
      using off = Tensor.fromArray(offsets, { dtype: 'i32', device: cpu });
      using goff = off.to(gpu);
      expertBias(rows, bias, off);
      expertBias(grows, gbias, goff);
      // The same fp32 add and one rounding on both: the same bits.
      expect(values(grows)).toEqual(values(rows));
      // Offsets out of order or past the rows: clamped, nothing written out of bounds.
      using bad = Tensor.fromArray([500, 10, 5000, 0, 0, -3, -1], { dtype: 'i32', device: gpu });
      using before = grows.clone();
      expertBias(grows, gbias, bad);
      const b = values(before),
        g = values(grows),
        bv = values(bias);
      // Expert 1 covers rows [10, 1000); the others nothing.
      using want = Tensor.fromArray(
        Float32Array.from(b.map((v, i) => (i >= 10 * 96 ? Math.fround(v + (bv[96 + (i % 96)] as number)) : v))),
        { shape: [1000, 96], device: cpu },
      ).cast(dtype);
      expect(g).toEqual(values(want));
      // clampedSwiglu: values past ±7 on both sides; the device's expf may differ from the host's by an
      // fp32 ulp, which can move a rounding into bf16/f16 by one unit: compared within that.
      const [h13, gh13] = pair([777, 2 * 130], dtype, -11, 11);
      using out = poisoned([777, 130], dtype, cpu);
      using gout = poisoned([777, 130], dtype, gpu);
      clampedSwiglu(h13, { out });
      clampedSwiglu(gh13, { out: gout });
      const c = values(out),
        d = values(gout);
      const unit = dtype === 'f32' ? 2 ** -21 : dtype === 'bf16' ? 2 ** -7 : 2 ** -10;
      for (let i = 0; i < c.length; i++)
        expect(Math.abs((d[i] as number) - (c[i] as number)), `element ${i}`).toBeLessThanOrEqual(
          unit * Math.abs(c[i] as number) + 2 ** -24,
        );
      // The backward ops: the bias gradient is the same fp32 sums in the same order (the same bits);
      // the clamped SwiGLU's gradient within a unit of the CPU's (expf again).
      // (The rows as the CPU holds them: grows took the out-of-order offsets' bias above.)
      using dB = expertBiasBackward(rows, off);
      using rowsOnGpu = rows.to(gpu);
      using gdB = expertBiasBackward(rowsOnGpu, goff);
      expect(values(gdB)).toEqual(values(dB));
      const [dh, gdh] = pair([777, 130], dtype);
      using dg = clampedSwigluBackward(dh, h13);
      using gdg = clampedSwigluBackward(gdh, gh13);
      const e = values(dg),
        f = values(gdg);
      for (let i = 0; i < e.length; i++)
        expect(Math.abs((f[i] as number) - (e[i] as number)), `d element ${i}`).toBeLessThanOrEqual(
          2 * unit * Math.abs(e[i] as number) + 2 ** -20,
        );
      for (const t of [rows, grows, bias, gbias, h13, gh13, dh, gdh]) t.dispose();
    },
  );
});
