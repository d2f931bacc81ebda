// MoELayer on one rank in f32 on the CPU: forward against a float64 oracle written here, backward
// against finite differences; config validation.
import { describe, expect, it, vi } from 'vitest';

import { DisposedError, memoryStats, Stream, Tensor, tidy } from '../lib/index.js';
import { disposeSaved, type MoEGradBuffers, MoELayer, type MoELayerConfig } from '../lib/moe/layer.js';
import { expertsBackward, expertsForward } from '../lib/moe/experts.js';
import { dequantizeFp8, quantizeFp8 } from '../lib/moe/fp8.js';
import { routerForward } from '../lib/moe/router.js';
import { freshGradientSums, freshSeed, MOE_WEIGHT_GRADS, relErr, values } from './helpers.js';

const cpu = 'cpu' as const;
const silu = (v: number): number => v / (1 + Math.exp(-v));

/**
 * y for every token from the layer's own master weights, in float64. `expertInput` [T,H]: what the
 * routed experts read instead of x (the router and the shared expert always read x).
 */
function oracle(layer: MoELayer, x: Tensor, expertInput?: readonly number[]): number[] {
  const { hidden: H, ffn: F, numExperts: E, sharedFfn: Fs } = layer.config;
  const T = x.shape[0] as number;
  const xv = values(x),
    wr = values(layer.master.router),
    w13 = values(layer.master.w13),
    w2 = values(layer.master.w2);
  const logits = new Float32Array(T * E);
  // gpt-oss: the router's bias on the logits.
  const rb = layer.master.routerBias ? values(layer.master.routerBias) : null;
  for (let t = 0; t < T; t++)
    for (let e = 0; e < E; e++) {
      let s = rb ? (rb[e] as number) : 0;
      for (let h = 0; h < H; h++) s += (xv[t * H + h] as number) * (wr[h * E + e] as number);
      logits[t * E + e] = s;
    }
  const r = tidy(() => {
    const o = routerForward(Tensor.fromArray(logits, { shape: [T, E], device: cpu }), layer.router, { bias: layer.bias });
    return { idx: Array.from(o.indices.toArray() as Int32Array), w: values(o.weights) };
  });
  const k = layer.config.topK;
  // gpt-oss's experts: biases after both projections, the clamped SwiGLU between (routed experts only).
  const clamped = layer.config.activation === 'clamped-swiglu';
  const b13 = layer.master.w13Bias ? values(layer.master.w13Bias) : null;
  const b2 = layer.master.w2Bias ? values(layer.master.w2Bias) : null;
  const { swigluAlpha: alpha, swigluLimit: lim } = layer.config;
  const ffn = (inp: readonly number[], t: number, a13: number[], a2: number[], e: number, f: number, routed = false): number[] => {
    const gptOss = routed && clamped;
    const hAct = new Array(f).fill(0);
    for (let i = 0; i < f; i++) {
      let g1 = gptOss && b13 ? (b13[e * 2 * f + 2 * i] as number) : 0,
        g3 = gptOss && b13 ? (b13[e * 2 * f + 2 * i + 1] as number) : 0;
      for (let h = 0; h < H; h++) {
        g1 += (inp[t * H + h] as number) * (a13[(e * H + h) * 2 * f + 2 * i] as number);
        g3 += (inp[t * H + h] as number) * (a13[(e * H + h) * 2 * f + 2 * i + 1] as number);
      }
      if (gptOss) {
        const g = Math.min(g1, lim),
          u = Math.max(-lim, Math.min(g3, lim));
        hAct[i] = (u + 1) * (g / (1 + Math.exp(-Math.fround(alpha) * g)));
      } else hAct[i] = silu(g1) * g3;
    }
    return Array.from({ length: H }, (_, o) =>
      hAct.reduce((s, hv, i) => s + hv * (a2[(e * f + i) * H + o] as number), gptOss && b2 ? (b2[e * H + o] as number) : 0),
    );
  };
  const y = new Array(T * H).fill(0);
  const s13 = layer.master.sharedW13 ? values(layer.master.sharedW13) : [];
  const s2 = layer.master.sharedW2 ? values(layer.master.sharedW2) : [];
  const gate = layer.master.sharedGate ? values(layer.master.sharedGate) : null;
  // routeWeightsOn 'input' (Llama 4, top-1): the expert reads w·x and its output is added as it is.
  const onInput = layer.config.routeWeightsOn === 'input';
  const scaled = onInput ? xv.map((v, i) => v * (r.w[Math.floor(i / H) * k] as number)) : null;
  for (let t = 0; t < T; t++) {
    for (let j = 0; j < k; j++) {
      const out = ffn(scaled ?? expertInput ?? xv, t, w13, w2, r.idx[t * k + j] as number, F, true);
      for (let h = 0; h < H; h++) y[t * H + h] += (onInput ? 1 : (r.w[t * k + j] as number)) * (out[h] as number);
    }
    // sharedGate: the shared expert's output scaled by sigmoid(x·g).
    let scale = 1;
    if (gate) scale = 1 / (1 + Math.exp(-gate.reduce((a, g, h) => a + g * (xv[t * H + h] as number), 0)));
    if (Fs) ffn(xv, t, s13, s2, 0, Fs).forEach((v, h) => (y[t * H + h] += scale * v));
  }
  return y;
}

/**
 * gpt-oss's biases start at 0: random ones instead (the experts' first ones large enough that some
 * pre-activations pass the clamp), so the oracle and the gradients see them.
 */
function randomBiases(layer: MoELayer): void {
  const seed = freshSeed();
  tidy(() => {
    const m = layer.master;
    if (m.routerBias) m.routerBias.copy_(Tensor.randn(m.routerBias.shape, { std: 0.5, seed, device: cpu }));
    if (m.w13Bias) m.w13Bias.copy_(Tensor.randn(m.w13Bias.shape, { std: 2, seed: seed + 1, device: cpu }));
    if (m.w2Bias) m.w2Bias.copy_(Tensor.randn(m.w2Bias.shape, { std: 0.5, seed: seed + 2, device: cpu }));
  });
  layer.refreshComputeWeights();
}

const base: MoELayerConfig = { hidden: 8, ffn: 4, numExperts: 4, topK: 2, dtype: 'f32', device: cpu, sharedFfn: 3 };

