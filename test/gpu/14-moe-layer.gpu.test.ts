// MoELayer on the GPU (bf16) against the same layer on the CPU (f32 compute, same global weights):
// forward output and gradients within bf16 tolerance, dropless and capacity modes, bf16 and fp8
// dispatch (both layers quantising the same rows).
import { describe, expect, it, vi } from 'vitest';

import { memoryStats, Tensor, tidy } from '../../lib/index.js';
import { type MoEGradBuffers, MoELayer, type MoELayerConfig } from '../../lib/moe/layer.js';
import { freshGradientSums, freshSeed, MOE_WEIGHT_GRADS, relErr, values } from '../helpers.js';
import { hasGpu } from './gpu.js';

const gpu = 'cuda:0' as const;

describe.skipIf(!hasGpu)('MoELayer on the GPU', () => {
  it.each([
    ['dropless, softmax, shared expert', { sharedFfn: 64 }],
    ['dropless, shared expert gated by sigmoid(x·g)', { sharedFfn: 64, sharedGate: true }],
    ['dropless, shared expert, communication on its own stream', { sharedFfn: 64, commStream: true }],
    [
      'capacity 1.25 padded, sigmoid groups',
      { capacityFactor: 1.25, padToCapacity: true, scoreFunction: 'sigmoid', groups: 4, topkGroups: 2 },
    ],
    ['dropless, fp8 dispatch dequantised on arrival, shared expert', { sharedFfn: 64, fp8Dispatch: true }],
    ['capacity 1.25 padded, fp8 dispatch kept as e4m3', { capacityFactor: 1.25, padToCapacity: true, fp8Dispatch: 'keep' }],
    [
      "Llama 4's: top-1 sigmoid weight on the expert's input, shared expert",
      { sharedFfn: 64, topK: 1, scoreFunction: 'sigmoid', routeWeightsOn: 'input' },
    ],
    [
      "gpt-oss's router and expert biases and clamped SwiGLU (limit 7, gpt-oss's: the limit where bf16 and f32 disagree about few elements)",
      { routerBias: true, expertBias: true, activation: 'clamped-swiglu', swigluLimit: 7 },
    ],
  ] as const)('%s: forward and backward match the CPU', (_n, extra) => {
    const seed = freshSeed();
    const config: MoELayerConfig = { hidden: 256, ffn: 128, numExperts: 16, topK: 4, seed, ...extra };
    const before = memoryStats(gpu).liveBytes;
    {
      using g = new MoELayer({ ...config, device: gpu, dtype: 'bf16' });
      using c = new MoELayer({ ...config, device: 'cpu', dtype: 'f32' });
      tidy(() => {
        // gpt-oss's biases start at 0: random ones (the experts' first large enough to pass the clamp).
        const biasStd = { routerBias: 0.5, w13Bias: 2, w2Bias: 0.5 } as const;
        for (const k of ['routerBias', 'w13Bias', 'w2Bias'] as const) {
          const m = g.master[k];
          if (m) m.copy_(Tensor.randn(m.shape, { std: biasStd[k], seed: freshSeed(), device: gpu }));
        }
        g.refreshComputeWeights();
        for (const k of ['routerBias', 'w13Bias', 'w2Bias'] as const) c.master[k]?.copy_(g.compute[k] as Tensor);
        // The CPU layer computes in f32 from the bf16-rounded inputs and weights the GPU uses.
        c.master.router.copy_(g.compute.router.view(256, 16));
        c.master.w13.copy_(g.compute.w13);
        c.master.w2.copy_(g.compute.w2);
        if (c.master.sharedW13 && g.compute.sharedW13) c.master.sharedW13.copy_(g.compute.sharedW13);
        if (c.master.sharedW2 && g.compute.sharedW2) c.master.sharedW2.copy_(g.compute.sharedW2);
        if (c.master.sharedGate && g.compute.sharedGate) c.master.sharedGate.copy_(g.compute.sharedGate.view(256));
        c.refreshComputeWeights();
        const xb = Tensor.randn([1000, 256], { seed: freshSeed(), dtype: 'bf16', device: gpu });
        const dyb = Tensor.randn([1000, 256], { seed: freshSeed(), dtype: 'bf16', device: gpu });
        const fg = g.forward(xb);
        const fc = c.forward(xb.to('cpu').cast('f32'));
        // Near-tied router scores may pick different experts in bf16: compare in norm.
        expect(relErr(values(fg.y), values(fc.y))).toBeLessThan(3e-2);
        if ('fp8Dispatch' in extra) {
          expect(fg.saved.dispatched?.rows.dtype).toBe(extra.fp8Dispatch === 'keep' ? 'fp8e4m3' : 'bf16');
          // e4m3's error (3 mantissa bits) is above bf16's: the GPU output must sit nearer the CPU
          // layer that quantised the rows than one that did not.
          using plain = new MoELayer({ ...config, fp8Dispatch: false, device: 'cpu', dtype: 'f32' });
          for (const k of ['router', 'w13', 'w2', 'sharedW13', 'sharedW2'] as const) plain.master[k]?.copy_(c.master[k] as Tensor);
          plain.refreshComputeWeights();
          const fp = plain.forward(xb.to('cpu').cast('f32'));
          expect(relErr(values(fg.y), values(fc.y))).toBeLessThan(relErr(values(fg.y), values(fp.y)));
        }
        const gg = g.backward(fg, dyb);
        const gc = c.backward(fc, dyb.to('cpu').cast('f32'));
        expect(relErr(values(gg.dx), values(gc.dx)), 'dx').toBeLessThan(5e-2);
        expect(relErr(values(gg.w13), values(gc.w13)), 'w13').toBeLessThan(5e-2);
        expect(relErr(values(gg.w2), values(gc.w2)), 'w2').toBeLessThan(5e-2);
        if (gc.sharedGate) expect(relErr(values(gg.sharedGate as Tensor), values(gc.sharedGate)), 'sharedGate').toBeLessThan(5e-2);
        for (const k of ['routerBias', 'w13Bias', 'w2Bias'] as const)
          if (gc[k]) expect(relErr(values(gg[k] as Tensor), values(gc[k])), k).toBeLessThan(5e-2);
        expect(relErr(values(gg.router), values(gc.router)), 'router').toBeLessThan(5e-2);
      });
    }
    expect(memoryStats(gpu).liveBytes).toBe(before);
  });

  it.each([
    ['dropless, shared expert', { sharedFfn: 64 }],
    ['dropless, gated shared expert', { sharedFfn: 64, sharedGate: true }],
    ['capacity 1.25, communication on its own stream', { capacityFactor: 1.25, commStream: true }],
  ] as const)('%s: backward with out and accumulate gives the sum of two fresh backwards (the GEMMs add into the buffers)', (_n, extra) => {
    const seed = freshSeed();
    const before = memoryStats(gpu).liveBytes;
    {
      using layer = new MoELayer({ hidden: 256, ffn: 128, numExperts: 16, topK: 4, seed, device: gpu, dtype: 'bf16', ...extra });
      tidy(() => {
        const batches = [0, 1].map(() => ({
          x: Tensor.randn([1000, 256], { seed: freshSeed(), dtype: 'bf16', device: gpu }),
          dy: Tensor.randn([1000, 256], { seed: freshSeed(), dtype: 'bf16', device: gpu }),
        }));
        const keys = MOE_WEIGHT_GRADS;
        const { sums } = freshGradientSums(layer, batches);
        // Buffers poisoned with a known value, not zero: the epilogue must add to what is there.
        const buffers = Object.fromEntries(
          keys.filter((k) => layer.master[k]).map((k) => [k, Tensor.full((layer.master[k] as Tensor).shape, 0.5, { device: gpu })]),
        ) as unknown as MoEGradBuffers;
        for (const { x, dy } of batches) layer.backward(layer.forward(x), dy, { out: buffers, accumulate: true });
        for (const k of keys) {
          const buf = buffers[k];
          if (!buf) continue;
          const want = (sums.get(k) as number[]).map((v) => v + 0.5);
          expect(relErr(values(buf), want), `${k} (seed ${seed})`).toBeLessThan(1e-5);
        }
      });
    }
    expect(memoryStats(gpu).liveBytes).toBe(before);
  });

  it.each([
    ['dropless, shared expert', { sharedFfn: 64 }],
    ['dropless, gated shared expert', { sharedFfn: 64, sharedGate: true }],
    ['capacity 1.25 padded, communication on its own stream', { capacityFactor: 1.25, padToCapacity: true, commStream: true }],
    ['dropless, fp8 dispatch kept as e4m3', { fp8Dispatch: 'keep' }],
    ['expert choice', { routing: 'expert-choice', capacityFactor: 4 }],
    [
      "Llama 4's weight on the input, capacity 1.25 padded",
      { topK: 1, routeWeightsOn: 'input', capacityFactor: 1.25, padToCapacity: true },
    ],
  ] as const)("%s: recompute 'experts' and 'layer' give the bits of 'none', keeping less", (_n, extra) => {
    const seed = freshSeed();
    const config: MoELayerConfig = { hidden: 256, ffn: 128, numExperts: 16, topK: 4, seed, device: gpu, dtype: 'bf16', ...extra };
    const bits = (t: Tensor | null): number[] => (t ? Array.from(new Uint8Array((t.toArray() as Uint16Array | Float32Array).buffer)) : []);
    const before = memoryStats(gpu).liveBytes;
    {
      using plain = new MoELayer(config);
      using x = Tensor.randn([1000, 256], { seed: freshSeed(), dtype: 'bf16', device: gpu });
      using dy = Tensor.randn([1000, 256], { seed: freshSeed(), dtype: 'bf16', device: gpu });
      const step = (layer: MoELayer) =>
        tidy(() => {
          const atStart = memoryStats(gpu).liveBytes;
          const f = layer.forward(x);
          const kept = memoryStats(gpu).liveBytes - atStart;
          const y = bits(f.y);
          const g = layer.backward(f, dy);
          return { kept, y, grads: (['dx', ...MOE_WEIGHT_GRADS] as const).map((k) => bits(g[k])) };
        });
      step(plain); // warm-up: the layer's cached offsets, the kernels' first launches
      const ref = step(plain);
      for (const recompute of ['experts', 'layer'] as const) {
        using again = new MoELayer({ ...config, recompute });
        step(again);
        const r = step(again);
        expect(r.y, `${recompute}: y, seed ${seed}`).toEqual(ref.y);
        (['dx', ...MOE_WEIGHT_GRADS] as const).forEach((k, i) =>
          expect(r.grads[i], `${recompute}: ${k}, seed ${seed}`).toEqual(ref.grads[i]),
        );
        // Not kept: the experts' g, h and output rows (bf16), on at least 1000·k rows of 3F + H
        // values (the allocator's rounding aside).
        expect(ref.kept - r.kept, `${recompute}: bytes a forward keeps`).toBeGreaterThanOrEqual(
          1000 * (config.topK as number) * (3 * 128 + 256) * 2 * 0.9,
        );
      }
    }
    expect(memoryStats(gpu).liveBytes).toBe(before);
  });

  it.each([
    ['dropless, shared expert (1000 tokens: ~250 rows an expert, the tile kernels)', { sharedFfn: 64 }, 1000],
    ['dropless, 64 experts (~63 rows each: the B-resident dW)', { numExperts: 64 }, 1000],
    ['dropless, 64 experts, 48 tokens (~3 rows each: the few-rows dW)', { numExperts: 64 }, 48],
    ["gpt-oss's biases and clamped SwiGLU", { routerBias: true, expertBias: true, activation: 'clamped-swiglu', swigluLimit: 7 }, 1000],
  ] as const)(
    "%s: weightGradDtype 'bf16' gives the f32 weight gradients rounded (within one bf16 step: other kernels), every other gradient the same bits",
    (_n, extra, tokens) => {
      const seed = freshSeed();
      const config: MoELayerConfig = { hidden: 256, ffn: 128, numExperts: 16, topK: 4, seed, device: gpu, dtype: 'bf16', ...extra };
      const experts = new Set(['w13', 'w2', 'sharedW13', 'sharedW2']);
      const before = memoryStats(gpu).liveBytes;
      {
        using ref = new MoELayer(config);
        using half = new MoELayer({ ...config, weightGradDtype: 'bf16' });
        tidy(() => {
          const x = Tensor.randn([tokens, 256], { seed: freshSeed(), dtype: 'bf16', device: gpu });
          const dy = Tensor.randn([tokens, 256], { seed: freshSeed(), dtype: 'bf16', device: gpu });
          const gRef = ref.backward(ref.forward(x), dy);
          // Into poisoned buffers, to see every element written.
          const buffers = Object.fromEntries(
            MOE_WEIGHT_GRADS.filter((k) => half.master[k]).map((k) => [
              k,
              Tensor.full((half.master[k] as Tensor).shape, Number.NaN, { device: gpu, dtype: experts.has(k) ? 'bf16' : 'f32' }),
            ]),
          ) as unknown as MoEGradBuffers;
          for (const g of [half.backward(half.forward(x), dy), half.backward(half.forward(x), dy, { out: buffers })]) {
            expect(values(g.dx), `dx, seed ${seed}`).toEqual(values(gRef.dx));
            for (const k of MOE_WEIGHT_GRADS) {
              const mine = g[k];
              const f32 = gRef[k];
              if (!mine || !f32) continue;
              if (!experts.has(k)) {
                expect(values(mine), `${k}, seed ${seed}`).toEqual(values(f32));
                continue;
              }
              expect(mine.dtype).toBe('bf16');
              // The bf16 products (hand-off, B-resident, few-rows) sum in fp32 like the f32 ones but
              // not always in their order: one bf16 step (2^-7 of the value) allowed, no more.
              const a = values(mine);
              const b = values(f32);
              const scale = b.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
              const worst = a.reduce(
                (w, v, i) => Math.max(w, Math.abs(v - (b[i] as number)) - 2 ** -7 * Math.abs(b[i] as number)),
                -Infinity,
              );
              expect(worst, `${k}: beyond one bf16 step of the f32 gradient (scale ${scale}), seed ${seed}`).toBeLessThanOrEqual(
                1e-6 * scale,
              );
            }
          }
        });
      }
      expect(memoryStats(gpu).liveBytes).toBe(before);
    },
  );

  it.each([
    ['dropless', {}],
    ['dropless, communication on its own stream', { commStream: true }],
    ["dropless, recompute 'layer' (the rows dispatched again)", { recompute: 'layer' }],
  ] as const)('%s: a forward and backward read nothing back to the host', (_n, extra) => {
    // A read waits for every queued kernel: one inside the step would keep the host from issuing
    // the backward while the forward runs (tidy() once read the dispatch handle's lazy row counts).
    using layer = new MoELayer({ hidden: 256, ffn: 128, numExperts: 16, topK: 4, seed: freshSeed(), device: gpu, dtype: 'bf16', ...extra });
    using x = Tensor.randn([1000, 256], { seed: freshSeed(), dtype: 'bf16', device: gpu });
    using dy = Tensor.randn([1000, 256], { seed: freshSeed(), dtype: 'bf16', device: gpu });
    const reads = vi.spyOn(Tensor.prototype, 'toArray');
    try {
      tidy(() => {
        const g = layer.backward(layer.forward(x), dy);
        for (const t of Object.values(g)) t?.dispose();
      });
      expect(reads).not.toHaveBeenCalled();
    } finally {
      reads.mockRestore();
    }
  });
});
