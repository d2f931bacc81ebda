// Expert-choice routing (routing: 'expert-choice'), CPU reference: against an independent
// float64 oracle written here, on fresh random inputs (the seed is in each failure message) with
// every output poisoned first; the backward against the oracle and finite differences; bad calls.
//
// Selection rule under test (router.h): expert e ranks tokens by their f32 score as the op wrote it
// (NaN lowest; equal scores: lower token first) and takes the first C. The oracle computes the
// scores itself in float64 (compared within 1e-6) and re-implements the rule on the op's f32
// scores, so near-ties are decided on the same values and the indices compare exactly; exact ties
// are made on purpose (identical rows, all-equal logits).
import { describe, expect, it } from 'vitest';

import {
  balanceLoss,
  expertChoiceCapacity,
  expertChoiceForward,
  type ExpertChoiceOutputs,
  InvalidArgumentError,
  routerBackward,
  type RouterConfig,
  routerForward,
  Tensor,
  tidy,
} from '../lib/index.js';
import { native } from '../lib/native.js';
import { freshSeed, poisoned, relErr, values } from './helpers.js';

const cpu = 'cpu' as const;

function oracleScores(logits: number[], T: number, E: number, score: 'softmax' | 'sigmoid'): number[] {
  const out: number[] = [];
  for (let t = 0; t < T; t++) {
    const row = logits.slice(t * E, (t + 1) * E);
    if (row.some((x) => !Number.isFinite(x))) {
      out.push(...row.map(() => NaN));
      continue;
    }
    if (score === 'sigmoid') out.push(...row.map((x) => 1 / (1 + Math.exp(-x))));
    else {
      const m = Math.max(...row);
      const ex = row.map((x) => Math.exp(x - m));
      const s = ex.reduce((a, b) => a + b, 0);
      out.push(...ex.map((x) => x / s));
    }
  }
  return out;
}

interface OracleChoice {
  slot: number[];
  weights: number[];
  hist: number[];
}

/** The selection rule on given f32 scores: per expert, the first C tokens by (score desc, NaN last, t asc). */
function oracleChoose(scores: ArrayLike<number>, T: number, E: number, C: number, scale: number): OracleChoice {
  const slot = new Array<number>(T * E).fill(-1);
  const weights = new Array<number>(T * E).fill(0);
  for (let e = 0; e < E; e++) {
    const s = (t: number): number => scores[t * E + e] as number;
    const order = Array.from({ length: T }, (_, t) => t).sort((a, b) => {
      const na = Number.isNaN(s(a)),
        nb = Number.isNaN(s(b));
      if (na !== nb) return na ? 1 : -1;
      if (!na && s(a) !== s(b)) return s(b) - s(a);
      return a - b;
    });
    const chosen = new Set(order.slice(0, C));
    let n = 0;
    for (let t = 0; t < T; t++) {
      if (!chosen.has(t)) continue;
      slot[t * E + e] = n++;
      weights[t * E + e] = Math.fround(Math.fround(scale) * s(t)); // an f32 product
    }
  }
  const hist = new Array<number>(E + 1).fill(0);
  for (let t = 0; t < T; t++) hist[slot.slice(t * E, (t + 1) * E).filter((v) => v >= 0).length]! += 1;
  return { slot, weights, hist };
}

function poisonedOutputs(T: number, E: number) {
  return {
    indices: poisoned([T, E], 'i32', cpu),
    weights: poisoned([T, E], 'f32', cpu),
    tokensPerExpert: poisoned([E], 'i32', cpu),
    scores: poisoned([T, E], 'f32', cpu),
    nanRows: poisoned([2], 'i32', cpu),
    slot: poisoned([T, E], 'i32', cpu),
    expertsPerToken: poisoned([E + 1], 'i32', cpu),
  };
}

