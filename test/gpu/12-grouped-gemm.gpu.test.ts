// The CUDA grouped GEMM (NN, NT, TN and the fused SwiGLU epilogues) against the CPU reference on
// fresh random inputs, outputs poisoned first; ragged groups, empty groups, unaligned sizes. Then the
// Hopper kernel's fp32 dW on the edges of its TN path, and its fused epilogues (handed off to the
// storer warps), each against the CPU reference.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import {
  info,
  kernelOptionDefaults,
  type KernelOptionsUpdate,
  memoryStats,
  resetKernelOptions,
  setKernelOptions,
  Tensor,
  tidy,
} from '../../lib/index.js';
import { dequantizeFp8, quantizeFp8 } from '../../lib/moe/fp8.js';
import { Epilogue, groupedGemm, groupedGemmEpilogue } from '../../lib/moe/grouped-gemm.js';
import { floats, freshSeed, poisoned, relErr, values } from '../helpers.js';
import { hasGpu } from './gpu.js';
import { offsets, pair } from './grouped-gemm-inputs.js';

const gpu = 'cuda:0' as const;
const cpu = 'cpu' as const;

/** Ragged counts summing to `total` over E groups, some of them empty. */
function raggedCounts(E: number, total: number): number[] {
  const weights = Array.from({ length: E }, (_, e) => (e % 5 === 1 ? 0 : 1 + ((e * 7919 + freshSeed()) % 13)));
  const sum = weights.reduce((s, w) => s + w, 0) || 1;
  const counts = weights.map((w) => Math.floor((w * total) / sum));
  counts[0] = (counts[0] as number) + total - counts.reduce((s, c) => s + c, 0);
  return counts;
}

const cases: { name: string; E: number; K: number; N: number; counts: number[] }[] = [
  { name: 'E=1, one group', E: 1, K: 64, N: 64, counts: [37] },
  { name: 'ragged with empty groups, M not a tile multiple', E: 8, K: 256, N: 384, counts: raggedCounts(8, 1000) },
  { name: 'H=7168 × F=2048 (W13: N=4096)', E: 4, K: 7168, N: 4096, counts: raggedCounts(4, 48) },
  { name: 'H=4096 × F=14336 (W13: N=28672)', E: 2, K: 4096, N: 28672, counts: [9, 7] },
  { name: 'unaligned 1000 × 300', E: 3, K: 1000, N: 300, counts: [100, 0, 77] },
  { name: 'unaligned K=300', E: 3, K: 300, N: 1000, counts: [50, 60, 1] },
  { name: 'many small groups (E=256, 2 rows each)', E: 256, K: 128, N: 256, counts: new Array(256).fill(2) },
  // Multiples of 8 (the Hopper kernel's TMA path) but of no tile: zero-filled k and n edges.
  { name: 'K=200, N=328: partial k and n tiles', E: 5, K: 200, N: 328, counts: raggedCounts(5, 700) },
  // Less than one k tile and one staged slice of columns.
  { name: 'K=24, N=40: under one tile', E: 3, K: 24, N: 40, counts: [10, 0, 33] },
  // Groups whose last m-tile holds 1, 63, 64, 65, 127 or 128 rows (the Hopper kernel's second
  // consumer has rows of its own from 65 on), and whose last k-tile for dW holds 1, 63 or 64 rows
  // (1 or 4 k16 steps run: groupedGemm.trimTails).
  { name: 'last tiles of 1, 63, 64, 65, 127, 128 rows', E: 8, K: 256, N: 512, counts: [129, 63, 64, 65, 127, 128, 0, 192] },
  // More work items than SMs: each persistent block walks several tiles through its ring.
  { name: 'M=6000 over 4 groups, N=1024: several tiles per block', E: 4, K: 256, N: 1024, counts: raggedCounts(4, 6000) },
  // Many tiles per block (~5 NN tiles on 132 SMs; NT several n-tiles each; TN ~4 tiles per block
  // on the 64-group case): every barrier phase of the ring and of the hand-off completes many times.
  { name: 'M=20000, K=64, N=1024: ~5 NN tiles per block', E: 4, K: 64, N: 1024, counts: raggedCounts(4, 20000) },
  { name: 'M=20000, K=1024, N=64: NT over several n-tiles per block', E: 4, K: 1024, N: 64, counts: raggedCounts(4, 20000) },
  { name: 'E=64 groups of 64 rows, K=N=512: ~4 TN tiles per block', E: 64, K: 512, N: 512, counts: new Array(64).fill(64) },
  // dW with ≤ 8 rows per group on average takes the few-rows kernel: most groups fit one chunk of
  // 8 rows, two (20 and 45 rows) take several; K and N end mid-slab (32 × 256).
  { name: 'decode-like dW: E=32, mostly 0-6 rows, two groups over 8', E: 32, K: 520, N: 1032, counts: fewRowCounts() },
];
/** 0-6 rows per group, and 20 and 45 rows in two of them: M = 147 (+3) ≤ 8·E. */
function fewRowCounts(): number[] {
  const counts = Array.from({ length: 32 }, (_, e) => e % 7);
  counts[5] = 20;
  counts[17] = 45;
  return counts;
}
// On compute capability 9.0 the NN/NT products take the wgmma kernel where eligible; the portable
// mma.sync kernel (the fallback elsewhere) is checked too, on the smaller cases.
// The Hopper kernel hands bf16 tiles to its storer warps and stores fp32 ones through warp slices
// (both in the default path's f32 and bf16 outputs); the variants that lost (the ping-pong kernel for
// fp32 results among them) are in benchmarks/kernels/grouped_gemm/.
const small = cases.filter((c) => c.K * c.N <= 1 << 22);
const paths: { path: string; kernels: KernelOptionsUpdate; cases: typeof cases }[] = [
  { path: 'default kernels', kernels: {}, cases },
  // The forward with one group takes the skinny kernel by default (test 17); these two paths keep the
  // tile kernels checked on it.
  { path: 'mma.sync only (groupedGemm.hopper and .skinny off)', kernels: { groupedGemm: { hopper: false, skinny: false } }, cases: small },
  {
    path: 'one group on the tile kernels (groupedGemm.skinny off)',
    kernels: { groupedGemm: { skinny: false } },
    cases: cases.filter((c) => c.E === 1),
  },
  // The cases whose dW takes the few-rows kernel by default, on the tensor-core kernel alone.
  {
    path: 'dW without the few-rows kernel (groupedGemm.fewRows off)',
    kernels: { groupedGemm: { fewRows: false } },
    cases: cases.filter((c) => c.counts.reduce((s, n) => s + n, 3) <= 8 * c.E),
  },
  // dW's last k-tiles computed whole (the results must not change: a test below compares the bits).
  {
    path: 'untrimmed tails (groupedGemm.trimTails off)',
    kernels: { groupedGemm: { trimTails: false } },
    cases: cases.filter((c) => c.name.startsWith('last tiles') || c.name.startsWith('ragged')),
  },
  // The cases whose bf16 dW takes the B-resident kernel by default (32-128 rows per group on
  // average, grouped_gemm.cc), on the general Hopper kernel's TN path.
  {
    path: 'dW without the B-resident kernel (groupedGemm.bResident off)',
    kernels: { groupedGemm: { bResident: false } },
    cases: cases.filter((c) => {
      const M = c.counts.reduce((s, n) => s + n, 3);
      return M >= 32 * c.E && M <= 128 * c.E;
    }),
  },
];