/** One finite-difference check of MoELayer.backward; false when a perturbation moved the routing. */
function gradientCheck(config: MoELayerConfig = base): boolean {
  using layer = new MoELayer({ ...config, seed: freshSeed(), auxLossCoef: 0.1, zLossCoef: 0.01 });
  randomBiases(layer);
  const T = 5;
  using x = Tensor.randn([T, 8], { seed: freshSeed(), device: cpu });
  using R = Tensor.randn([T, 8], { seed: freshSeed(), device: cpu });
  const rv = values(R);
  let selection: string | undefined;
  let moved = false;
  // L = Σ y·R + auxLoss
  const loss = (xx: Tensor): number =>
    tidy(() => {
      const f = layer.forward(xx);
      const sel = JSON.stringify(f.saved.indices.toNumbers());
      if (selection === undefined) selection = sel;
      else if (sel !== selection) moved = true;
      const l = values(f.y).reduce((s, v, i) => s + v * (rv[i] as number), 0) + (f.auxLoss.item() as number);
      disposeSaved(f);
      return l;
    });
  loss(x);
  const grads = tidy(() => layer.backward(layer.forward(x), R));
  try {
    const h = 1e-3;
    const fd = (t: Tensor, i: number, refresh: boolean): number => {
      const v = values(t);
      const at = (d: number): number => {
        const w = v.slice();
        w[i] = (w[i] as number) + d;
        t.copy_(Tensor.fromArray(w, { shape: [...t.shape], device: cpu }));
        if (refresh) layer.refreshComputeWeights();
        return loss(x);
      };
      const g = (at(h) - at(-h)) / (2 * h);
      at(0);
      return g;
    };
    const pick = (n: number): number[] => Array.from({ length: 12 }, (_, i) => Math.floor((i * n) / 12));
    const checks: [string, Tensor, Tensor, boolean][] = [
      ['dx', grads.dx, x, false],
      ['router', grads.router, layer.master.router, true],
      ['w13', grads.w13, layer.master.w13, true],
      ['w2', grads.w2, layer.master.w2, true],
      ['shared w13', grads.sharedW13 as Tensor, layer.master.sharedW13 as Tensor, true],
      ['shared w2', grads.sharedW2 as Tensor, layer.master.sharedW2 as Tensor, true],
    ];
    if (layer.master.sharedGate) checks.push(['shared gate', grads.sharedGate as Tensor, layer.master.sharedGate, true]);
    for (const k of ['routerBias', 'w13Bias', 'w2Bias'] as const) {
      const m = layer.master[k];
      if (m) checks.push([k, grads[k] as Tensor, m, true]);
    }
    const errors = checks.map(([name, g, t, refresh]) => {
      const analytic = values(g);
      const picks = pick(t.numel);
      return [
        name,
        relErr(
          picks.map((i) => analytic[i] as number),
          picks.map((i) => fd(t, i, refresh)),
        ),
      ] as const;
    });
    if (moved) return false;
    for (const [name, err] of errors) expect(err, name).toBeLessThan(2e-2);
    return true;
  } finally {
    for (const g of Object.values(grads)) g?.dispose();
  }
}

