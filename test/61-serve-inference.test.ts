// MoEInference on the CPU: the same output as the training layer's forward with the same weights
// (every router option, shared expert, capacity with both drop policies, bf16 and f32, several
// token counts), fixed workspaces (no allocation per step once a token count has been seen, with
// `out`), the Qwen2-MoE shared gate against a float64 oracle, config and argument errors, no leaks.
import { describe, expect, it } from 'vitest';

import {
  capacity,
  DisposedError,
  groupedGemm,
  memoryStats,
  MoEInference,
  type MoEInferenceConfig,
  MoELayer,
  type MoELayerConfig,
  ops,
  routerForward,
  Tensor,
  tidy,
} from '../lib/index.js';
import { disposeSaved } from '../lib/moe/layer.js';
import { expectInvalidArgument, expectNoLeak, freshSeed, relErr, values } from './helpers.js';

const cpu = 'cpu' as const;
const bits = (t: Tensor): Buffer => Buffer.from((t.toArray() as Uint16Array | Float32Array).buffer);

const cases: [string, Partial<MoELayerConfig>][] = [
  ['softmax top-2 (Qwen-like: not normalised)', {}],
  ['softmax top-2 normalised (Mixtral-like)', { normalize: true }],
  [
    'sigmoid + bias, 4 groups keep 2, top-4, route scale 2.5, shared expert (DeepSeek-V3-like)',
    { scoreFunction: 'sigmoid', groups: 4, topkGroups: 2, topK: 4, routeScale: 2.5, sharedFfn: 24, numExperts: 16 },
  ],
  [
    'softmax, 4 groups keep 2 by their maximum (groupTop 1), top-4, route scale 16 (DeepSeek-V2-like; the default would sum the top 2)',
    { groups: 4, topkGroups: 2, groupTop: 1, topK: 4, routeScale: 16, numExperts: 16 },
  ],
  ['softmax top-1, shared expert', { topK: 1, sharedFfn: 8 }],
  ['shared expert gated by sigmoid(x·g) (Qwen2-MoE-like)', { sharedFfn: 8, sharedGate: true }],
  ['capacity 1.0, drop by probability (drops happen)', { capacityFactor: 1.0, dropPolicy: 'probs' }],
  [
    'capacity 1.25 padded, drop by position, sigmoid',
    { capacityFactor: 1.25, padToCapacity: true, dropPolicy: 'position', scoreFunction: 'sigmoid' },
  ],
];

describe('MoEInference equals MoELayer.forward (same weights)', () => {
  for (const dtype of ['bf16', 'f32'] as const) {
    for (const [name, extra] of cases) {
      it(`${dtype}: ${name}; T = 1, 6, 64, then 6 again (workspace reused)`, () => {
        const seed = freshSeed();
        expectNoLeak(cpu, () => {
          using layer = new MoELayer({ hidden: 32, ffn: 16, numExperts: 8, topK: 2, dtype, device: cpu, seed, ...extra });
          // A non-zero balancing bias, so that selection differs from the scores' order.
          tidy(() => layer.bias.copy_(Tensor.randn([layer.config.numExperts], { std: 0.05, seed: seed + 1, device: cpu })));
          using inf = MoEInference.fromLayer(layer);
          expect(inf.weightBytes).toBe(
            [
              layer.compute.router,
              layer.bias,
              layer.compute.w13,
              layer.compute.w2,
              layer.compute.sharedW13,
              layer.compute.sharedW2,
              layer.compute.sharedGate,
            ].reduce((s, t) => s + (t ? t.numel * (t.dtype === 'bf16' ? 2 : 4) : 0), 0),
          );
          for (const T of [1, 6, 64, 6]) {
            tidy(() => {
              const x = Tensor.randn([T, 32], { seed: seed + 10 + T, device: cpu }).cast(dtype);
              const fwd = layer.forward(x);
              const yTrain = fwd.y;
              disposeSaved(fwd);
              const yInf = inf.forward(x);
              expect(yInf.shape).toEqual([T, 32]);
              expect(yInf.dtype).toBe(dtype);
              // Same kernels in the same order: the same bits (else within the dtype's rounding).
              const same = bits(yInf).equals(bits(yTrain));
              if (!same) expect(relErr(values(yInf), values(yTrain)), `seed ${seed}, T ${T}`).toBeLessThan(dtype === 'bf16' ? 1e-2 : 1e-6);
              expect(same, `seed ${seed}, T ${T}: bitwise equal to the training layer`).toBe(true);
            });
          }
          // Three token counts seen: three workspaces.
          expect((inf as unknown as { workspaces: Map<number, unknown> }).workspaces.size).toBe(3);
        });
      });
    }
  }

  it('a training layer with expert-choice routing is refused', () => {
    using layer = new MoELayer({ hidden: 8, ffn: 4, numExperts: 4, topK: 2, dtype: 'f32', device: cpu, routing: 'expert-choice' });
    expectInvalidArgument(() => MoEInference.fromLayer(layer), /routing 'expert-choice' is not served/);
  });

  it.each([true, 'keep'] as const)('a training layer with fp8Dispatch %s is refused (a served copy would compute otherwise)', (mode) => {
    using layer = new MoELayer({ hidden: 128, ffn: 4, numExperts: 4, topK: 2, dtype: 'f32', device: cpu, fp8Dispatch: mode });
    expectInvalidArgument(() => MoEInference.fromLayer(layer), /fp8Dispatch .* is not served: MoEInference dispatches rows unquantised/);
  });
});