describe.skipIf(!hasGpu).each(paths)('CUDA grouped GEMM against the CPU reference: $path', ({ kernels, cases }) => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
    setKernelOptions(kernelOptionDefaults); // whatever the environment says: this path's switches alone
    setKernelOptions(kernels);
  });
  afterEach(() => {
    resetKernelOptions();
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  // The largest shapes spend most of their time in the double-precision CPU reference.
  it.each(cases)('NN, NT and TN: $name', { timeout: 300_000 }, ({ E, K, N, counts }) => {
    const M = counts.reduce((s, c) => s + c, 0) + 3; // 3 rows outside every group
    tidy(() => {
      const [a, ga] = pair([M, K]);
      const [b, gb] = pair([E, K, N]);
      const [dC, gdC] = pair([M, N]);
      const [off, goff] = offsets(counts);
      for (const outType of ['f32', 'bf16'] as const) {
        // fp32 accumulation over K up to 28672 terms vs a double reference: ~1e-5 to 5e-5 expected.
        const tol = outType === 'f32' ? 1e-4 : 1e-2;
        const go = poisoned([M, N], outType, gpu),
          co = poisoned([M, N], outType, cpu);
        groupedGemm('NN', ga, gb, goff, { out: go });
        groupedGemm('NN', a, b, off, { out: co });
        expect(relErr(values(go), values(co)), `NN ${outType}`).toBeLessThan(tol);
        const gdA = poisoned([M, K], outType, gpu),
          cdA = poisoned([M, K], outType, cpu);
        groupedGemm('NT', gdC, gb, goff, { out: gdA });
        groupedGemm('NT', dC, b, off, { out: cdA });
        expect(relErr(values(gdA), values(cdA)), `NT ${outType}`).toBeLessThan(tol);
        const gdW = poisoned([E, K, N], outType, gpu),
          cdW = poisoned([E, K, N], outType, cpu);
        groupedGemm('TN', ga, gdC, goff, { out: gdW });
        groupedGemm('TN', a, dC, off, { out: cdW });
        expect(relErr(floats(gdW), floats(cdW)), `TN ${outType}`).toBeLessThan(tol);
      }
    });
  });

  it('no rows at all, and no groups: NN/NT leave out alone, TN writes dW = 0', () => {
    tidy(() => {
      const K = 64,
        N = 128;
      for (const E of [0, 3]) {
        const [a, ga] = pair([E === 0 ? 5 : 0, K]);
        const M = a.shape[0] as number;
        const [b, gb] = pair([E, K, N]);
        const [, gdC] = pair([M, N]);
        const [off, goff] = offsets(new Array(E).fill(0));
        const go = poisoned([M, N], 'f32', gpu),
          co = poisoned([M, N], 'f32', cpu);
        groupedGemm('NN', ga, gb, goff, { out: go });
        groupedGemm('NN', a, b, off, { out: co });
        expect(Array.from(floats(go)).map(Number.isNaN), `NN E=${E}: rows outside every group keep their contents`).toEqual(
          Array.from(floats(co)).map(Number.isNaN),
        );
        const gdA = poisoned([M, K], 'f32', gpu);
        groupedGemm('NT', gdC, gb, goff, { out: gdA });
        expect(floats(gdA).every(Number.isNaN), `NT E=${E}`).toBe(true);
        const gdW = poisoned([E, K, N], 'f32', gpu);
        groupedGemm('TN', ga, gdC, goff, { out: gdW });
        expect(
          floats(gdW).every((v) => v === 0),
          `TN E=${E}: dW = 0`,
        ).toBe(true);
      }
    });
  });

  // On the paths whose cases include the decode-like shape (the one-group path has none).
  const decodeLike = cases.find((c) => c.name.startsWith('decode-like'));
  it.skipIf(!decodeLike)('accumulate with few rows per group: f32 dW += product onto random contents (the few-rows kernel)', () => {
    const { E, K, N, counts } = decodeLike as (typeof cases)[number];
    const M = counts.reduce((s, c) => s + c, 0) + 3;
    tidy(() => {
      const [a, ga] = pair([M, K]);
      const [dC, gdC] = pair([M, N]);
      const [off, goff] = offsets(counts);
      const [start, gstart] = pair([E, K, N]);
      const gdW = gstart.cast('f32'),
        cdW = start.cast('f32');
      groupedGemm('TN', ga, gdC, goff, { out: gdW, accumulate: true });
      groupedGemm('TN', a, dC, off, { out: cdW, accumulate: true });
      expect(relErr(floats(gdW), floats(cdW))).toBeLessThan(1e-4);
    });
  });

  it('accumulate: f32 out += product (NN, NT, TN) onto random contents', { timeout: 300_000 }, () => {
    // The second case (the one-group path has a single case: that one).
    const { E, K, N, counts } = (cases[1] ?? cases[0]) as (typeof cases)[number];
    const M = counts.reduce((s, c) => s + c, 0);
    tidy(() => {
      const [a, ga] = pair([M, K]);
      const [b, gb] = pair([E, K, N]);
      const [dC, gdC] = pair([M, N]);
      const [off, goff] = offsets(counts);
      const start = (shape: number[]): [Tensor, Tensor] => {
        const c = Tensor.rand(shape, { seed: freshSeed(), low: -1, high: 1, device: cpu });
        return [c, c.to(gpu)];
      };
      const [co, go] = start([M, N]);
      groupedGemm('NN', ga, gb, goff, { out: go, accumulate: true });
      groupedGemm('NN', a, b, off, { out: co, accumulate: true });
      expect(relErr(values(go), values(co)), 'NN').toBeLessThan(1e-4);
      const [cdA, gdA] = start([M, K]);
      groupedGemm('NT', gdC, gb, goff, { out: gdA, accumulate: true });
      groupedGemm('NT', dC, b, off, { out: cdA, accumulate: true });
      expect(relErr(values(gdA), values(cdA)), 'NT').toBeLessThan(1e-4);
      const [cdW, gdW] = start([E, K, N]);
      groupedGemm('TN', ga, gdC, goff, { out: gdW, accumulate: true });
      groupedGemm('TN', a, dC, off, { out: cdW, accumulate: true });
      expect(relErr(floats(gdW), floats(cdW)), 'TN').toBeLessThan(1e-4);
    });
  });

  it.each(cases.filter((c) => c.N % 2 === 0))(
    'fused SwiGLU forward and dSwiGLU backward: $name',
    { timeout: 300_000 },
    ({ E, K, N, counts }) => {
      const M = counts.reduce((s, c) => s + c, 0);
      const F = N / 2;
      tidy(() => {
        const [a, ga] = pair([M, K]);
        const [w13, gw13] = pair([E, K, N]);
        const [w2, gw2] = pair([E, F, K]);
        const [dOut, gdOut] = pair([M, K]);
        const [off, goff] = offsets(counts);
        const gh = poisoned([M, F], 'bf16', gpu),
          ch = poisoned([M, F], 'bf16', cpu);
        const gg = poisoned([M, N], 'bf16', gpu),
          cg = poisoned([M, N], 'bf16', cpu);
        groupedGemmEpilogue('NN', Epilogue.SwiGLU, ga, gw13, goff, gh, gg);
        groupedGemmEpilogue('NN', Epilogue.SwiGLU, a, w13, off, ch, cg);
        expect(relErr(values(gg), values(cg)), 'g').toBeLessThan(1e-2);
        expect(relErr(values(gh), values(ch)), 'h').toBeLessThan(1e-2);
        // The backward from the same saved g on both sides (the GPU's), so only dSwiGLU is compared.
        const gSaved = gg.to(cpu);
        const gdg = poisoned([M, N], 'bf16', gpu),
          cdg = poisoned([M, N], 'bf16', cpu);
        groupedGemmEpilogue('NT', Epilogue.DSwiGLU, gdOut, gw2, goff, gdg, gg);
        groupedGemmEpilogue('NT', Epilogue.DSwiGLU, dOut, w2, off, cdg, gSaved);
        expect(relErr(values(gdg), values(cdg)), 'dg').toBeLessThan(1e-2);
      });
    },
  );
});

