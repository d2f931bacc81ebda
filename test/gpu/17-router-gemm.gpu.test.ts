// The router's logits product x[T,H]·Wr[H,E] on the skinny grouped GEMM (native/ops/moe/grouped_gemm/
// skinny.cu; groupedGemm.skinny): the forward (NN) with one group and N ≤ 256 columns, bf16 operands,
// f32 or bf16 out. Against the CPU reference, outputs poisoned (NaN) first, fresh random inputs with
// the seed printed and in every message, the switch on and off, on M ∈ {1, 7, 64, 128, 300, 4096},
// K ∈ {4096, 7168, 4120 = 8·515} and N ∈ {8, 32, 64, 256} (plus narrow and ragged ones: N = 16, 48,
// 200, K < 32, a group that ends before the last row). Three checks:
// - exact: integer-valued inputs (|a|, |b| ≤ 4, so every partial sum is an integer below
//   K·16 ≤ 114 688 < 2^24) make every summation order exact in fp32, rounding or truncating: the GPU
//   must give the CPU reference's values, f32 and bf16 (both round the exact sum to nearest even). Any
//   indexing mistake (a k, a column or a token out of place, a chunk or a split missed or counted
//   twice) shows here.
// - rounding: random real inputs within a bound derived from fp32 summation (below, `bound`), and a
//   second run gives the same bits (the split sums are added in a fixed order).
// - the switch reaches the kernel (on and off differ in rounding on a long K), accumulate onto f32
//   contents, and a captured CUDA graph (the serving path) replays the eager bits.
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
import { groupedGemm } from '../../lib/moe/grouped-gemm.js';
import { floats, freshSeed, poisoned, rng } from '../helpers.js';
import { hasGpu } from './gpu.js';
import { offsets, pair } from './grouped-gemm-inputs.js';

const gpu = 'cuda:0' as const;
const cpu = 'cpu' as const;
const bits = (t: Tensor): Buffer => Buffer.from((t.toArray() as Uint16Array | Float32Array).buffer);
const skinny = (on: boolean): void => void setKernelOptions({ groupedGemm: { skinny: on } });

interface Case {
  name: string;
  M: number;
  K: number;
  N: number;
  rows?: number; // the group's rows (default M); rows past it must stay poisoned
}
const KODD = 8 * 515; // K a multiple of 8, not of 32 (the last chunk partly past K) nor of 64
const grid: [number, number[]][] = [
  [1, [4096, 7168, KODD, KODD]],
  [7, [7168, 4096, KODD, 4096]],
  [64, [4096, 7168, KODD, 7168]],
  [128, [KODD, 4096, 7168, 7168]],
  [300, [7168, KODD, 4096, KODD]],
  [4096, [4096, 7168, KODD, KODD]],
];
const cases: Case[] = [
  ...grid.flatMap(([M, Ks]) => [8, 32, 64, 256].map((N, i) => ({ name: `M=${M}, K=${Ks[i]}, N=${N}`, M, K: Ks[i] as number, N }))),
  { name: 'Mixtral serving T=256 (K=4096, N=8)', M: 256, K: 4096, N: 8 },
  { name: 'N=16, K=264', M: 9, K: 264, N: 16 },
  { name: 'N=48, K=520', M: 33, K: 520, N: 48 },
  { name: 'N=200 (a part band), K=1032', M: 130, K: 1032, N: 200 },
  { name: 'K=24 (under one chunk), N=16', M: 37, K: 24, N: 16 },
  { name: 'K=8, N=8, one row', M: 1, K: 8, N: 8 },
  { name: 'group of 61 of 64 rows, K=4096, N=8', M: 64, K: 4096, N: 8, rows: 61 },
  { name: 'group of 290 of 300 rows, K=4120, N=64', M: 300, K: KODD, N: 64, rows: 290 },
];