/** Runs the op into poisoned outputs and checks every output against the oracle. */
function checkForward(logits: Tensor, config: RouterConfig, what: string): ExpertChoiceOutputs {
  const [T, E] = logits.shape as [number, number];
  const out = poisonedOutputs(T, E);
  const r = expertChoiceForward(logits, config, { out, checkNaN: false });
  const C = expertChoiceCapacity(T, E, config.capacityFactor ?? config.topK);
  expect(r.capacity, what).toBe(C);
  const ref = oracleScores(values(logits), T, E, config.scoreFunction ?? 'softmax');
  expect(relErr(values(out.scores), ref), `${what}: scores`).toBeLessThan(1e-6);
  const choice = oracleChoose(out.scores.toFloat32Array(), T, E, C, config.routeScale ?? 1);
  expect(out.slot.toNumbers(), `${what}: slot`).toEqual(choice.slot);
  expect(values(out.weights), `${what}: weights`).toEqual(choice.weights);
  expect(out.indices.toNumbers(), `${what}: indices`).toEqual(Array.from({ length: T * E }, (_, i) => i % E));
  expect(out.tokensPerExpert.toNumbers(), `${what}: tokensPerExpert`).toEqual(new Array(E).fill(C));
  expect(out.expertsPerToken.toNumbers(), `${what}: expertsPerToken`).toEqual(choice.hist);
  // invariants of the rule: every expert C tokens, numbered 0..C-1; the histogram covers T tokens
  for (let e = 0; e < E; e++) {
    const col = Array.from({ length: T }, (_, t) => choice.slot[t * E + e] as number).filter((v) => v >= 0);
    expect(col, `${what}: expert ${e}`).toEqual(Array.from({ length: C }, (_, i) => i));
  }
  expect(choice.hist.reduce((a, b) => a + b, 0)).toBe(T);
  expect(choice.hist.reduce((a, b, n) => a + b * n, 0)).toBe(E * C);
  return { ...out, capacity: C };
}

const cases: [string, number, RouterConfig][] = [
  ['softmax, E=8, C from topK=2', 40, { numExperts: 8, topK: 2, routing: 'expert-choice' }],
  [
    'sigmoid, E=16, capacityFactor 1.5, route scale 2.5',
    37,
    { numExperts: 16, topK: 2, routing: 'expert-choice', scoreFunction: 'sigmoid', capacityFactor: 1.5, routeScale: 2.5 },
  ],
  ['softmax, E=5 (odd), capacityFactor 0.3', 23, { numExperts: 5, topK: 1, routing: 'expert-choice', capacityFactor: 0.3 }],
  ['E=1: the one expert takes ceil(T·cf) tokens', 11, { numExperts: 1, topK: 1, routing: 'expert-choice', capacityFactor: 0.5 }],
  ['capacityFactor ≥ E: every expert takes every token', 9, { numExperts: 4, topK: 2, routing: 'expert-choice', capacityFactor: 7 }],
  ['one token', 1, { numExperts: 6, topK: 2, routing: 'expert-choice' }],
];

