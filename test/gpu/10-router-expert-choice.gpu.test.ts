// The CUDA expert-choice router (native/ops/moe/router/expert_choice.cu) against the CPU reference on
// fresh random inputs, outputs poisoned first: the chosen tokens (slot) and the counts exactly,
// scores and weights within f32 rounding; the backward; the layer on the GPU against the CPU layer.
// Live device bytes return to their baseline after each test.
//
// Near-ties, by construction: the two devices compute the scores with different rounding (f32 expf
// against double exp), so two tokens whose scores straddle a column's C-th place within float error
// could legitimately swap. repairNearTies() finds, from the CPU's result, every (chosen, unchosen)
// pair of a column whose scores are within 1e-5 (relative) and not equal on both devices by
// construction, lowers the unchosen token's logit for that column by 0.05 and routes again, until
// none is left. Exact ties that both devices see (identical rows, underflowed scores, equal sigmoid
// logits) are kept on purpose: they test the lower-token rule.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import {
  expertChoiceForward,
  type ExpertChoiceOutputs,
  memoryStats,
  routerBackward,
  type RouterConfig,
  Tensor,
  tidy,
} from '../../lib/index.js';
import { MoELayer, type MoELayerConfig } from '../../lib/moe/layer.js';
import { freshSeed, poisoned, relErr, values } from '../helpers.js';
import { hasGpu } from './gpu.js';

const gpu = 'cuda:0' as const;
const cpu = 'cpu' as const;

function outputs(T: number, E: number, device: typeof gpu | typeof cpu) {
  return {
    indices: poisoned([T, E], 'i32', device),
    weights: poisoned([T, E], 'f32', device),
    tokensPerExpert: poisoned([E], 'i32', device),
    scores: poisoned([T, E], 'f32', device),
    nanRows: poisoned([2], 'i32', device),
    slot: poisoned([T, E], 'i32', device),
    expertsPerToken: poisoned([E + 1], 'i32', device),
  };
}

/**
 * Pairs (chosen c, unchosen u) of one column whose scores are within 1e-5 (relative) of each other
 * but need not be equal on the GPU: equal on both devices are scores from identical logit rows
 * (softmax), from equal logits in the column (sigmoid), or exact zeros from underflow.
 * Returns the unchosen tokens of such pairs, per column.
 */
function nearTies(data: Float32Array, scores: Float32Array, slot: Int32Array, T: number, E: number, sigmoid: boolean): number[][] {
  const out: number[][] = [];
  for (let e = 0; e < E; e++) {
    let lowest = Infinity,
      highest = -Infinity;
    for (let t = 0; t < T; t++) {
      const v = scores[t * E + e] as number;
      if (Number.isNaN(v)) continue;
      if ((slot[t * E + e] as number) >= 0) lowest = Math.min(lowest, v);
      else highest = Math.max(highest, v);
    }
    const near: number[] = [];
    out.push(near);
    if (!(highest >= lowest * (1 - 1e-5))) continue;
    const chosen: number[] = [],
      unchosen: number[] = [];
    for (let t = 0; t < T; t++) {
      const v = scores[t * E + e] as number;
      if (Number.isNaN(v)) continue;
      if ((slot[t * E + e] as number) >= 0) {
        if (v - highest < 1e-5 * v) chosen.push(t);
      } else if (v >= lowest * (1 - 1e-5)) unchosen.push(t);
    }
    const robust = (c: number, u: number): boolean =>
      (scores[c * E + e] === 0 && scores[u * E + e] === 0) ||
      (!sigmoid && E === 1) ||
      (sigmoid ? data[c * E + e] === data[u * E + e] : sameRow(data, E, c, u));
    for (const u of unchosen) {
      const su = scores[u * E + e] as number;
      if (chosen.some((c) => (scores[c * E + e] as number) - su < 1e-5 * (scores[c * E + e] as number) && !robust(c, u))) near.push(u);
    }
  }
  return out;
}

/** The first index where a and b differ, or -1. */
function firstDifference(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return 0;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return i;
  return -1;
}

function sameRow(data: Float32Array, E: number, a: number, b: number): boolean {
  for (let e = 0; e < E; e++) if (data[a * E + e] !== data[b * E + e]) return false;
  return true;
}

