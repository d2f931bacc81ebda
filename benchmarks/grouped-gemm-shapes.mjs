// The grouped-GEMM shapes of issues #3 and #7 (M rows split into groups by counts, K inner, N
// columns), shared by the benchmark and the profiling script. `tag`: a short name for tables.
// `dram`: the shapes where the DRAM roof binds (issue #20): the [E, K, N] weights (or dW) of E=256
// are 7.5 GB, so every product's bytes at the copy bandwidth (~4.2 TB/s, ~1.8 ms) take longer than
// its FLOPs at the tensor roof (~750 TFLOP/s: 1.3 ms for E=256, 0.04 ms for decode).
import { mulberry32 } from './mulberry32.mjs';

function balanced(E, M) {
  return Array.from({ length: E }, (_, e) => Math.floor(((e + 1) * M) / E) - Math.floor((e * M) / E));
}
// Zipf(1.0) over experts, rounded to multiples of 8 rows (torch's dW needs that), summing to M.
function zipf(E, M) {
  const w = Array.from({ length: E }, (_, e) => 1 / (e + 1));
  const s = w.reduce((x, y) => x + y, 0);
  const counts = w.map((x) => Math.floor(((x / s) * M) / 8) * 8);
  counts[0] += M - counts.reduce((x, y) => x + y, 0);
  return counts;
}

// The counts a router gives: each of M = T·k rows to one of E experts drawn uniformly (a seeded
// mulberry32, so every run has the same counts): ragged, every group's last m-tile (and, for dW,
// last k-tile) partly filled, as in a real step; the balanced shapes' groups end on whole tiles.
function routed(E, M, seed) {
  const next = mulberry32(seed);
  const counts = new Array(E).fill(0);
  for (let i = 0; i < M; i++) counts[Math.floor(next() * E)]++;
  return counts;
}