// dW (TN) with fp32 results on the edges of the Hopper kernel's TN path (written for the ping-pong
// kernel, which left for benchmarks/kernels/grouped_gemm/ 08; they exercise the warp slices as
// well): groups of no rows (a tile with no k-steps), of fewer rows than a k-step, of counts not a
// multiple of 64 (rows zeroed in shared memory), K and N not multiples of a tile, one tile in all,
// an odd number of tiles per block (on 132 SMs), many tiles per block, and accumulate. Each against
// the CPU reference, outputs poisoned first. Every dW here averages ≥ 32 rows per group, so the
// Hopper kernel takes it.
const dwEdgeCases: { name: string; E: number; K: number; N: number; counts: number[] }[] = [
  { name: 'one tile in all (E=1, K=N=64, 37 rows)', E: 1, K: 64, N: 64, counts: [37] },
  {
    name: 'groups of 0, 1, 5, 63, 64, 65, 127, 200 rows',
    E: 10,
    K: 256,
    N: 384,
    counts: [0, 1, 5, 63, 64, 65, 0, 127, 200, 3],
  },
  { name: 'K=200, N=328: partial m and n tiles', E: 5, K: 200, N: 328, counts: [70, 0, 129, 33, 300] },
  { name: 'K=24, N=40: under one tile', E: 3, K: 24, N: 40, counts: [10, 0, 133] },
  // A group's last k-tile holding 16, 17, 32, 33, 48 or 47 rows: trimmed (groupedGemm.trimTails), it
  // runs 1-3 of its 4 k16 steps, zeroing the rows past the group's end only up to the next 16.
  { name: 'groups ending on and beside the k16 steps', E: 8, K: 128, N: 256, counts: [16, 17, 32, 33, 48, 80, 111, 112] },
  // 53 groups × 1 × 5 tiles = 265 = 2·132 + 1: block 0 takes three tiles, the rest two.
  { name: '265 tiles: an odd number per block', E: 53, K: 128, N: 640, counts: Array.from({ length: 53 }, (_, e) => 20 + ((e * 37) % 50)) },
  // 8 × 4 × 8 = 256 tiles of ~700 rows: two per block and many k-steps; the ring wraps many times.
  { name: 'long groups: ~11 k-steps per tile', E: 8, K: 512, N: 1024, counts: [700, 650, 0, 701, 64, 1000, 333, 999] },
];

