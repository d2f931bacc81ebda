// The router's CPU reference against float64 oracles written here, its gradients against central
// finite differences, and its bad calls. Outputs are poisoned before each run.
import { describe, expect, it } from 'vitest';

import {
  balanceLoss,
  InvalidArgumentError,
  Router,
  routerBackward,
  type RouterConfig,
  routerForward,
  Tensor,
  tidy,
  zLoss,
} from '../lib/index.js';
import { freshSeed, poisoned, relErr, values } from './helpers.js';

const cpu = 'cpu' as const;

// ------------------------------------------------------------------------------- float64 oracles
interface Full {
  E: number;
  k: number;
  score: 'softmax' | 'sigmoid';
  groups: number;
  topkGroups: number;
  groupTop: number;
  normalize: boolean;
  routeScale: number;
}
function full(c: RouterConfig): Full {
  const score = c.scoreFunction ?? 'softmax';
  return {
    E: c.numExperts,
    k: c.topK,
    score,
    groups: c.groups ?? 1,
    topkGroups: c.topkGroups ?? c.groups ?? 1,
    groupTop: c.groupTop ?? c.topK / (c.topkGroups ?? c.groups ?? 1),
    normalize: c.normalize ?? score === 'sigmoid',
    routeScale: c.routeScale ?? 1,
  };
}

