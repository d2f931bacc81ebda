// MoELayer's recompute on one rank on the CPU: backward computes again what the forward did not
// keep, and every output and gradient is the same bits as when the forward kept it all; the memory
// a forward keeps shrinks by exactly what each mode drops.
import { describe, expect, it } from 'vitest';

import { DisposedError, memoryStats, Tensor, tidy } from '../lib/index.js';
import { disposeSaved, type MoEForward, MoELayer, type MoELayerConfig, type Recompute } from '../lib/moe/layer.js';
import { freshSeed, MOE_WEIGHT_GRADS } from './helpers.js';

const cpu = 'cpu' as const;
const base: MoELayerConfig = { hidden: 8, ffn: 4, numExperts: 4, topK: 2, dtype: 'f32', device: cpu, sharedFfn: 3 };
const MODES: Recompute[] = ['experts', 'layer'];

/** A tensor's bytes, to compare bit for bit whatever its dtype. */
const bits = (t: Tensor | null): number[] => {
  if (!t) return [];
  const a = t.toArray() as ArrayLike<number> & { buffer: ArrayBufferLike; byteOffset: number; byteLength: number };
  return Array.from(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
};

const CONFIGS: [string, Partial<MoELayerConfig>][] = [
  ['dropless, shared expert, aux and z losses', { auxLossCoef: 0.1, zLossCoef: 0.01 }],
  [
    'capacity 0.75 with drops by position, sigmoid, no shared expert',
    { capacityFactor: 0.75, dropPolicy: 'position', scoreFunction: 'sigmoid', sharedFfn: 0 },
  ],
  ['capacity 1.25 padded, with a comm stream', { capacityFactor: 1.25, padToCapacity: true, commStream: true }],
  ['expert choice', { routing: 'expert-choice', capacityFactor: 2 }],
  ['bf16, 2 groups keep 1', { dtype: 'bf16', groups: 2, topkGroups: 1 }],
  ['the shared expert gated (its output recomputed too)', { sharedGate: true, capacityFactor: 1.25 }],
  ["fp8Dispatch 'keep' (e4m3 rows)", { hidden: 128, fp8Dispatch: 'keep' }],
  ['fp8Dispatch true', { hidden: 128, fp8Dispatch: true, sharedFfn: 0 }],
  [
    "gpt-oss's router and expert biases, clamped SwiGLU at limit 1.5 (its g and h made again)",
    { routerBias: true, expertBias: true, activation: 'clamped-swiglu', swigluLimit: 1.5 },
  ],
  [
    "Llama 4's router weight on the input (w·x dispatched again), capacity 0.75, bf16",
    { routeWeightsOn: 'input', topK: 1, scoreFunction: 'sigmoid', capacityFactor: 0.75, dtype: 'bf16' },
  ],
];

describe('MoELayer recompute', () => {
  for (const recompute of MODES) {
    it.each(CONFIGS)(`'${recompute}': forward and every gradient are the bits of recompute 'none': %s`, (_n, extra) => {
      const before = memoryStats(cpu).liveBytes;
      {
        const seed = freshSeed();
        using plain = new MoELayer({ ...base, ...extra, seed });
        using again = new MoELayer({ ...base, ...extra, seed, recompute });
        expect(again.config.recompute).toBe(recompute);
        const { hidden: H, dtype } = plain.config;
        tidy(() => {
          // Two steps, the second with gradients accumulated into buffers (micro-batches).
          const buffers = (layer: MoELayer) =>
            Object.fromEntries(
              MOE_WEIGHT_GRADS.filter((k) => layer.master[k]).map((k) => [
                k,
                Tensor.zeros((layer.master[k] as Tensor).shape, { device: cpu }),
              ]),
            ) as unknown as { router: Tensor; w13: Tensor; w2: Tensor };
          const into = [buffers(plain), buffers(again)] as const;
          for (let step = 0; step < 2; step++) {
            const x = Tensor.randn([13, H], { seed: seed * 10 + step, device: cpu, dtype });
            const dy = Tensor.randn([13, H], { seed: seed * 10 + 5 + step, device: cpu, dtype });
            const ref = plain.forward(x);
            const f = again.forward(x);
            expect(bits(f.y), `y, seed ${seed}`).toEqual(bits(ref.y));
            expect(bits(f.auxLoss)).toEqual(bits(ref.auxLoss));
            expect(bits(f.tokensPerExpert)).toEqual(bits(ref.tokensPerExpert));
            expect(bits(f.dropped)).toEqual(bits(ref.dropped));
            // What the forward kept, by mode.
            expect(f.saved.experts).toBeNull();
            expect(f.saved.shared).toBeNull();
            expect(f.saved.dispatched === null).toBe(recompute === 'layer');
            expect(f.saved.layout === null).toBe(recompute !== 'layer');
            // The caller releasing the returned counts (a trainer does, after reading its metrics)
            // must not reach what backward dispatches with.
            f.tokensPerExpert.dispose();
            f.dropped.dispose();
            const gRef = plain.backward(ref, dy, step === 1 ? { out: into[0], accumulate: true } : {});
            const g = again.backward(f, dy, step === 1 ? { out: into[1], accumulate: true } : {});
            for (const k of ['dx', ...MOE_WEIGHT_GRADS] as const)
              expect(bits(g[k]), `${k}, step ${step}, seed ${seed}`).toEqual(bits(gRef[k]));
          }
        });
      }
      expect(memoryStats(cpu).liveBytes).toBe(before);
    });
  }

  it('a forward keeps M·(3F + H) + T·3S fewer values with experts, and M·H fewer again with layer (dropless, M = T·k rows)', () => {
    const seed = freshSeed();
    const config = { ...base, hidden: 16, ffn: 8, sharedFfn: 6, seed };
    const T = 11;
    using x = Tensor.randn([T, 16], { seed, device: cpu });
    const kept = (recompute: Recompute): number => {
      using layer = new MoELayer({ ...config, recompute });
      const release = (f: MoEForward): void => {
        disposeSaved(f);
        for (const t of [f.y, f.tokensPerExpert, f.dropped, f.auxLoss, f.routerEntropy]) t.dispose();
      };
      release(layer.forward(x)); // the first forward caches the layer's [0, T] offsets
      const before = memoryStats(cpu).liveBytes;
      const f = layer.forward(x);
      const bytes = memoryStats(cpu).liveBytes - before;
      release(f);
      expect(memoryStats(cpu).liveBytes).toBe(before);
      return bytes;
    };
    const [none, experts, layer] = (['none', 'experts', 'layer'] as const).map(kept) as [number, number, number];
    const M = T * 2;
    // f32 tensors of n values, as the host allocator counts them (64-byte multiples).
    const f32 = (n: number): number => Math.ceil((n * 4) / 64) * 64;
    // The experts' g [M,2F], h [M,F] and output rows [M,H]; the shared expert's g [T,2S] and h [T,S].
    expect(none - experts).toBe(f32(M * 16) + f32(M * 8) + f32(M * 16) + f32(T * 12) + f32(T * 6));
    // 'layer' drops the rows [M,H] and the dispatch's layout, and keeps capacity()'s slots [T,k]
    // and kept counts [E] (i32) to dispatch again.
    expect(experts - layer).toBeGreaterThanOrEqual(f32(M * 16) - f32(T * 2) - f32(4));
    console.log(`recompute memory (seed ${seed}): a forward keeps ${none} B (none), ${experts} B (experts), ${layer} B (layer)`);
    // With the shared expert gated, 'none' also keeps its output [T,H] (the gate's gradient reads
    // it), which 'experts' computes again; the gate's σ, scores and indices [T,1] stay in every mode.
    const gated = { ...config, sharedGate: true };
    const keptGated = (recompute: Recompute): number => {
      using layer = new MoELayer({ ...gated, recompute });
      const release = (f: MoEForward): void => {
        disposeSaved(f);
        for (const t of [f.y, f.tokensPerExpert, f.dropped, f.auxLoss, f.routerEntropy]) t.dispose();
      };
      release(layer.forward(x));
      const before = memoryStats(cpu).liveBytes;
      const f = layer.forward(x);
      const bytes = memoryStats(cpu).liveBytes - before;
      release(f);
      return bytes;
    };
    const [gNone, gExperts] = (['none', 'experts'] as const).map(keptGated) as [number, number];
    expect(gNone - gExperts).toBe(none - experts + f32(T * 16));
    expect(gExperts - experts).toBe(3 * f32(T)); // σ, scores (f32) and indices (i32), [T,1] each
  });

  it("a backward whose forward's x was disposed says so before anything runs; the forward stays releasable", () => {
    for (const recompute of ['none', ...MODES] as const) {
      using layer = new MoELayer({ ...base, seed: freshSeed(), recompute });
      const x = Tensor.randn([5, 8], { seed: freshSeed(), device: cpu });
      using dy = Tensor.randn([5, 8], { seed: freshSeed(), device: cpu });
      const f = layer.forward(x);
      x.dispose();
      expect(() => layer.backward(f, dy)).toThrow(DisposedError);
      expect(() => layer.backward(f, dy)).toThrow(
        /^MoELayer\.backward: the forward's 'x' was disposed; keep it until backward, which reads it$/,
      );
      disposeSaved(f);
      for (const t of [f.y, f.tokensPerExpert, f.dropped, f.auxLoss, f.routerEntropy]) t.dispose();
    }
  });

  it('is checked at construction, naming the field', () => {
    expect(() => new MoELayer({ ...base, recompute: 'all' as unknown as Recompute })).toThrow(
      /^MoELayer: 'recompute' must be one of none, experts, layer; received all$/,
    );
  });
});
