// The grouped GEMM's CPU reference against float64 loops written here, and the experts' SwiGLU
// backward against finite differences (in f32 on the CPU).
import { describe, expect, it } from 'vitest';

import { InvalidArgumentError, Tensor, tidy } from '../lib/index.js';
import { expertsBackward, expertsForward, interleaveW13 } from '../lib/moe/experts.js';
import { dequantizeFp8, quantizeFp8 } from '../lib/moe/fp8.js';
import { groupedGemm } from '../lib/moe/grouped-gemm.js';
import { freshSeed, poisoned, relErr, values } from './helpers.js';

const cpu = 'cpu' as const;
const rand = (shape: number[], dtype: 'f32' | 'bf16' = 'f32', scale = 1): Tensor =>
  tidy(() => Tensor.rand(shape, { seed: freshSeed(), low: -scale, high: scale, device: cpu }).cast(dtype));
const offsetsOf = (counts: number[]): Tensor => {
  const off = [0];
  for (const c of counts) off.push((off[off.length - 1] as number) + c);
  return Tensor.fromArray(off, { dtype: 'i32', device: cpu });
};

describe('grouped GEMM reference', () => {
  const counts = [3, 0, 5, 1]; // a group with no rows
  const M = 11; // two rows beyond the last group stay untouched
  const [K, N] = [7, 6];

  it('NN: rows of each group times that group’s matrix; rows outside every group untouched', () => {
    using a = rand([M, K], 'bf16');
    using b = rand([4, K, N], 'bf16');
    using off = offsetsOf(counts);
    using out = poisoned([M, N], 'f32', cpu);
    groupedGemm('NN', a, b, off, { out });
    const av = values(a),
      bv = values(b),
      ov = values(out);
    let row = 0;
    counts.forEach((c, e) => {
      for (let m = row; m < row + c; m++)
        for (let n = 0; n < N; n++) {
          let s = 0;
          for (let k = 0; k < K; k++) s += (av[m * K + k] as number) * (bv[(e * K + k) * N + n] as number);
          expect(ov[m * N + n]).toBeCloseTo(s, 5);
        }
      row += c;
    });
    for (let i = row * N; i < M * N; i++) expect(Number.isNaN(ov[i])).toBe(true);
  });

  it('NT and TN are the transposed products (dA and dW)', () => {
    using dC = rand([M, N], 'bf16');
    using b = rand([4, K, N], 'bf16');
    using a = rand([M, K], 'bf16');
    using off = offsetsOf(counts);
    using dA = groupedGemm('NT', dC, b, off, { dtype: 'f32' });
    using dW = groupedGemm('TN', a, dC, off, { dtype: 'f32' });
    const dcv = values(dC),
      bv = values(b),
      av = values(a);
    const dAref: number[] = [];
    const dWref = new Array(4 * K * N).fill(0);
    let row = 0;
    counts.forEach((c, e) => {
      for (let m = row; m < row + c; m++)
        for (let k = 0; k < K; k++) {
          let s = 0;
          for (let n = 0; n < N; n++) s += (dcv[m * N + n] as number) * (bv[(e * K + k) * N + n] as number);
          dAref[m * K + k] = s;
          for (let n = 0; n < N; n++) dWref[(e * K + k) * N + n] += (av[m * K + k] as number) * (dcv[m * N + n] as number);
        }
      row += c;
    });
    expect(relErr(values(dA).slice(0, row * K), dAref.slice(0, row * K))).toBeLessThan(1e-6);
    expect(relErr(values(dW), dWref)).toBeLessThan(1e-6);
    expect(
      values(dW)
        .slice(K * N, 2 * K * N)
        .every((v) => v === 0),
    ).toBe(true); // the empty group
  });

  it('accumulate adds into an f32 out', () => {
    using a = rand([4, 8], 'bf16');
    using b = rand([1, 8, 8], 'bf16');
    using off = offsetsOf([4]);
    using once = groupedGemm('NN', a, b, off, { dtype: 'f32' });
    using out = Tensor.full([4, 8], 1, { device: cpu });
    groupedGemm('NN', a, b, off, { out, accumulate: true });
    expect(
      relErr(
        values(out),
        values(once).map((v) => v + 1),
      ),
    ).toBeLessThan(1e-7);
  });

  it('rejects bad groups and shapes with clear errors', () => {
    using a = rand([4, 8], 'bf16');
    using b = rand([2, 8, 8], 'bf16');
    using bad = Tensor.fromArray([0, 3, 2], { dtype: 'i32', device: cpu });
    expect(() => groupedGemm('NN', a, b, bad)).toThrow(/'offsets' must rise from 0 to at most 4; entry 2 is 2 after 3/);
    using past = Tensor.fromArray([0, 3, 5], { dtype: 'i32', device: cpu });
    expect(() => groupedGemm('NN', a, b, past)).toThrow(/entry 2 is 5/);
    using three = offsetsOf([1, 1, 1]);
    expect(() => groupedGemm('NN', a, b, three)).toThrow(/'b' must be \[E, K, N\] with E = 3 groups/);
    using b7 = rand([2, 7, 8], 'bf16');
    using off = offsetsOf([2, 2]);
    expect(() => groupedGemm('NN', a, b7, off)).toThrow(/disagree on K/);
    using f = rand([2, 8, 8], 'f32');
    expect(() => groupedGemm('NN', a, f, off)).toThrow(InvalidArgumentError);
    expect(() => groupedGemm('XX' as never, a, b, off)).toThrow(/'mode' must be 'NN', 'NT' or 'TN'/);
  });
});

