// MoELayer with routing 'expert-choice' on one rank (f32, CPU): forward and backward against the
// plain-loop float64 reference (test/expert-choice-reference.mjs), a comm stream changes no bit,
// config errors. Near-ties at a column's threshold are excluded by construction: a draw whose
// reference selection has two scores within 1e-5 (relative) around some column's C-th place is
// redrawn (the seed and the number of redraws are printed on failure).
import { describe, expect, it } from 'vitest';

import { memoryStats, Stream, Tensor, tidy } from '../lib/index.js';
import { MoELayer, type MoELayerConfig } from '../lib/moe/layer.js';
import { expertChoiceReference } from './expert-choice-reference.mjs';
import { freshSeed, relErr, values } from './helpers.js';

const cpu = 'cpu' as const;
const base: MoELayerConfig = { hidden: 8, ffn: 4, numExperts: 4, topK: 2, dtype: 'f32', device: cpu, routing: 'expert-choice' };

function reference(layer: MoELayer, x: Tensor, dy: Tensor) {
  const c = layer.config;
  return expertChoiceReference({
    x: values(x),
    dy: values(dy),
    router: values(layer.master.router),
    w13: values(layer.master.w13),
    w2: values(layer.master.w2),
    shared:
      layer.master.sharedW13 && layer.master.sharedW2
        ? { w13: values(layer.master.sharedW13), w2: values(layer.master.sharedW2) }
        : undefined,
    cfg: {
      H: c.hidden,
      F: c.ffn,
      E: c.numExperts,
      Fs: c.sharedFfn,
      score: c.scoreFunction,
      routeScale: c.routeScale,
      zLossCoef: c.zLossCoef,
      C: Math.min(x.shape[0] as number, Math.ceil(((x.shape[0] as number) * (c.capacityFactor as number)) / c.numExperts - 1e-9)),
    },
  });
}

describe('MoELayer with expert-choice routing on one rank, against the plain-loop reference', () => {
  it.each([
    ['softmax, C from topK, shared expert, z-loss', { sharedFfn: 3, zLossCoef: 0.01 }, 13],
    ['sigmoid, capacityFactor 1.5, route scale 2, no shared expert', { scoreFunction: 'sigmoid', capacityFactor: 1.5, routeScale: 2 }, 11],
    ['softmax, 8 experts, capacityFactor 3 (most tokens get several experts)', { numExperts: 8, capacityFactor: 3, sharedFfn: 2 }, 9],
  ] as const)('forward and backward: %s', (_name, extra, T) => {
    const before = memoryStats(cpu).liveBytes;
    const first = freshSeed();
    let seed = first;
    for (let redraws = 0; ; redraws++, seed = freshSeed()) {
      expect(redraws, `no draw without a near-tie in 20 (first seed ${first})`).toBeLessThan(20);
      using layer = new MoELayer({ ...base, ...extra, seed });
      const done = tidy(() => {
        const x = Tensor.randn([T, 8], { seed: seed + 1, device: cpu });
        const dy = Tensor.randn([T, 8], { seed: seed + 2, device: cpu });
        const ref = reference(layer, x, dy);
        if (ref.minGap < 1e-5) return false;
        const what = `seed ${seed}`;
        const f = layer.forward(x);
        expect(f.saved.slot?.toNumbers(), what).toEqual(Array.from(ref.slot));
        expect(f.expertsPerToken?.toNumbers(), what).toEqual(ref.expertsPerToken);
        const C = Math.ceil((T * (layer.config.capacityFactor as number)) / layer.config.numExperts - 1e-9);
        expect(f.tokensPerExpert.toNumbers(), what).toEqual(new Array(layer.config.numExperts).fill(C));
        expect(f.dropped.toNumbers()).toEqual([0]);
        expect(relErr(values(f.y), Array.from(ref.y)), `y, ${what}`).toBeLessThan(1e-5);
        const g = layer.backward(f, dy);
        const pairs: [string, Tensor | null, Float64Array][] = [
          ['dx', g.dx, ref.dx],
          ['router', g.router, ref.dRouter],
          ['w13', g.w13, ref.dW13],
          ['w2', g.w2, ref.dW2],
          ['shared w13', g.sharedW13, ref.dShared13],
          ['shared w2', g.sharedW2, ref.dShared2],
        ];
        for (const [name, got, want] of pairs) {
          if (got === null) {
            expect(want.length, name).toBe(0);
            continue;
          }
          expect(relErr(values(got), Array.from(want)), `${name}, ${what}`).toBeLessThan(1e-4);
        }
        return true;
      });
      if (done) break;
    }
    expect(memoryStats(cpu).liveBytes).toBe(before);
  });

  it('a comm stream leaves every output bit unchanged', () => {
    const seed = freshSeed();
    using plain = new MoELayer({ ...base, sharedFfn: 3, seed });
    using own = new MoELayer({ ...base, sharedFfn: 3, seed, commStream: true });
    expect(own.dispatcher.commStream).toBeInstanceOf(Stream);
    const bits = (t: Tensor | null): number[] => (t ? Array.from(new Uint8Array((t.toArray() as Float32Array).buffer)) : []);
    tidy(() => {
      const x = Tensor.randn([10, 8], { seed: seed + 1, device: cpu });
      const dy = Tensor.randn([10, 8], { seed: seed + 2, device: cpu });
      const a = plain.forward(x);
      const ga = plain.backward(a, dy);
      const b = own.forward(x);
      expect(bits(b.y), `seed ${seed}`).toEqual(bits(a.y));
      const gb = own.backward(b, dy);
      for (const k of ['dx', 'router', 'w13', 'w2', 'sharedW13', 'sharedW2'] as const)
        expect(bits(gb[k]), `${k}, seed ${seed}`).toEqual(bits(ga[k]));
    });
  });

  it('config: fixed segments, no balance losses, no groups or normalisation; errors name the field', () => {
    using layer = new MoELayer({ ...base });
    expect(layer.config.padToCapacity).toBe(true);
    expect(layer.config.capacityFactor).toBe(2); // topK
    expect(layer.config.routing).toBe('expert-choice');
    expect(layer.dispatcher.padToCapacity).toBe(true);
    expect(() => new MoELayer({ ...base, padToCapacity: false })).toThrow(
      /MoELayer: 'padToCapacity' is always on with routing 'expert-choice'/,
    );
    expect(() => new MoELayer({ ...base, auxLossCoef: 0.01 })).toThrow(
      /'auxLossCoef' and 'seqAuxLossCoef' must be 0 with routing 'expert-choice'/,
    );
    expect(() => new MoELayer({ ...base, groups: 2, topkGroups: 1 })).toThrow(/'groups' = 2 is not available with routing 'expert-choice'/);
    expect(() => new MoELayer({ ...base, scoreFunction: 'sigmoid', normalize: true })).toThrow(/'normalize' is not available/);
    expect(() => new MoELayer({ ...base, capacityFactor: -1 })).toThrow(/'capacityFactor' must be a finite number > 0/);
    expect(() => new MoELayer({ ...base, routing: 'tokens' as 'token-choice' })).toThrow(
      /'routing' must be 'token-choice' or 'expert-choice'/,
    );
    // token choice keeps its own meaning of capacityFactor (and its default: dropless)
    using tc = new MoELayer({ ...base, routing: 'token-choice' });
    expect(tc.config.capacityFactor).toBeUndefined();
    expect(tc.config.padToCapacity).toBe(false);
  });
});