/** Logits [T,E] on the CPU whose CPU routing has no near-tie at any column's threshold (see above). */
function repairNearTies(data: Float32Array, T: number, E: number, config: RouterConfig, what: string): Tensor {
  for (let round = 0; round < 20; round++) {
    const moved = tidy(() => {
      const r = expertChoiceForward(Tensor.fromArray(data, { shape: [T, E], device: cpu }), config, { checkNaN: false });
      const near = nearTies(data, r.scores.toFloat32Array(), r.slot.toArray() as Int32Array, T, E, config.scoreFunction === 'sigmoid');
      let n = 0;
      near.forEach((us, e) => {
        for (const u of us) data[u * E + e] = (data[u * E + e] as number) - 0.05;
        n += us.length;
      });
      return n;
    });
    if (moved === 0) return Tensor.fromArray(data, { shape: [T, E], device: cpu });
  }
  throw new Error(`${what}: near-ties still left after 20 rounds of repair`);
}

type Kind = 'random' | 'repeated rows' | 'underflow and constant columns' | 'bad rows';
// E covers every tile width of the kernels (16, 8, 4, 2, 1 columns), odd E, E = 512 (the size the
// kernel is tuned for) and T from 1 to 65536 (several histogram and final-pass chunks).
const cases: [string, number, RouterConfig, Kind][] = [
  ['T=65536 E=512 cf=2, softmax', 65536, { numExperts: 512, topK: 2, routing: 'expert-choice' }, 'random'],
  [
    'T=16384 E=64 cf=8, sigmoid, route scale 2.5',
    16384,
    { numExperts: 64, topK: 8, routing: 'expert-choice', scoreFunction: 'sigmoid', routeScale: 2.5 },
    'random',
  ],
  [
    'T=4099 E=40 cf=1.5 (E not a multiple of the tile)',
    4099,
    { numExperts: 40, topK: 2, routing: 'expert-choice', capacityFactor: 1.5 },
    'random',
  ],
  ['T=3001 E=8 cf=2 (8-column tiles)', 3001, { numExperts: 8, topK: 2, routing: 'expert-choice' }, 'random'],
  ['T=777 E=3 cf=1 (4-column tiles)', 777, { numExperts: 3, topK: 1, routing: 'expert-choice' }, 'random'],
  [
    'T=999 E=2 cf=0.7, sigmoid',
    999,
    { numExperts: 2, topK: 1, routing: 'expert-choice', scoreFunction: 'sigmoid', capacityFactor: 0.7 },
    'random',
  ],
  ['T=5000 E=1 cf=0.37 (one column)', 5000, { numExperts: 1, topK: 1, routing: 'expert-choice', capacityFactor: 0.37 }, 'random'],
  ['T=7 E=17 cf=3 (tiny)', 7, { numExperts: 17, topK: 3, routing: 'expert-choice' }, 'random'],
  ['T=1 E=16', 1, { numExperts: 16, topK: 2, routing: 'expert-choice' }, 'random'],
  ['T=2048 E=16 C=T (capacityFactor ≥ E)', 2048, { numExperts: 16, topK: 2, routing: 'expert-choice', capacityFactor: 20 }, 'random'],
  [
    'T=8191 E=128 cf=2: rows repeated (exact ties in every column)',
    8191,
    { numExperts: 128, topK: 2, routing: 'expert-choice' },
    'repeated rows',
  ],
  [
    'T=8192 E=256 cf=1, sigmoid: rows repeated',
    8192,
    { numExperts: 256, topK: 1, routing: 'expert-choice', scoreFunction: 'sigmoid' },
    'repeated rows',
  ],
  [
    'T=3000 E=32 cf=4: underflowing softmax columns (all-zero ties)',
    3000,
    { numExperts: 32, topK: 4, routing: 'expert-choice' },
    'underflow and constant columns',
  ],
  [
    'T=3000 E=32 cf=4, sigmoid: constant columns (ties at one value)',
    3000,
    { numExperts: 32, topK: 4, routing: 'expert-choice', scoreFunction: 'sigmoid' },
    'underflow and constant columns',
  ],
  [
    'T=1000 E=16 cf=15.5: bad rows chosen last',
    1000,
    { numExperts: 16, topK: 2, routing: 'expert-choice', capacityFactor: 15.5 },
    'bad rows',
  ],
];