describe.skipIf(!hasGpu)('the Hopper kernel on the edges of dW (TN, fp32 results) against the CPU reference', () => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
    setKernelOptions(kernelOptionDefaults);
  });
  afterEach(() => {
    resetKernelOptions();
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  it.each(dwEdgeCases)('TN: $name', { timeout: 300_000 }, ({ E, K, N, counts }) => {
    const seed = freshSeed();
    console.log(`dW edges TN ${E}×${K}×${N}: seed ${seed}`);
    const M = counts.reduce((s, c) => s + c, 0) + 3; // 3 rows outside every group
    tidy(() => {
      const a = Tensor.rand([M, K], { seed, low: -1, high: 1, device: cpu }).cast('bf16');
      const dC = Tensor.rand([M, N], { seed: seed + 1, low: -1, high: 1, device: cpu }).cast('bf16');
      // NaN in the rows outside every group, which the last group's k-tile loads: the kernel must
      // zero them in both operands (or not read them), or NaN reaches the last expert's dW.
      for (const t of [a, dC]) t.narrow(0, M - 3, 3).fill_(NaN);
      const ga = a.to(gpu),
        gdC = dC.to(gpu);
      const [off, goff] = offsets(counts);
      const cdW = poisoned([E, K, N], 'f32', cpu);
      groupedGemm('TN', a, dC, off, { out: cdW });
      const gdW = poisoned([E, K, N], 'f32', gpu);
      groupedGemm('TN', ga, gdC, goff, { out: gdW });
      const got = floats(gdW);
      expect(got.every(Number.isFinite), `seed ${seed}: every output written`).toBe(true);
      expect(relErr(got, floats(cdW)), `seed ${seed}: vs CPU`).toBeLessThan(1e-4);
      // accumulate onto random contents: out += product (groups of no rows leave theirs alone)
      const start = Tensor.rand([E, K, N], { seed: seed + 2, low: -1, high: 1, device: cpu });
      const cAcc = start.clone(),
        gAcc = start.to(gpu);
      groupedGemm('TN', a, dC, off, { out: cAcc, accumulate: true });
      groupedGemm('TN', ga, gdC, goff, { out: gAcc, accumulate: true });
      expect(relErr(floats(gAcc), floats(cAcc)), `seed ${seed}: accumulate vs CPU`).toBeLessThan(1e-4);
    });
  });
});

// dW (TN, f32 out) of one group with few output tiles, the router's dWr = xᵀ·dLogits, is split into
// row ranges by default (groupedGemm.splitRows; native/ops/moe/grouped_gemm/split_rows.h): a grouped
// GEMM of several groups into fp32 partials, added in split order. Against the CPU reference with
// the split on and off, accumulating too, and on the mma.sync kernel (hopper off); the group stops
// before the last rows (NaN there: a cut past the group's end would reach them), in the last case
// long before, so that most of its 16 ranges are empty. Where the split ran, its bits differ from
// one range's (another summation order) and repeat run to run.
const splitRowsCases: { name: string; M: number; K: number; N: number; end: number }[] = [
  { name: "the fine layer's router: T=4096 rows, H=2048, E=128", M: 4100, K: 2048, N: 128, end: 4096 },
  { name: "the main layer's router: T=4096 rows, H=7168, E=32", M: 4100, K: 7168, N: 32, end: 4096 },
  { name: 'K=200, N=40 (partial tiles), 2999 rows: cuts inside no k-tile but the last', M: 3100, K: 200, N: 40, end: 2999 },
  { name: 'K=200, N=40, a group of 700 of 4100 rows: 16 ranges, most of them empty', M: 4100, K: 200, N: 40, end: 700 },
];
/** How many ranges grouped_gemm.cc's row_splits cuts a one-group f32 dW into on this GPU (1: none). */
function expectedSplits(M: number, K: number, N: number): number {
  const sms = info().cuda.devices[0]?.multiprocessors ?? 0;
  const tiles = Math.ceil(K / 128) * Math.ceil(N / 256);
  return Math.max(1, Math.min(Math.floor(sms / tiles), Math.floor(M / 256), 16));
}