describe('MoELayer on one rank', () => {
  it.each([
    ['softmax', { ...base }],
    ['sigmoid, 2 groups keep 1, no shared expert', { ...base, scoreFunction: 'sigmoid', groups: 2, topkGroups: 1, sharedFfn: 0 }],
    [
      "DeepSeek-V2's: softmax, top-3 from 2 of 4 groups scored by their maximum, scaled",
      { ...base, numExperts: 8, topK: 3, groups: 4, topkGroups: 2, groupTop: 1, routeScale: 16 },
    ],
    ['the shared expert gated by sigmoid(x·g)', { ...base, sharedGate: true }],
    [
      "Llama 4's: top-1 sigmoid weight on the expert's input, a shared expert",
      { ...base, topK: 1, scoreFunction: 'sigmoid', routeWeightsOn: 'input' },
    ],
    [
      "gpt-oss's: router bias, expert biases, clamped SwiGLU (limit 1.5: clamps on both sides)",
      { ...base, sharedFfn: 0, routerBias: true, expertBias: true, activation: 'clamped-swiglu', swigluLimit: 1.5 },
    ],
    ['the clamped SwiGLU alone (limit 1.5)', { ...base, activation: 'clamped-swiglu', swigluLimit: 1.5 }],
  ] as const)('forward equals the float64 oracle: %s', (_n, config) => {
    const before = memoryStats(cpu).liveBytes;
    {
      using layer = new MoELayer({ ...config, seed: freshSeed() });
      randomBiases(layer);
      tidy(() => {
        const x = Tensor.randn([9, 8], { seed: freshSeed(), device: cpu });
        const f = layer.forward(x);
        expect(relErr(values(f.y), oracle(layer, x))).toBeLessThan(1e-5);
        expect(Array.from(f.tokensPerExpert.toArray() as Int32Array).reduce((a, b) => a + b, 0)).toBe(9 * layer.config.topK);
        disposeSaved(f);
      });
    }
    expect(memoryStats(cpu).liveBytes).toBe(before);
  });

  describe('fp8Dispatch: routed rows as e4m3 with per-128 scales', () => {
    const fp8Base: MoELayerConfig = { ...base, hidden: 128 };
    /** x's rows through e4m3 and back: what the experts of an fp8 dispatch read. */
    const quantised = (x: Tensor): number[] =>
      tidy(() => {
        const q = quantizeFp8(x);
        return values(dequantizeFp8(q, 'f32'));
      });

    it.each([true, 'keep'] as const)('%s: the experts read the quantised rows, the router and the shared expert read x', (mode) => {
      const before = memoryStats(cpu).liveBytes;
      {
        const seed = freshSeed();
        using layer = new MoELayer({ ...fp8Base, seed, fp8Dispatch: mode });
        expect(layer.dispatcher.fp8).toBe(mode);
        tidy(() => {
          const x = Tensor.randn([9, 128], { seed: freshSeed(), device: cpu });
          const f = layer.forward(x);
          const y = values(f.y);
          expect(relErr(y, oracle(layer, x, quantised(x))), `seed ${seed}`).toBeLessThan(1e-5);
          // The quantisation shows (e4m3 keeps 3 mantissa bits): an option that did nothing fails here.
          expect(relErr(y, oracle(layer, x)), `seed ${seed}`).toBeGreaterThan(1e-3);
          expect(f.saved.dispatched?.rows.dtype).toBe(mode === 'keep' ? 'fp8e4m3' : 'f32');
          expect(f.saved.dispatched?.rowScales?.shape ?? null).toEqual(mode === 'keep' ? [f.saved.dispatched?.rows.shape[0], 1] : null);
          const scales = f.saved.dispatched?.rowScales;
          disposeSaved(f);
          // Freed by disposeSaved itself (the tidy around would hide a leak from the live-bytes check).
          expect(scales?.disposed ?? true).toBe(true);
        });
      }
      expect(memoryStats(cpu).liveBytes).toBe(before);
    });

    it.each([true, 'keep'] as const)(
      '%s: on rows e4m3 holds (nearly) exactly, forward and every gradient equal the unquantised dispatch',
      (mode) => {
        // Rows already through e4m3 quantise again to the same values up to the scale's last bit
        // (amax/448 recomputed from amax = 448·scale), so both layers compute the same thing.
        const seed = freshSeed();
        using plain = new MoELayer({ ...fp8Base, seed });
        using fp8 = new MoELayer({ ...fp8Base, seed, fp8Dispatch: mode });
        tidy(() => {
          const x = Tensor.fromArray(quantised(Tensor.randn([9, 128], { seed: freshSeed(), device: cpu })), {
            shape: [9, 128],
            device: cpu,
          });
          const dy = Tensor.randn([9, 128], { seed: freshSeed(), device: cpu });
          const a = plain.forward(x),
            b = fp8.forward(x);
          expect(relErr(values(b.y), values(a.y)), `seed ${seed}`).toBeLessThan(1e-6);
          const scales = b.saved.dispatched?.rowScales;
          const ga = plain.backward(a, dy),
            gb = fp8.backward(b, dy);
          expect(scales?.disposed ?? true, 'backward frees the saved scales').toBe(true);
          expect(b.saved.dispatched?.rows.disposed).toBe(true);
          for (const name of ['dx', 'router', 'w13', 'w2', 'sharedW13', 'sharedW2'] as const)
            expect(relErr(values(gb[name] as Tensor), values(ga[name] as Tensor)), `${name}, seed ${seed}`).toBeLessThan(1e-6);
        });
      },
    );

    it('is checked at construction, naming the field', () => {
      expect(() => new MoELayer({ ...fp8Base, fp8Dispatch: 'yes' as never })).toThrow(
        /MoELayer: 'fp8Dispatch' must be true, false or 'keep'; received "yes"/,
      );
      expect(() => new MoELayer({ ...base, fp8Dispatch: true })).toThrow(
        /MoELayer: 'fp8Dispatch' needs a 'hidden' that is a multiple of 128 .*received 8/,
      );
    });
  });

  it('keeps a bounded number of per-shape caches: 40 token counts, dropless and capacity mode', () => {
    for (const extra of [{}, { capacityFactor: 1, padToCapacity: true }]) {
      using layer = new MoELayer({ ...base, ...extra, seed: freshSeed() });
      const live = (): number => memoryStats(cpu).liveAllocations;
      let after20 = 0;
      for (let T = 1; T <= 40; T++) {
        tidy(() => {
          const x = Tensor.randn([T, 8], { seed: T, device: cpu });
          const f = layer.forward(x);
          const g = layer.backward(f, Tensor.randn([T, 8], { seed: 100 + T, device: cpu }));
          for (const t of Object.values(g)) t?.dispose();
        });
        if (T === 20) after20 = live();
      }
      // Past 16 shapes the caches evict: 20 more token counts leave as many tensors alive.
      expect(live(), JSON.stringify(extra)).toBe(after20);
    }
  });

  it("a forward and backward never read the dispatch handle's row counts (a wait for the device on a GPU)", () => {
    // The one-rank dispatch handle reads its row counts lazily, through getters that nothing in the
    // step may touch: on a GPU the read waits for every queued kernel, so the host could not issue
    // the backward while the forward runs (tidy() once did, at each forward's end). The CPU path
    // reads elsewhere on purpose (the router's NaN check, the permute's counts); GPU test 14 checks
    // that the GPU step reads nothing at all.
    using layer = new MoELayer({ ...base, seed: freshSeed() });
    using x = Tensor.randn([7, 8], { seed: freshSeed(), device: cpu });
    using dy = Tensor.randn([7, 8], { seed: freshSeed(), device: cpu });
    const reads = vi.spyOn(Tensor.prototype, 'toArray');
    try {
      tidy(() => {
        const f = layer.forward(x);
        const offsets = f.saved.dispatched?.handle.localOffsets;
        const g = layer.backward(f, dy);
        for (const t of Object.values(g)) t?.dispose();
        expect(reads.mock.contexts).not.toContain(offsets);
      });
    } finally {
      reads.mockRestore();
    }
  });

  it.each([
    ['', base],
    [' (the shared expert gated by sigmoid(x·g), and its gate)', { ...base, sharedGate: true }],
    [
      " (Llama 4's router weight on the expert's input: its gradient ⟨d(w·x), x⟩)",
      { ...base, topK: 1, scoreFunction: 'sigmoid', routeWeightsOn: 'input' },
    ],
    [
      " (gpt-oss's router and expert biases and clamped SwiGLU, limit 1.5)",
      { ...base, routerBias: true, expertBias: true, activation: 'clamped-swiglu', swigluLimit: 1.5 },
    ],
  ] as [string, MoELayerConfig][])('backward matches finite differences for x, the router and the experts%s', (_name, config) => {
    // Finite differences are only meaningful where the routing is locally constant: a random draw
    // whose top-k nearly ties flips under a ±h step. Such draws are detected (the selection seen by
    // any perturbed forward differs) and redrawn; every attempt compares, none is skipped silently.
    for (let attempt = 0; attempt < 20; attempt++) {
      if (gradientCheck(config)) return;
    }
    throw new Error('no random draw with a locally stable routing in 20 attempts');
  });

  it("gpt-oss's options are checked at construction, naming the field; a gradient buffer for a bias the layer lacks is refused", () => {
    const live = memoryStats(cpu).liveBytes;
    expect(() => new MoELayer({ ...base, expertBias: true })).toThrow(/MoELayer: 'expertBias' needs the 'clamped-swiglu' activation/);
    expect(() => new MoELayer({ ...base, swigluLimit: 3 })).toThrow(
      /MoELayer: 'swigluAlpha' and 'swigluLimit' set the 'clamped-swiglu' activation/,
    );
    expect(() => new MoELayer({ ...base, activation: 'gelu' as never })).toThrow(/MoELayer: 'activation'/);
    expect(() => new MoELayer({ ...base, activation: 'clamped-swiglu', swigluLimit: -1 })).toThrow(
      /'swigluLimit' = -1 must be greater than 0/,
    );
    expect(() => new MoELayer({ ...base, hidden: 128, activation: 'clamped-swiglu', fp8Dispatch: true })).toThrow(
      /MoELayer: 'fp8Dispatch' is not taken with the 'clamped-swiglu' activation/,
    );
    expect(memoryStats(cpu).liveBytes).toBe(live);
    using layer = new MoELayer({ ...base, seed: freshSeed() });
    tidy(() => {
      const x = Tensor.randn([4, 8], { seed: 1, device: cpu });
      const f = layer.forward(x);
      const out = {
        router: Tensor.zeros([8, 4], { device: cpu }),
        w13: Tensor.zeros(layer.master.w13.shape, { device: cpu }),
        w2: Tensor.zeros(layer.master.w2.shape, { device: cpu }),
        sharedW13: Tensor.zeros((layer.master.sharedW13 as Tensor).shape, { device: cpu }),
        sharedW2: Tensor.zeros((layer.master.sharedW2 as Tensor).shape, { device: cpu }),
        routerBias: Tensor.zeros([4], { device: cpu }),
      };
      expect(() => layer.backward(f, x, { out })).toThrow(
        /MoELayer\.backward: 'out\.routerBias' was given but the layer has no router bias/,
      );
      disposeSaved(f);
    });
  });

  it.each([
    ['with a shared expert', base],
    ['with a gated shared expert', { ...base, sharedGate: true }],
    ['without one, capacity mode', { ...base, sharedFfn: 0, capacityFactor: 1.25 }],
    ["gpt-oss's biases and clamped SwiGLU", { ...base, routerBias: true, expertBias: true, activation: 'clamped-swiglu' }],
    ['the clamped SwiGLU without biases (no bias passes; a second step too)', { ...base, activation: 'clamped-swiglu', swigluLimit: 1.5 }],
  ] as [string, MoELayerConfig][])(
    'backward with out and accumulate adds each weight gradient into the buffers: two micro-batches give the sum of two fresh backwards (%s)',
    (_name, config) => {
      const seed = freshSeed();
      using layer = new MoELayer({ ...config, seed });
      const { hidden: H } = layer.config;
      const batches = [0, 1].map((i) => ({
        x: Tensor.randn([7, H], { seed: seed * 10 + i, device: cpu }),
        dy: Tensor.randn([7, H], { seed: seed * 10 + 5 + i, device: cpu }),
      }));
      const keys = MOE_WEIGHT_GRADS;
      const { sums, dx: freshDx } = freshGradientSums(layer, batches);
      // The same two micro-batches into buffers that start at zero.
      const buffers = Object.fromEntries(
        keys.filter((k) => layer.master[k]).map((k) => [k, Tensor.zeros((layer.master[k] as Tensor).shape, { device: cpu })]),
      ) as unknown as MoEGradBuffers;
      batches.forEach(({ x, dy }, b) => {
        const g = layer.backward(layer.forward(x), dy, { out: buffers, accumulate: true });
        for (const k of keys) expect(g[k] ?? null, `${k} comes back as the buffer`).toBe(buffers[k] ?? null);
        expect(relErr(values(g.dx), freshDx[b] as number[]), 'dx as without accumulate').toBeLessThan(1e-6);
        g.dx.dispose();
      });
      for (const k of keys) {
        const buf = buffers[k];
        if (!buf) continue;
        expect(relErr(values(buf), sums.get(k) as number[]), `${k} (seed ${seed})`).toBeLessThan(1e-6);
      }
      for (const t of [...Object.values(buffers), ...batches.flatMap((b) => [b.x, b.dy])]) t.dispose();
    },
  );

  it.each([
    ['an f32 layer with a shared expert', base],
    ["recompute 'layer' (the experts' products run again in backward)", { ...base, recompute: 'layer' }],
    ['a bf16 layer with a gated shared expert', { ...base, sharedGate: true, dtype: 'bf16' }],
    [
      "gpt-oss's biases and clamped SwiGLU",
      { ...base, routerBias: true, expertBias: true, activation: 'clamped-swiglu', swigluLimit: 1.5 },
    ],
  ] as [string, MoELayerConfig][])(
    "weightGradDtype 'bf16': the experts' weight gradients are the f32 ones rounded once, every other gradient the same bits, new or into bf16 buffers (%s)",
    (_name, config) => {
      const seed = freshSeed();
      using ref = new MoELayer({ ...config, seed });
      using half = new MoELayer({ ...config, seed, weightGradDtype: 'bf16' });
      expect(half.config.weightGradDtype).toBe('bf16');
      expect(ref.config.weightGradDtype).toBe('f32');
      if (config.expertBias) {
        randomBiases(ref);
        for (const k of ['routerBias', 'w13Bias', 'w2Bias'] as const) (half.master[k] as Tensor).copy_(ref.master[k] as Tensor);
        half.refreshComputeWeights();
      }
      const dtype = ref.config.dtype;
      using x = Tensor.randn([11, 8], { seed: seed + 1, device: cpu, dtype });
      using dy = Tensor.randn([11, 8], { seed: seed + 2, device: cpu, dtype });
      const experts = new Set(['w13', 'w2', 'sharedW13', 'sharedW2']);
      const present = MOE_WEIGHT_GRADS.filter((k) => ref.master[k]);
      const gRef = ref.backward(ref.forward(x), dy);
      const check = (g: typeof gRef, how: string) => {
        expect(values(g.dx), `${how}: dx`).toEqual(values(gRef.dx));
        for (const k of present) {
          const mine = g[k] as Tensor;
          const f32 = gRef[k] as Tensor;
          if (experts.has(k)) {
            expect(mine.dtype, `${how}: ${k}`).toBe('bf16');
            using rounded = f32.cast('bf16');
            expect(values(mine), `${how}: ${k} (seed ${seed})`).toEqual(values(rounded));
          } else {
            expect(mine.dtype, `${how}: ${k}`).toBe('f32');
            expect(values(mine), `${how}: ${k} (seed ${seed})`).toEqual(values(f32));
          }
        }
      };
      const fresh = half.backward(half.forward(x), dy);
      check(fresh, 'new tensors');
      // Into the caller's buffers (the experts' bf16, the rest f32), poisoned first.
      const buffers = Object.fromEntries(
        present.map((k) => [
          k,
          Tensor.full((half.master[k] as Tensor).shape, Number.NaN, { device: cpu, dtype: experts.has(k) ? 'bf16' : 'f32' }),
        ]),
      ) as unknown as MoEGradBuffers;
      const into = half.backward(half.forward(x), dy, { out: buffers });
      for (const k of present) expect(into[k], `${k} comes back as the buffer`).toBe(buffers[k]);
      check(into, 'into buffers');
      for (const t of [...Object.values(gRef), ...Object.values(fresh), into.dx, ...Object.values(buffers)]) t?.dispose();
    },
  );

  it("weightGradDtype: refused values, accumulate refused with 'bf16', and f32 buffers for its experts' gradients refused by name", () => {
    for (const bad of ['f16', 'fp32', 32])
      expect(() => new MoELayer({ ...base, weightGradDtype: bad as never }), String(bad)).toThrow(
        /MoELayer: 'weightGradDtype' must be one of 'f32', 'bf16'; received/,
      );
    using layer = new MoELayer({ ...base, seed: freshSeed(), weightGradDtype: 'bf16' });
    using x = Tensor.randn([5, 8], { seed: 3, device: cpu });
    using dy = Tensor.randn([5, 8], { seed: 4, device: cpu });
    const zeros = (k: 'router' | 'w13' | 'w2' | 'sharedW13' | 'sharedW2', dtype: 'f32' | 'bf16') =>
      Tensor.zeros((layer.master[k] as Tensor).shape, { device: cpu, dtype });
    const good = {
      router: zeros('router', 'f32'),
      w13: zeros('w13', 'bf16'),
      w2: zeros('w2', 'bf16'),
      sharedW13: zeros('sharedW13', 'bf16'),
      sharedW2: zeros('sharedW2', 'bf16'),
    };
    using f32W2 = zeros('w2', 'f32');
    using bf16Router = zeros('router', 'bf16');
    const fwd = layer.forward(x);
    expect(() => layer.backward(fwd, dy, { out: good, accumulate: true })).toThrow(
      /MoELayer\.backward: 'accumulate' adds into f32 gradients only; this layer's 'weightGradDtype' is 'bf16'/,
    );
    expect(() => layer.backward(fwd, dy, { out: { ...good, w2: f32W2 } })).toThrow(
      /'out\.w2' must be a contiguous bf16 \(the layer's weightGradDtype\) \[4,4,8\] on cpu; received f32/,
    );
    expect(() => layer.backward(fwd, dy, { out: { ...good, router: bf16Router } })).toThrow(
      /'out\.router' must be a contiguous f32 \[8,4\]/,
    );
    const g = layer.backward(fwd, dy, { out: good });
    expect(g.w2).toBe(good.w2);
    for (const t of [g.dx, ...Object.values(good)]) t.dispose();
    // expertsBackward's own option.
    using w13 = Tensor.randn([2, 8, 6], { seed: 1, device: cpu });
    using w2 = Tensor.randn([2, 3, 8], { seed: 2, device: cpu });
    using a = Tensor.randn([5, 8], { seed: 3, device: cpu });
    using offsets = Tensor.fromArray([0, 2, 5], { dtype: 'i32', device: cpu });
    const ef = expertsForward(a, w13, w2, offsets);
    using dW13 = Tensor.zeros(w13.shape, { device: cpu });
    using dW2 = Tensor.zeros(w2.shape, { device: cpu });
    expect(() => expertsBackward(dy, a, w13, w2, offsets, ef, { out: { dW13, dW2 }, accumulate: true, gradDtype: 'bf16' })).toThrow(
      /expertsBackward: 'accumulate' adds into f32 gradients only; 'gradDtype' is 'bf16'/,
    );
    expect(() => expertsBackward(dy, a, w13, w2, offsets, ef, { gradDtype: 'f64' as never })).toThrow(
      /expertsBackward: 'gradDtype' must be one of 'f32', 'bf16'; received/,
    );
    expect(() => expertsBackward(dy, a, w13, w2, offsets, ef, { out: { dW13, dW2 }, gradDtype: 'bf16' })).toThrow(
      /'out\.dW13' must be a contiguous bf16 \[2,8,6\]/,
    );
    const eb = expertsBackward(dy, a, w13, w2, offsets, ef, { gradDtype: 'bf16' });
    expect([eb.dW13.dtype, eb.dW2.dtype, eb.dA.dtype]).toEqual(['bf16', 'bf16', 'f32']);
    for (const t of [eb.dA, eb.dW13, eb.dW2, ef.out, ef.g, ef.h]) t.dispose();
  });

  it('backward refuses out buffers of the wrong dtype, shape or layout, missing, extra or overlapping ones, before any product runs', () => {
    using layer = new MoELayer({ ...base, seed: freshSeed() });
    const { hidden: H } = layer.config;
    const zerosLike = (k: 'router' | 'w13' | 'w2' | 'sharedW13' | 'sharedW2') =>
      Tensor.zeros((layer.master[k] as Tensor).shape, { device: cpu });
    using x = Tensor.randn([5, H], { seed: 3, device: cpu });
    using dy = Tensor.randn([5, H], { seed: 4, device: cpu });
    const good = {
      router: zerosLike('router'),
      w13: zerosLike('w13'),
      w2: zerosLike('w2'),
      sharedW13: zerosLike('sharedW13'),
      sharedW2: zerosLike('sharedW2'),
    };
    using bf = Tensor.zeros(layer.master.w2.shape, { dtype: 'bf16', device: cpu });
    using small = Tensor.zeros([1, 2], { device: cpu });
    const [E, F, Hh] = layer.master.w2.shape as [number, number, number];
    using wideBacking = Tensor.zeros([E, Hh, F], { device: cpu });
    const strided = wideBacking.transpose(1, 2);
    // Two views of one allocation whose last 8 elements are shared.
    using backing = Tensor.zeros([E * F * Hh + 16], { device: cpu });
    using w2Slice = backing.narrow(0, 0, E * F * Hh);
    using sharedSlice = backing.narrow(0, E * F * Hh - 8, 24);
    using w2View = w2Slice.view(E, F, Hh);
    using sharedView = sharedSlice.view(1, 3, Hh);
    // A sharedW2 buffer over dy's memory (dy [5, 8] f32 is 40 elements; sharedW2 [1, 3, 8] 24).
    using dyBacking = Tensor.randn([40], { seed: 5, device: cpu });
    using dyOver = dyBacking.view(5, H);
    using dyTail = dyBacking.narrow(0, 16, 24);
    using sharedOverDy = dyTail.view(1, 3, Hh);
    const bad: [string, object, RegExp, Tensor?][] = [
      ['bf16', { ...good, w2: bf }, /'out\.w2' must be a contiguous f32 \[4,4,8\] on cpu; received bf16/],
      ['shape', { ...good, router: small }, /'out\.router' must be a contiguous f32 \[8,4\]/],
      ['strided', { ...good, w2: strided }, /'out\.w2' must be a contiguous f32 .*received a strided f32/],
      ['missing', { router: good.router, w13: good.w13, w2: good.w2 }, /'out\.sharedW13' is missing/],
      ['overlapping', { ...good, w2: w2View, sharedW2: sharedView }, /'out\.w2' overlaps 'out\.sharedW2' in memory/],
      ['unknown key', { ...good, dx: good.router }, /MoELayer\.backward: 'out' has an unknown key 'dx'/],
      ['the masters themselves', layer.master, /'out\.router' overlaps 'master\.router' in memory/],
      ['over dy', { ...good, sharedW2: sharedOverDy }, /'out\.sharedW2' overlaps 'dy' in memory/, dyOver],
    ];
    const masterBefore = values(layer.master.w13);
    for (const [what, out, message, dyGiven] of bad) {
      const fwd = layer.forward(x);
      expect(() => layer.backward(fwd, dyGiven ?? dy, { out: out as never, accumulate: true }), what).toThrow(message);
      // Refused before any product: the buffers are still zero and the forward is still usable.
      for (const t of Object.values(good))
        expect(
          values(t).every((v) => v === 0),
          `${what}: buffers untouched`,
        ).toBe(true);
      const g = layer.backward(fwd, dy);
      for (const t of Object.values(g)) t?.dispose();
    }
    expect(values(layer.master.w13)).toEqual(masterBefore);
    expect(() => layer.backward(layer.forward(x), dy, { accumulate: true })).toThrow(/MoELayer\.backward: 'accumulate' needs 'out'/);
    strided.dispose();
    for (const t of Object.values(good)) t.dispose();
    using plain = new MoELayer({ ...base, sharedFfn: 0, seed: 1 });
    const fwd = plain.forward(x);
    const r = Tensor.zeros(plain.master.router.shape, { device: cpu });
    const w13 = Tensor.zeros(plain.master.w13.shape, { device: cpu });
    const w2 = Tensor.zeros(plain.master.w2.shape, { device: cpu });
    expect(() => plain.backward(fwd, dy, { out: { router: r, w13, w2, sharedW13: w13 } })).toThrow(
      /'out\.sharedW13' was given but the layer has no shared expert/,
    );
    // out without accumulate: the gradients written into the buffers (twice: the same values, not their sum).
    r.fill_(7);
    const g1 = plain.backward(fwd, dy, { out: { router: r, w13, w2 } });
    expect(g1.router).toBe(r);
    const once = values(r);
    const g2 = plain.backward(plain.forward(x), dy, { out: { router: r, w13, w2 } });
    expect(values(r)).toEqual(once);
    for (const t of [r, w13, w2, g1.dx, g2.dx]) t.dispose();
  });

  it('expertsBackward: out and accumulate, checked before the first product', () => {
    using w13 = Tensor.randn([2, 8, 6], { seed: 1, device: cpu });
    using w2 = Tensor.randn([2, 3, 8], { seed: 2, device: cpu });
    using a = Tensor.randn([5, 8], { seed: 3, device: cpu });
    using dOut = Tensor.randn([5, 8], { seed: 4, device: cpu });
    using offsets = Tensor.fromArray([0, 2, 5], { dtype: 'i32', device: cpu });
    const fwd = expertsForward(a, w13, w2, offsets);
    const fresh = expertsBackward(dOut, a, w13, w2, offsets, fwd);
    using dW13 = Tensor.full(w13.shape, 1, { device: cpu });
    using dW2 = Tensor.full(w2.shape, 1, { device: cpu });
    const acc = expertsBackward(dOut, a, w13, w2, offsets, fwd, { out: { dW13, dW2 }, accumulate: true });
    expect(acc.dW13).toBe(dW13);
    expect(
      relErr(
        values(dW13),
        values(fresh.dW13).map((v) => v + 1),
      ),
    ).toBeLessThan(1e-6);
    expect(
      relErr(
        values(dW2),
        values(fresh.dW2).map((v) => v + 1),
      ),
    ).toBeLessThan(1e-6);
    const before = values(dW13);
    const refuse = (options: object, message: RegExp) => {
      expect(() => expertsBackward(dOut, a, w13, w2, offsets, fwd, options as never)).toThrow(message);
      expect(values(dW13)).toEqual(before);
    };
    refuse({ accumulate: true }, /expertsBackward: 'accumulate' needs 'out'/);
    refuse({ out: null }, /expertsBackward: 'out' must be \{ dW13, dW2 \}/);
    refuse({ out: { dW13, dW2: dW13 } }, /'out\.dW2' must be a contiguous f32 \[2,3,8\]/);
    refuse({ out: { dW13, dW2, extra: dW2 } }, /expertsBackward: .*'extra'/);
    refuse({ out: { dW13: w13, dW2 }, accumulate: true }, /'out\.dW13' overlaps 'w13' in memory/);
    for (const t of [fresh.dA, fresh.dW13, fresh.dW2, acc.dA, fwd.out, fwd.g, fwd.h]) t.dispose();
  });

  it.each([
    ['a shared expert', {}],
    ['a gated shared expert', { sharedGate: true }],
  ] as const)("a bf16 layer with %s takes an f32 dy (backward's contract): the gradients of the bf16 dy within bf16 noise", (_n, extra) => {
    // The shared expert's GEMMs refused an f32 dy before (a reviewer's find): 'b' bf16 must have the dtype of 'a' (f32).
    const seed = freshSeed();
    using layer = new MoELayer({ ...base, ...extra, dtype: 'bf16', seed });
    using x = Tensor.randn([9, 8], { seed: seed + 1, device: cpu, dtype: 'bf16' });
    using dy16 = Tensor.randn([9, 8], { seed: seed + 2, device: cpu, dtype: 'bf16' });
    using dy32 = dy16.cast('f32');
    tidy(() => {
      const a = layer.backward(layer.forward(x), dy16);
      const b = layer.backward(layer.forward(x), dy32);
      for (const k of ['dx', ...MOE_WEIGHT_GRADS] as const) {
        const ta = a[k],
          tb = b[k];
        if (!ta || !tb) {
          expect(ta ?? null, k).toBe(tb ?? null);
          continue;
        }
        expect(relErr(values(tb), values(ta)), `${k} (seed ${seed})`).toBeLessThan(2e-2);
      }
    });
  });

  it('a disposed layer says so, naming the method (not a disposed tensor inside it); dispose twice is fine', () => {
    const layer = new MoELayer({ hidden: 16, ffn: 8, numExperts: 4, topK: 2, device: cpu, dtype: 'f32' });
    const x = Tensor.randn([3, 16], { seed: freshSeed(), device: cpu });
    const fwd = layer.forward(x);
    layer.dispose();
    layer.dispose();
    expect(() => layer.forward(x)).toThrow(DisposedError);
    expect(() => layer.forward(x)).toThrow(/^MoELayer\.forward: the layer was disposed and cannot be used$/);
    expect(() => layer.backward(fwd, x)).toThrow(/^MoELayer\.backward: the layer was disposed/);
    expect(() => layer.refreshComputeWeights()).toThrow(/^MoELayer\.refreshComputeWeights: the layer was disposed/);
    disposeSaved(fwd);
    x.dispose();
  });
  it('a second backward of one forward says the saved tensors were released, not which internal one', () => {
    using layer = new MoELayer({ hidden: 16, ffn: 8, numExperts: 4, topK: 2, device: cpu, dtype: 'f32' });
    using x = Tensor.randn([3, 16], { seed: freshSeed(), device: cpu });
    const fwd = layer.forward(x);
    for (const g of Object.values(layer.backward(fwd, x))) g?.dispose();
    expect(() => layer.backward(fwd, x)).toThrow(
      /^MoELayer\.backward: this forward's saved tensors were released by an earlier backward\(\) or disposeSaved\(\): run forward\(\) again$/,
    );
    fwd.y.dispose();
  });
  it('sigmoid top-1 is not renormalised by default, so its router learns', () => {
    const seed = freshSeed();
    using layer = new MoELayer({ ...base, topK: 1, scoreFunction: 'sigmoid', seed });
    expect(layer.config.normalize, `seed ${seed}`).toBe(false);
    using x = Tensor.randn([6, 8], { seed: seed + 1, device: cpu });
    using dy = Tensor.randn([6, 8], { seed: seed + 2, device: cpu });
    const grads = tidy(() => layer.backward(layer.forward(x), dy));
    try {
      expect(Math.max(...values(grads.router).map(Math.abs)), `seed ${seed}`).toBeGreaterThan(1e-6);
    } finally {
      for (const g of Object.values(grads)) g?.dispose();
    }
  });

  // DeepSeek-V3's eq. 18 and Megatron-Core count f_e over each token's top-k of the plain scores:
  // the selection bias and the group limit steer routing only.
  it("the balance losses count each token's top-k of the plain scores, not its biased, group-limited routing", () => {
    const seed = freshSeed();
    const [T, H, E, k] = [6, 8, 8, 2];
    const coef = { aux: 1, seq: 0.5, seqLen: 3 };
    using layer = new MoELayer({
      ...base,
      numExperts: E,
      topK: k,
      groups: 4,
      topkGroups: 2,
      scoreFunction: 'sigmoid',
      seed,
      auxLossCoef: coef.aux,
      seqAuxLossCoef: coef.seq,
      seqLen: coef.seqLen,
    });
    // Experts 6 and 7 (group 3) strongly favoured: every token is routed to one of them.
    using bias = Tensor.fromArray([0, 0, 0, 0, 0, 0, 10, 10], { device: cpu });
    layer.bias.copy_(bias);
    using x = Tensor.randn([T, H], { seed: seed + 1, device: cpu });
    const xv = values(x),
      wr = values(layer.master.router);
    const scores = Array.from({ length: T }, (_, t) =>
      Array.from({ length: E }, (_, e) => {
        let l = 0;
        for (let h = 0; h < H; h++) l += (xv[t * H + h] as number) * (wr[h * E + e] as number);
        return 1 / (1 + Math.exp(-l));
      }),
    );
    const topK = (row: number[]): number[] =>
      row
        .map((v, e) => [v, e] as const)
        .sort((a, b) => b[0] - a[0] || a[1] - b[1])
        .slice(0, k)
        .map(([, e]) => e);
    const plain = scores.map(topK);
    // α·E·Σ_e f_e·P_e per sequence, averaged: f_e = count/(Ts·k), P_e = mean of the renormalised scores.
    const loss = (chosen: number[][], seqLen: number): number => {
      let total = 0;
      for (let s0 = 0; s0 < T; s0 += seqLen) {
        for (let e = 0; e < E; e++) {
          let count = 0,
            p = 0;
          for (let t = s0; t < s0 + seqLen; t++) {
            if ((chosen[t] as number[]).includes(e)) count++;
            const row = scores[t] as number[];
            p += (row[e] as number) / row.reduce((a, b) => a + b, 0);
          }
          total += E * (count / (seqLen * k)) * (p / seqLen);
        }
      }
      return total / (T / seqLen);
    };
    tidy(() => {
      const f = layer.forward(x);
      const routedFlat = f.saved.indices.toNumbers();
      const routed = Array.from({ length: T }, (_, t) => routedFlat.slice(t * k, t * k + k));
      expect(
        routed.some((r, t) => r.includes(6) !== (plain[t] as number[]).includes(6) || r.includes(7) !== (plain[t] as number[]).includes(7)),
        `seed ${seed}: the bias must move some token's experts, or this test checks nothing`,
      ).toBe(true);
      const expected = coef.aux * loss(plain, T) + coef.seq * loss(plain, coef.seqLen);
      const ifRouted = coef.aux * loss(routed, T) + coef.seq * loss(routed, coef.seqLen);
      // far apart next to the check's tolerance (5e-6), or the check below could not tell them apart
      expect(Math.abs(expected - ifRouted), `seed ${seed}`).toBeGreaterThan(1e-4);
      expect(f.auxLoss.item(), `seed ${seed}`).toBeCloseTo(expected, 5);
      disposeSaved(f);
    });
  });

  it('validates the config with errors naming the field', () => {
    expect(() => new MoELayer({ ...base, hidden: 0 })).toThrow(/'hidden' must be a positive integer/);
    expect(() => new MoELayer({ ...base, topK: 5 })).toThrow(/topK/);
    expect(() => new MoELayer({ ...base, capacityFactor: -1 })).toThrow(/'capacityFactor' must be a finite positive number/);
    expect(() => new MoELayer({ ...base, padToCapacity: true })).toThrow(/'padToCapacity' needs 'capacityFactor'/);
    expect(() => new MoELayer({ ...base, seqAuxLossCoef: 0.1 })).toThrow(/'seqAuxLossCoef' needs 'seqLen'/);
    // A lone renormalised weight is routeScale for every token: the router would never learn.
    expect(() => new MoELayer({ ...base, topK: 1, normalize: true })).toThrow(
      /MoELayer: 'normalize' with 'topK' 1 makes every weight 1 \('routeScale'\), so the router would get no gradient/,
    );
    expect(() => new MoELayer({ ...base, dtype: 'f16' })).toThrow(/'dtype' must be 'bf16'/);
    expect(() => new MoELayer({ ...base, commStream: 'yes' as unknown as boolean })).toThrow(
      /MoELayer: 'commStream' must be a Stream or a boolean; received yes/,
    );
    // At construction, not at the first forward (issue 14).
    expect(() => new MoELayer({ ...base, dropPolicy: 'random' as unknown as 'probs' })).toThrow(
      /MoELayer: 'dropPolicy' must be one of probs, position; received random/,
    );
  });

  it.each([
    ['dropless, shared expert, aux and z losses', { auxLossCoef: 0.1, zLossCoef: 0.01 }],
    [
      'capacity 1.0 padded, sigmoid, no shared expert',
      { capacityFactor: 1.0, padToCapacity: true, scoreFunction: 'sigmoid', sharedFfn: 0 },
    ],
  ] as const)(
    'commStream (dispatch ∥ shared expert, combine backward ∥ shared backward, dispatch backward ∥ router backward) leaves every output bit unchanged: %s',
    (_n, extra) => {
      const before = memoryStats(cpu).liveBytes;
      {
        const seed = freshSeed();
        using given = new Stream(cpu);
        using plain = new MoELayer({ ...base, ...extra, seed });
        using own = new MoELayer({ ...base, ...extra, seed, commStream: true });
        using passed = new MoELayer({ ...base, ...extra, seed, commStream: given });
        expect(own.dispatcher.commStream).toBeInstanceOf(Stream);
        expect(passed.dispatcher.commStream).toBe(given);
        expect(plain.dispatcher.commStream).toBeUndefined();
        const bits = (t: Tensor | null): number[] => (t ? Array.from(new Uint8Array((t.toArray() as Float32Array).buffer)) : []);
        tidy(() => {
          const x = Tensor.randn([13, 8], { seed: freshSeed(), device: cpu });
          const dy = Tensor.randn([13, 8], { seed: freshSeed(), device: cpu });
          const ref = plain.forward(x);
          const gRef = plain.backward(ref, dy);
          for (const layer of [own, passed]) {
            const f = layer.forward(x);
            expect(bits(f.y)).toEqual(bits(ref.y));
            expect(bits(f.auxLoss)).toEqual(bits(ref.auxLoss));
            const g = layer.backward(f, dy);
            for (const k of ['dx', 'router', 'w13', 'w2', 'sharedW13', 'sharedW2'] as const) expect(bits(g[k]), k).toEqual(bits(gRef[k]));
          }
        });
      }
      expect(memoryStats(cpu).liveBytes).toBe(before);
    },
  );
});

describe('router entropy metric', () => {
  it('is the mean per-token entropy of the renormalised scores, in nats', async () => {
    const { routerEntropy } = await import('../lib/moe/router.js');
    tidy(() => {
      const v = [
        0.5, 0.5, 0, 0, /* row 2 */ 1, 1, 1, 1, /* row 3: sigmoid-like, renormalised */ 0.9, 0.1, 0.1, 0.9, /* row 4: all zero */ 0, 0, 0,
        0,
      ];
      const s = Tensor.fromArray(v, { shape: [4, 4], device: cpu });
      const h = (ps: number[]): number => {
        const sum = ps.reduce((a, b) => a + b, 0);
        return sum > 0 ? -ps.reduce((a, p) => (p > 0 ? a + (p / sum) * Math.log(p / sum) : a), 0) : 0;
      };
      const ref = (h(v.slice(0, 4)) + h(v.slice(4, 8)) + h(v.slice(8, 12)) + h(v.slice(12, 16))) / 4;
      expect(routerEntropy(s).item()).toBeCloseTo(ref, 6);
      expect(() => routerEntropy(Tensor.zeros([4], { device: cpu }))).toThrow(/'scores' must be \[T, E\]/);
      // a row with a NaN or infinite score is not counted as 0 nats: the mean is NaN
      for (const bad of [NaN, Infinity]) {
        const withBad = Tensor.fromArray([0.5, 0.5, bad, 0], { shape: [2, 2], device: cpu });
        expect(routerEntropy(withBad).item(), String(bad)).toBeNaN();
      }
    });
  });
});