describe('fixed buffers', () => {
  it('once a token count has been seen, a forward into `out` allocates nothing (one rank, dropless and capacity)', () => {
    for (const extra of [{}, { capacityFactor: 1.5 }, { sharedFfn: 16, scoreFunction: 'sigmoid' as const, groups: 2, topkGroups: 1 }]) {
      using layer = new MoELayer({ hidden: 32, ffn: 16, numExperts: 8, topK: 2, device: cpu, seed: 3, ...extra });
      using inf = MoEInference.fromLayer(layer);
      using x = Tensor.randn([10, 32], { seed: 4, device: cpu }).cast('bf16');
      using out = Tensor.empty([10, 32], { dtype: 'bf16', device: cpu });
      inf.forward(x, { out });
      const first = Buffer.from(bits(out));
      const before = memoryStats(cpu);
      for (let i = 0; i < 3; i++) inf.forward(x, { out });
      const after = memoryStats(cpu);
      expect(after.allocations - before.allocations, JSON.stringify(extra)).toBe(0);
      expect(after.liveBytes).toBe(before.liveBytes);
      expect(bits(out).equals(first)).toBe(true);
      // The workspace's size is what rowsFor() and the module doc's formula say.
      const T = 10,
        k = 2,
        E = 8,
        H = 32,
        F = 16;
      const R = inf.rowsFor(T);
      expect(R).toBe('capacityFactor' in extra ? E * Math.ceil((1.5 * T * k) / E) : T * k);
      const Fs = 'sharedFfn' in extra ? 16 : 0;
      const expected =
        8 * T * E + 16 * T * k + 8 * R + 2 * R * (2 * H + F) + (Fs ? 2 * T * (Fs + H) : 0) + 4 * (E + 2 + E + 1 + 1 + E + 1 + 1) + 8; // i32 counters: tokensPerExpert, nanRows, keptPerExpert, dropped, invalid, offsets, invalid; [0,T]
      expect(inf.workspaceBytes(T)).toBe(expected);
    }
  });

  it('at most maxWorkspaces token counts are kept (least recently used goes first); releaseWorkspaces frees them', () => {
    expectNoLeak(cpu, () => {
      using layer = new MoELayer({ hidden: 16, ffn: 8, numExperts: 4, topK: 2, device: cpu, seed: 5 });
      using inf = MoEInference.fromLayer(layer, { maxWorkspaces: 2 });
      const ws = (inf as unknown as { workspaces: Map<number, unknown> }).workspaces;
      const run = (T: number): void => tidy(() => void inf.forward(Tensor.randn([T, 16], { seed: T, device: cpu }).cast('bf16')));
      run(1);
      run(2);
      run(1);
      run(3);
      expect([...ws.keys()]).toEqual([1, 3]);
      const live = memoryStats(cpu).liveBytes;
      inf.releaseWorkspaces();
      expect(ws.size).toBe(0);
      expect(memoryStats(cpu).liveBytes).toBeLessThan(live);
      run(2);
      expect([...ws.keys()]).toEqual([2]);
    });
  });
});

