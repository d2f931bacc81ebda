// The training ops' CPU references against float64 oracles written here, and their backward passes
// against central finite differences of the forward; outputs poisoned before each run.
import { describe, expect, it } from 'vitest';

import {
  adamwStep,
  balanceBiasUpdate,
  cosineLr,
  cosineSchedule,
  crossEntropyLoss,
  type DType,
  InvalidArgumentError,
  memoryStats,
  MoEModel,
  mseLoss,
  rmsnorm,
  rmsnormBackward,
  singleRankGroup,
  sumOfSquares,
  Tensor,
  tidy,
} from '../lib/index.js';
import { Device } from '../lib/device.js';
import { freshSeed, poisoned, relErr, tolerance, values } from './helpers.js';

const cpu = 'cpu' as const;
const actTypes: DType[] = ['f32', 'bf16'];

function randomInput(shape: number[], dtype: DType = 'f32', low = -2, high = 2): Tensor {
  using f = Tensor.rand(shape, { seed: freshSeed(), low, high, device: cpu });
  return f.cast(dtype);
}

function fromValues(v: number[], shape: number[], dtype: DType = 'f32'): Tensor {
  using f = Tensor.fromArray(Float32Array.from(v), { shape, device: cpu });
  return f.cast(dtype);
}

/** Central differences of scalar f at x (f32 values), one entry per element. */
function numericGrad(x: number[], f: (x: number[]) => number, h: number): number[] {
  return x.map((_, i) => {
    const up = x.slice();
    const down = x.slice();
    up[i] = (x[i] as number) + h;
    down[i] = (x[i] as number) - h;
    return (f(up) - f(down)) / (2 * h);
  });
}

const dot = (a: number[], b: number[]): number => a.reduce((s, x, i) => s + x * (b[i] as number), 0);

// ------------------------------------------------------------------------------------------ RMSNorm

function rmsnormOracle(x: number[], w: number[], T: number, H: number, eps: number): { y: number[]; rstd: number[] } {
  const y: number[] = [];
  const rstd: number[] = [];
  for (let t = 0; t < T; t++) {
    let ss = 0;
    for (let j = 0; j < H; j++) ss += (x[t * H + j] as number) ** 2;
    const r = 1 / Math.sqrt(ss / H + eps);
    rstd.push(r);
    for (let j = 0; j < H; j++) y.push((x[t * H + j] as number) * r * (w[j] as number));
  }
  return { y, rstd };
}

/** The backward written from the chain rule directly (not the op's x̂ formulation). */
function rmsnormBackwardOracle(dy: number[], x: number[], w: number[], T: number, H: number, eps: number): { dx: number[]; dw: number[] } {
  const dx: number[] = [];
  const dw = new Array<number>(H).fill(0);
  for (let t = 0; t < T; t++) {
    let ss = 0;
    for (let j = 0; j < H; j++) ss += (x[t * H + j] as number) ** 2;
    const ms = ss / H + eps;
    const r = ms ** -0.5;
    // dy_i w_i x_i summed: ∂r/∂x_j = −x_j r³ / H
    let s = 0;
    for (let i = 0; i < H; i++) s += (dy[t * H + i] as number) * (w[i] as number) * (x[t * H + i] as number);
    for (let j = 0; j < H; j++) {
      const xj = x[t * H + j] as number;
      dx.push((dy[t * H + j] as number) * (w[j] as number) * r - (s * xj * r ** 3) / H);
      dw[j] = (dw[j] as number) + (dy[t * H + j] as number) * xj * r;
    }
  }
  return { dx, dw };
}