describe('expert-choice router (CPU) against the float64 oracle', () => {
  it.each(cases)('%s', (name, T, config) => {
    const seed = freshSeed();
    tidy(() => {
      const logits = Tensor.randn([T, config.numExperts], { seed, std: 1.5, device: cpu });
      checkForward(logits, config, `${name}, seed ${seed}`);
    });
  });

  it('routerForward and Router dispatch on the config; zero tokens give empty outputs', () => {
    const seed = freshSeed();
    tidy(() => {
      const config: RouterConfig = { numExperts: 8, topK: 2, routing: 'expert-choice' };
      const logits = Tensor.randn([20, 8], { seed, device: cpu });
      const a = routerForward(logits, config) as ExpertChoiceOutputs;
      const b = expertChoiceForward(logits, config);
      expect(a.slot.toNumbers(), `seed ${seed}`).toEqual(b.slot.toNumbers());
      expect(a.capacity).toBe(5);
      const none = expertChoiceForward(Tensor.empty([0, 8], { device: cpu }), config);
      expect(none.capacity).toBe(0);
      expect(none.slot.shape).toEqual([0, 8]);
      expect(none.tokensPerExpert.toNumbers()).toEqual(new Array(8).fill(0));
      expect(none.expertsPerToken.toNumbers()).toEqual(new Array(9).fill(0));
      expect(none.nanRows.toNumbers()).toEqual([0, 0]);
    });
  });

  it('C = min(T, ceil(T·capacityFactor/E)), rounded as expertCapacity rounds', () => {
    expect(expertChoiceCapacity(256, 8, 2)).toBe(64);
    expect(expertChoiceCapacity(100, 10, 1.1)).toBe(11); // not 12: 1.1·100/10 is 11.000000000000002
    expect(expertChoiceCapacity(10, 4, 1)).toBe(3);
    expect(expertChoiceCapacity(9, 4, 7)).toBe(9);
    expect(expertChoiceCapacity(0, 4, 2)).toBe(0);
  });

  it('ties go to the lower token index: identical rows, and all-equal logits', () => {
    const seed = freshSeed();
    tidy(() => {
      // 6 distinct rows, each repeated 5 times in a shuffled order: every column has 5-way exact ties
      const E = 8;
      const base = Tensor.randn([6, E], { seed, device: cpu }).toFloat32Array();
      const order = [3, 0, 5, 1, 3, 2, 4, 0, 5, 1, 2, 4, 3, 0, 5, 1, 2, 4, 3, 0, 5, 1, 2, 4, 3, 0, 5, 1, 2, 4];
      const data = order.flatMap((r) => Array.from(base.subarray(r * E, (r + 1) * E)));
      for (const cf of [1, 2, 3.3]) {
        const config: RouterConfig = { numExperts: E, topK: 2, routing: 'expert-choice', capacityFactor: cf };
        checkForward(Tensor.fromArray(data, { shape: [30, E], device: cpu }), config, `duplicated rows, cf ${cf}, seed ${seed}`);
      }
      // all scores equal: expert e takes tokens 0..C-1
      const flat = expertChoiceForward(Tensor.zeros([10, 4], { device: cpu }), { numExperts: 4, topK: 2, routing: 'expert-choice' });
      expect(flat.capacity).toBe(5);
      expect(flat.slot.toNumbers()).toEqual(Array.from({ length: 40 }, (_, i) => (Math.floor(i / 4) < 5 ? Math.floor(i / 4) : -1)));
      expect(flat.expertsPerToken.toNumbers()).toEqual([5, 0, 0, 0, 5]);
    });
  });

  it('bad rows (NaN or ±inf): NaN scores ranked last, counted; checkNaN names the first', () => {
    tidy(() => {
      const data = Array.from({ length: 6 * 4 }, (_, i) => Math.sin(i));
      data[1 * 4 + 2] = NaN;
      data[4 * 4 + 0] = -Infinity;
      const logits = Tensor.fromArray(data, { shape: [6, 4], device: cpu });
      const config: RouterConfig = { numExperts: 4, topK: 2, routing: 'expert-choice' };
      expect(() => expertChoiceForward(logits, config)).toThrow(/router: 'logits' row 1 has a NaN or infinite value.*2 bad row/);
      const r = checkForward(logits, config, 'bad rows');
      expect(r.nanRows.toNumbers()).toEqual([2, 1]);
      // C = 3 of 4 good rows: bad rows are never chosen
      for (const t of [1, 4]) expect(r.slot.toNumbers().slice(t * 4, t * 4 + 4)).toEqual([-1, -1, -1, -1]);
      // C = T: the bad rows are chosen too, with NaN weights (as token choice's bad rows)
      const all = checkForward(logits, { ...config, capacityFactor: 4 }, 'bad rows, C = T');
      expect(values(all.weights).slice(4, 8).every(Number.isNaN)).toBe(true);
      expect(values(all.weights).slice(0, 4).some(Number.isNaN)).toBe(false);
    });
  });
});

