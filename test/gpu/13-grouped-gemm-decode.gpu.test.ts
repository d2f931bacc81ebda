// The decode grouped GEMM (native/ops/moe/grouped_gemm/decode.cu; groupedGemm.decode): the forward
// (NN) with a handful of rows per group, Store (bf16, f32, f32 accumulate) and SwiGLU (with and
// without saving g), against the CPU reference and against the tile kernels (the switch off) on
// fresh random inputs, outputs poisoned first, the seed printed and in every message. Cases: 1, 2, 7
// and 16 rows per group; ragged and empty groups; E = 1, 8, 256; K and N off every tile; the
// split-K path (long K, few groups) and the direct one; groups over the decode limit beside small
// ones (those take the tile kernel in the same call). Also: two runs give the same bits (the split
// sums are reduced in a fixed order), and a captured CUDA graph replays the eager result bit for bit.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import {
  CudaGraph,
  kernelOptionDefaults,
  memoryStats,
  resetKernelOptions,
  setKernelOptions,
  Stream,
  synchronize,
  Tensor,
  tidy,
} from '../../lib/index.js';
import { Epilogue, groupedGemm, groupedGemmEpilogue } from '../../lib/moe/grouped-gemm.js';
import { floats, freshSeed, poisoned, relErr, values } from '../helpers.js';
import { hasGpu } from './gpu.js';
import { offsets, pair } from './grouped-gemm-inputs.js';

const gpu = 'cuda:0' as const;
const cpu = 'cpu' as const;
const bits = (t: Tensor): Buffer => Buffer.from((t.toArray() as Uint16Array | Float32Array).buffer);

/** E groups, mostly 0..maxRows rows (every fifth empty), from the seed. */
function ragged(E: number, maxRows: number, seed: number): number[] {
  return Array.from({ length: E }, (_, e) => (e % 5 === 1 ? 0 : (e * 7919 + seed) % (maxRows + 1)));
}
const one = (E: number, at: number[], rows = 1): number[] => Array.from({ length: E }, (_, e) => (at.includes(e) ? rows : 0));

interface Case {
  name: string;
  E: number;
  K: number;
  N: number;
  counts: (seed: number) => number[];
}
const cases: Case[] = [
  { name: 'E=1, 1 row', E: 1, K: 64, N: 64, counts: () => [1] },
  { name: 'E=8, 2 groups of 1 row (Mixtral T=1), K=512, N=1024', E: 8, K: 512, N: 1024, counts: () => one(8, [1, 4]) },
  { name: 'E=8, 2 rows each (M=16), K=256, N=512', E: 8, K: 256, N: 512, counts: () => new Array(8).fill(2) },
  { name: 'E=8, 7 rows each, K=200, N=328 (off every tile)', E: 8, K: 200, N: 328, counts: () => new Array(8).fill(7) },
  { name: 'E=8, 16 rows each, K=264, N=200', E: 8, K: 264, N: 200, counts: () => new Array(8).fill(16) },
  { name: 'E=8, one group of 16 rows (M=16)', E: 8, K: 128, N: 256, counts: () => one(8, [5], 16) },
  { name: 'E=3, 7 rows in all, K=24, N=40 (under one tile)', E: 3, K: 24, N: 40, counts: () => [3, 0, 4] },
  { name: 'E=256, 0-3 rows ragged with empty groups', E: 256, K: 128, N: 256, counts: (s) => ragged(256, 3, s) },
  { name: 'E=256, 2 rows each, N=264', E: 256, K: 128, N: 264, counts: () => new Array(256).fill(2) },
  // Split-K: long K over few groups (the down projection's shape at T=1: many splits, the finishing pass).
  { name: 'split-K: K=14336, N=512, 2 groups of 1 row', E: 8, K: 14336, N: 512, counts: () => one(8, [0, 6]) },
  { name: 'split-K: K=4104, N=1032, 7 groups of 1-2 rows', E: 8, K: 4104, N: 1032, counts: () => [1, 2, 0, 1, 1, 2, 1, 1] },
  // Groups over the decode limit (32 rows; 16 when the average is ≤ 4) take the tile kernel in the same call.
  { name: 'hybrid: a 40-row group beside groups of 0-16', E: 8, K: 256, N: 384, counts: () => [3, 40, 0, 5, 16, 1, 0, 12] },
  {
    name: 'hybrid: E=32 of 0-6 rows and a 20-row group (limit 16)',
    E: 32,
    K: 520,
    N: 1032,
    counts: (s) => ragged(32, 6, s).map((c, e) => (e === 9 ? 20 : c)),
  },
];