describe.each(actTypes)('rmsnorm %s', (dtype) => {
  const [T, H, eps] = [7, 37, 1e-5];

  it('forward against a float64 oracle', () => {
    using x = randomInput([T, H], dtype);
    using w = randomInput([H], 'f32', 0.5, 1.5);
    using y = poisoned([T, H], dtype, cpu);
    using rstd = poisoned([T], 'f32', cpu);
    const r = rmsnorm(x, w, { eps, out: { y, rstd } });
    expect(r.y).toBe(y);
    const ref = rmsnormOracle(values(x), values(w), T, H, eps);
    expect(relErr(values(y), ref.y)).toBeLessThan(dtype === 'f32' ? 1e-6 : tolerance.bf16);
    expect(relErr(values(rstd), ref.rstd)).toBeLessThan(1e-6);
    expect(y.dtype).toBe(dtype);
  });

  it('backward against the chain-rule oracle, and accumulate', () => {
    using x = randomInput([T, H], dtype);
    using w = randomInput([H], 'f32', 0.5, 1.5);
    using dy = randomInput([T, H], dtype);
    const f = rmsnorm(x, w, { eps });
    using _y = f.y;
    using rstd = f.rstd;
    using dx = poisoned([T, H], dtype, cpu);
    using dWeight = poisoned([H], 'f32', cpu);
    rmsnormBackward(dy, x, w, rstd, { out: { dx, dWeight } });
    const ref = rmsnormBackwardOracle(values(dy), values(x), values(w), T, H, eps);
    const tol = dtype === 'f32' ? 1e-5 : tolerance.bf16;
    expect(relErr(values(dx), ref.dx)).toBeLessThan(tol);
    expect(relErr(values(dWeight), ref.dw)).toBeLessThan(1e-5);
    rmsnormBackward(dy, x, w, rstd, { out: { dx, dWeight }, accumulate: true });
    expect(
      relErr(
        values(dWeight),
        ref.dw.map((v) => 2 * v),
      ),
    ).toBeLessThan(1e-5);
  });
});

describe('rmsnorm finite differences (f32)', () => {
  it('dx and dWeight match central differences of Σ c·y', () => {
    const [T, H, eps, h] = [3, 5, 1e-5, 1e-2];
    using x = randomInput([T, H]);
    using w = randomInput([H], 'f32', 0.5, 1.5);
    using c = randomInput([T, H]);
    const cv = values(c);
    const loss = (xv: number[], wv: number[]): number => {
      using xt = fromValues(xv, [T, H]);
      using wt = fromValues(wv, [H]);
      const r = rmsnorm(xt, wt, { eps });
      using y = r.y;
      using _r = r.rstd;
      return dot(values(y), cv);
    };
    const xv = values(x);
    const wv = values(w);
    const { y, rstd } = rmsnorm(x, w, { eps });
    y.dispose();
    using _rstd = rstd;
    const g = rmsnormBackward(c, x, w, rstd);
    using dx = g.dx;
    using dWeight = g.dWeight;
    expect(
      relErr(
        values(dx),
        numericGrad(xv, (v) => loss(v, wv), h),
      ),
    ).toBeLessThan(1e-2);
    expect(
      relErr(
        values(dWeight),
        numericGrad(wv, (v) => loss(xv, v), h),
      ),
    ).toBeLessThan(1e-2);
  });
});

// ------------------------------------------------------------------------------------------- losses

describe.each(actTypes)('mseLoss %s', (dtype) => {
  it('loss and gradient against a float64 oracle; grad: false writes none', () => {
    const [T, N] = [9, 13];
    using pred = randomInput([T, N], dtype);
    using target = randomInput([T, N], 'f32');
    const p = values(pred);
    const q = values(target);
    const n = T * N;
    const refLoss = p.reduce((s, x, i) => s + (x - (q[i] as number)) ** 2, 0) / n;
    const refGrad = p.map((x, i) => (2 * (x - (q[i] as number))) / n);
    using loss = poisoned([1], 'f32', cpu);
    using grad = poisoned([T, N], dtype, cpu);
    mseLoss(pred, target, { out: { loss, grad } });
    expect(relErr(values(loss), [refLoss])).toBeLessThan(1e-6);
    expect(relErr(values(grad), refGrad)).toBeLessThan(dtype === 'f32' ? 1e-6 : tolerance.bf16);
    const r = mseLoss(pred, target, { grad: false });
    using l2 = r.loss;
    expect(r.grad).toBeNull();
    expect(relErr(values(l2), [refLoss])).toBeLessThan(1e-6);
  });
});