export const shapes = [
  { name: 'T=32768 H=7168 F=2048 E=64 balanced', tag: 'balanced', M: 32768, K: 7168, N: 2048, counts: balanced(64, 32768) },
  { name: 'T=32768 H=7168 F=2048 E=64 zipf', tag: 'zipf', M: 32768, K: 7168, N: 2048, counts: zipf(64, 32768) },
  { name: 'T=8192 H=4096 F=14336 E=8', tag: 'E=8', M: 8192, K: 4096, N: 14336, counts: balanced(8, 8192) },
  { name: 'T=4096x8 H=7168 F=2048 E=256', tag: 'E=256', M: 32768, K: 7168, N: 2048, counts: balanced(256, 32768), dram: true },
  { name: 'T=65536x8 H=2048 F=768 E=128 fine-grained', tag: 'fine', M: 524288, K: 2048, N: 768, counts: balanced(128, 524288) },
  { name: 'T=128x8 H=7168 F=2048 E=256 decode', tag: 'decode', M: 1024, K: 7168, N: 2048, counts: balanced(256, 1024), dram: true },
  // Mixtral's decode forward (issue #19), top-2 of 8 experts at T = 1, 8, 64: the up projection
  // (K = H = 4096, N = 2F = 28672, W1|W3 interleaved) and the down one (K = F = 14336, N = H = 4096).
  // Not in the default run: `--shapes=mixtral-decode` (or their indices) with `--products=NN`; the
  // roof counts the touched experts' weights only. Group sizes: T=1 two experts, T=8 seven, T=64 all.
  ...mixtralDecode(),
  // The MoE layer's expert GEMMs with their fused epilogues (issue #20; `fused`: the benchmark's
  // fused products run on it): K = H, N = 2F (W1 and W3 interleaved); the up projection NN+SwiGLU
  // [M, H]·[E, H, 2F], the down projection's dA NT+dSwiGLU [M, H]·[E, F, H]ᵀ with the saved g.
  { name: 'layer T=4096x8 H=7168 F=2048 E=32', tag: 'layer', M: 32768, K: 7168, N: 4096, counts: balanced(32, 32768), fused: true },
  // E=256 with Zipf counts (6424 rows down to 16 per group, 128 on average): the bf16 dW's groups
  // over 128 rows leave the B-resident kernel for the general one. Not in the default run:
  // `--shapes=skewed`.
  {
    name: 'T=4096x8 H=7168 F=2048 E=256 zipf',
    tag: 'E=256zipf',
    M: 32768,
    K: 7168,
    N: 2048,
    counts: zipf(256, 32768),
    dram: true,
    set: 'skewed',
  },
  // The layer's down projection: forward NN [M, F]·[E, F, H] (the layer step's least efficient
  // GEMM, 73% of the roof in results/moe-layer-217f16e.json) and, as TN32, training's dW2. Not in the
  // default run: `--shapes=layer-down` (with `--products=NN,TN32`).
  {
    name: 'layer down T=4096x8 F=2048 H=7168 E=32',
    tag: 'layerdown',
    M: 32768,
    K: 2048,
    N: 7168,
    counts: balanced(32, 32768),
    set: 'layer-down',
  },
  // The two MoE layers of moe-layer.bench.mjs with routed counts (`--shapes=routed`, not in the
  // default run): the main layer's up projection (fused: NN, SwiGLU, NT = its dA, TN32 = dW13,
  // DSWIGLU = the down projection's dA) and its down projection (NN, TN32 = dW2), and the fine
  // layer's up projection (H=2048, 2F=1536, E=128: 256 rows per group on average).
  {
    name: 'layer routed T=4096x8 H=7168 F=2048 E=32',
    tag: 'layerR',
    M: 32768,
    K: 7168,
    N: 4096,
    counts: routed(32, 32768, 20),
    fused: true,
    set: 'routed',
  },
  {
    name: 'layer down routed T=4096x8 F=2048 H=7168 E=32',
    tag: 'layerdownR',
    M: 32768,
    K: 2048,
    N: 7168,
    counts: routed(32, 32768, 20),
    set: 'routed',
  },
  {
    name: 'fine layer routed T=4096x8 H=2048 F=768 E=128',
    tag: 'fineR',
    M: 32768,
    K: 2048,
    N: 1536,
    counts: routed(128, 32768, 21),
    fused: true,
    set: 'routed',
  },
];
function mixtralDecode() {
  const counts = { 1: [0, 1, 0, 0, 1, 0, 0, 0], 8: [3, 2, 0, 4, 1, 2, 3, 1], 64: [18, 14, 17, 12, 20, 15, 16, 16] };
  return Object.entries(counts).flatMap(([T, c]) => [
    {
      name: `Mixtral T=${T} up H=4096 2F=28672 top-2 of 8`,
      tag: `mx${T}up`,
      M: 2 * T,
      K: 4096,
      N: 28672,
      counts: c,
      dram: true,
      set: 'mixtral-decode',
    },
    {
      name: `Mixtral T=${T} down F=14336 H=4096 top-2 of 8`,
      tag: `mx${T}dn`,
      M: 2 * T,
      K: 14336,
      N: 4096,
      counts: c,
      dram: true,
      set: 'mixtral-decode',
    },
  ]);
}

// The same seven cases shrunk for CPU dry runs (the benchmark's --dry-run): the same kinds of counts
// (balanced, Zipf, few large groups, many groups, many rows, <= 8 rows per group), so every path of
// the script runs; their times mean nothing.
export const dryShapes = [
  { name: 'dry balanced', tag: 'balanced', M: 512, K: 128, N: 64, counts: balanced(8, 512) },
  { name: 'dry zipf', tag: 'zipf', M: 512, K: 128, N: 64, counts: zipf(8, 512) },
  { name: 'dry E=2', tag: 'E=2', M: 256, K: 64, N: 256, counts: balanced(2, 256) },
  { name: 'dry E=16', tag: 'E=16', M: 512, K: 128, N: 64, counts: balanced(16, 512), dram: true },
  { name: 'dry fine-grained', tag: 'fine', M: 1024, K: 64, N: 48, counts: balanced(16, 1024) },
  { name: 'dry decode', tag: 'decode', M: 64, K: 128, N: 64, counts: balanced(16, 64), dram: true },
  { name: 'dry Mixtral T=1', tag: 'mx1', M: 2, K: 256, N: 512, counts: [0, 1, 0, 0, 1, 0, 0, 0], dram: true, set: 'mixtral-decode' },
  { name: 'dry layer', tag: 'layer', M: 512, K: 128, N: 128, counts: balanced(8, 512), fused: true },
  { name: 'dry E=16 zipf', tag: 'E=16zipf', M: 512, K: 128, N: 64, counts: zipf(16, 512), dram: true, set: 'skewed' },
  { name: 'dry layer routed', tag: 'layerR', M: 512, K: 128, N: 128, counts: routed(8, 512, 20), fused: true, set: 'routed' },
];
