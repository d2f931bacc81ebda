// The training ops' CUDA kernels against their CPU references on fresh random inputs, outputs
// poisoned before each run; live device bytes back at their baseline after each test.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import {
  adamwStep,
  balanceBiasUpdate,
  ClusterTask,
  crossEntropyLoss,
  type DType,
  memoryStats,
  mseLoss,
  rmsnorm,
  rmsnormBackward,
  sumOfSquares,
  Tensor,
} from '../../lib/index.js';
import { resolveConfig } from '../../lib/train/config.js';
import { Trainer } from '../../lib/train/trainer.js';
import { freshSeed, poisoned, relErr, tolerance, values } from '../helpers.js';
import { hasGpu } from './gpu.js';

const gpu = 'cuda:0' as const;
const cpu = 'cpu' as const;
const actTypes: DType[] = ['f32', 'bf16'];

/** The same random values on both devices (drawn on the CPU, copied over). */
function pair(shape: number[], dtype: DType = 'f32', low = -2, high = 2): [Tensor, Tensor] {
  using f = Tensor.rand(shape, { seed: freshSeed(), low, high, device: cpu });
  const c = f.cast(dtype);
  return [c, c.to(gpu)];
}

function floats(t: Tensor): Float32Array {
  return t.toFloat32Array();
}