describe('mseLoss finite differences (f32)', () => {
  it('grad matches central differences', () => {
    const [T, N, h] = [3, 4, 1e-2];
    using pred = randomInput([T, N]);
    using target = randomInput([T, N]);
    const r = mseLoss(pred, target);
    using _l = r.loss;
    using grad = r.grad as Tensor;
    const f = (pv: number[]): number => {
      using pt = fromValues(pv, [T, N]);
      using l = mseLoss(pt, target, { grad: false }).loss;
      return l.item();
    };
    expect(relErr(values(grad), numericGrad(values(pred), f, h))).toBeLessThan(1e-2);
  });
});

function crossEntropyOracle(
  p: number[],
  y: number[],
  T: number,
  N: number,
  ignore: number,
): { loss: number; grad: number[]; correct: number } {
  const count = y.filter((c) => c !== ignore).length;
  let total = 0;
  let correct = 0;
  const grad: number[] = [];
  for (let t = 0; t < T; t++) {
    const row = p.slice(t * N, (t + 1) * N);
    const mx = Math.max(...row);
    const arg = row.indexOf(mx);
    const z = row.reduce((s, v) => s + Math.exp(v - mx), 0);
    const lse = mx + Math.log(z);
    const target = y[t] as number;
    if (target !== ignore) {
      total += lse - (row[target] as number);
      if (arg === target) correct++;
    }
    for (let c = 0; c < N; c++) grad.push(target === ignore ? 0 : (Math.exp((row[c] as number) - lse) - (c === target ? 1 : 0)) / count);
  }
  return { loss: count > 0 ? total / count : 0, grad, correct };
}

describe.each(actTypes)('crossEntropyLoss %s', (dtype) => {
  it('loss, gradient and correct count against a float64 oracle, with ignored rows', () => {
    const [T, N] = [11, 7];
    using pred = randomInput([T, N], dtype, -3, 3);
    const p = values(pred);
    // targets: some the argmax (so 'correct' is not trivially 0), some ignored, the rest random
    const y = Array.from({ length: T }, (_, t) => {
      if (t % 4 === 1) return -100;
      if (t % 3 === 0) return p.slice(t * N, (t + 1) * N).indexOf(Math.max(...p.slice(t * N, (t + 1) * N)));
      return (t * 5 + 3) % N;
    });
    using target = Tensor.fromArray(y, { dtype: 'i32', device: cpu });
    using loss = poisoned([1], 'f32', cpu);
    using grad = poisoned([T, N], dtype, cpu);
    using correct = poisoned([1], 'i32', cpu);
    crossEntropyLoss(pred, target, { out: { loss, grad, correct } });
    const ref = crossEntropyOracle(p, y, T, N, -100);
    expect(relErr(values(loss), [ref.loss])).toBeLessThan(1e-6);
    expect(relErr(values(grad), ref.grad)).toBeLessThan(dtype === 'f32' ? 1e-6 : tolerance.bf16);
    expect(correct.toNumbers()).toEqual([ref.correct]);
    expect(ref.correct).toBeGreaterThan(0);
  });

  it('a custom ignoreIndex; every row ignored gives 0 loss and 0 gradient', () => {
    using pred = randomInput([4, 5], dtype);
    using target = Tensor.fromArray([7, 7, 7, 7], { dtype: 'i32', device: cpu });
    using g = poisoned([4, 5], dtype, cpu);
    const r = crossEntropyLoss(pred, target, { ignoreIndex: 7, out: { grad: g } });
    using loss = r.loss;
    using correct = r.correct;
    expect(loss.toNumbers()).toEqual([0]);
    expect(correct.toNumbers()).toEqual([0]);
    expect(values(g).every((v) => v === 0)).toBe(true);
  });
});

