#!/usr/bin/env node
// How often group-limited routing meets a group-score near tie on the inputs the GPU router test
// draws (test/gpu/10-router.gpu.test.ts: logits N(0, 1.5²), bias N(0, 0.05²)), measured on the CPU.
// For every token: the float64 group scores as native/ops/moe/router/cpu.cc computes them (checked
// against the CPU router's own choice), the gap between the last kept and the first dropped group,
// and an f32 emulation of the CUDA kernels' arithmetic (scores with expf, f32 softmax sums, bias
// added in f32, the group's top-m summed in f32; Math.exp rounded to f32 stands in for CUDA's expf,
// which is within 2 ulp, so this estimates how often the devices disagree, it does not replay them).
// A token "fails" when the f32 emulation keeps other groups than float64 and thereby picks an expert
// more than 1e-5 away from the CPU's: what the GPU test (before separateGroupTies) reported as a
// failure.
//
//   MOE_EP_ADDON=build/Release/moe_ep.node node benchmarks/router-group-ties.mjs [CASE] [RUNS] [SEED0]
// CASE: an index into `cases` below (default 0: the shape that failed on the H200); RUNS: inputs drawn
// (default 20), each T tokens from seeds SEED0 + 2i (logits) and SEED0 + 2i + 1 (bias).
import { routerForward, Tensor, tidy } from '../dist/lib/index.js';

const cases = [
  [16384, { numExperts: 256, topK: 8, scoreFunction: 'sigmoid', groups: 8, topkGroups: 4 }],
  [3001, { numExperts: 256, topK: 4, scoreFunction: 'sigmoid', groups: 8, topkGroups: 4 }],
  [8192, { numExperts: 512, topK: 8, scoreFunction: 'sigmoid', groups: 16, topkGroups: 4 }],
  [5003, { numExperts: 128, topK: 6, groups: 4, topkGroups: 3 }],
  [777, { numExperts: 64, topK: 4, scoreFunction: 'sigmoid', groups: 32, topkGroups: 2 }],
  [1001, { numExperts: 96, topK: 6, scoreFunction: 'sigmoid', groups: 32, topkGroups: 3 }],
  [4099, { numExperts: 160, topK: 4, scoreFunction: 'sigmoid', groups: 5, topkGroups: 2 }],
  [77, { numExperts: 1024, topK: 16, scoreFunction: 'sigmoid', groups: 16, topkGroups: 8 }],
];
const [T, config] = cases[Number(process.argv[2] ?? 0)];
const runs = Number(process.argv[3] ?? 20);
const seed0 = Number(process.argv[4] ?? 1000);
const E = config.numExperts,
  k = config.topK,
  G = config.groups,
  KG = config.topkGroups,
  gs = E / G,
  m = config.groupTop ?? k / KG;
const sigmoid = config.scoreFunction === 'sigmoid';
const f = Math.fround;
const thresholds = [1e-5, 1e-6, 1e-7];

function groupScores(v, round) {
  const out = [];
  for (let g = 0; g < G; g++) {
    const top = Array.from(v.subarray(g * gs, (g + 1) * gs)).sort((a, b) => b - a);
    let sum = 0;
    for (let j = 0; j < m; j++) sum = round(sum + top[j]);
    out.push(sum);
  }
  return out;
}
const rank = (sc) => sc.map((_, g) => g).sort((a, b) => sc[b] - sc[a] || a - b);
function topk(v, kept) {
  const cand = [];
  for (let e = 0; e < E; e++) if (kept.has(Math.floor(e / gs))) cand.push(e);
  cand.sort((a, b) => v[b] - v[a] || a - b);
  return cand.slice(0, k);
}

const stats = { tokens: 0, oracleMismatch: 0, keptDiffer: 0, failing: 0, runsFailing: 0 };
const below = thresholds.map(() => 0);
const examples = [];
let largestFlippedGap = 0;
const b64 = new Float64Array(E),
  b32 = new Float64Array(E),
  s32 = new Float64Array(E);
for (let run = 0; run < runs; run++) {
  const seedL = seed0 + 2 * run,
    seedB = seedL + 1;
  let failedThisRun = false;
  tidy(() => {
    const logits = Tensor.randn([T, E], { seed: seedL, std: 1.5, device: 'cpu' });
    const biasT = Tensor.randn([E], { seed: seedB, std: 0.05, device: 'cpu' });
    const x = logits.toFloat32Array(),
      bias = biasT.toFloat32Array();
    const idx = routerForward(logits, config, { bias: biasT }).indices.toNumbers();
    for (let t = 0; t < T; t++) {
      stats.tokens++;
      const row = x.subarray(t * E, (t + 1) * E);
      if (sigmoid) {
        for (let e = 0; e < E; e++) {
          b64[e] = 1 / (1 + Math.exp(-row[e])) + bias[e];
          s32[e] = f(1 / f(1 + f(Math.exp(-row[e]))));
        }
      } else {
        let mx = -Infinity,
          sum = 0,
          sum32 = 0;
        for (let e = 0; e < E; e++) mx = Math.max(mx, row[e]);
        for (let e = 0; e < E; e++) {
          sum += b64[e] = Math.exp(row[e] - mx);
          sum32 = f(sum32 + (s32[e] = f(Math.exp(f(row[e] - mx)))));
        }
        const inv = f(1 / sum32);
        for (let e = 0; e < E; e++) {
          b64[e] = b64[e] / sum + bias[e];
          s32[e] = f(s32[e] * inv);
        }
      }
      for (let e = 0; e < E; e++) b32[e] = f(bias[e] + s32[e]);
      const g64 = groupScores(b64, (v) => v),
        g32 = groupScores(b32, f);
      const o64 = rank(g64),
        o32 = rank(g32);
      const gap = g64[o64[KG - 1]] - g64[o64[KG]];
      thresholds.forEach((h, i) => (below[i] += gap < h ? 1 : 0));
      const k64 = new Set(o64.slice(0, KG)),
        k32 = new Set(o32.slice(0, KG));
      const i64 = topk(b64, k64),
        i32 = topk(b32, k32);
      if (i64.join() !== idx.slice(t * k, (t + 1) * k).join()) stats.oracleMismatch++;
      if ([...k64].some((g) => !k32.has(g))) {
        stats.keptDiffer++;
        largestFlippedGap = Math.max(largestFlippedGap, gap);
        const j = i64.findIndex((e, jj) => e !== i32[jj] && Math.abs(b64[e] - b64[i32[jj]]) >= 1e-5);
        if (j >= 0) {
          stats.failing++;
          failedThisRun = true;
          if (examples.length < 5) {
            examples.push({
              seedL,
              seedB,
              token: t,
              slot: j,
              cpu: i64[j],
              f32: i32[j],
              expertGap: Math.abs(b64[i64[j]] - b64[i32[j]]),
              groups: [o64[KG - 1], o64[KG]],
              groupGap: gap,
            });
          }
        }
      }
    }
  });
  if (failedThisRun) stats.runsFailing++;
}
const perToken = stats.failing / stats.tokens;
console.log(
  JSON.stringify(
    {
      T,
      config,
      runs,
      seed0,
      stats,
      boundaryGapBelow: Object.fromEntries(thresholds.map((h, i) => [h, below[i]])),
      largestFlippedGap,
      failingPerToken: perToken,
      failingRunProbability: 1 - (1 - perToken) ** T,
      examples,
    },
    null,
    1,
  ),
);