/** Integer-valued bf16 in [-lim, lim] from `seed` (raw bits: small integers are exact in bf16): [CPU, cuda:0]. */
function integers(shape: number[], seed: number, lim = 4): [Tensor, Tensor] {
  const r = rng(seed);
  const n = shape.reduce((p, d) => p * d, 1);
  const raw = new Uint16Array(n);
  const word = new Float32Array(1);
  const asBits = new Uint32Array(word.buffer);
  for (let i = 0; i < n; i++) {
    word[0] = Math.floor(r() * (2 * lim + 1)) - lim;
    raw[i] = (asBits[0] as number) >>> 16;
  }
  const c = Tensor.fromArray(raw, { dtype: 'bf16', shape, device: cpu });
  return [c, c.to(gpu)];
}

/** |t| of a bf16 CPU tensor (the sign bit cleared). */
function abs(t: Tensor): Tensor {
  const raw = (t.toArray() as Uint16Array).map((v) => v & 0x7fff);
  return Tensor.fromArray(raw, { dtype: 'bf16', shape: t.shape, device: cpu });
}

/**
 * The largest |gpu − ref| an element may show, from fp32 summation. Each product of two bf16 values
 * is exact in fp32 (8 + 8 significant bits ≤ 24); a sum of K terms in any order, each addition
 * rounded to nearest, errs by at most (K−1)·u·S, u = 2^-24, S = Σ_k |a_k||b_k|. Tensor cores may
 * truncate inside an MMA instead of rounding (up to 2u per addition): the GPU's sum errs by at most
 * 2(K−1)·u·S and the CPU reference's by (K−1)·u·S, so the two differ by at most 3(K−1)·u·S (S is
 * itself computed in fp32, to within (K−1)·u of itself: the factor 1 + K·u). bf16 results: each side
 * then rounds to bf16, 8 significant bits, so by up to half a unit in the last place: relative 2^-8
 * (not 2^-9, which this bound said until an H200 run at 73d9b7a, seed 823205, had the two sides an
 * ulp apart, 1.109375 against 1.1171875, fp32 values astride a rounding midpoint). That adds
 * 2^-8·(|gpu| + |ref|)/(1 − 2^-8) ≤ 2^-7·1.004·max.
 */
function bound(K: number, S: number, out: 'f32' | 'bf16', gpuValue: number, refValue: number): number {
  const u = 2 ** -24;
  const sum = 3 * (K - 1) * u * S * (1 + K * u);
  return out === 'f32' ? sum : sum + 2 ** -7 * 1.004 * Math.max(Math.abs(gpuValue), Math.abs(refValue));
}

/** The first element that differs from the reference (NaN, unwritten, matching NaN), or null. */
function firstDifferent(got: Float32Array, ref: Float32Array): string | null {
  for (let i = 0; i < ref.length; i++) {
    const g = got[i] as number,
      r = ref[i] as number;
    if (g !== r && !(Number.isNaN(g) && Number.isNaN(r))) return `element ${i}: ${g} against ${r}`;
  }
  return null;
}

/** The first element outside the bound (or NaN where the reference has a number), or null. */
function firstOutside(got: Float32Array, ref: Float32Array, S: Float32Array, K: number, out: 'f32' | 'bf16'): string | null {
  for (let i = 0; i < ref.length; i++) {
    const g = got[i] as number,
      r = ref[i] as number;
    if (Number.isNaN(r)) {
      if (!Number.isNaN(g)) return `element ${i}: written (${g}) where the reference left it unwritten`;
      continue;
    }
    const b = bound(K, S[i] as number, out, g, r);
    if (!(Math.abs(g - r) <= b)) return `element ${i}: ${g} against ${r} (|diff| ${Math.abs(g - r)}, bound ${b})`;
  }
  return null;
}