describe('crossEntropyLoss details', () => {
  it('argmax ties go to the lower class; out-of-range targets throw on the CPU', () => {
    using pred = Tensor.fromArray([1, 3, 3, 0, 2, 2, 2, 2], { shape: [2, 4], device: cpu });
    using target = Tensor.fromArray([2, 0], { dtype: 'i32', device: cpu });
    const r = crossEntropyLoss(pred, target, { grad: false });
    using _l = r.loss;
    using correct = r.correct;
    expect(correct.toNumbers()).toEqual([1]); // row 0: argmax 1 (not 2); row 1: argmax 0
    using bad = Tensor.fromArray([2, 4], { dtype: 'i32', device: cpu });
    const live = memoryStats(cpu).liveBytes;
    expect(() => crossEntropyLoss(pred, bad)).toThrow(/'target' row 1 is 4/);
    expect(memoryStats(cpu).liveBytes).toBe(live);
  });

  it('grad matches central differences (f32)', () => {
    const [T, N, h] = [4, 5, 1e-2];
    using pred = randomInput([T, N]);
    using target = Tensor.fromArray([3, -100, 0, 4], { dtype: 'i32', device: cpu });
    const r = crossEntropyLoss(pred, target);
    using _l = r.loss;
    using _c = r.correct;
    using grad = r.grad as Tensor;
    const f = (pv: number[]): number => {
      using pt = fromValues(pv, [T, N]);
      const o = crossEntropyLoss(pt, target, { grad: false });
      using l = o.loss;
      using _cc = o.correct;
      return l.item();
    };
    expect(relErr(values(grad), numericGrad(values(pred), f, h))).toBeLessThan(1e-2);
  });
});

// -------------------------------------------------------------------------------------------- AdamW

/** torch.optim.AdamW's update, written out in float64. */
function adamwOracle(
  w: number[],
  g: number[],
  m: number[],
  v: number[],
  o: { lr: number; beta1: number; beta2: number; eps: number; weightDecay: number; step: number; gradScale: number },
): void {
  const bc1 = 1 - o.beta1 ** o.step;
  const bc2 = 1 - o.beta2 ** o.step;
  for (let i = 0; i < w.length; i++) {
    const gi = o.gradScale * (g[i] as number);
    w[i] = (w[i] as number) * (1 - o.lr * o.weightDecay);
    m[i] = o.beta1 * (m[i] as number) + (1 - o.beta1) * gi;
    v[i] = o.beta2 * (v[i] as number) + (1 - o.beta2) * gi * gi;
    const mHat = (m[i] as number) / bc1;
    const vHat = (v[i] as number) / bc2;
    w[i] = (w[i] as number) - (o.lr * mHat) / (Math.sqrt(vHat) + o.eps);
  }
}