function scoresOf(row: number[], score: Full['score']): number[] {
  if (score === 'sigmoid') return row.map((x) => 1 / (1 + Math.exp(-x)));
  const m = Math.max(...row);
  const e = row.map((x) => Math.exp(x - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / s);
}

/** Top n of v among `allowed`, by value then lower index. */
function topN(v: number[], n: number, allowed: (i: number) => boolean): number[] {
  const order = v.map((_, i) => i).filter(allowed);
  order.sort((a, b) => (v[b] as number) - (v[a] as number) || a - b);
  return order.slice(0, n);
}

interface Routed {
  indices: number[][];
  weights: number[][];
  scores: number[][];
  groups: number[][]; // groups kept per token
  counts: number[];
}

function oracleRoute(logits: number[][], bias: number[] | undefined, c: Full): Routed {
  const gs = c.E / c.groups;
  const m = c.groupTop;
  const r: Routed = { indices: [], weights: [], scores: [], groups: [], counts: new Array(c.E).fill(0) };
  for (const row of logits) {
    const s = scoresOf(row, c.score);
    const b = s.map((x, e) => x + (bias?.[e] ?? 0));
    const gScore = Array.from({ length: c.groups }, (_, g) =>
      topN(b, m, (e) => Math.floor(e / gs) === g).reduce((a, e) => a + (b[e] as number), 0),
    );
    const kept = c.groups > 1 ? topN(gScore, c.topkGroups, () => true) : [0];
    const idx = topN(b, c.k, (e) => c.groups === 1 || kept.includes(Math.floor(e / gs)));
    const z = idx.reduce((a, e) => a + (s[e] as number), 0) + 1e-20;
    r.indices.push(idx);
    r.weights.push(idx.map((e) => c.routeScale * (c.normalize ? (s[e] as number) / z : (s[e] as number))));
    r.scores.push(s);
    r.groups.push(kept);
    for (const e of idx) r.counts[e]! += 1;
  }
  return r;
}

/** Balance loss (seqLen = T: Switch) from scores and indices, and dL/dscores is not needed here. */
function oracleBalance(scores: number[][], indices: number[][], c: Full, seqLen: number, coef: number): number {
  const T = scores.length;
  const S = T / seqLen;
  let total = 0;
  for (let q = 0; q < S; q++) {
    const f = new Array(c.E).fill(0);
    const P = new Array(c.E).fill(0);
    for (let t = q * seqLen; t < (q + 1) * seqLen; t++) {
      for (const e of indices[t] as number[]) f[e] += 1 / (seqLen * c.k);
      const s = scores[t] as number[];
      const sum = c.score === 'sigmoid' ? s.reduce((a, b) => a + b, 0) : 1;
      s.forEach((x, e) => (P[e] += x / sum / seqLen));
    }
    total += c.E * f.reduce((a, fe, e) => a + fe * (P[e] as number), 0);
  }
  return (coef * total) / S;
}

function oracleZ(logits: number[][], coef: number): number {
  let total = 0;
  for (const row of logits) {
    const m = Math.max(...row);
    const lse = m + Math.log(row.reduce((a, x) => a + Math.exp(x - m), 0));
    total += lse * lse;
  }
  return (coef * total) / logits.length;
}

// ------------------------------------------------------------------------------------ helpers
function rows(flat: ArrayLike<number>, cols: number): number[][] {
  const out: number[][] = [];
  for (let i = 0; i < flat.length; i += cols) out.push(Array.from(flat).slice(i, i + cols) as number[]);
  return out;
}

function randomLogits(T: number, E: number, std = 1.5): Tensor {
  return Tensor.randn([T, E], { seed: freshSeed(), std, device: cpu });
}

function poisonedOutputs(T: number, E: number, k: number) {
  return {
    indices: poisoned([T, k], 'i32', cpu),
    weights: poisoned([T, k], 'f32', cpu),
    tokensPerExpert: poisoned([E], 'i32', cpu),
    scores: poisoned([T, E], 'f32', cpu),
    nanRows: poisoned([2], 'i32', cpu),
  };
}

const configs: [string, RouterConfig, boolean][] = [
  ['softmax top-2 of 16', { numExperts: 16, topK: 2 }, false],
  ['softmax top-4 of 16, normalised, scaled, with bias', { numExperts: 16, topK: 4, normalize: true, routeScale: 2.5 }, true],
  ['sigmoid top-8 of 64, bias, 8 groups keep 4', { numExperts: 64, topK: 8, scoreFunction: 'sigmoid', groups: 8, topkGroups: 4 }, true],
  [
    'sigmoid top-6 of 24, 6 groups keep 3, not normalised',
    { numExperts: 24, topK: 6, scoreFunction: 'sigmoid', groups: 6, topkGroups: 3, normalize: false },
    false,
  ],
  ['softmax, 4 groups keep 2, bias', { numExperts: 32, topK: 4, groups: 4, topkGroups: 2 }, true],
  // DeepSeek-V2's group_limited_greedy: a group scores its maximum, top-6 from 3 of 8 groups (6 is not 3·m for m = 1).
  [
    'softmax top-6 of 40, 8 groups keep 3 by their maximum (groupTop 1), scaled',
    { numExperts: 40, topK: 6, groups: 8, topkGroups: 3, groupTop: 1, routeScale: 16 },
    false,
  ],
  // topK not divisible by topkGroups: allowed once groupTop is given.
  [
    'sigmoid top-5 of 32, 4 groups keep 2 by their top 3, bias',
    { numExperts: 32, topK: 5, scoreFunction: 'sigmoid', groups: 4, topkGroups: 2, groupTop: 3 },
    true,
  ],
  ['E = 1, k = 1', { numExperts: 1, topK: 1 }, false],
  ['k = E (softmax, normalised)', { numExperts: 12, topK: 12, normalize: true }, true],
  ['k = E (sigmoid, 3 groups keep 3)', { numExperts: 12, topK: 12, scoreFunction: 'sigmoid', groups: 3, topkGroups: 3 }, true],
];

// ---------------------------------------------------------------------------------- forward
describe('router forward (CPU reference) against the float64 oracle', () => {
  it.each(configs)('%s', (_name, config, withBias) => {
    const c = full(config);
    const T = 37;
    tidy(() => {
      const logits = randomLogits(T, c.E);
      const bias = withBias ? Tensor.randn([c.E], { seed: freshSeed(), std: 0.2, device: cpu }) : undefined;
      const out = poisonedOutputs(T, c.E, c.k);
      routerForward(logits, config, { ...(bias && { bias }), out });
      const ref = oracleRoute(rows(values(logits), c.E), bias && values(bias), c);
      expect(rows(out.indices.toNumbers(), c.k)).toEqual(ref.indices);
      expect(relErr(values(out.weights), ref.weights.flat())).toBeLessThan(1e-6);
      expect(relErr(values(out.scores), ref.scores.flat())).toBeLessThan(1e-6);
      expect(out.tokensPerExpert.toNumbers()).toEqual(ref.counts);
      expect(out.nanRows.toNumbers()).toEqual([0, T]);
      // invariants
      expect(ref.counts.reduce((a, b) => a + b, 0)).toBe(T * c.k);
      if (c.normalize) {
        for (const w of rows(values(out.weights), c.k)) expect(w.reduce((a, b) => a + b, 0)).toBeCloseTo(c.routeScale, 5);
      }
    });
  });

  it('the bias changes which experts are chosen but never the weights', () => {
    const config: RouterConfig = { numExperts: 32, topK: 4, scoreFunction: 'sigmoid', normalize: false };
    tidy(() => {
      const logits = randomLogits(64, 32);
      // a strong bias towards experts 24..31, against 0..7
      const bias = Tensor.fromArray(
        Array.from({ length: 32 }, (_, e) => (e >= 24 ? 0.5 : e < 8 ? -0.5 : 0)),
        { device: cpu },
      );
      const plain = routerForward(logits, config);
      const biased = routerForward(logits, config, { bias });
      const s = rows(values(plain.scores), 32);
      const pi = rows(plain.indices.toNumbers(), 4);
      const bi = rows(biased.indices.toNumbers(), 4);
      const bw = rows(values(biased.weights), 4);
      expect(values(biased.scores)).toEqual(values(plain.scores)); // scores are unbiased
      let changed = 0;
      for (let t = 0; t < 64; t++) {
        if (JSON.stringify(pi[t]) !== JSON.stringify(bi[t])) changed++;
        (bi[t] as number[]).forEach((e, j) => expect(bw[t]?.[j]).toBe(s[t]?.[e])); // weight = unbiased score
      }
      expect(changed).toBeGreaterThan(16);
      // the bias pulls assignments towards 24..31 and away from 0..7
      const counts = biased.tokensPerExpert.toNumbers();
      const sumOf = (a: number[]) => a.reduce((x, y) => x + y, 0);
      expect(sumOf(counts.slice(24))).toBeGreaterThan(sumOf(plain.tokensPerExpert.toNumbers().slice(24)));
      expect(sumOf(counts.slice(0, 8))).toBeLessThan(sumOf(plain.tokensPerExpert.toNumbers().slice(0, 8)));
    });
  });

  it('group-limited routing never leaves the groups it chose', () => {
    const config: RouterConfig = { numExperts: 64, topK: 8, scoreFunction: 'sigmoid', groups: 8, topkGroups: 2 };
    const c = full(config);
    tidy(() => {
      const logits = randomLogits(200, 64);
      const bias = Tensor.randn([64], { seed: freshSeed(), std: 0.3, device: cpu });
      const out = routerForward(logits, config, { bias });
      const ref = oracleRoute(rows(values(logits), 64), values(bias), c);
      const idx = rows(out.indices.toNumbers(), 8);
      let differsFromPlain = 0;
      const plainRef = oracleRoute(rows(values(logits), 64), values(bias), { ...c, groups: 1, topkGroups: 1 });
      idx.forEach((r, t) => {
        const groups = new Set(r.map((e) => Math.floor(e / 8)));
        expect(groups.size).toBeLessThanOrEqual(2);
        for (const g of groups) expect(ref.groups[t]).toContain(g);
        if (JSON.stringify(r) !== JSON.stringify(plainRef.indices[t])) differsFromPlain++;
      });
      expect(differsFromPlain).toBeGreaterThan(0); // the restriction actually bites
    });
  });

  it('ties go to the lower expert index (and the lower group)', () => {
    tidy(() => {
      const logits = Tensor.zeros([3, 8], { device: cpu });
      const a = routerForward(logits, { numExperts: 8, topK: 3 });
      expect(a.indices.toNumbers()).toEqual([0, 1, 2, 0, 1, 2, 0, 1, 2]);
      const b = routerForward(logits, { numExperts: 8, topK: 2, groups: 4, topkGroups: 1, scoreFunction: 'sigmoid' });
      expect(b.indices.toNumbers()).toEqual([0, 1, 0, 1, 0, 1]);
      const w = values(b.weights);
      expect(w.every((x) => Math.abs(x - 0.5) < 1e-7)).toBe(true);
      // a tie with a later expert that has a bias edge goes to that expert
      const bias = Tensor.fromArray([0, 0, 0, 0, 0, 0, 0, 1e-3], { device: cpu });
      const c = routerForward(logits, { numExperts: 8, topK: 2 }, { bias });
      expect(c.indices.toNumbers()).toEqual([7, 0, 7, 0, 7, 0]);
    });
  });

  it('NaN or infinite logits: counted, written deterministically, and an error naming the first bad row', () => {
    tidy(() => {
      const data = Array.from({ length: 5 * 6 }, (_, i) => Math.sin(i));
      data[2 * 6 + 3] = NaN;
      data[4 * 6 + 0] = Infinity;
      const logits = Tensor.fromArray(data, { shape: [5, 6], device: cpu });
      expect(() => routerForward(logits, { numExperts: 6, topK: 2 })).toThrow(InvalidArgumentError);
      expect(() => routerForward(logits, { numExperts: 6, topK: 2 })).toThrow(
        /router: 'logits' row 2 has a NaN or infinite value.*2 bad row/,
      );
      const out = routerForward(logits, { numExperts: 6, topK: 2, scoreFunction: 'sigmoid' }, { checkNaN: false });
      expect(out.nanRows.toNumbers()).toEqual([2, 2]);
      const idx = rows(out.indices.toNumbers(), 2);
      expect(idx[2]).toEqual([0, 1]);
      expect(idx[4]).toEqual([0, 1]);
      const w = rows(values(out.weights), 2);
      expect(w[2]?.every(Number.isNaN)).toBe(true);
      expect(w[1]?.some(Number.isNaN)).toBe(false);
      expect(out.tokensPerExpert.toNumbers().reduce((a, b) => a + b, 0)).toBe(10);
      expect(rows(values(out.scores), 6)[4]?.every(Number.isNaN)).toBe(true);
      // a NaN in the bias makes every row bad
      const bias = Tensor.fromArray([0, 0, NaN, 0, 0, 0], { device: cpu });
      const clean = Tensor.fromArray(
        data.map((x) => (Number.isFinite(x) ? x : 0)),
        { shape: [5, 6], device: cpu },
      );
      expect(() => routerForward(clean, { numExperts: 6, topK: 2 }, { bias })).toThrow(/row 0 .*5 bad row/);
    });
  });
});

// --------------------------------------------------------------------------------- gradients
/** Logits whose entries are well separated (spacing ≥ 0.4), so ±h never changes the selection. */
function separatedLogits(T: number, E: number): number[] {
  const out: number[] = [];
  let seed = freshSeed();
  const rand = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  for (let t = 0; t < T; t++) {
    const row = Array.from({ length: E }, (_, i) => -1.6 + (3.2 * i) / Math.max(1, E - 1) + 0.05 * rand());
    for (let i = E - 1; i > 0; i--) {
      const j = Math.floor(rand() * (i + 1));
      [row[i], row[j]] = [row[j] as number, row[i] as number];
    }
    out.push(...row);
  }
  return out;
}

/** Central differences of f at x (float32 tensors, step h), against `analytic`; relative norm 1e-2. */
function checkGradient(x: number[], shape: number[], f: (logits: Tensor) => number, analytic: number[], h = 1e-2): void {
  const fd: number[] = [];
  for (let i = 0; i < x.length; i++) {
    const plus = x.slice();
    const minus = x.slice();
    plus[i] = (plus[i] as number) + h;
    minus[i] = (minus[i] as number) - h;
    const fp = tidy(() => f(Tensor.fromArray(plus, { shape, device: cpu })));
    const fm = tidy(() => f(Tensor.fromArray(minus, { shape, device: cpu })));
    fd.push((fp - fm) / (2 * h));
  }
  expect(Math.max(...analytic.map(Math.abs))).toBeGreaterThan(1e-3); // never a trivially zero gradient
  expect(relErr(analytic, fd)).toBeLessThan(1e-2);
}

const gradConfigs: [string, RouterConfig][] = [
  ['softmax', { numExperts: 8, topK: 3 }],
  ['softmax, normalised, scale 1.7', { numExperts: 8, topK: 3, normalize: true, routeScale: 1.7 }],
  ['sigmoid, normalised', { numExperts: 8, topK: 2, scoreFunction: 'sigmoid' }],
  [
    'sigmoid, not normalised, scale 2.5, 4 groups keep 2',
    { numExperts: 8, topK: 4, scoreFunction: 'sigmoid', normalize: false, routeScale: 2.5, groups: 4, topkGroups: 2 },
  ],
  ['softmax, k = E, normalised', { numExperts: 4, topK: 4, normalize: true }],
];

describe('router backward against central finite differences', () => {
  it.each(gradConfigs)('%s', (_name, config) => {
    const c = full(config);
    const T = 3;
    // Finite differences only mean something where the selection is locally constant: separated
    // logits make expert ranks stable, but group sums (group-limited routing) can still nearly tie,
    // so draw until no ±h step of any logit moves the selection.
    const selectionAt = (v: number[]): number[] =>
      tidy(() => routerForward(Tensor.fromArray(v, { shape: [T, c.E], device: cpu }), config).indices.toNumbers());
    let x = separatedLogits(T, c.E);
    for (let attempt = 0; attempt < 50; attempt++) {
      const base = JSON.stringify(selectionAt(x));
      const stable = x.every((_, i) =>
        [-1e-2, 1e-2].every((h) => JSON.stringify(selectionAt(x.map((v, j) => (j === i ? v + h : v)))) === base),
      );
      if (stable) break;
      x = separatedLogits(T, c.E);
    }
    const dw = Array.from({ length: T * c.k }, (_, i) => Math.cos(1.3 * i + 0.4));
    tidy(() => {
      const logits = Tensor.fromArray(x, { shape: [T, c.E], device: cpu });
      const fwd = routerForward(logits, config);
      const indices0 = fwd.indices.toNumbers();
      const dW = Tensor.fromArray(dw, { shape: [T, c.k], device: cpu });
      const dLogits = poisoned([T, c.E], 'f32', cpu);
      routerBackward(dW, fwd, config, { out: dLogits });
      const analytic = values(dLogits);
      checkGradient(
        x,
        [T, c.E],
        (l) => {
          const r = routerForward(l, config);
          expect(r.indices.toNumbers()).toEqual(indices0); // the selection did not move
          return values(r.weights).reduce((a, w, i) => a + w * (dw[i] as number), 0);
        },
        analytic,
      );
      // accumulate adds onto what is there
      routerBackward(dW, fwd, config, { out: dLogits, accumulate: true });
      expect(
        relErr(
          values(dLogits),
          analytic.map((g) => 2 * g),
        ),
      ).toBeLessThan(1e-6);
    });
  });
});

describe('auxiliary losses', () => {
  it.each([
    ['softmax, Switch (batch-wise)', { numExperts: 16, topK: 2 }, undefined],
    ['sigmoid, Switch (batch-wise)', { numExperts: 16, topK: 4, scoreFunction: 'sigmoid' }, undefined],
    ['softmax, sequence-wise (4 sequences)', { numExperts: 16, topK: 2 }, 10],
    ['sigmoid, sequence-wise (5 sequences), groups', { numExperts: 16, topK: 4, scoreFunction: 'sigmoid', groups: 4, topkGroups: 2 }, 8],
  ] as [string, RouterConfig, number | undefined][])('balance loss %s equals the float64 oracle', (_name, config, seqLen) => {
    const c = full(config);
    const T = seqLen ? 40 : 33;
    tidy(() => {
      const logits = randomLogits(T, c.E);
      const r = routerForward(logits, config);
      const out = poisoned([1], 'f32', cpu);
      balanceLoss(r.scores, r.indices, config, { coefficient: 0.01, ...(seqLen === undefined ? {} : { seqLen }), out });
      const ref = oracleBalance(rows(values(r.scores), c.E), rows(r.indices.toNumbers(), c.k), c, seqLen ?? T, 0.01);
      expect(Math.abs(out.item() - ref) / ref).toBeLessThan(1e-6);
    });
  });

  it('balance loss of a perfectly uniform softmax router is the coefficient', () => {
    tidy(() => {
      // token t routes to expert t mod 4 with equal logits: P_e = 1/4, f_e = 1/4 → loss = coef·E·Σ 1/16 = coef
      const logits = Tensor.zeros([8, 4], { device: cpu });
      const indices = Tensor.fromArray([0, 1, 2, 3, 0, 1, 2, 3], { shape: [8, 1], dtype: 'i32', device: cpu });
      const r = routerForward(logits, { numExperts: 4, topK: 1 });
      expect(balanceLoss(r.scores, indices, { numExperts: 4, topK: 1 }, { coefficient: 0.3 }).item()).toBeCloseTo(0.3, 6);
    });
  });

  it('z-loss equals the float64 oracle', () => {
    tidy(() => {
      const logits = randomLogits(29, 24, 3);
      const out = poisoned([1], 'f32', cpu);
      zLoss(logits, { coefficient: 1e-3, out });
      const ref = oracleZ(rows(values(logits), 24), 1e-3);
      expect(Math.abs(out.item() - ref) / ref).toBeLessThan(1e-6);
    });
  });

  // Softmax scores sum to 1, so the batch-wise gradient vanishes when every expert has the same
  // load: 4 tokens × top-2 over 8 experts hit that for 1 draw in 300 (and failed the nonzero check).
  // 5 tokens make 10 picks, which 8 experts cannot share evenly: over 3000 draws the largest
  // gradient entry was never below 1.6e-2. The sigmoid case (no sum to 1) keeps 4 tokens (≥ 1.2e-2).
  it.each([
    ['softmax batch-wise', { numExperts: 8, topK: 2 }, 5, 5],
    ['sigmoid sequence-wise', { numExperts: 8, topK: 2, scoreFunction: 'sigmoid' }, 2, 4],
  ] as [string, RouterConfig, number, number][])('balance-loss gradient (%s) against finite differences', (_name, config, seqLen, T) => {
    const c = full(config);
    const x = separatedLogits(T, c.E);
    tidy(() => {
      const logits = Tensor.fromArray(x, { shape: [T, c.E], device: cpu });
      const r = routerForward(logits, config);
      const dLogits = Tensor.zeros([T, c.E], { device: cpu });
      balanceLoss(r.scores, r.indices, config, { coefficient: 0.7, seqLen, dLogits });
      checkGradient(
        x,
        [T, c.E],
        (l) => {
          const s = routerForward(l, config).scores;
          return balanceLoss(s, r.indices, config, { coefficient: 0.7, seqLen }).item(); // f fixed: no gradient through it
        },
        values(dLogits),
      );
    });
  });

  it('z-loss gradient against finite differences, and losses compose by adding into dLogits', () => {
    const T = 4;
    const E = 6;
    const x = separatedLogits(T, E);
    tidy(() => {
      const logits = Tensor.fromArray(x, { shape: [T, E], device: cpu });
      const dz = Tensor.zeros([T, E], { device: cpu });
      zLoss(logits, { coefficient: 0.5, dLogits: dz });
      checkGradient(x, [T, E], (l) => zLoss(l, { coefficient: 0.5 }).item(), values(dz));
      // routing backward, then both losses, into one tensor: the sum of the separate gradients
      const config: RouterConfig = { numExperts: E, topK: 2, normalize: true };
      const r = routerForward(logits, config);
      const dW = Tensor.fromArray(
        Array.from({ length: T * 2 }, (_, i) => i - 3.5),
        { shape: [T, 2], device: cpu },
      );
      const route = routerBackward(dW, r, config);
      const bal = Tensor.zeros([T, E], { device: cpu });
      balanceLoss(r.scores, r.indices, config, { coefficient: 0.1, dLogits: bal });
      const all = routerBackward(dW, r, config);
      balanceLoss(r.scores, r.indices, config, { coefficient: 0.1, dLogits: all });
      zLoss(logits, { coefficient: 0.5, dLogits: all });
      const sum = values(route).map((g, i) => g + (values(bal)[i] as number) + (values(dz)[i] as number));
      expect(relErr(values(all), sum)).toBeLessThan(1e-6);
    });
  });
});

// --------------------------------------------------------------------------------- bad calls
describe('groupTop', () => {
  it('defaults to topK/topkGroups with groups, and resolves to 1 (unread) with one group', () => {
    expect(new Router({ numExperts: 16, topK: 6, groups: 4, topkGroups: 3 }).config.groupTop).toBe(2);
    expect(new Router({ numExperts: 16, topK: 5, groups: 4, topkGroups: 3, groupTop: 1 }).config.groupTop).toBe(1);
    expect(new Router({ numExperts: 16, topK: 6 }).config.groupTop).toBe(1);
    expect(new Router({ numExperts: 16, topK: 6, groupTop: 3 }).config.groupTop).toBe(1);
    // null (a JSON config leaving it out) is left out, with groups or without.
    expect(new Router({ numExperts: 16, topK: 6, groups: 4, topkGroups: 3, groupTop: null as never }).config.groupTop).toBe(2);
    expect(new Router({ numExperts: 16, topK: 6, groupTop: null as never }).config.groupTop).toBe(1);
    expect(() => new Router({ numExperts: 16, topK: 5, groups: 4, topkGroups: 3, groupTop: null as never })).toThrow(
      /'topK' = 5 is not divisible by 'topkGroups' = 3/,
    );
  });
});

describe('router bad calls', () => {
  const l = () => Tensor.zeros([4, 8], { device: cpu });
  const cases: [string, () => unknown, RegExp][] = [
    ['k > E', () => routerForward(l(), { numExperts: 8, topK: 9 }), /router: 'topK' = 9 is more than 'numExperts' = 8/],
    ['k = 0', () => routerForward(l(), { numExperts: 8, topK: 0 }), /router: 'topK' must be a positive integer; received 0/],
    ['k negative', () => new Router({ numExperts: 8, topK: -2 }), /router: 'topK' must be a positive integer/],
    [
      'groups not dividing E',
      () => routerForward(l(), { numExperts: 8, topK: 2, groups: 3 }),
      /router: 'groups' = 3 does not divide 'numExperts' = 8/,
    ],
    [
      'topkGroups > groups',
      () => routerForward(l(), { numExperts: 8, topK: 2, groups: 2, topkGroups: 4 }),
      /router: 'topkGroups' = 4 is more than 'groups' = 2/,
    ],
    [
      'k not divisible by topkGroups',
      () => routerForward(l(), { numExperts: 8, topK: 3, groups: 4, topkGroups: 2 }),
      /router: 'topK' = 3 is not divisible by 'topkGroups' = 2/,
    ],
    [
      'k/topkGroups > group size',
      () => routerForward(l(), { numExperts: 8, topK: 4, groups: 4, topkGroups: 1 }),
      /router: 'groupTop' = 4 \(topK\/topkGroups, its default\) is more than a group's 2 experts/,
    ],
    [
      'groupTop > group size',
      () => routerForward(l(), { numExperts: 8, topK: 2, groups: 4, topkGroups: 2, groupTop: 3 }),
      /router: 'groupTop' = 3 is more than a group's 2 experts/,
    ],
    [
      'k more than the kept groups hold',
      () => routerForward(l(), { numExperts: 8, topK: 3, groups: 4, topkGroups: 1, groupTop: 1 }),
      /router: 'topK' = 3 is more than the 2 experts of the 1 groups a token keeps/,
    ],
    [
      'groupTop 0',
      () => routerForward(l(), { numExperts: 8, topK: 2, groups: 4, topkGroups: 2, groupTop: 0 }),
      /router: 'groupTop' must be a positive integer; received 0/,
    ],
    [
      'groupTop 0 with one group (not read, still checked)',
      () => routerForward(l(), { numExperts: 8, topK: 2, groupTop: 0 }),
      /router: 'groupTop' must be a positive integer; received 0/,
    ],
    [
      'groupTop fractional',
      () => routerForward(l(), { numExperts: 8, topK: 2, groups: 4, topkGroups: 2, groupTop: 1.5 }),
      /router: 'groupTop' must be a positive integer; received 1.5/,
    ],
    [
      'unknown score function',
      () => routerForward(l(), { numExperts: 8, topK: 2, scoreFunction: 'relu' as never }),
      /router: 'scoreFunction' must be 'softmax' or 'sigmoid'/,
    ],
    [
      'logits of the wrong width',
      () => routerForward(l(), { numExperts: 16, topK: 2 }),
      /router: 'logits' has shape \[4,8\] but the config has numExperts = 16/,
    ],
    [
      'bias of the wrong length',
      () => routerForward(l(), { numExperts: 8, topK: 2 }, { bias: Tensor.zeros([7], { device: cpu }) }),
      /router: 'bias' has shape \[7\]; expected \[8\]/,
    ],
    [
      'bf16 logits',
      () => routerForward(Tensor.zeros([4, 8], { dtype: 'bf16', device: cpu }), { numExperts: 8, topK: 2 }),
      /router: 'logits' bf16\[4,8\] cpu has dtype bf16; expected one of f32/,
    ],
    [
      'bias i32',
      () => routerForward(l(), { numExperts: 8, topK: 2 }, { bias: Tensor.zeros([8], { dtype: 'i32', device: cpu }) }),
      /router: 'bias' .* has dtype i32/,
    ],
    [
      'out.indices of the wrong shape',
      () => routerForward(l(), { numExperts: 8, topK: 2 }, { out: { indices: Tensor.zeros([4, 3], { dtype: 'i32', device: cpu }) } }),
      /router: 'indices' i32\[4,3\] cpu should have shape \[4,2\]/,
    ],
    [
      'out.weights as i32',
      () => routerForward(l(), { numExperts: 8, topK: 2 }, { out: { weights: Tensor.zeros([4, 2], { dtype: 'i32', device: cpu }) } }),
      /router: 'weights' .* has dtype i32/,
    ],
    [
      'indices out of range in the backward',
      () => {
        const idx = Tensor.fromArray([0, 1, 2, 8, 0, 1, 0, 1], { shape: [4, 2], dtype: 'i32', device: cpu });
        return routerBackward(Tensor.zeros([4, 2], { device: cpu }), { scores: l(), indices: idx }, { numExperts: 8, topK: 2 });
      },
      /routerBackward: 'indices' holds 8 at token 1, slot 1; experts are 0..7/,
    ],
    [
      'negative index in the balance loss',
      () => {
        const idx = Tensor.fromArray([0, 1, 2, -1, 0, 1, 0, 1], { shape: [4, 2], dtype: 'i32', device: cpu });
        return balanceLoss(l(), idx, { numExperts: 8, topK: 2 }, { coefficient: 1 });
      },
      /balanceLoss: 'indices' holds -1 at token 1, slot 1/,
    ],
    [
      'dWeights of the wrong shape',
      () =>
        routerBackward(
          Tensor.zeros([4, 3], { device: cpu }),
          { scores: l(), indices: Tensor.zeros([4, 2], { dtype: 'i32', device: cpu }) },
          { numExperts: 8, topK: 2 },
        ),
      /routerBackward: 'dWeights' f32\[4,3\] cpu should have shape \[4,2\]/,
    ],
    [
      'seqLen not dividing T',
      () =>
        balanceLoss(l(), Tensor.zeros([4, 2], { dtype: 'i32', device: cpu }), { numExperts: 8, topK: 2 }, { coefficient: 1, seqLen: 3 }),
      /balanceLoss: 'seqLen' = 3 must be a positive integer dividing the 4 tokens/,
    ],
    ['missing coefficient', () => zLoss(l(), {} as never), /zLoss: 'coefficient' must be a finite number/],
    [
      'z-loss of i32 logits',
      () => zLoss(Tensor.zeros([2, 2], { dtype: 'i32', device: cpu }), { coefficient: 1 }),
      /zLoss: 'logits' .* has dtype i32/,
    ],
  ];
  it.each(cases)('%s', (_name, call, message) => {
    tidy(() => {
      let caught: unknown;
      try {
        call();
      } catch (e) {
        caught = e;
      }
      expect(caught).toBeInstanceOf(InvalidArgumentError);
      expect((caught as Error).message).toMatch(message);
    });
  });

  it('the native checks hold without the TypeScript layer', async () => {
    const { native } = await import('../lib/native.js');
    tidy(() => {
      const logits = l();
      const o = poisonedOutputs(4, 8, 2);
      const call = (k: number, groups: number, topkGroups: number, groupTop = 0) =>
        native().routerForward(
          logits.handle,
          null,
          0,
          k,
          groups,
          topkGroups,
          false,
          1,
          o.indices.handle,
          o.weights.handle,
          o.tokensPerExpert.handle,
          o.scores.handle,
          o.nanRows.handle,
          groupTop,
        );
      expect(() => call(9, 1, 1)).toThrow(/router: 'k' = 9 must be in \[1, 8\]/);
      expect(() => call(2, 3, 1)).toThrow(/router: 'groups' = 3 does not divide the 8 experts/);
      expect(() => call(2, 2, 3)).toThrow(/router: 'topkGroups' = 3 must be in \[1, 2\]/);
      expect(() => call(2, 64, 1)).toThrow(/router: 'groups' = 64 must be in \[1, 32\]/);
      expect(() => call(3, 4, 2)).toThrow(/router: 'k' = 3 is not divisible by 'topkGroups' = 2 \(with 'groupTop' 0/);
      expect(() => call(2, 4, 2, -1)).toThrow(/router: 'groupTop' = -1 must be 0 \(k\/topkGroups\) or positive/);
      expect(() => call(2, 4, 2, 3)).toThrow(
        /router: a group's score sums its top 3 biased scores \('groupTop'\) but a group has only 2 experts/,
      );
      expect(() => call(3, 4, 1, 1)).toThrow(/router: 'k' = 3 is more than the 2 experts of the 'topkGroups' = 1 groups a token keeps/);
      expect(() =>
        native().routerForward(
          logits.handle,
          null,
          5,
          2,
          1,
          1,
          false,
          1,
          o.indices.handle,
          o.weights.handle,
          o.tokensPerExpert.handle,
          o.scores.handle,
          o.nanRows.handle,
          0,
        ),
      ).toThrow(/router: 'scoreFn' must be 0 \(softmax\) or 1 \(sigmoid\)/);
      expect(() => call(2, 1, 1)).not.toThrow();
    });
  });
});