describe.skipIf(!hasGpu)('CUDA training ops against the CPU reference', () => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
  });
  afterEach(() => {
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  describe.each(actTypes)('%s', (dtype) => {
    const tol = dtype === 'f32' ? 1e-5 : tolerance.bf16;

    it.each([
      [1, 1],
      [7, 37],
      [300, 1000],
      [1024, 7168],
      [3, 20000],
    ])('rmsnorm forward and backward on [%i, %i]', (T, H) => {
      const [x, gx] = pair([T, H], dtype);
      const [w, gw] = pair([H], 'f32', 0.5, 1.5);
      const [dy, gdy] = pair([T, H], dtype);
      const [dw0, gdw0] = pair([H], 'f32');
      using y = poisoned([T, H], dtype, cpu);
      using rstd = poisoned([T], 'f32', cpu);
      using gy = poisoned([T, H], dtype, gpu);
      using grstd = poisoned([T], 'f32', gpu);
      rmsnorm(x, w, { out: { y, rstd } });
      rmsnorm(gx, gw, { out: { y: gy, rstd: grstd } });
      expect(relErr(floats(gy), floats(y)), 'y').toBeLessThan(tol);
      expect(relErr(floats(grstd), floats(rstd)), 'rstd').toBeLessThan(1e-5);
      using dx = poisoned([T, H], dtype, cpu);
      using gdx = poisoned([T, H], dtype, gpu);
      // accumulate into a random dWeight: both what was there and what was added must be right
      rmsnormBackward(dy, x, w, rstd, { out: { dx, dWeight: dw0 }, accumulate: true });
      rmsnormBackward(gdy, gx, gw, grstd, { out: { dx: gdx, dWeight: gdw0 }, accumulate: true });
      if (H === 1) {
        // dx = rstd·(dy·w − x̂·mean(x̂·w·dy)); with H = 1 that is rstd·dy·w·(1 − x̂²) and
        // 1 − x̂² = eps·rstd² ≈ 1e-6: the two terms cancel to about 1e-6 of their size, so an fp32
        // rounding of x̂ or rstd (GPU rsqrtf, or the f32 rstd the CPU reference reads) moves dx by
        // tens of percent of itself. Judge the error against the size of the cancelled terms.
        const d = floats(dy)[0] as number,
          ww = floats(w)[0] as number,
          rs = floats(rstd)[0] as number;
        const scale = Math.abs(rs * d * ww);
        expect(Math.abs((floats(gdx)[0] as number) - (floats(dx)[0] as number)) / scale, 'dx (H = 1)').toBeLessThan(tol);
      } else {
        expect(relErr(floats(gdx), floats(dx)), 'dx').toBeLessThan(tol);
      }
      expect(relErr(floats(gdw0), floats(dw0)), 'dWeight').toBeLessThan(1e-4);
      // deterministic: the same inputs give the same bits
      using again = poisoned([H], 'f32', gpu);
      using again2 = poisoned([H], 'f32', gpu);
      rmsnormBackward(gdy, gx, gw, grstd, { out: { dx: gdx, dWeight: again } });
      rmsnormBackward(gdy, gx, gw, grstd, { out: { dx: gdx, dWeight: again2 } });
      expect(Array.from(floats(again))).toEqual(Array.from(floats(again2)));
      for (const t of [x, gx, w, gw, dy, gdy, dw0, gdw0]) t.dispose();
    });

    it.each([
      [1, 1],
      [33, 100],
      [4096, 1024],
    ])('mseLoss on [%i, %i]', (T, N) => {
      const [p, gp] = pair([T, N], dtype);
      const [q, gq] = pair([T, N], 'f32');
      using loss = poisoned([1], 'f32', cpu);
      using grad = poisoned([T, N], dtype, cpu);
      using gloss = poisoned([1], 'f32', gpu);
      using ggrad = poisoned([T, N], dtype, gpu);
      mseLoss(p, q, { out: { loss, grad } });
      mseLoss(gp, gq, { out: { loss: gloss, grad: ggrad } });
      expect(relErr(floats(gloss), floats(loss))).toBeLessThan(1e-5);
      expect(relErr(floats(ggrad), floats(grad))).toBeLessThan(tol);
      for (const t of [p, gp, q, gq]) t.dispose();
    });

    it.each([
      [1, 1],
      [37, 10],
      [2048, 32000],
      [5, 3000],
    ])('crossEntropyLoss on [%i, %i] with ignored rows', (T, N) => {
      const [p, gp] = pair([T, N], dtype, -4, 4);
      // every third row's target is its argmax, so 'correct' counts something; every fifth is ignored
      const pv = floats(p);
      const argmax = (t: number): number => {
        let best = 0;
        for (let c = 1; c < N; c++) if ((pv[t * N + c] as number) > (pv[t * N + best] as number)) best = c;
        return best;
      };
      const ys = Array.from({ length: T }, (_, t) => (t % 5 === 2 ? -100 : t % 3 === 0 ? argmax(t) : (t * 7919 + 13) % N));
      using target = Tensor.fromArray(ys, { dtype: 'i32', device: cpu });
      using gtarget = target.to(gpu);
      using loss = poisoned([1], 'f32', cpu);
      using grad = poisoned([T, N], dtype, cpu);
      using correct = poisoned([1], 'i32', cpu);
      using gloss = poisoned([1], 'f32', gpu);
      using ggrad = poisoned([T, N], dtype, gpu);
      using gcorrect = poisoned([1], 'i32', gpu);
      crossEntropyLoss(p, target, { out: { loss, grad, correct } });
      crossEntropyLoss(gp, gtarget, { out: { loss: gloss, grad: ggrad, correct: gcorrect } });
      expect(relErr(floats(gloss), floats(loss))).toBeLessThan(1e-5);
      expect(relErr(floats(ggrad), floats(grad))).toBeLessThan(tol);
      expect(gcorrect.toNumbers()).toEqual(correct.toNumbers());
      expect(correct.item()).toBeGreaterThan(0);
      for (const t of [p, gp]) t.dispose();
    });

    it.each([[1], [1000], [12_345_679]])('sumOfSquares over %i elements, accumulating', (n) => {
      const [x, gx] = pair([n], dtype);
      using out = Tensor.fromArray([2.5], { device: cpu });
      using gout = Tensor.fromArray([2.5], { device: gpu });
      sumOfSquares(x, { out, accumulate: true });
      sumOfSquares(gx, { out: gout, accumulate: true });
      expect(relErr(floats(gout), floats(out))).toBeLessThan(1e-5);
      using fresh = poisoned([1], 'f32', gpu);
      using fresh2 = poisoned([1], 'f32', gpu);
      sumOfSquares(gx, { out: fresh });
      sumOfSquares(gx, { out: fresh2 });
      expect(fresh.item()).toBe(fresh2.item());
      x.dispose();
      gx.dispose();
    });
  });

  it('crossEntropyLoss: a target out of range gives NaN on the GPU (the CPU throws)', () => {
    const [p, gp] = pair([3, 4]);
    using gtarget = Tensor.fromArray([1, 9, -100], { dtype: 'i32', device: gpu });
    const r = crossEntropyLoss(gp, gtarget);
    using loss = r.loss;
    using grad = r.grad as Tensor;
    using _correct = r.correct;
    expect(Number.isNaN(loss.item())).toBe(true);
    expect(values(grad).slice(4, 8).every(Number.isNaN)).toBe(true);
    expect(values(grad).slice(8)).toEqual([0, 0, 0, 0]);
    p.dispose();
    gp.dispose();
  });

  it.each([
    [1, 'f32'],
    [203, 'f32'],
    [1_000_003, 'f32'],
    [203, 'bf16'],
    [1_000_003, 'bf16'],
  ] as const)('adamwStep on %i elements, %s gradients, three steps, with the bf16 copy', (n, gradDtype) => {
    const [w, gw] = pair([n]);
    using m = Tensor.zeros([n], { device: cpu });
    using v = Tensor.zeros([n], { device: cpu });
    using gm = Tensor.zeros([n], { device: gpu });
    using gv = Tensor.zeros([n], { device: gpu });
    using copy = poisoned([n], 'bf16', cpu);
    using gcopy = poisoned([n], 'bf16', gpu);
    const hp = { lr: 1e-3, beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, gradScale: 0.7 };
    for (let step = 1; step <= 3; step++) {
      const [g, gg] = pair([n], gradDtype);
      adamwStep(w, g, m, v, { ...hp, step, paramBf16: copy });
      adamwStep(gw, gg, gm, gv, { ...hp, step, paramBf16: gcopy });
      g.dispose();
      gg.dispose();
    }
    expect(relErr(floats(gw), floats(w))).toBeLessThan(1e-6);
    expect(relErr(floats(gm), floats(m))).toBeLessThan(1e-6);
    expect(relErr(floats(gv), floats(v))).toBeLessThan(1e-6);
    expect(relErr(floats(gcopy), floats(copy))).toBeLessThan(tolerance.bf16);
    w.dispose();
    gw.dispose();
  });

  it('balanceBiasUpdate matches the CPU exactly, for i32 and f32 loads', () => {
    for (const dtype of ['i32', 'f32'] as const) {
      for (const E of [1, 8, 256, 1000]) {
        using f = Tensor.rand([E], { seed: freshSeed(), low: 0, high: 50, device: cpu });
        using floor = f.cast('i32');
        using load = floor.cast(dtype);
        using gload = load.to(gpu);
        const [b, gb] = pair([E]);
        balanceBiasUpdate(b, load, 1e-3);
        balanceBiasUpdate(gb, gload, 1e-3);
        expect(Array.from(floats(gb))).toEqual(Array.from(floats(b)));
        b.dispose();
        gb.dispose();
      }
    }
  });
});