describe('adamwStep', () => {
  it.each(['f32', 'bf16'] as const)(
    'three steps against a float64 AdamW, %s gradients, with weight decay, gradScale and the bf16 copy',
    (gradDtype) => {
      const n = 203; // not a multiple of 4
      using param = randomInput([7, 29]);
      using mom = Tensor.zeros([n], { device: cpu });
      using mom2 = Tensor.zeros([n], { device: cpu });
      using copy = poisoned([n], 'bf16', cpu);
      const w = values(param);
      const m = new Array<number>(n).fill(0);
      const v = new Array<number>(n).fill(0);
      const hp = { lr: 3e-3, beta1: 0.85, beta2: 0.99, eps: 1e-6, weightDecay: 0.1, gradScale: 0.5 };
      for (let step = 1; step <= 3; step++) {
        using grad = randomInput([n], gradDtype);
        const gv = values(grad); // a bf16 gradient's values, widened exactly
        adamwStep(param, grad, mom, mom2, { ...hp, step, paramBf16: copy });
        adamwOracle(w, gv, m, v, { ...hp, step });
        expect(relErr(values(param), w), `param at step ${step}`).toBeLessThan(1e-6);
        expect(relErr(values(mom), m)).toBeLessThan(1e-6);
        expect(relErr(values(mom2), v)).toBeLessThan(1e-6);
        using expected = param.view(n).cast('bf16');
        expect(Array.from(copy.toArray() as Uint16Array)).toEqual(Array.from(expected.toArray() as Uint16Array));
      }
    },
  );

  it('a bf16 gradient gives the same bits as its exact f32 widening', () => {
    const n = 203;
    using g16 = randomInput([n], 'bf16');
    using g32 = g16.cast('f32');
    const run = (grad: Tensor): number[][] => {
      using p = fromValues(
        Array.from({ length: n }, (_, i) => Math.sin(i)),
        [n],
      );
      using m = Tensor.zeros([n], { device: cpu });
      using v = Tensor.zeros([n], { device: cpu });
      using copy = poisoned([n], 'bf16', cpu);
      for (let step = 1; step <= 2; step++) adamwStep(p, grad, m, v, { lr: 1e-2, step, weightDecay: 0.1, gradScale: 0.5, paramBf16: copy });
      return [p, m, v, copy].map((t) => Array.from(t.toArray() as Float32Array | Uint16Array));
    };
    expect(run(g16)).toEqual(run(g32));
  });

  it('the first step without decay moves each weight by about lr against the sign of its gradient', () => {
    using param = Tensor.fromArray([1, -1, 0.5, 2], { device: cpu });
    using grad = Tensor.fromArray([0.3, -2, 1e-3, -0.01], { device: cpu });
    using m = Tensor.zeros([4], { device: cpu });
    using v = Tensor.zeros([4], { device: cpu });
    adamwStep(param, grad, m, v, { lr: 0.1, step: 1, eps: 1e-12 });
    expect(relErr(values(param), [0.9, -0.9, 0.4, 2.1])).toBeLessThan(1e-6);
  });

  it('checks its hyperparameters', () => {
    using p = Tensor.zeros([4], { device: cpu });
    expect(() => adamwStep(p, p, p, p, { lr: 1e-3, step: 0 })).toThrow(/'step'/);
    expect(() => adamwStep(p, p, p, p, { lr: 1e-3, step: 1, beta1: 1 })).toThrow(/beta1/);
    expect(() => adamwStep(p, p, p, p, { lr: Number.NaN, step: 1 })).toThrow(InvalidArgumentError);
    using short = Tensor.zeros([3], { device: cpu });
    // (p for every tensor passes the number checks above, which come first, but not the memory check.)
    expect(() => adamwStep(p, p, short, p, { lr: 1e-3, step: 1 })).toThrow(/adamw: 'param' overlaps 'grad' in memory/);
    using g = Tensor.zeros([4], { device: cpu });
    using v = Tensor.zeros([4], { device: cpu });
    expect(() => adamwStep(p, g, short, v, { lr: 1e-3, step: 1 })).toThrow(/'expAvg'.*3 elements/);
    using g16 = Tensor.zeros([4], { device: cpu, dtype: 'f16' });
    expect(() => adamwStep(p, g16, g, v, { lr: 1e-3, step: 1 })).toThrow(/adamw: 'grad'.*f16/);
  });
});

// ----------------------------------------------------------------------------------- norms, balance