describe('the Qwen2-MoE shared-expert gate', () => {
  it('y = routed + sigmoid(x·g)·shared(x), against a float64 oracle (f32)', () => {
    const seed = freshSeed();
    const H = 12,
      F = 6,
      Fs = 10,
      E = 4,
      k = 2,
      T = 7;
    const w = tidy(() => ({
      router: Tensor.randn([1, H, E], { std: 0.5, seed, device: cpu }),
      w13: Tensor.randn([E, H, 2 * F], { std: 0.3, seed: seed + 1, device: cpu }),
      w2: Tensor.randn([E, F, H], { std: 0.3, seed: seed + 2, device: cpu }),
      sharedW13: Tensor.randn([1, H, 2 * Fs], { std: 0.3, seed: seed + 3, device: cpu }),
      sharedW2: Tensor.randn([1, Fs, H], { std: 0.3, seed: seed + 4, device: cpu }),
      sharedGate: Tensor.randn([1, H, 1], { std: 0.5, seed: seed + 5, device: cpu }),
    }));
    const v = Object.fromEntries(Object.entries(w).map(([key, t]) => [key, values(t)])) as Record<keyof typeof w, number[]>;
    using inf = new MoEInference(
      { hidden: H, ffn: F, numExperts: E, topK: k, sharedFfn: Fs, sharedGate: true, dtype: 'f32', device: cpu },
      w,
    );
    using x = Tensor.randn([T, H], { seed: seed + 6, device: cpu });
    const xv = values(x);
    const y = tidy(() => values(inf.forward(x)));
    const silu = (a: number): number => a / (1 + Math.exp(-a));
    const ffn = (t: number, w13: number[], w2: number[], e: number, f: number): number[] => {
      const h = Array.from({ length: f }, (_, i) => {
        let g1 = 0,
          g3 = 0;
        for (let j = 0; j < H; j++) {
          g1 += (xv[t * H + j] as number) * (w13[(e * H + j) * 2 * f + 2 * i] as number);
          g3 += (xv[t * H + j] as number) * (w13[(e * H + j) * 2 * f + 2 * i + 1] as number);
        }
        return silu(g1) * g3;
      });
      return Array.from({ length: H }, (_, o) => h.reduce((s, hv, i) => s + hv * (w2[(e * f + i) * H + o] as number), 0));
    };
    const ref: number[] = [];
    for (let t = 0; t < T; t++) {
      const logits = Array.from({ length: E }, (_, e) => {
        let a = 0;
        for (let j = 0; j < H; j++) a += (xv[t * H + j] as number) * (v.router[j * E + e] as number);
        return a;
      });
      const mx = Math.max(...logits);
      const p = logits.map((l) => Math.exp(l - mx));
      const z = p.reduce((a, b) => a + b, 0);
      const order = p.map((_, e) => e).sort((a, b) => (p[b] as number) - (p[a] as number));
      const yt = new Array(H).fill(0);
      for (const e of order.slice(0, k)) ffn(t, v.w13, v.w2, e, F).forEach((o, h) => (yt[h] += ((p[e] as number) / z) * o));
      let g = 0;
      for (let j = 0; j < H; j++) g += (xv[t * H + j] as number) * (v.sharedGate[j] as number);
      const s = 1 / (1 + Math.exp(-g));
      ffn(t, v.sharedW13, v.sharedW2, 0, Fs).forEach((o, h) => (yt[h] += s * o));
      ref.push(...yt);
    }
    expect(relErr(y, ref), `seed ${seed}`).toBeLessThan(1e-5);
  });
});