describe('expert-choice router backward', () => {
  it.each(['softmax', 'sigmoid'] as const)('%s: against the float64 formula and finite differences of Σ dW·weights', (score) => {
    const seed = freshSeed();
    const T = 12,
      E = 6;
    const config: RouterConfig = { numExperts: E, topK: 2, routing: 'expert-choice', scoreFunction: score, routeScale: 1.7 };
    tidy(() => {
      const logits = Tensor.randn([T, E], { seed, std: 1.2, device: cpu });
      const dW = Tensor.randn([T, E], { seed: seed + 1, device: cpu });
      const r = expertChoiceForward(logits, config);
      const out = poisoned([T, E], 'f32', cpu);
      routerBackward(dW, { scores: r.scores, indices: r.indices, slot: r.slot }, config, { out });
      // float64 formula from the op's f32 scores
      const s = values(r.scores),
        g = values(dW),
        sl = r.slot.toNumbers();
      const ref: number[] = [];
      for (let t = 0; t < T; t++) {
        const ds = Array.from({ length: E }, (_, e) => ((sl[t * E + e] as number) >= 0 ? 1.7 * (g[t * E + e] as number) : 0));
        const c = ds.reduce((a, d, e) => a + d * (s[t * E + e] as number), 0);
        for (let e = 0; e < E; e++) {
          const se = s[t * E + e] as number;
          ref.push(score === 'softmax' ? se * ((ds[e] as number) - c) : (ds[e] as number) * se * (1 - se));
        }
      }
      expect(relErr(values(out), ref), `seed ${seed}`).toBeLessThan(1e-6);
      // finite differences (skipped per entry only where a ±h step changes the selection)
      const lv = values(logits);
      const L = (v: number[]): { value: number; slot: string } => {
        const o = expertChoiceForward(Tensor.fromArray(v, { shape: [T, E], device: cpu }), config);
        return { value: values(o.weights).reduce((a, w, i) => a + w * (g[i] as number), 0), slot: o.slot.toNumbers().join() };
      };
      const h = 1e-3;
      const fd: number[] = [],
        an: number[] = [];
      const analytic = values(out);
      for (let i = 0; i < T * E; i += 5) {
        const up = lv.slice(),
          dn = lv.slice();
        up[i] = (up[i] as number) + h;
        dn[i] = (dn[i] as number) - h;
        const a = L(up),
          b = L(dn);
        if (a.slot !== sl.join() || b.slot !== sl.join()) continue;
        fd.push((a.value - b.value) / (2 * h));
        an.push(analytic[i] as number);
      }
      expect(fd.length, `seed ${seed}: entries whose selection stays put`).toBeGreaterThan(6);
      expect(relErr(an, fd), `seed ${seed}`).toBeLessThan(2e-3);
      // accumulate adds into what is there
      const acc = Tensor.full([T, E], 0.5, { device: cpu });
      routerBackward(dW, { scores: r.scores, indices: r.indices, slot: r.slot }, config, { out: acc, accumulate: true });
      expect(
        relErr(
          values(acc),
          ref.map((v) => v + 0.5),
        ),
      ).toBeLessThan(1e-6);
    });
  });
});

