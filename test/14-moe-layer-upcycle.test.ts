// upcycleExperts on the CPU: every expert a copy of a dense SwiGLU FFN, so a layer whose weights sum
// to 1 per token computes the dense FFN (float64 oracle written here), whatever the routing; the
// layouts a checkpoint hands over (transposed views, bf16) give the same experts; bad calls are named.
import { describe, expect, it } from 'vitest';

import { DisposedError, memoryStats, MoELayer, Tensor, tidy, upcycleExperts } from '../lib/index.js';
import { freshSeed, relErr, values } from './helpers.js';

const cpu = 'cpu' as const;
const [H, F] = [16, 8];

/** y = (silu(x·w1) ⊙ (x·w3))·w2 in float64 for every row of x [T,H]. */
function denseFfn(x: number[], w1: number[], w3: number[], w2: number[]): number[] {
  const T = x.length / H;
  const y = new Array<number>(T * H).fill(0);
  for (let t = 0; t < T; t++) {
    for (let f = 0; f < F; f++) {
      let a = 0,
        b = 0;
      for (let h = 0; h < H; h++) {
        a += (x[t * H + h] as number) * (w1[h * F + f] as number);
        b += (x[t * H + h] as number) * (w3[h * F + f] as number);
      }
      const act = (a / (1 + Math.exp(-a))) * b;
      for (let h = 0; h < H; h++) y[t * H + h] = (y[t * H + h] as number) + act * (w2[f * H + h] as number);
    }
  }
  return y;
}

describe('upcycleExperts', () => {
  it.each([
    ['softmax, top-2 of 8', { scoreFunction: 'softmax', topK: 2 }],
    ['sigmoid, top-3 of 8, 2 groups keep 1', { scoreFunction: 'sigmoid', topK: 3, groups: 2, topkGroups: 1 }],
  ] as const)('%s, weights normalised: the upcycled layer computes the dense FFN', (_n, routing) => {
    const before = memoryStats(cpu).liveBytes;
    {
      const seed = freshSeed();
      using layer = new MoELayer({ hidden: H, ffn: F, numExperts: 8, normalize: true, dtype: 'f32', device: cpu, seed, ...routing });
      using w1 = Tensor.randn([H, F], { seed: seed + 1, std: 0.3, device: cpu });
      using w3 = Tensor.randn([H, F], { seed: seed + 2, std: 0.3, device: cpu });
      using w2 = Tensor.randn([F, H], { seed: seed + 3, std: 0.3, device: cpu });
      using x = Tensor.randn([11, H], { seed: seed + 4, device: cpu });
      const plain = tidy(() => values(layer.forward(x).y));
      upcycleExperts(layer, { w1, w3, w2 });
      const want = denseFfn(values(x), values(w1), values(w3), values(w2));
      expect(relErr(plain, want), 'before: the experts are not the dense FFN').toBeGreaterThan(1e-2);
      tidy(() => {
        const f = layer.forward(x);
        expect(relErr(values(f.y), want), `seed ${seed}`).toBeLessThan(1e-5);
        // The router is left as initialised: it still spreads the tokens over the experts.
        expect(f.tokensPerExpert.toNumbers().filter((n) => n > 0).length).toBeGreaterThan(1);
        layer.backward(f, Tensor.randn([11, H], { seed: seed + 5, device: cpu }));
      });
    }
    expect(memoryStats(cpu).liveBytes).toBe(before);
  });

  it("a checkpoint's layouts give the same experts: transposed [F,H] views (Hugging Face's gate/up/down), bf16", () => {
    const seed = freshSeed();
    using a = new MoELayer({ hidden: H, ffn: F, numExperts: 4, topK: 2, dtype: 'f32', device: cpu, seed });
    using b = new MoELayer({ hidden: H, ffn: F, numExperts: 4, topK: 2, dtype: 'f32', device: cpu, seed });
    tidy(() => {
      const gate = Tensor.randn([F, H], { seed: seed + 1, device: cpu }).cast('bf16'); // gate_proj.weight
      const up = Tensor.randn([F, H], { seed: seed + 2, device: cpu }).cast('bf16'); // up_proj.weight
      const down = Tensor.randn([H, F], { seed: seed + 3, device: cpu }).cast('bf16'); // down_proj.weight
      upcycleExperts(a, { w1: gate.transpose(), w3: up.transpose(), w2: down.transpose() });
      upcycleExperts(b, {
        w1: gate.transpose().contiguous().cast('f32'),
        w3: up.transpose().contiguous(),
        w2: down.transpose().contiguous(),
      });
      for (const k of ['w13', 'w2'] as const) expect(values(a.master[k])).toEqual(values(b.master[k]));
      // Every expert holds the FFN: W1 in w13's even columns, W3 in its odd ones.
      const w13 = values(a.master.w13);
      const g = values(gate.transpose().contiguous().cast('f32'));
      for (let e = 0; e < 4; e++)
        for (let i = 0; i < H * F; i += 7) expect(w13[e * H * 2 * F + Math.floor(i / F) * 2 * F + (i % F) * 2]).toBe(g[i]);
      // The compute copies were refreshed: the forward reads the new weights.
      expect(values(a.compute.w2)).toEqual(values(a.master.w2));
    });
  });

  it('refuses what does not fit, naming the argument', () => {
    using layer = new MoELayer({ hidden: H, ffn: F, numExperts: 4, topK: 2, dtype: 'f32', device: cpu });
    using ok = Tensor.zeros([H, F], { device: cpu });
    using w2 = Tensor.zeros([F, H], { device: cpu });
    using wrong = Tensor.zeros([F, H + 1], { device: cpu });
    using ints = Tensor.zeros([H, F], { dtype: 'i32', device: cpu });
    expect(() => upcycleExperts(layer, { w1: ok, w3: ok, w2: wrong })).toThrow(
      /^upcycleExperts: 'dense\.w2' is \[8,17\]; the layer's experts need \[8,16\] \(hidden 16, ffn 8\)$/,
    );
    expect(() => upcycleExperts(layer, { w1: ints, w3: ok, w2 })).toThrow(/'dense\.w1' is i32; expected a float tensor/);
    expect(() => upcycleExperts(layer, { w1: ok, w3: ok, w2, w4: ok } as never)).toThrow(/unknown option 'w4'/);
    expect(() => upcycleExperts({} as never, { w1: ok, w3: ok, w2 })).toThrow(/'layer' must be a MoELayer/);
    const gone = new MoELayer({ hidden: H, ffn: F, numExperts: 4, topK: 2, dtype: 'f32', device: cpu });
    gone.dispose();
    expect(gone.disposed).toBe(true);
    expect(() => upcycleExperts(gone, { w1: ok, w3: ok, w2 })).toThrow(DisposedError);
  });
});