describe.skipIf(!hasGpu)('the training data on the GPU (data.onDevice)', () => {
  it("ClusterTask's batches made on the GPU (x f32, targets bf16) match the CPU's within rounding, for every rank's shard", () => {
    const cfg = { dim: 256, clusters: 16, zipf: 1.1, noise: 0.3, seed: freshSeed() % 1000 };
    using onCpu = new ClusterTask(cfg);
    using onGpu = new ClusterTask({ ...cfg, device: gpu });
    for (const [rank, ranks] of [
      [0, 1],
      [1, 2],
    ] as const) {
      using a = onCpu.batch(3, 512, rank, ranks);
      using b = onGpu.batch(3, 512, rank, ranks);
      expect(b.y.device.toString()).toBe(gpu);
      expect(b.y.shape).toEqual(a.y.shape);
      // The inputs are the same Philox draws, made on the GPU: equal within the last bits of the
      // normals (the device's log/sincos), far from another draw (relErr ~1.4).
      expect(b.x.device.toString()).toBe(gpu);
      expect(relErr(values(b.x), values(a.x))).toBeLessThan(1e-6);
      expect(relErr(values(b.y), values(a.y))).toBeLessThan(1e-2);
      using labels = ClusterTask.labels(b);
      expect(labels.shape).toEqual([a.y.shape[0]]);
    }
  });
});

describe.skipIf(!hasGpu)('train.microBatches on the GPU', () => {
  it('2 passes a step (the bf16 GEMMs and rmsnorm accumulating into f32 buffers) follow the one-pass losses', () => {
    const run = (microBatches: number): number[] => {
      const cfg = resolveConfig({
        model: { hidden: 128, ffn: 64, experts: 8, topK: 2, sharedFfn: 32 },
        data: { tokensPerStep: 512 },
        train: { device: 'cuda', steps: 10, progress: false, microBatches },
      });
      using t = new Trainer(cfg);
      return t.run().map((s) => s.loss);
    };
    const live = memoryStats(gpu).liveBytes;
    const one = run(1);
    const two = run(2);
    // bf16 compute: the passes' sums differ in order and rounding, so the trajectories agree closely, not bit for bit.
    two.forEach((l, i) => expect(Math.abs(l - (one[i] as number)), `step ${i}`).toBeLessThan(2e-2 * (one[i] as number)));
    expect(two[two.length - 1]).toBeLessThan(two[0] as number);
    expect(memoryStats(gpu).liveBytes).toBe(live);
  });
});
