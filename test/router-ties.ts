// Group-score near ties in group-limited routing, for tests that compare two implementations of the
// router (the CUDA kernels against the CPU reference).
//
// A token keeps its best `topkGroups` groups by group score (the sum of a group's top
// m = groupTop biased scores, by default k/topkGroups). The CPU reference computes those sums in double; the CUDA kernels
// in f32: sigmoid 1/(1 + expf(-x)) (expf within 2 ulp, IEEE division), the bias added in f32, the top
// two summed in f32. For the test's sigmoid scores that is at most ~3.6e-7 per score, 6e-8 per bias
// addition and 1.2e-7 for the sum: ~1e-6 per group score (an f32 emulation over 13 million tokens
// saw groups reorder at gaps up to 2e-7; benchmarks/router-group-ties.mjs). Where the last kept and
// the first dropped group lie closer than that, the devices may legitimately keep different groups,
// and the token's experts then differ by whole groups, with expert-score gaps of any size: no
// per-expert tolerance can tell that from a bug. (Near ties between a group's 2nd and 3rd best
// experts do not matter here: the sum is the same whichever is 2nd.) `separateGroupTies` removes such
// tokens from an input by construction: it redraws their logits until the gap at the kept/dropped
// boundary is at least GROUP_TIE_GAP.
import type { RouterConfig } from '../lib/index.js';
import { rng } from './helpers.js';

/** Gap below which a kept/dropped group boundary counts as a near tie: 10× the f32-vs-double bound above. */
export const GROUP_TIE_GAP = 1e-5;

export interface GroupRouting {
  E: number;
  k: number;
  score: 'softmax' | 'sigmoid';
  groups: number;
  topkGroups: number;
  groupTop: number;
}

/** The fields of a RouterConfig that group selection depends on, defaults filled in as router.ts does. */
export function groupRouting(c: RouterConfig): GroupRouting {
  return {
    E: c.numExperts,
    k: c.topK,
    score: c.scoreFunction ?? 'softmax',
    groups: c.groups ?? 1,
    topkGroups: c.topkGroups ?? c.groups ?? 1,
    groupTop: c.groupTop ?? c.topK / (c.topkGroups ?? c.groups ?? 1),
  };
}

/** Whether group selection can change anything (some group is dropped). */
export function hasGroupBoundary(r: GroupRouting): boolean {
  return r.groups > 1 && r.topkGroups < r.groups;
}

/** One row's scores in float64 from f32 logits, as native/ops/moe/router/cpu.cc computes them. */
export function scoresF64(row: ArrayLike<number>, score: GroupRouting['score']): Float64Array {
  const n = row.length;
  const s = new Float64Array(n);
  if (score === 'sigmoid') {
    for (let e = 0; e < n; e++) s[e] = 1 / (1 + Math.exp(-(row[e] as number)));
    return s;
  }
  let mx = -Infinity;
  for (let e = 0; e < n; e++) mx = Math.max(mx, row[e] as number);
  let sum = 0;
  for (let e = 0; e < n; e++) sum += s[e] = Math.exp((row[e] as number) - mx);
  for (let e = 0; e < n; e++) s[e] = (s[e] as number) / sum;
  return s;
}

export interface GroupBoundary {
  /** Group scores (float64): the sum of each group's top m biased scores. */
  scores: number[];
  /** The kept groups, best first (ties to the lower group, as on every device). */
  kept: number[];
  /** The last kept group and the first dropped one (-1 when no group is dropped). */
  lastKept: number;
  firstDropped: number;
  /** scores[lastKept] − scores[firstDropped] (≥ 0); Infinity when no group is dropped. */
  gap: number;
}

/** The group selection of one token from its biased scores (float64, length E). */
export function groupBoundary(biased: ArrayLike<number>, r: GroupRouting): GroupBoundary {
  const { E, groups: G, topkGroups: KG } = r;
  const gs = E / G;
  const m = r.groupTop;
  const scores: number[] = [];
  for (let g = 0; g < G; g++) {
    const top: number[] = [];
    for (let e = g * gs; e < (g + 1) * gs; e++) {
      const v = biased[e] as number;
      if (!Number.isFinite(v)) throw new Error(`groupBoundary: biased score ${v} at expert ${e} (finite inputs only)`);
      top.push(v);
    }
    top.sort((a, b) => b - a);
    let sum = 0;
    for (let j = 0; j < m; j++) sum += top[j] as number; // descending, as cpu.cc adds them
    scores.push(sum);
  }
  const order = scores.map((_, g) => g).sort((a, b) => (scores[b] as number) - (scores[a] as number) || a - b);
  const kept = order.slice(0, KG);
  if (!hasGroupBoundary(r)) return { scores, kept, lastKept: -1, firstDropped: -1, gap: Infinity };
  const lastKept = order[KG - 1] as number;
  const firstDropped = order[KG] as number;
  return { scores, kept, lastKept, firstDropped, gap: (scores[lastKept] as number) - (scores[firstDropped] as number) };
}

/** Whether a boundary is a near tie: gap below GROUP_TIE_GAP (relative above scores of 1). */
export function isGroupNearTie(b: GroupBoundary, minGap = GROUP_TIE_GAP): boolean {
  if (b.lastKept < 0) return false;
  return b.gap < minGap * Math.max(1, Math.abs(b.scores[b.lastKept] as number));
}

/** Biased scores (float64) of token t of `logits` [T,E] (f32 values), bias optional. */
export function biasedRow(logits: ArrayLike<number>, t: number, bias: ArrayLike<number> | undefined, r: GroupRouting): Float64Array {
  const row = new Float64Array(r.E);
  for (let e = 0; e < r.E; e++) row[e] = logits[t * r.E + e] as number;
  const s = scoresF64(row, r.score);
  if (bias) for (let e = 0; e < r.E; e++) s[e] = (s[e] as number) + (bias[e] as number);
  return s;
}

export interface SeparateResult {
  /** Tokens whose logits were redrawn. */
  repaired: number[];
  /** Redraws in all (a token may need more than one). */
  redraws: number;
}

/**
 * Makes every token's kept/dropped group boundary clear by construction: where the float64 gap is a
 * near tie (isGroupNearTie), the token's logits are redrawn from N(0, std²) (a mulberry32 stream from
 * `seed`, rounded to f32) until it is not. Changes `logits` ([T,E] f32, row-major) in place; other
 * rows are left bit for bit. Deterministic for a given seed and input. No-op without a boundary.
 */
export function separateGroupTies(
  logits: Float32Array,
  bias: ArrayLike<number> | undefined,
  config: RouterConfig,
  opts: { seed: number; std: number; minGap?: number; maxRedraws?: number },
): SeparateResult {
  const r = groupRouting(config);
  const out: SeparateResult = { repaired: [], redraws: 0 };
  if (!hasGroupBoundary(r)) return out;
  const T = logits.length / r.E;
  const rand = rng(opts.seed);
  const normal = () => {
    const u = 1 - rand(); // (0, 1]
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rand());
  };
  for (let t = 0; t < T; t++) {
    let tries = 0;
    while (isGroupNearTie(groupBoundary(biasedRow(logits, t, bias, r), r), opts.minGap)) {
      if (tries === 0) out.repaired.push(t);
      if (++tries > (opts.maxRedraws ?? 100))
        throw new Error(`separateGroupTies: token ${t} still has a group near tie after ${tries - 1} redraws`);
      for (let e = 0; e < r.E; e++) logits[t * r.E + e] = Math.fround(opts.std * normal());
      out.redraws++;
    }
  }
  return out;
}