const tileKernels = [
  { kernels: 'Hopper where it applies', hopper: true },
  { kernels: 'mma.sync', hopper: false },
];

describe.skipIf(!hasGpu).each(tileKernels)('decode grouped GEMM (NN) beside the tile kernels ($kernels)', ({ hopper }) => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
    setKernelOptions(kernelOptionDefaults);
    // skinny off: the one-group forward (the E=1 case) would otherwise take the skinny kernel (test 17).
    setKernelOptions({ groupedGemm: { hopper, skinny: false } });
  });
  afterEach(() => {
    resetKernelOptions();
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });
  const decode = (on: boolean): void => void setKernelOptions({ groupedGemm: { decode: on } });

  it.each(cases)('Store bf16/f32/f32 accumulate and SwiGLU with and without g: $name', { timeout: 300_000 }, (c) => {
    const seed = freshSeed();
    console.info(`[decode gemm] ${c.name}: seed ${seed}`);
    const counts = c.counts(seed);
    const { E, K, N } = c;
    const M = counts.reduce((s, n) => s + n, 0) + 3; // 3 rows outside every group stay poisoned
    const at = `seed ${seed}, counts [${counts.join(',')}]`;
    tidy(() => {
      const [a, ga] = pair([M, K], seed);
      const [b, gb] = pair([E, K, N], seed + 1, 1 / Math.sqrt(K));
      const [off, goff] = offsets(counts);

      for (const outType of ['f32', 'bf16'] as const) {
        const tol = outType === 'f32' ? 1e-4 : 1e-2;
        const ref = poisoned([M, N], outType, cpu);
        groupedGemm('NN', a, b, off, { out: ref });
        decode(true);
        const go = poisoned([M, N], outType, gpu);
        groupedGemm('NN', ga, gb, goff, { out: go });
        expect(relErr(values(go), values(ref)), `Store ${outType} against the CPU, ${at}`).toBeLessThan(tol);
        const again = poisoned([M, N], outType, gpu);
        groupedGemm('NN', ga, gb, goff, { out: again });
        expect(bits(again).equals(bits(go)), `Store ${outType}: a second run gives the same bits, ${at}`).toBe(true);
        decode(false);
        const tile = poisoned([M, N], outType, gpu);
        groupedGemm('NN', ga, gb, goff, { out: tile });
        expect(relErr(values(go), values(tile)), `Store ${outType} against the tile kernel, ${at}`).toBeLessThan(tol);
      }

      // f32 out += product onto random contents.
      const start = tidy(() => Tensor.rand([M, N], { seed: seed + 2, low: -1, high: 1, device: cpu }));
      const cAcc = start.clone(),
        gAcc = start.to(gpu);
      groupedGemm('NN', a, b, off, { out: cAcc, accumulate: true });
      decode(true);
      groupedGemm('NN', ga, gb, goff, { out: gAcc, accumulate: true });
      expect(relErr(floats(gAcc), floats(cAcc)), `accumulate against the CPU, ${at}`).toBeLessThan(1e-4);

      // SwiGLU: h = silu(g1)·g3 over interleaved columns, g saved or not.
      const F = N / 2;
      const ch = poisoned([M, F], 'bf16', cpu),
        cg = poisoned([M, N], 'bf16', cpu);
      groupedGemmEpilogue('NN', Epilogue.SwiGLU, a, b, off, ch, cg);
      const gh = poisoned([M, F], 'bf16', gpu),
        gg = poisoned([M, N], 'bf16', gpu),
        gh2 = poisoned([M, F], 'bf16', gpu);
      groupedGemmEpilogue('NN', Epilogue.SwiGLU, ga, gb, goff, gh, gg);
      groupedGemmEpilogue('NN', Epilogue.SwiGLU, ga, gb, goff, gh2, null);
      expect(relErr(values(gg), values(cg)), `SwiGLU g against the CPU, ${at}`).toBeLessThan(1e-2);
      expect(relErr(values(gh), values(ch)), `SwiGLU h against the CPU, ${at}`).toBeLessThan(1e-2);
      expect(bits(gh2).equals(bits(gh)), `SwiGLU h without g: the same bits as with it, ${at}`).toBe(true);
      decode(false);
      const th = poisoned([M, F], 'bf16', gpu),
        tg = poisoned([M, N], 'bf16', gpu);
      groupedGemmEpilogue('NN', Epilogue.SwiGLU, ga, gb, goff, th, tg);
      expect(relErr(values(gh), values(th)), `SwiGLU h against the tile kernel, ${at}`).toBeLessThan(1e-2);
      expect(relErr(values(gg), values(tg)), `SwiGLU g against the tile kernel, ${at}`).toBeLessThan(1e-2);
    });
  });

  it('the switch reaches the kernel: on a long K the decode result differs in rounding from the tile kernel', () => {
    const seed = freshSeed();
    console.info(`[decode gemm] switch check: seed ${seed}`);
    tidy(() => {
      const [, ga] = pair([2, 14336], seed);
      const [, gb] = pair([8, 14336, 512], seed + 1, 1 / 64);
      const [, goff] = offsets(one(8, [2, 5]));
      decode(true);
      const on = poisoned([2, 512], 'f32', gpu);
      groupedGemm('NN', ga, gb, goff, { out: on });
      decode(false);
      const off = poisoned([2, 512], 'f32', gpu);
      groupedGemm('NN', ga, gb, goff, { out: off });
      // Another summation order (split-K partials, 16-k MMA steps): equal within f32 rounding, not bit
      // for bit. Two orders of K = 14336 f32 sums differ by about √K·2⁻²⁴ ≈ 7e-6 of the result, a few
      // times that where partial sums cancel (1.5e-5 and 1.6e-5 measured on the H200, cf38d04), at
      // most K·2⁻²⁴ ≈ 8.5e-4 of the terms' magnitude; an indexing mistake gives O(1).
      expect(relErr(floats(on), floats(off)), `seed ${seed}`).toBeLessThan(2e-4);
      expect(bits(on).equals(bits(off)), `seed ${seed}: the same bits would mean the decode kernel did not run`).toBe(false);
    });
  });

  it('a CUDA graph of the decode step (SwiGLU up, Store down) replays the eager result bit for bit', () => {
    const seed = freshSeed();
    console.info(`[decode gemm] graph: seed ${seed}`);
    decode(true);
    const base = memoryStats(gpu);
    {
      using stream = new Stream(gpu);
      const E = 8,
        H = 256,
        F = 1024;
      using x = tidy(() => Tensor.rand([2, H], { seed, low: -1, high: 1, device: gpu }).cast('bf16'));
      using w13 = tidy(() => Tensor.rand([E, H, 2 * F], { seed: seed + 1, low: -0.06, high: 0.06, device: gpu }).cast('bf16'));
      using w2 = tidy(() => Tensor.rand([E, F, H], { seed: seed + 2, low: -0.03, high: 0.03, device: gpu }).cast('bf16'));
      using off = Tensor.fromArray([0, 0, 1, 1, 1, 2, 2, 2, 2], { dtype: 'i32', device: gpu });
      const f = (): Tensor =>
        tidy(() => {
          const h = Tensor.empty([2, F], { dtype: 'bf16', device: gpu });
          groupedGemmEpilogue('NN', Epilogue.SwiGLU, x, w13, off, h, null);
          return groupedGemm('NN', h, w2, off);
        });
      using ref = f();
      const graph = CudaGraph.capture(stream, f, { retain: [x, w13, w2, off] });
      graph.replay();
      expect(bits(graph.outputs).equals(bits(ref)), `seed ${seed}: replay against eager`).toBe(true);
      tidy(() => x.copy_(Tensor.rand([2, H], { seed: seed + 3, low: -1, high: 1, device: gpu }).cast('bf16')));
      graph.replay();
      using eager = f();
      expect(bits(graph.outputs).equals(bits(eager)), `seed ${seed}: replay with a new x against eager`).toBe(true);
      const y = graph.outputs;
      graph.dispose();
      y.dispose();
    }
    synchronize(gpu);
    expect(memoryStats(gpu).liveBytes).toBe(base.liveBytes);
  });
});
