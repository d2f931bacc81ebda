// Shared test helpers: independent float64 oracles and comparison by relative norm.
import { expect } from 'vitest';

import { type DType, type DeviceLike, InvalidArgumentError, memoryStats, type MoELayer, Tensor } from '../lib/index.js';

/** ‖out − ref‖ / ‖ref‖ (or ‖out‖ when ref is all zeros). NaN anywhere gives Infinity. */
export function relErr(out: ArrayLike<number>, ref: ArrayLike<number>): number {
  if (out.length !== ref.length) throw new Error(`length ${out.length} vs ${ref.length}`);
  let num = 0;
  let den = 0;
  for (let i = 0; i < out.length; i++) {
    const o = out[i] as number;
    const r = ref[i] as number;
    if (Number.isNaN(o) !== Number.isNaN(r)) return Infinity;
    if (Number.isNaN(o)) continue;
    num += (o - r) ** 2;
    den += r * r;
  }
  return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
}

/** Relative-norm tolerance for results stored in a dtype. */
export const tolerance: Record<DType, number> = { f32: 1e-5, bf16: 1e-2, f16: 2e-3, fp8e4m3: 1e-1, i32: 0, i64: 0, u8: 0 };

/** A tensor of `dtype` filled with NaN (floats) or an unlikely integer, so unwritten outputs show. */
export function poisoned(shape: readonly number[], dtype: DType, device: DeviceLike): Tensor {
  const floating = dtype === 'f32' || dtype === 'bf16' || dtype === 'f16' || dtype === 'fp8e4m3';
  return Tensor.full(shape, floating ? NaN : dtype === 'u8' ? 173 : -123456, { dtype, device });
}

/** A fresh random seed per call, logged on failure through the test name. */
let seedCounter = Date.now() % 1_000_000;
export function freshSeed(): number {
  return seedCounter++;
}

/** Runs fn and checks that live bytes on `device` are back at their starting value afterwards. */
export function expectNoLeak(device: DeviceLike, fn: () => void): void {
  const before = memoryStats(device).liveBytes;
  fn();
  const after = memoryStats(device).liveBytes;
  if (after !== before) throw new Error(`live bytes on ${String(device)} went from ${before} to ${after}`);
}

/** Calls fn, which must throw an InvalidArgumentError whose message matches every pattern. */
export function expectInvalidArgument(fn: () => unknown, ...patterns: RegExp[]): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err, patterns.join(' ')).toBeInstanceOf(InvalidArgumentError);
  for (const pattern of patterns) expect((err as Error).message).toMatch(pattern);
}

/** Decodes bf16 bits in float64 (independent of the addon). */
export function bf16ToNumber(bits: number): number {
  const f = new Float32Array(new Uint32Array([bits << 16]).buffer);
  return f[0] as number;
}

/** Decodes IEEE half bits in float64. */
export function f16ToNumber(bits: number): number {
  const s = bits & 0x8000 ? -1 : 1;
  const e = (bits >> 10) & 0x1f;
  const m = bits & 0x3ff;
  if (e === 0x1f) return m ? NaN : s * Infinity;
  if (e === 0) return s * m * 2 ** -24;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/** Decodes OCP fp8 e4m3fn bits in float64. */
export function fp8ToNumber(bits: number): number {
  const s = bits & 0x80 ? -1 : 1;
  const e = (bits >> 3) & 0xf;
  const m = bits & 0x7;
  if (e === 0xf && m === 0x7) return NaN;
  if (e === 0) return s * m * 2 ** -9;
  return s * (1 + m / 8) * 2 ** (e - 7);
}

/** Rounds a float64 to float32, the precision the addon's f32 results carry. */
export const f32 = Math.fround;

/** Row-major values as a Float32Array (for tensors too large for a plain array). */
export function floats(t: Tensor): Float32Array {
  return t.toFloat32Array();
}

/** Row-major values of a tensor as plain numbers. */
export function values(t: Tensor): number[] {
  return Array.from(t.toFloat32Array());
}

/** mulberry32: a small seeded generator for routing decisions in tests. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** The weight gradients' names in MoELayer.backward's result (and its `out`). */
export const MOE_WEIGHT_GRADS = ['router', 'w13', 'w2', 'sharedW13', 'sharedW2', 'sharedGate', 'routerBias', 'w13Bias', 'w2Bias'] as const;

/**
 * Fresh backwards of `layer` over the batches: each weight gradient summed on the host in float64
 * (by name), and each batch's dx. The reference for gradient accumulation.
 */
export function freshGradientSums(
  layer: MoELayer,
  batches: readonly { x: Tensor; dy: Tensor }[],
): { sums: Map<string, number[]>; dx: number[][] } {
  const sums = new Map<string, number[]>();
  const dx: number[][] = [];
  for (const { x, dy } of batches) {
    const g = layer.backward(layer.forward(x), dy);
    dx.push(values(g.dx));
    for (const k of MOE_WEIGHT_GRADS) {
      const t = g[k];
      if (!t) continue;
      const v = values(t);
      const acc = sums.get(k) ?? new Array<number>(v.length).fill(0);
      sums.set(
        k,
        acc.map((a, i) => a + (v[i] as number)),
      );
    }
    for (const t of Object.values(g)) t?.dispose();
  }
  return { sums, dx };
}