describe("Llama 4's router weight on the experts' input and gpt-oss's experts, with a capacity that drops", () => {
  // The kept assignments are capacity()'s choice on the same f32 logits (the package's ops, tested
  // on their own); everything after is checked against float64 loops written here.
  const H = 12,
    F = 6,
    E = 4,
    T = 16;
  const silu = (a: number): number => a / (1 + Math.exp(-a));
  const sigmoid = (a: number): number => 1 / (1 + Math.exp(-a));
  /** The experts' [H] output for the input row `xr`: SwiGLU, or gpt-oss's clamped one with biases. */
  function expert(xr: number[], v: Record<string, number[]>, e: number, gptOss: boolean): number[] {
    const h = Array.from({ length: F }, (_, i) => {
      let g = gptOss ? (v['w13Bias']![e * 2 * F + 2 * i] as number) : 0,
        u = gptOss ? (v['w13Bias']![e * 2 * F + 2 * i + 1] as number) : 0;
      for (let j = 0; j < H; j++) {
        g += (xr[j] as number) * (v['w13']![(e * H + j) * 2 * F + 2 * i] as number);
        u += (xr[j] as number) * (v['w13']![(e * H + j) * 2 * F + 2 * i + 1] as number);
      }
      if (!gptOss) return silu(g) * u;
      g = Math.min(g, 7);
      u = Math.max(-7, Math.min(u, 7));
      return (u + 1) * g * sigmoid(Math.fround(1.702) * g);
    });
    return Array.from({ length: H }, (_, o) =>
      h.reduce((s, hv, i) => s + hv * (v['w2']![(e * F + i) * H + o] as number), gptOss ? (v['w2Bias']![e * H + o] as number) : 0),
    );
  }
  for (const mode of ['llama4', 'gpt-oss'] as const)
    for (const dropPolicy of ['probs', 'position'] as const)
      it(`${mode}: kept assignments as the float64 loops, dropped ones nothing (capacity 0.5, drop by ${dropPolicy})`, () => {
        const seed = freshSeed();
        const gptOss = mode === 'gpt-oss';
        const k = gptOss ? 2 : 1;
        const w = tidy(() => ({
          router: Tensor.randn([1, H, E], { std: 0.5, seed, device: cpu }),
          w13: Tensor.randn([E, H, 2 * F], { std: 0.4, seed: seed + 1, device: cpu }),
          w2: Tensor.randn([E, F, H], { std: 0.4, seed: seed + 2, device: cpu }),
          ...(gptOss
            ? {
                routerBias: Tensor.randn([E], { std: 0.5, seed: seed + 3, device: cpu }),
                w13Bias: Tensor.randn([E, 2 * F], { std: 4, seed: seed + 4, device: cpu }),
                w2Bias: Tensor.randn([E, H], { std: 0.5, seed: seed + 5, device: cpu }),
              }
            : {}),
        }));
        const v = Object.fromEntries(Object.entries(w).map(([key, t]) => [key, values(t)])) as Record<string, number[]>;
        const config: MoEInferenceConfig = {
          hidden: H,
          ffn: F,
          numExperts: E,
          topK: k,
          capacityFactor: 0.5,
          dropPolicy,
          dtype: 'f32',
          device: cpu,
          ...(gptOss
            ? { scoreFunction: 'softmax', normalize: true, routerBias: true, expertBias: true, activation: 'clamped-swiglu' }
            : { scoreFunction: 'sigmoid', normalize: false, routeWeightsOn: 'input' }),
        };
        using inf = new MoEInference(config, { ...w });
        using x = Tensor.randn([T, H], { seed: seed + 6, device: cpu });
        const xv = values(x);
        const y = tidy(() => values(inf.forward(x)));
        // The routing and capacity's choice, from the same ops on the same logits.
        const { idx, wts, slot } = tidy(() => {
          const logits = groupedGemm('NN', x, w.router, Tensor.fromArray([0, T], { dtype: 'i32', device: cpu }), { dtype: 'f32' });
          if (gptOss) ops.add(logits, w.routerBias as Tensor, { out: logits });
          const r = routerForward(logits, { numExperts: E, topK: k, scoreFunction: gptOss ? 'softmax' : 'sigmoid', normalize: gptOss });
          const cap = capacity(r.indices, r.weights, { numExperts: E, capacityFactor: 0.5, dropPolicy });
          return { idx: values(r.indices), wts: values(r.weights), slot: values(cap.slot) };
        });
        expect(slot.filter((s) => s < 0).length, 'some assignments are dropped').toBeGreaterThan(0);
        const ref: number[] = [];
        for (let t = 0; t < T; t++) {
          const xr = xv.slice(t * H, (t + 1) * H);
          const yt = new Array<number>(H).fill(0);
          for (let j = 0; j < k; j++) {
            if ((slot[t * k + j] as number) < 0) continue;
            const e = idx[t * k + j] as number,
              wt = wts[t * k + j] as number;
            // Llama 4: the expert takes w·x and its output is added as it is; else w·E(x).
            const out = gptOss
              ? expert(xr, v, e, true).map((o) => wt * o)
              : expert(
                  xr.map((a) => wt * a),
                  v,
                  e,
                  false,
                );
            out.forEach((o, h) => (yt[h] = (yt[h] as number) + o));
          }
          ref.push(...yt);
        }
        expect(relErr(y, ref), `seed ${seed}`).toBeLessThan(2e-6);
      });
});