describe('sumOfSquares', () => {
  it.each(actTypes)('%s against float64, accumulated over several tensors', (dtype) => {
    using a = randomInput([17, 31], dtype);
    using b = randomInput([5], dtype);
    using empty = Tensor.zeros([0, 3], { dtype, device: cpu });
    const ss = (t: Tensor): number => values(t).reduce((s, x) => s + x * x, 0);
    using out = poisoned([1], 'f32', cpu);
    sumOfSquares(a, { out });
    expect(relErr(values(out), [ss(a)])).toBeLessThan(1e-6);
    sumOfSquares(b, { out, accumulate: true });
    sumOfSquares(empty, { out, accumulate: true });
    expect(relErr(values(out), [ss(a) + ss(b)])).toBeLessThan(1e-6);
    expect(() => sumOfSquares(a, { accumulate: true })).toThrow(/needs 'out'/);
  });
});

describe('balanceBiasUpdate', () => {
  it('moves the bias by gamma toward under-loaded experts, not at all for experts at the mean', () => {
    for (const dtype of ['i32', 'f32'] as const) {
      // mean = 10: experts at 10 stay, above move down, below move up
      using load = Tensor.fromArray([10, 4, 16, 10, 0, 20], { dtype, device: cpu });
      using bias = Tensor.fromArray([0, 0.5, -0.5, 1, 0, 0], { device: cpu });
      expect(balanceBiasUpdate(bias, load, 0.25)).toBe(bias);
      expect(values(bias)).toEqual([0, 0.75, -0.75, 1, 0.25, -0.25]);
    }
    // a non-integer mean: no expert sits at it
    using load = Tensor.fromArray([1, 2], { dtype: 'i32', device: cpu });
    using bias = Tensor.zeros([2], { device: cpu });
    balanceBiasUpdate(bias, load, 1e-3);
    expect(values(bias)).toEqual([Math.fround(1e-3), -Math.fround(1e-3)]);
    using wrong = Tensor.zeros([3], { dtype: 'i32', device: cpu });
    expect(() => balanceBiasUpdate(bias, wrong, 1)).toThrow(/'load'/);
  });
});

// ------------------------------------------------------------------------------------------ schedule

describe('cosineSchedule', () => {
  it('warms up linearly, decays by a cosine, then holds minLr', () => {
    const lr = cosineSchedule({ warmupSteps: 10, totalSteps: 110, maxLr: 1e-3, minLr: 1e-4 });
    expect(lr(0)).toBeCloseTo(1e-4, 12); // (0+1)/10 of maxLr, from 0
    expect(lr(4)).toBeCloseTo(5e-4, 12);
    expect(lr(9)).toBeCloseTo(1e-3, 12); // the peak, once: the warm-up's last step
    expect(lr(10)).toBeCloseTo(1e-4 + 0.45e-3 * (1 + Math.cos(Math.PI / 100)), 12);
    expect(lr(10)).toBeLessThan(lr(9));
    expect(lr(59)).toBeCloseTo(5.5e-4, 12); // half way: the mean of max and min
    expect(lr(109)).toBe(1e-4); // the run's last step takes the floor
    expect(lr(1000)).toBe(1e-4);
    for (let s = 9; s < 109; s++) expect(lr(s + 1)).toBeLessThan(lr(s));
    expect(cosineLr(34, { warmupSteps: 10, totalSteps: 110, maxLr: 1e-3, minLr: 1e-4 })).toBeCloseTo(
      1e-4 + 0.45e-3 * (1 + Math.cos(Math.PI / 4)),
      12,
    );
  });

  it('warms up from minLr when asked; no warm-up; bad configs name the field', () => {
    const fromMin = cosineSchedule({ warmupSteps: 4, totalSteps: 8, maxLr: 1, minLr: 0.2, warmupStartLr: 0.2 });
    expect(fromMin(0)).toBeCloseTo(0.4, 12);
    expect(fromMin(3)).toBeCloseTo(1, 12);
    // without warm-up step 0 is the peak and the last step the floor
    const noWarm = cosineSchedule({ warmupSteps: 0, totalSteps: 4, maxLr: 2 });
    expect([0, 1, 2, 3, 4].map(noWarm).map((v) => Number(v.toFixed(12)))).toEqual([2, 1.5, 0.5, 0, 0]);
    // a one-step run trains at maxLr
    expect(cosineSchedule({ warmupSteps: 0, totalSteps: 1, maxLr: 2, minLr: 0.1 })(0)).toBe(2);
    // a run no longer than its warm-up ends at the peak
    const allWarm = cosineSchedule({ warmupSteps: 4, totalSteps: 4, maxLr: 1, minLr: 0.1 });
    expect([0, 1, 2, 3, 4].map(allWarm)).toEqual([0.25, 0.5, 0.75, 1, 0.1]);
    expect(() => cosineSchedule({ warmupSteps: 5, totalSteps: 4, maxLr: 1 })).toThrow(/'totalSteps'/);
    expect(() => cosineSchedule({ warmupSteps: 1, totalSteps: 4, maxLr: 1, minLr: 2 })).toThrow(/'minLr'/);
    expect(() => cosineSchedule({ warmupSteps: 1.5, totalSteps: 4, maxLr: 1 })).toThrow(/'warmupSteps'/);
    expect(() => noWarm(-1)).toThrow(/'step'/);
  });
});