describe.skipIf(!hasGpu)("the router's dW split into row ranges (groupedGemm.splitRows) against the CPU reference", () => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
    setKernelOptions(kernelOptionDefaults);
  });
  afterEach(() => {
    resetKernelOptions();
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  it.each(splitRowsCases)('TN f32: $name', { timeout: 300_000 }, ({ M, K, N, end }) => {
    const seed = freshSeed();
    const splits = expectedSplits(M, K, N);
    console.log(`split rows TN ${M}×${K}×${N}, ${splits} ranges: seed ${seed}`);
    tidy(() => {
      const a = Tensor.rand([M, K], { seed, low: -1, high: 1, device: cpu }).cast('bf16');
      const dC = Tensor.rand([M, N], { seed: seed + 1, low: -1, high: 1, device: cpu }).cast('bf16');
      for (const t of [a, dC]) t.narrow(0, end, M - end).fill_(NaN);
      const ga = a.to(gpu),
        gdC = dC.to(gpu);
      const off = Tensor.fromArray([0, end], { dtype: 'i32', device: cpu });
      const goff = off.to(gpu);
      const cdW = poisoned([1, K, N], 'f32', cpu);
      groupedGemm('TN', a, dC, off, { out: cdW });
      const run = (splitRows: boolean, out = poisoned([1, K, N], 'f32', gpu), accumulate = false, hopper = true): Float32Array => {
        setKernelOptions({ groupedGemm: { splitRows, hopper } });
        groupedGemm('TN', ga, gdC, goff, { out, accumulate });
        return floats(out);
      };
      const split = run(true);
      expect(split.every(Number.isFinite), `seed ${seed}: every output written, no NaN row read`).toBe(true);
      expect(relErr(split, floats(cdW)), `seed ${seed}: split vs CPU`).toBeLessThan(1e-4);
      expect(run(true), `seed ${seed}: the same bits again`).toEqual(split);
      const whole = run(false);
      expect(relErr(whole, floats(cdW)), `seed ${seed}: one range vs CPU`).toBeLessThan(1e-4);
      if (splits > 1)
        expect(
          whole.some((v, i) => v !== split[i]),
          `seed ${seed}: the split's summation order differs from one range's`,
        ).toBe(true);
      expect(relErr(run(true, undefined, false, false), floats(cdW)), `seed ${seed}: split on the mma.sync kernel vs CPU`).toBeLessThan(
        1e-4,
      );
      // accumulate onto random contents: out += product
      const start = Tensor.rand([1, K, N], { seed: seed + 2, low: -1, high: 1, device: cpu });
      const cAcc = start.clone();
      groupedGemm('TN', a, dC, off, { out: cAcc, accumulate: true });
      expect(relErr(run(true, start.to(gpu), true), floats(cAcc)), `seed ${seed}: split, accumulate vs CPU`).toBeLessThan(1e-4);
    });
  });
});

// dW with bf16 results and 32-128 rows per group on average takes the B-resident Hopper kernel by
// default (native/ops/moe/grouped_gemm/hopper_b_resident.cu): each group's dC slice kept in shared
// memory, the tiles stored by TMA tensor stores; a group over 128 rows (a skewed routing) left to
// the general Hopper kernel, launched after it over those groups alone. Against the CPU reference,
// and bit for bit against the general Hopper kernel alone (groupedGemm.bResident off): the same wgmma over the same k order, rounded to bf16 the same way.
// Outputs poisoned; every dW_e written (groups of no rows: zeros). Off Hopper both sides are the
// mma.sync kernel and the comparison holds trivially.
const bResidentCases: { name: string; E: number; K: number; N: number; counts: number[] }[] = [
  {
    name: 'E=16, groups of 0-300 rows (1, 63-65, 127, 128; 129, 257 and 300 on the general kernel), K=392, N=328: partial m- and n-tiles',
    E: 16,
    K: 392,
    N: 328,
    counts: [0, 1, 63, 64, 65, 127, 128, 129, 257, 300, 0, 50, 100, 128, 64, 32],
  },
  // 32 × 4 = 128 items of 8 m-tiles each: the ring, the B loads and the staging go round many times.
  { name: 'E=32 groups of 100 rows, K=N=1024', E: 32, K: 1024, N: 1024, counts: new Array(32).fill(100) },
  {
    name: 'E=8, every row in one group (1000 rows: the general kernel; the B-resident one writes the empty groups’ zeros)',
    E: 8,
    K: 256,
    N: 512,
    counts: [0, 0, 0, 1000, 0, 0, 0, 0],
  },
];