describe('arguments', () => {
  const H = 8,
    F = 4,
    E = 4;
  const weights = (dtype: 'bf16' | 'f32' = 'f32') => ({
    router: Tensor.zeros([1, H, E], { dtype, device: cpu }),
    w13: Tensor.zeros([E, H, 2 * F], { dtype, device: cpu }),
    w2: Tensor.zeros([E, F, H], { dtype, device: cpu }),
  });
  const base = { hidden: H, ffn: F, numExperts: E, topK: 2, dtype: 'f32' as const, device: cpu };

  it('config and weights are checked at construction, naming the field', () => {
    expectNoLeak(cpu, () => {
      const bad = (cfg: object, w: object, re: RegExp): void => {
        expectInvalidArgument(() => new MoEInference(cfg as never, w as never), re);
        for (const t of Object.values(w)) if (Tensor.isTensor(t)) t.dispose();
      };
      bad({ ...base, hidden: 0 }, weights(), /'hidden' must be a positive integer/);
      bad({ ...base, topK: 5 }, weights(), /'topK' = 5 is more than 'numExperts' = 4/);
      bad({ ...base, routing: 'expert-choice' }, weights(), /unknown|routing/);
      bad({ ...base, sharedGate: true }, weights(), /'sharedGate' needs a shared expert/);
      bad({ ...base, capacityFactor: -1 }, weights(), /'capacityFactor' must be a positive number/);
      bad({ ...base, dtype: 'f16' }, weights(), /'dtype' must be 'bf16' \(or 'f32' on the CPU\)/);
      const wide = weights();
      wide.w13.dispose();
      bad(base, { ...wide, w13: Tensor.zeros([E, H, 2 * F + 2], { device: cpu }) }, /'weights.w13' is \[4,8,10\]; expected \[4,8,8\]/);
      bad(base, weights('bf16'), /'weights.router' is bf16; expected f32/);
      bad(
        base,
        { ...weights(), bias: Tensor.zeros([E], { device: cpu }) },
        /'weights.bias' is given but the config has none \('selectionBias'\)/,
      );
      bad({ ...base, selectionBias: true }, weights(), /'weights.bias' must be a Tensor/);
      bad({ ...base, numExperts: 6 }, weights(), /'weights.router' is \[1,8,4\]; expected \[1,8,6\]/);
      // Weights are named as weights, with the closest one.
      bad(
        base,
        { ...weights(), w31: null },
        /^MoEInference: 'weights': unknown key 'w31' \(did you mean 'w13'\?\); expected 'router', 'bias', 'w13'/,
      );
      // Beside readLayer's bookkeeping, only the misspelt key is named (a review found all four named).
      bad(
        base,
        { ...weights(), firstExpert: 0, localExperts: 4, dispose: () => {}, sharedGat: null },
        /unknown key 'sharedGat' \(did you mean 'sharedGate'\?\);/,
      );
      // readLayer's bookkeeping must name this rank's experts (one rank: 0…3).
      bad(
        base,
        { ...weights(), firstExpert: 4, localExperts: 4 },
        /'weights\.firstExpert' is 4 but this rank holds experts 0…3 \(4 of them\)/,
      );
      bad(base, { ...weights(), firstExpert: 0, localExperts: 2 }, /'weights\.localExperts' is 2 but this rank holds experts 0…3/);
    });
  });

  it("takes HfMoECheckpoint.readLayer's result as it is (its firstExpert, localExperts and dispose)", () => {
    expectNoLeak(cpu, () => {
      const w = weights();
      const layerRead = {
        ...w,
        bias: null,
        sharedW13: null,
        sharedW2: null,
        sharedGate: null,
        firstExpert: 0,
        localExperts: E,
        dispose: () => {},
      };
      using inf = new MoEInference(base, layerRead);
      using x = Tensor.zeros([3, H], { device: cpu });
      inf.forward(x).dispose();
    });
  });

  it('forward checks x and out; a disposed layer refuses', () => {
    const inf = new MoEInference(base, weights());
    using x = Tensor.zeros([3, H], { device: cpu });
    expectInvalidArgument(() => inf.forward(Tensor.zeros([3, H + 1], { device: cpu })), /'x' must be \[T, 8\]/);
    expectInvalidArgument(
      () => inf.forward(Tensor.zeros([3, H], { dtype: 'bf16', device: cpu })),
      /'x' is bf16 but the layer computes in f32/,
    );
    expectInvalidArgument(() => inf.forward(x, { out: Tensor.zeros([4, H], { device: cpu }) }), /'out' must be a contiguous f32 \[3,8\]/);
    expectInvalidArgument(() => inf.forward(x, { out: x }), /'out' shares memory with 'x'/);
    expectInvalidArgument(() => inf.forward(x, { bogus: 1 } as never), /bogus/);
    inf.dispose();
    expect(() => inf.forward(x)).toThrow(DisposedError);
    expect(() => inf.forward(x)).toThrow(/MoEInference.forward: .*disposed/);
  });
});