function inputs(T: number, E: number, kind: Kind, seed: number): Float32Array {
  const data = Tensor.randn([T, E], { seed, std: 1.5, device: cpu }).toFloat32Array();
  if (kind === 'repeated rows') {
    const distinct = Math.max(1, Math.floor(T / 9));
    for (let t = distinct; t < T; t++) data.copyWithin(t * E, ((t * 7919) % distinct) * E, ((t * 7919) % distinct) * E + E);
  } else if (kind === 'underflow and constant columns') {
    for (let t = 0; t < T; t++) for (let e = 0; e < E / 4; e++) data[t * E + e] = -250 + (e % 2 ? 0 : 3); // softmax: 0; sigmoid: constant
  } else if (kind === 'bad rows') {
    for (const t of [0, 17, 500, T - 1]) data[t * E + (t % E)] = t % 2 ? NaN : -Infinity;
  }
  return data;
}

describe.skipIf(!hasGpu)('CUDA expert-choice router against the CPU reference', () => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
  });
  afterEach(() => {
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  it.each(cases)(
    'forward and backward: %s',
    (name, T, config, kind) => {
      const E = config.numExperts;
      const seed = freshSeed();
      const what = `${name}, seed ${seed}`;
      tidy(() => {
        const lc = repairNearTies(inputs(T, E, kind, seed), T, E, config, what);
        const lg = lc.to(gpu);
        const c = outputs(T, E, cpu);
        const g = outputs(T, E, gpu);
        const rc = expertChoiceForward(lc, config, { out: c, checkNaN: false });
        const rg = expertChoiceForward(lg, config, { out: g, checkNaN: false });
        expect(rg.capacity).toBe(rc.capacity);
        expect(g.nanRows.toNumbers(), what).toEqual(c.nanRows.toNumbers());
        expect(relErr(g.scores.toFloat32Array(), c.scores.toFloat32Array()), `${what}: scores`).toBeLessThan(1e-6);
        const gs = g.slot.toArray() as Int32Array,
          cs = c.slot.toArray() as Int32Array;
        const d = firstDifference(gs, cs);
        expect(d, `${what}: first differing slot at token ${Math.floor(d / E)}, expert ${d % E}: GPU ${gs[d]}, CPU ${cs[d]}`).toBe(-1);
        expect(firstDifference(g.indices.toArray() as Int32Array, c.indices.toArray() as Int32Array), `${what}: indices`).toBe(-1);
        expect(g.tokensPerExpert.toNumbers(), what).toEqual(new Array(E).fill(rc.capacity));
        expect(g.expertsPerToken.toNumbers(), what).toEqual(c.expertsPerToken.toNumbers());
        const gw = g.weights.toFloat32Array(),
          cw = c.weights.toFloat32Array();
        expect(
          firstDifference(
            gw.map((v) => (Number.isNaN(v) ? 1 : 0)),
            cw.map((v) => (Number.isNaN(v) ? 1 : 0)),
          ),
          `${what}: NaN weights`,
        ).toBe(-1);
        expect(relErr(gw, cw), `${what}: weights`).toBeLessThan(1e-6);
        expect(
          gw.every((w, i) => ((cs[i] as number) < 0 ? w === 0 : true)),
          `${what}: unchosen weights are 0`,
        ).toBe(true);

        // backward from the GPU's own scores and slot, against the CPU on the same tensors
        if (kind === 'bad rows') return; // NaN rows give NaN gradients on both; the rest is covered above
        const dwc = Tensor.randn([T, E], { seed: seed + 1, device: cpu });
        const dwg = dwc.to(gpu);
        const savedC: Pick<ExpertChoiceOutputs, 'scores' | 'indices' | 'slot'> = {
          scores: g.scores.to(cpu),
          indices: g.indices.to(cpu),
          slot: g.slot.to(cpu),
        };
        const dc = poisoned([T, E], 'f32', cpu);
        const dg = poisoned([T, E], 'f32', gpu);
        routerBackward(dwc, savedC, config, { out: dc });
        routerBackward(dwg, rg, config, { out: dg });
        expect(relErr(dg.toFloat32Array(), dc.toFloat32Array()), `${what}: dLogits`).toBeLessThan(1e-5);
        routerBackward(dwg, rg, config, { out: dg, accumulate: true });
        expect(
          relErr(
            dg.toFloat32Array(),
            dc.toFloat32Array().map((v) => 2 * v),
          ),
          `${what}: dLogits accumulated`,
        ).toBeLessThan(1e-5);
      });
    },
    300_000,
  ); // T=65536 E=512: the CPU reference and the host-side checks take a while

  it('zero tokens, and checkNaN on the GPU names the first bad row', () => {
    tidy(() => {
      const config: RouterConfig = { numExperts: 8, topK: 2, routing: 'expert-choice' };
      const none = expertChoiceForward(Tensor.empty([0, 8], { device: gpu }), config);
      expect(none.tokensPerExpert.toNumbers()).toEqual(new Array(8).fill(0));
      expect(none.expertsPerToken.toNumbers()).toEqual(new Array(9).fill(0));
      expect(none.nanRows.toNumbers()).toEqual([0, 0]);
      const data = Array.from({ length: 64 * 8 }, (_, i) => Math.sin(0.37 * i));
      data[9 * 8 + 3] = NaN;
      expect(() => expertChoiceForward(Tensor.fromArray(data, { shape: [64, 8], device: gpu }), config, { checkNaN: true })).toThrow(
        /router: 'logits' row 9 has a NaN or infinite value/,
      );
    });
  });
});