describe.skipIf(!hasGpu)('the B-resident dW (TN, bf16 results) against the CPU reference and the general Hopper kernel', () => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
    setKernelOptions(kernelOptionDefaults);
  });
  afterEach(() => {
    resetKernelOptions();
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  it.each(bResidentCases)('TN: $name', { timeout: 300_000 }, ({ E, K, N, counts }) => {
    const seed = freshSeed();
    console.log(`B-resident dW TN ${E}×${K}×${N}: seed ${seed}`);
    const M = counts.reduce((s, c) => s + c, 0) + 3; // 3 rows outside every group
    expect(M >= 32 * E && M <= 128 * E, 'the case is in the B-resident range (32-128 rows per group on average)').toBe(true);
    tidy(() => {
      const a = Tensor.rand([M, K], { seed, low: -1, high: 1, device: cpu }).cast('bf16');
      const dC = Tensor.rand([M, N], { seed: seed + 1, low: -1, high: 1, device: cpu }).cast('bf16');
      const ga = a.to(gpu),
        gdC = dC.to(gpu);
      const [off, goff] = offsets(counts);
      const cdW = poisoned([E, K, N], 'bf16', cpu);
      groupedGemm('TN', a, dC, off, { out: cdW });
      const resident = poisoned([E, K, N], 'bf16', gpu);
      groupedGemm('TN', ga, gdC, goff, { out: resident });
      setKernelOptions({ groupedGemm: { bResident: false } });
      const general = poisoned([E, K, N], 'bf16', gpu);
      groupedGemm('TN', ga, gdC, goff, { out: general });
      const got = floats(resident);
      expect(got.every(Number.isFinite), `seed ${seed}: every output written`).toBe(true);
      expect(relErr(got, floats(cdW)), `seed ${seed}: vs CPU`).toBeLessThan(1e-2);
      expect(bitsDiffer(got, floats(general)), `seed ${seed}: bits differing from the general Hopper kernel`).toBe(0);
    });
  });
});

// The fused epilogues on the Hopper kernel, handed off to its storer warps (the way stored from the
// consumers' registers lost and is benchmarks/kernels/grouped_gemm/ 09), against the CPU reference
// (which takes the product as stored in bf16, as the kernel does), outputs poisoned first. SwiGLU
// with and without saving g, then dSwiGLU from the CPU's saved g. Each case keeps 3 rows outside
// every group (never written). F is a multiple of 8 throughout, so dSwiGLU's NT product takes the
// Hopper kernel too. (Without the Hopper kernel, e.g. on sm_80, this is the mma.sync kernel's.)
const fusedCases: { name: string; E: number; K: number; F: number; counts: number[] }[] = [
  { name: 'E=1, 37 rows: one partial tile', E: 1, K: 64, F: 32, counts: [37] },
  // N = 2F = 400: SwiGLU's second n-tile holds 144 columns (lanes 18-31 of its storers idle);
  // dSwiGLU's one n-tile 200 columns (its pieces at 128 + 4·lane in for lanes < 18 only).
  { name: 'ragged with empty groups, M not a tile multiple, partial n-tiles (F=200)', E: 8, K: 256, F: 200, counts: raggedCounts(8, 1000) },
  { name: 'H=7168, F=2048: the layer shape, few rows', E: 4, K: 7168, F: 2048, counts: raggedCounts(4, 200) },
  // ~3 SwiGLU and ~1.5 dSwiGLU tiles per block on 132 SMs: the hand-off's barriers and the g ring
  // go round more than once.
  { name: 'M=12000, K=64, F=512: several tiles per block', E: 4, K: 64, F: 512, counts: raggedCounts(4, 12000) },
  { name: 'many small groups (E=256, 2 rows each)', E: 256, K: 128, F: 128, counts: new Array(256).fill(2) },
  { name: 'K=24, F=24: under one tile', E: 3, K: 24, F: 24, counts: [10, 0, 33] },
  { name: 'no rows in any group (3 rows outside them)', E: 3, K: 64, F: 64, counts: [0, 0, 0] },
];

/** How many elements differ in their bits (NaN poison included: unwritten on one side only counts). */
function bitsDiffer(x: Float32Array, y: Float32Array): number {
  if (x.length !== y.length) return Infinity;
  const a = new Uint32Array(x.buffer, x.byteOffset, x.length),
    b = new Uint32Array(y.buffer, y.byteOffset, y.length);
  let n = 0;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) n++;
  return n;
}