describe.skipIf(!hasGpu)('router logits on the skinny grouped GEMM (NN, one group, N ≤ 256)', () => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
    setKernelOptions(kernelOptionDefaults);
  });
  afterEach(() => {
    resetKernelOptions();
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  it.each(cases)('exact on integer inputs, skinny on and off, f32 and bf16 out: $name', { timeout: 300_000 }, (c) => {
    const seed = freshSeed();
    console.info(`[router gemm] exact ${c.name}: seed ${seed}`);
    const { M, K, N } = c;
    const at = `seed ${seed}, ${c.name}`;
    tidy(() => {
      const [a, ga] = integers([M, K], seed);
      const [b, gb] = integers([1, K, N], seed + 1);
      const [off, goff] = offsets([c.rows ?? M]);
      for (const out of ['f32', 'bf16'] as const) {
        const ref = poisoned([M, N], out, cpu);
        groupedGemm('NN', a, b, off, { out: ref });
        for (const on of [true, false]) {
          skinny(on);
          const got = poisoned([M, N], out, gpu);
          groupedGemm('NN', ga, gb, goff, { out: got });
          // Values, not bits: rows outside the group hold NaN, whose bits the CPU and GPU fills may spell differently.
          expect(
            firstDifferent(floats(got), floats(ref)),
            `${out} out, skinny ${on ? 'on' : 'off'}: the reference's values, ${at}`,
          ).toBeNull();
        }
      }
    });
  });

  it.each(cases)('random inputs within the fp32 summation bound, the same bits twice: $name', { timeout: 300_000 }, (c) => {
    const seed = freshSeed();
    console.info(`[router gemm] rounding ${c.name}: seed ${seed}`);
    const { M, K, N } = c;
    const at = `seed ${seed}, ${c.name}`;
    tidy(() => {
      const [a, ga] = pair([M, K], seed);
      const [b, gb] = pair([1, K, N], seed + 1, 1 / Math.sqrt(K));
      const [off, goff] = offsets([c.rows ?? M]);
      const S = floats(groupedGemm('NN', abs(a), abs(b), off, { out: poisoned([M, N], 'f32', cpu) }));
      for (const out of ['f32', 'bf16'] as const) {
        const ref = poisoned([M, N], out, cpu);
        groupedGemm('NN', a, b, off, { out: ref });
        for (const on of [true, false]) {
          skinny(on);
          const got = poisoned([M, N], out, gpu);
          groupedGemm('NN', ga, gb, goff, { out: got });
          const outside = firstOutside(floats(got), floats(ref), S, K, out);
          expect(outside, `${out} out, skinny ${on ? 'on' : 'off'} against the CPU, ${at}`).toBeNull();
          const again = poisoned([M, N], out, gpu);
          groupedGemm('NN', ga, gb, goff, { out: again });
          expect(bits(again).equals(bits(got)), `${out} out, skinny ${on ? 'on' : 'off'}: a second run gives the same bits, ${at}`).toBe(
            true,
          );
        }
      }
    });
  });

  // Both paths that add onto `out` (skinny.cu's plan, make_plan, on a 132-SM H200): the first two
  // shapes plan to several splits (8 and 2), so the finishing pass adds (store_out with 8 columns per
  // thread); the last two to one split, so the main kernel adds as it stores (store_out with CPL
  // columns per lane: 2 at N = 8, 4 at N = 32). One split because the chunks (K/32: 16 and 8) give
  // no warp a full batch of loads with more (most_splits: chunks / (4 warps · unroll) = 16 / (4·4)
  // and 8 / (4·2) = 1), whatever the SM count from 5 SMs up. M = 100: the last 8-row tile is partial.
  it('accumulate: f32 out += x·Wr onto random contents (split-K and single-split shapes)', () => {
    const seed = freshSeed();
    console.info(`[router gemm] accumulate: seed ${seed}`);
    for (const [M, K, N] of [
      [64, 4096, 8], // many splits: the finishing pass adds
      [4096, 512, 32], // few chunks per row block (2 splits)
      [100, 512, 8], // one split: the main kernel adds, 2 columns per lane
      [100, 256, 32], // one split: the main kernel adds, 4 columns per lane
    ] as const) {
      const at = `seed ${seed}, M=${M}, K=${K}, N=${N}`;
      tidy(() => {
        const [a, ga] = integers([M, K], seed);
        const [b, gb] = integers([1, K, N], seed + 1);
        const [off, goff] = offsets([M]);
        // Integer-valued start (|start| ≤ 2^10): start + exact sum stays an exact integer in fp32.
        const start = tidy(() => Tensor.rand([M, N], { seed: seed + 2, low: -1024, high: 1024, device: cpu }));
        const startInt = Tensor.fromArray(
          Array.from(floats(start), (v) => Math.round(v)),
          { dtype: 'f32', shape: [M, N], device: cpu },
        );
        const ref = startInt.clone();
        groupedGemm('NN', a, b, off, { out: ref, accumulate: true });
        skinny(true);
        const got = startInt.to(gpu);
        groupedGemm('NN', ga, gb, goff, { out: got, accumulate: true });
        expect(bits(got).equals(bits(ref)), `accumulate: the reference's bits, ${at}`).toBe(true);
      });
    }
  });

  it('the switch reaches the kernel: on a long K the skinny result differs in rounding from the tile kernel', () => {
    const seed = freshSeed();
    console.info(`[router gemm] switch check: seed ${seed}`);
    for (const [M, K, N] of [
      [64, 4096, 8],
      [128, 7168, 256],
      [4096, 7168, 32],
    ] as const) {
      const at = `seed ${seed}, M=${M}, K=${K}, N=${N}`;
      tidy(() => {
        const [, ga] = pair([M, K], seed);
        const [, gb] = pair([1, K, N], seed + 1, 1 / Math.sqrt(K));
        const [, goff] = offsets([M]);
        skinny(true);
        const on = poisoned([M, N], 'f32', gpu);
        groupedGemm('NN', ga, gb, goff, { out: on });
        skinny(false);
        const off = poisoned([M, N], 'f32', gpu);
        groupedGemm('NN', ga, gb, goff, { out: off });
        // Another summation order (split-K partials, chunks of 32 k in a permuted order): the same
        // bits everywhere would mean the skinny kernel did not run.
        expect(bits(on).equals(bits(off)), `${at}: on and off give the same bits`).toBe(false);
      });
    }
  });

  it('a CUDA graph of the router product (f32 logits into a preallocated out) replays the eager bits', () => {
    const seed = freshSeed();
    console.info(`[router gemm] graph: seed ${seed}`);
    skinny(true);
    const base = memoryStats(gpu);
    {
      using stream = new Stream(gpu);
      const T = 64,
        H = 4096,
        E = 8;
      using x = tidy(() => Tensor.rand([T, H], { seed, low: -1, high: 1, device: gpu }).cast('bf16'));
      using wr = tidy(() => Tensor.rand([1, H, E], { seed: seed + 1, low: -1 / 64, high: 1 / 64, device: gpu }).cast('bf16'));
      using all = Tensor.fromArray([0, T], { dtype: 'i32', device: gpu });
      using logits = Tensor.full([T, E], NaN, { dtype: 'f32', device: gpu });
      using eager = Tensor.full([T, E], NaN, { dtype: 'f32', device: gpu });
      const f = (): void => void groupedGemm('NN', x, wr, all, { out: logits });
      groupedGemm('NN', x, wr, all, { out: eager });
      const graph = CudaGraph.capture(stream, f, { retain: [x, wr, all, logits] });
      graph.replay();
      synchronize(gpu);
      expect(bits(logits).equals(bits(eager)), `seed ${seed}: replay against eager`).toBe(true);
      tidy(() => x.copy_(Tensor.rand([T, H], { seed: seed + 3, low: -1, high: 1, device: gpu }).cast('bf16')));
      graph.replay();
      synchronize(gpu);
      groupedGemm('NN', x, wr, all, { out: eager });
      expect(bits(logits).equals(bits(eager)), `seed ${seed}: replay with a new x against eager`).toBe(true);
      graph.dispose();
    }
    synchronize(gpu);
    expect(memoryStats(gpu).liveBytes).toBe(base.liveBytes);
  });
});