describe.skipIf(!hasGpu)('MoELayer with expert-choice routing on the GPU', () => {
  it('forward and backward match the CPU layer (bf16 against f32 from the same bf16 weights), the same tokens chosen', () => {
    const before = memoryStats(gpu).liveBytes;
    const first = freshSeed();
    let seed = first;
    for (let redraws = 0; ; redraws++, seed = freshSeed()) {
      expect(redraws, `no draw without a near-tie in 20 (first seed ${first})`).toBeLessThan(20);
      const config: MoELayerConfig = {
        hidden: 256,
        ffn: 128,
        numExperts: 16,
        topK: 4,
        seed,
        sharedFfn: 64,
        routing: 'expert-choice',
        capacityFactor: 3,
      };
      using g = new MoELayer({ ...config, device: gpu, dtype: 'bf16' });
      using c = new MoELayer({ ...config, device: cpu, dtype: 'f32' });
      const done = tidy(() => {
        c.master.router.copy_(g.compute.router.view(256, 16));
        c.master.w13.copy_(g.compute.w13);
        c.master.w2.copy_(g.compute.w2);
        (c.master.sharedW13 as Tensor).copy_(g.compute.sharedW13 as Tensor);
        (c.master.sharedW2 as Tensor).copy_(g.compute.sharedW2 as Tensor);
        c.refreshComputeWeights();
        const xb = Tensor.randn([1000, 256], { seed: seed + 1, dtype: 'bf16', device: gpu });
        const dyb = Tensor.randn([1000, 256], { seed: seed + 2, dtype: 'bf16', device: gpu });
        const fc = c.forward(xb.to(cpu).cast('f32'));
        const slotC = fc.saved.slot as Tensor;
        // (softmax; x differs row to row, so only the 1e-5 margin counts)
        const near = nearTies(
          new Float32Array(1000 * 16).fill(NaN),
          fc.saved.scores.toFloat32Array(),
          slotC.toArray() as Int32Array,
          1000,
          16,
          false,
        );
        if (near.some((us) => us.length > 0)) return false;
        const fg = g.forward(xb);
        expect((fg.saved.slot as Tensor).toNumbers(), `seed ${seed}`).toEqual(slotC.toNumbers());
        expect(fg.expertsPerToken?.toNumbers()).toEqual(fc.expertsPerToken?.toNumbers());
        expect(relErr(values(fg.y), values(fc.y)), `y, seed ${seed}`).toBeLessThan(3e-2);
        const gg = g.backward(fg, dyb);
        const gc = c.backward(fc, dyb.to(cpu).cast('f32'));
        for (const k of ['dx', 'router', 'w13', 'w2', 'sharedW13', 'sharedW2'] as const) {
          expect(relErr(values(gg[k] as Tensor), values(gc[k] as Tensor)), `${k}, seed ${seed}`).toBeLessThan(5e-2);
        }
        return true;
      });
      if (done) break;
    }
    expect(memoryStats(gpu).liveBytes).toBe(before);
  });
});