// groupedGemm.trimTails skips only products of zeroed rows (a dW's k16 steps past the group's end):
// dW gives the same bits on and off (an exactly zero sum aside, whose sign the skipped +0 terms could
// change: random inputs never give one), and the CPU's values; the other products (which the switch
// leaves alone) the same bits too. Groups with last m-tiles of 1-128 rows and last k-tiles of 1-64;
// NaN in the rows outside every group, which the last group's k-tiles load and must zero or skip.
describe.skipIf(!hasGpu)('trimmed tails (groupedGemm.trimTails): the same bits as every k-tile computed whole', () => {
  beforeEach(() => setKernelOptions(kernelOptionDefaults));
  afterEach(() => resetKernelOptions());
  const E = 12,
    K = 320,
    F = 192,
    counts = [1, 16, 17, 47, 63, 64, 65, 112, 127, 128, 0, 200];
  it('NN, NT, TN (bf16 and f32 results), SwiGLU and dSwiGLU', { timeout: 300_000 }, () => {
    const seed = freshSeed();
    console.log(`trimmed tails: seed ${seed}`);
    const M = counts.reduce((s, c) => s + c, 0) + 3; // 3 rows outside every group
    tidy(() => {
      const rand = (shape: number[], k: number) => Tensor.rand(shape, { seed: seed + k, low: -1, high: 1, device: gpu }).cast('bf16');
      const a = rand([M, K], 0),
        w13 = rand([E, K, 2 * F], 1),
        w2 = rand([E, F, K], 2),
        dC = rand([M, 2 * F], 3);
      for (const t of [a, dC]) t.narrow(0, M - 3, 3).fill_(NaN);
      const [, off] = offsets(counts);
      /** Every product once with the switch as given; the outputs' floats. */
      const run = (trimTails: boolean): Record<string, Float32Array> => {
        setKernelOptions({ groupedGemm: { trimTails, bResident: false } }); // bf16 dW on hopper.cu's kernel too
        const got: Record<string, Float32Array> = {};
        for (const outType of ['f32', 'bf16'] as const) {
          const nn = poisoned([M, 2 * F], outType, gpu);
          groupedGemm('NN', a, w13, off, { out: nn });
          const nt = poisoned([M, K], outType, gpu);
          groupedGemm('NT', dC, w13, off, { out: nt });
          const tn = poisoned([E, K, 2 * F], outType, gpu);
          groupedGemm('TN', a, dC, off, { out: tn });
          Object.assign(got, { [`NN ${outType}`]: floats(nn), [`NT ${outType}`]: floats(nt), [`TN ${outType}`]: floats(tn) });
        }
        const h = poisoned([M, F], 'bf16', gpu),
          g = poisoned([M, 2 * F], 'bf16', gpu);
        groupedGemmEpilogue('NN', Epilogue.SwiGLU, a, w13, off, h, g);
        const dg = poisoned([M, 2 * F], 'bf16', gpu);
        groupedGemmEpilogue('NT', Epilogue.DSwiGLU, rand([M, K], 4), w2, off, dg, g);
        return { ...got, 'SwiGLU h': floats(h), 'SwiGLU g': floats(g), dSwiGLU: floats(dg) };
      };
      const trimmed = run(true),
        whole = run(false);
      for (const [name, bits] of Object.entries(whole)) {
        // NaN poison left in the 3 rows outside every group compares equal bit for bit.
        expect(bitsDiffer(trimmed[name] as Float32Array, bits), `seed ${seed}: ${name}, bits differing`).toBe(0);
      }
      // And the trimmed products are the CPU's (the whole ones are checked in the paths above).
      const [coff] = offsets(counts);
      const cpuA = a.to(cpu),
        cpuW = w13.to(cpu),
        cpuDC = dC.to(cpu);
      const cnn = poisoned([M, 2 * F], 'f32', cpu);
      groupedGemm('NN', cpuA, cpuW, coff, { out: cnn });
      const ctn = poisoned([E, K, 2 * F], 'f32', cpu);
      groupedGemm('TN', cpuA, cpuDC, coff, { out: ctn });
      expect(relErr(trimmed['NN f32'] as Float32Array, values(cnn)), `seed ${seed}: NN vs CPU`).toBeLessThan(1e-4);
      expect(relErr(trimmed['TN f32'] as Float32Array, floats(ctn)), `seed ${seed}: TN vs CPU`).toBeLessThan(1e-4);
    });
  });
});

describe.skipIf(!hasGpu)('fused SwiGLU/dSwiGLU epilogues handed off, against the CPU reference', () => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
    setKernelOptions(kernelOptionDefaults);
  });
  afterEach(() => {
    resetKernelOptions();
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  it.each(fusedCases)('$name', { timeout: 300_000 }, ({ E, K, F, counts }) => {
    const M = counts.reduce((s, c) => s + c, 0) + 3;
    const N = 2 * F;
    const seeds = { a: freshSeed(), w13: freshSeed(), w2: freshSeed(), dOut: freshSeed() };
    const tag = `E=${E} K=${K} F=${F} M=${M} seeds ${JSON.stringify(seeds)}`;
    console.log(`12-grouped-gemm fused epilogues: ${tag}`);
    const seeded = (shape: number[], seed: number): [Tensor, Tensor] => {
      const c = tidy(() => Tensor.rand(shape, { seed, low: -1, high: 1, device: cpu }).cast('bf16'));
      return [c, c.to(gpu)];
    };
    tidy(() => {
      const [a, ga] = seeded([M, K], seeds.a);
      const [w13, gw13] = seeded([E, K, N], seeds.w13);
      const [w2, gw2] = seeded([E, F, K], seeds.w2);
      const [dOut, gdOut] = seeded([M, K], seeds.dOut);
      const [off, goff] = offsets(counts);

      // CPU reference.
      const ch = poisoned([M, F], 'bf16', cpu),
        cg = poisoned([M, N], 'bf16', cpu),
        cdg = poisoned([M, N], 'bf16', cpu);
      groupedGemmEpilogue('NN', Epilogue.SwiGLU, a, w13, off, ch, cg);
      const gSaved = cg.to(gpu); // the saved g every side's backward reads
      groupedGemmEpilogue('NT', Epilogue.DSwiGLU, dOut, w2, off, cdg, cg);

      const h = poisoned([M, F], 'bf16', gpu),
        g = poisoned([M, N], 'bf16', gpu),
        hOnly = poisoned([M, F], 'bf16', gpu),
        dg = poisoned([M, N], 'bf16', gpu);
      groupedGemmEpilogue('NN', Epilogue.SwiGLU, ga, gw13, goff, h, g);
      groupedGemmEpilogue('NN', Epilogue.SwiGLU, ga, gw13, goff, hOnly, null); // g not saved
      groupedGemmEpilogue('NT', Epilogue.DSwiGLU, gdOut, gw2, goff, dg, gSaved);
      const r = { h: floats(h), g: floats(g), hOnly: floats(hOnly), dg: floats(dg) };
      const ref = { h: floats(ch), g: floats(cg), dg: floats(cdg) };
      expect(relErr(r.g, ref.g), `g vs CPU (${tag})`).toBeLessThan(1e-2);
      expect(relErr(r.h, ref.h), `h vs CPU (${tag})`).toBeLessThan(1e-2);
      expect(relErr(r.hOnly, ref.h), `h without saving g vs CPU (${tag})`).toBeLessThan(1e-2);
      expect(bitsDiffer(r.hOnly, r.h), `h is the same whether or not g is saved (${tag})`).toBe(0);
      expect(relErr(r.dg, ref.dg), `dg vs CPU (${tag})`).toBeLessThan(1e-2);
    });
  });
});