describe('expert-choice router: bad calls name the argument', () => {
  const ec: RouterConfig = { numExperts: 4, topK: 2, routing: 'expert-choice' };
  it('config, bias, backward without slot, balance loss', () => {
    tidy(() => {
      const logits = Tensor.randn([8, 4], { seed: 1, device: cpu });
      expect(() => expertChoiceForward(logits, { ...ec, groups: 2, topkGroups: 1 })).toThrow(
        /'groups' = 2 is not available with routing 'expert-choice'/,
      );
      expect(() => expertChoiceForward(logits, { ...ec, normalize: true })).toThrow(
        /'normalize' is not available with routing 'expert-choice'/,
      );
      expect(() => expertChoiceForward(logits, { ...ec, capacityFactor: 0 })).toThrow(
        /'capacityFactor' must be a finite number > 0; received 0/,
      );
      expect(() => expertChoiceForward(logits, { ...ec, routing: 'experts' as 'expert-choice' })).toThrow(
        /'routing' must be 'token-choice' or 'expert-choice'; received experts/,
      );
      expect(() => expertChoiceForward(logits, { numExperts: 4, topK: 2 })).toThrow(/expertChoiceForward needs routing 'expert-choice'/);
      expect(() => expertChoiceForward(logits, ec, { bias: Tensor.zeros([4], { device: cpu }) })).toThrow(InvalidArgumentError);
      expect(() => routerForward(logits, ec, { bias: Tensor.zeros([4], { device: cpu }) })).toThrow(
        /'bias' is not used with routing 'expert-choice'/,
      );
      expect(() => expertChoiceForward(Tensor.randn([8, 5], { device: cpu }), ec)).toThrow(
        /'logits' has shape \[8,5\] but the config has numExperts = 4/,
      );
      expect(() => expertChoiceForward(logits, ec, { out: { slot: Tensor.empty([8, 3], { dtype: 'i32', device: cpu }) } })).toThrow(
        /router: 'slot' .* should have shape \[8,4\]/,
      );
      expect(() => expertChoiceForward(logits, ec, { out: { slot: Tensor.empty([8, 4], { device: cpu }) } })).toThrow(
        /router: 'slot' .* has dtype f32; expected one of i32/,
      );
      expect(() => expertChoiceForward(logits, ec, { out: { expertsPerToken: Tensor.empty([4], { dtype: 'i32', device: cpu }) } })).toThrow(
        /'expertsPerToken' .* should have shape \[5\]/,
      );
      const r = expertChoiceForward(logits, ec);
      expect(() => routerBackward(r.weights, { scores: r.scores, indices: r.indices }, ec)).toThrow(
        /routerBackward: 'slot' must be a Tensor/,
      );
      expect(() => routerBackward(Tensor.zeros([8, 2], { device: cpu }), r, ec)).toThrow(
        /routerBackward: 'dWeights' .* should have shape \[8,4\]/,
      );
      const badSlot = Tensor.full([8, 4], 9, { dtype: 'i32', device: cpu });
      expect(() => routerBackward(r.weights, { ...r, slot: badSlot }, ec)).toThrow(/'slot'\[0,0\] = 9 is outside \[-1, 8\)/);
      expect(() => balanceLoss(r.scores, r.indices, ec, { coefficient: 0.1 })).toThrow(
        /balanceLoss: not defined for routing 'expert-choice'/,
      );
    });
  });

  it('the raw binding throws (never crashes) on bad arguments, naming them', () => {
    tidy(() => {
      const n = native();
      const logits = Tensor.randn([8, 4], { seed: 1, device: cpu });
      const r = expertChoiceForward(logits, ec);
      const call = (over: Record<number, unknown>) => {
        const a: unknown[] = [
          logits.handle,
          0,
          4,
          1,
          r.scores.handle,
          r.slot.handle,
          r.weights.handle,
          r.indices.handle,
          r.tokensPerExpert.handle,
          r.expertsPerToken.handle,
          r.nanRows.handle,
        ];
        for (const [i, v] of Object.entries(over)) a[Number(i)] = v;
        return () => (n.routerExpertChoice as (...x: unknown[]) => void)(...a);
      };
      expect(call({ 2: 9 })).toThrow(/router: 'capacity' = 9 must be in \[0, 8\]/);
      expect(call({ 2: -1 })).toThrow(/'capacity' = -1/);
      expect(call({ 1: 2 })).toThrow(/'scoreFn' must be 0 \(softmax\) or 1 \(sigmoid\)/);
      expect(call({ 3: NaN })).toThrow(/'routeScale' = nan must be finite/);
      expect(call({ 5: r.weights.handle })).toThrow(/'slot' .* has dtype f32/);
      expect(call({ 4: 'scores' })).toThrow(InvalidArgumentError);
      expect(call({ 7: null })).not.toThrow(); // indices are optional natively
      expect(() => (n.routerExpertChoice as (...x: unknown[]) => void)(logits.handle)).toThrow(InvalidArgumentError);
      const back = (over: Record<number, unknown>) => {
        const a: unknown[] = [r.weights.handle, r.scores.handle, r.slot.handle, 0, 1, r.weights.handle, false];
        for (const [i, v] of Object.entries(over)) a[Number(i)] = v;
        return () => (n.routerExpertChoiceBackward as (...x: unknown[]) => void)(...a);
      };
      expect(back({ 2: Tensor.zeros([8, 3], { dtype: 'i32', device: cpu }).handle })).toThrow(/'slot' .* should have shape \[8,4\]/);
      expect(back({ 6: 'yes' })).toThrow(InvalidArgumentError);
    });
  });
});