// ----------------------------------------------------------------------------------------- bad calls

describe('training ops, bad calls', () => {
  it('name the op and the argument, and leave no allocation behind', () => {
    using x = randomInput([3, 4]);
    using w = randomInput([5]);
    using xi = Tensor.zeros([3, 4], { dtype: 'i32', device: cpu });
    using w4 = randomInput([4]);
    using t = Tensor.zeros([3], { device: cpu });
    const live = memoryStats(cpu).liveBytes;
    expect(() => rmsnorm(x, w)).toThrow(/rmsnorm: 'weight'.*\[4\]/);
    expect(() => rmsnorm(xi, w4)).toThrow(/rmsnorm: 'x'.*expected one of f32, bf16/);
    expect(() => rmsnormBackward(x, x, w4, w4)).toThrow(/'rstd'/);
    expect(() => mseLoss(x, w)).toThrow(/mseLoss: 'target'/);
    expect(() => crossEntropyLoss(x, t)).toThrow(/crossEntropyLoss: 'target'.*i32/);
    expect(memoryStats(cpu).liveBytes).toBe(live);
  });
});

describe('MoEModel memory', () => {
  // A bf16 model's parameters name [H,E] and [H,H] views of its [1,H,E] and [1,H,H] compute copies.
  // Made anew per params() call, the views outlived the model (a view holds its storage): every
  // Trainer on a GPU left 36 KiB live (the GPU suite's micro-batch test found it). bf16 here runs
  // the same TypeScript on the CPU.
  it('a bf16 model: params() (twice), a step accumulating into buffers, and dispose leave live bytes flat', () => {
    const live = memoryStats(cpu).liveBytes;
    const model = new MoEModel({ hidden: 16, ffn: 8, numExperts: 4, topK: 2, layers: 2 }, Device.parse(cpu), 'bf16', singleRankGroup, 3);
    const [a, b] = [model.params(), model.params()];
    a.forEach((p, i) => expect(p.computeBf16, p.name).toBe(b[i]?.computeBf16)); // the same views, not new ones
    expect(a.find((p) => p.name === 'head.weight')?.computeBf16?.shape).toEqual([16, 16]);
    const x = Tensor.randn([8, 16], { seed: 1, device: cpu, dtype: 'bf16' });
    const target = Tensor.randn([8, 16], { seed: 2, device: cpu });
    tidy(() => {
      // The forward's loss and routing counts are the caller's: the tidy frees them.
      const grads = model.backward(model.forward(x, target));
      model.backward(model.forward(x, target), { accumulate: grads });
      for (const t of grads.values()) t.dispose();
    });
    for (const t of [x, target]) t.dispose();
    model.dispose();
    expect(memoryStats(cpu).liveBytes).toBe(live);
  });
});