// fp8 rows ({ q, scales }: an fp8 'keep' dispatch) into the forward on the GPU: the op dequantises
// into a bf16 copy and runs the bf16 GEMM, so its results must equal dequantizeFp8 + the GEMM called
// by hand bit for bit (Store, SwiGLU with g saved, f32 results; poisoned outputs, rows outside every
// group never written; the tile kernels and the decode kernel, few rows) — a check of the GPU path's
// plumbing; the values are checked against the CPU reference (its own dequantisation and GEMM).
const fp8Cases: { name: string; E: number; K: number; F: number; counts: number[] }[] = [
  { name: 'ragged with empty groups, M not a tile multiple, K=256', E: 8, K: 256, F: 200, counts: raggedCounts(8, 1000) },
  { name: 'the layer shape H=7168, F=2048, a few hundred rows', E: 4, K: 7168, F: 2048, counts: raggedCounts(4, 700) },
  { name: 'decode-sized: 20 rows over 8 groups', E: 8, K: 256, F: 128, counts: [3, 0, 5, 2, 0, 4, 6, 0] },
];

describe.skipIf(!hasGpu)('fp8 rows into the forward product, against the bf16 GEMM of the dequantised rows', () => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
    setKernelOptions(kernelOptionDefaults);
  });
  afterEach(() => {
    resetKernelOptions();
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  it.each(fp8Cases)('$name', { timeout: 300_000 }, ({ E, K, F, counts }) => {
    const M = counts.reduce((s, c) => s + c, 0) + 3;
    const N = 2 * F;
    const seeds = { a: freshSeed(), w13: freshSeed() };
    const tag = `E=${E} K=${K} F=${F} M=${M} seeds ${JSON.stringify(seeds)}`;
    console.log(`12-grouped-gemm fp8 rows: ${tag}`);
    tidy(() => {
      const x = tidy(() => Tensor.randn([M, K], { seed: seeds.a, std: 2, device: cpu }).cast('bf16'));
      const cRows = quantizeFp8(x);
      const gRows = { q: cRows.q.to(gpu), scales: cRows.scales.to(gpu) };
      const [w13, gw13] = pair([E, K, N], seeds.w13, 0.05);
      const [off, goff] = offsets(counts);
      const dense = dequantizeFp8(gRows, 'bf16');

      const out8 = poisoned([M, N], 'bf16', gpu);
      groupedGemm('NN', gRows, gw13, goff, { out: out8 });
      const outDense = poisoned([M, N], 'bf16', gpu);
      groupedGemm('NN', dense, gw13, goff, { out: outDense });
      expect(bitsDiffer(floats(out8), floats(outDense)), `NN on fp8 rows vs on the dequantised rows (${tag})`).toBe(0);

      const h8 = poisoned([M, F], 'bf16', gpu),
        g8 = poisoned([M, N], 'bf16', gpu),
        hD = poisoned([M, F], 'bf16', gpu),
        gD = poisoned([M, N], 'bf16', gpu);
      groupedGemmEpilogue('NN', Epilogue.SwiGLU, gRows, gw13, goff, h8, g8);
      groupedGemmEpilogue('NN', Epilogue.SwiGLU, dense, gw13, goff, hD, gD);
      expect(bitsDiffer(floats(h8), floats(hD)), `SwiGLU h (${tag})`).toBe(0);
      expect(bitsDiffer(floats(g8), floats(gD)), `SwiGLU g (${tag})`).toBe(0);
      // f32 results: the same products, rounded once in f32.
      const o32 = groupedGemm('NN', gRows, gw13, goff, { dtype: 'f32' });
      const d32 = groupedGemm('NN', dense, gw13, goff, { dtype: 'f32' });
      const rows = counts.reduce((s, c) => s + c, 0);
      expect(bitsDiffer(floats(o32.narrow(0, 0, rows)), floats(d32.narrow(0, 0, rows))), `f32 results (${tag})`).toBe(0);

      // The values against the CPU reference (its own dequantisation and GEMM).
      const cOut = poisoned([M, N], 'bf16', cpu);
      groupedGemm('NN', cRows, w13, off, { out: cOut });
      const ref = floats(cOut).subarray(0, rows * N),
        got = floats(out8).subarray(0, rows * N);
      expect(relErr(got, ref), `fp8 rows vs CPU (${tag})`).toBeLessThan(1e-2);
    });
  });
});