describe('SwiGLU experts, f32 reference', () => {
  // loss = Σ out ⊙ R; its gradients from expertsBackward against central differences.
  it('backward matches finite differences for a, W1, W3 and W2', () => {
    const [E, H, F] = [3, 4, 3];
    const counts = [2, 0, 3];
    const M = 5;
    using a = rand([M, H], 'f32');
    using w1 = rand([E, H, F], 'f32');
    using w3 = rand([E, H, F], 'f32');
    using w2 = rand([E, F, H], 'f32');
    using R = rand([M, H], 'f32');
    using off = offsetsOf(counts);
    const loss = (aa: Tensor, ww1: Tensor, ww3: Tensor, ww2: Tensor): number =>
      tidy(() => {
        const w13 = interleaveW13(ww1, ww3);
        const { out } = expertsForward(aa, w13, ww2, off);
        const o = values(out),
          r = values(R);
        return o.reduce((s, v, i) => s + v * (r[i] as number), 0);
      });
    const grads = tidy(() => {
      const w13 = interleaveW13(w1, w3);
      const fwd = expertsForward(a, w13, w2, off);
      return expertsBackward(R, a, w13, w2, off, fwd);
    });
    const dW13 = values(grads.dW13);
    const analytic = {
      a: values(grads.dA),
      w1: Array.from({ length: E * H * F }, (_, i) => dW13[2 * i] as number),
      w3: Array.from({ length: E * H * F }, (_, i) => dW13[2 * i + 1] as number),
      w2: values(grads.dW2),
    };
    const h = 1e-2;
    for (const [name, t] of [
      ['a', a],
      ['w1', w1],
      ['w3', w3],
      ['w2', w2],
    ] as const) {
      const base = values(t);
      const numeric = base.map((_, i) => {
        const perturbed = (delta: number): number =>
          tidy(() => {
            const v = base.slice();
            v[i] = (v[i] as number) + delta;
            const p = Tensor.fromArray(v, { shape: [...t.shape], device: cpu });
            const args = { a, w1, w3, w2, [name]: p };
            return loss(args.a, args.w1, args.w3, args.w2);
          });
        return (perturbed(h) - perturbed(-h)) / (2 * h);
      });
      expect(relErr(analytic[name], numeric), name).toBeLessThan(2e-3);
    }
    grads.dA.dispose();
    grads.dW13.dispose();
    grads.dW2.dispose();
  });
});

describe('fp8 rows into the forward product', () => {
  // fp8 rows ({ q, scales }, what an fp8 'keep' dispatch delivers) are the bf16 GEMM of the
  // dequantised rows, bit for bit (the op dequantises into a bf16 copy first, on every device); the
  // errors name the argument.
  const counts = [3, 0, 5, 3]; // every row in a group: no unwritten rows to compare
  const [M, K, N] = [11, 256, 24];

  it('NN and the SwiGLU experts on fp8 rows equal them on the dequantised rows', () => {
    tidy(() => {
      const x = rand([M, K], 'bf16', 3);
      const rows = quantizeFp8(x);
      const dense = dequantizeFp8(rows, 'bf16');
      const b = rand([4, K, N], 'bf16');
      const off = offsetsOf(counts);
      for (const dtype of ['bf16', 'f32'] as const) {
        const out = poisoned([M, N], dtype, cpu);
        groupedGemm('NN', rows, b, off, { out });
        expect(values(out)).toEqual(values(groupedGemm('NN', dense, b, off, { dtype })));
      }
      expect(groupedGemm('NN', rows, b, off).dtype).toBe('bf16'); // b's dtype, not the rows'
      const w13 = rand([4, K, 2 * N], 'bf16', 0.1);
      const w2 = rand([4, N, K], 'bf16', 0.1);
      const viaFp8 = expertsForward(rows, w13, w2, off);
      const viaDense = expertsForward(dense, w13, w2, off);
      expect(viaFp8.g.dtype).toBe('bf16');
      expect(values(viaFp8.out)).toEqual(values(viaDense.out));
      expect(values(viaFp8.h)).toEqual(values(viaDense.h));
      // Backward takes the same fp8 rows (dequantised for dW13).
      const dOut = rand([M, K], 'bf16');
      const g8 = expertsBackward(dOut, rows, w13, w2, off, viaFp8);
      const gd = expertsBackward(dOut, dense, w13, w2, off, viaDense);
      expect(values(g8.dW13)).toEqual(values(gd.dW13));
      expect(values(g8.dA)).toEqual(values(gd.dA));
    });
  });

  it('refuses fp8 rows outside the forward, and scales or weights that do not fit, naming the argument', () => {
    tidy(() => {
      const rows = quantizeFp8(rand([M, K], 'bf16'));
      const b = rand([4, K, N], 'bf16');
      const off = offsetsOf(counts);
      expect(() => groupedGemm('NT', rows, rand([4, N, K], 'bf16'), off)).toThrow(
        /fp8 rows are taken by the 'NN' \(forward\) product only/,
      );
      expect(() => groupedGemm('NN', { q: rows.q, scales: rand([M, 1]) }, b, off)).toThrow(/'a.scales' must be \[11,2\], got f32\[11,1\]/);
      expect(() => groupedGemm('NN', rows, rand([4, K, N], 'f32'), off)).toThrow(/'b' .* must be bf16 when 'a' holds fp8 rows/);
      expect(() => groupedGemm('NN', { q: rows.q } as never, b, off)).toThrow(/'a' must be a Tensor or fp8 rows \{ q, scales \}/);
      expect(() => groupedGemm('NN', { q: rows.q, scales: rows.q }, b, off)).toThrow(
        /'a.scales' fp8e4m3\[11,256\] cpu has dtype fp8e4m3; expected one of f32/,
      );
    });
  });
});
