// Capacity, permute, unpermute and their backward on CUDA against the CPU reference, on fresh
// random routing and activations, every output poisoned first; live device bytes back at baseline.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import {
  capacity,
  type CapacityResult,
  type DeviceLike,
  type DropPolicy,
  memoryStats,
  permute,
  permuteBackward,
  type PermuteResult,
  Tensor,
  unpermute,
  unpermuteBackward,
} from '../../lib/index.js';
import { native } from '../../lib/native.js';
import { freshSeed, poisoned, relErr, rng } from '../helpers.js';
import { hasGpu } from './gpu.js';

const gpu = 'cuda:0' as const;
const cpu = 'cpu' as const;

/** k distinct experts per token among the first `used`; weights from `levels` values (ties happen). */
function routing(T: number, k: number, used: number, seed: number, levels = 7): { idx: Int32Array; w: Float32Array } {
  const r = rng(seed);
  const idx = new Int32Array(T * k);
  const w = new Float32Array(T * k);
  const pool = Array.from({ length: used }, (_, i) => i);
  for (let t = 0; t < T; t++) {
    for (let j = 0; j < k; j++) {
      const p = j + Math.floor(r() * (used - j));
      [pool[j], pool[p]] = [pool[p] as number, pool[j] as number];
      idx[t * k + j] = pool[j] as number;
      w[t * k + j] = Math.fround((1 + Math.floor(r() * levels)) / (levels + 1));
    }
  }
  return { idx, w };
}

const bytes = (t: Tensor): Buffer => {
  const a = t.toArray() as ArrayBufferView;
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
};
const same = (a: Tensor, b: Tensor): boolean => bytes(a).equals(bytes(b));
function disposeAll(o: object): void {
  for (const v of Object.values(o)) if (v instanceof Tensor) v.dispose();
}

function poisonedCapacity(T: number, k: number, E: number, device: DeviceLike) {
  return {
    slot: poisoned([T, k], 'i32', device),
    keptPerExpert: poisoned([E], 'i32', device),
    dropped: poisoned([1], 'i32', device),
    invalid: poisoned([1], 'i32', device),
  };
}

function poisonedPermute(T: number, k: number, E: number, R: number, H: number, dtype: 'f32' | 'bf16', device: DeviceLike) {
  return {
    rows: poisoned([R, H], dtype, device),
    offsets: poisoned([E + 1], 'i32', device),
    rowOf: poisoned([T, k], 'i32', device),
    rowWeight: poisoned([R], 'f32', device),
    rowToken: poisoned([R], 'i32', device),
    invalid: poisoned([1], 'i32', device),
  };
}

interface Case {
  name: string;
  T: number;
  k: number;
  E: number;
  used: number;
  H: number;
  dtype: 'f32' | 'bf16';
  cf?: number;
  policy: DropPolicy;
  align: number;
  pad: boolean;
}

const cases: Case[] = [
  {
    name: 'DeepSeek-like T·k=32768 H=7168',
    T: 4096,
    k: 8,
    E: 256,
    used: 256,
    H: 7168,
    dtype: 'bf16',
    cf: 1.25,
    policy: 'probs',
    align: 128,
    pad: true,
  },
  { name: 'dropless T·k=32768 H=4096', T: 16384, k: 2, E: 8, used: 8, H: 4096, dtype: 'bf16', policy: 'probs', align: 128, pad: false },
  { name: 'E=1, H=300', T: 999, k: 1, E: 1, used: 1, H: 300, dtype: 'bf16', policy: 'position', align: 1, pad: false },
  { name: 'k=E, position', T: 777, k: 4, E: 4, used: 4, H: 300, dtype: 'bf16', cf: 0.5, policy: 'position', align: 16, pad: true },
  {
    name: 'idle experts, f32, unpadded',
    T: 1531,
    k: 2,
    E: 16,
    used: 10,
    H: 300,
    dtype: 'f32',
    cf: 1.0,
    policy: 'probs',
    align: 1,
    pad: false,
  },
  {
    name: 'probs with heavy drops, odd H',
    T: 2049,
    k: 6,
    E: 64,
    used: 40,
    H: 301,
    dtype: 'bf16',
    cf: 0.3,
    policy: 'probs',
    align: 8,
    pad: true,
  },
  {
    name: 'E=12 (not a power of two), T·k=3000, 17 16-byte vectors per row',
    T: 1000,
    k: 3,
    E: 12,
    used: 12,
    H: 136,
    dtype: 'bf16',
    cf: 1.1,
    policy: 'probs',
    align: 4,
    pad: true,
  },
  {
    name: 'padded to capacity with idle experts (whole segments of padding), E=48',
    T: 2001,
    k: 4,
    E: 48,
    used: 30,
    H: 520,
    dtype: 'bf16',
    cf: 1.5,
    policy: 'position',
    align: 32,
    pad: true,
  },
  // The backward loads a token's rows 8 assignments at a time: k = 20 is two full tiles and a partial one.
  {
    name: 'k=20 (three backward tiles), padded',
    T: 500,
    k: 20,
    E: 32,
    used: 32,
    H: 264,
    dtype: 'bf16',
    cf: 1.0,
    policy: 'probs',
    align: 8,
    pad: true,
  },
  { name: 'T·k=32767 (odd), f32, 8-byte rows', T: 32767, k: 1, E: 7, used: 7, H: 2, dtype: 'f32', policy: 'probs', align: 1, pad: false },
  // Serving-step shapes: capacity's single-block path, the one-launch layout (n ≤ 1024, R ≤ 8192),
  // unpermute with each token's columns over several blocks.
  {
    name: 'Mixtral decode T=64 k=2 E=8, dropless, H=4096',
    T: 64,
    k: 2,
    E: 8,
    used: 8,
    H: 4096,
    dtype: 'bf16',
    policy: 'probs',
    align: 1,
    pad: false,
  },
  {
    name: 'DeepSeek-V3 decode T=128 k=8 E=256, position cf=1, padded, H=7168',
    T: 128,
    k: 8,
    E: 256,
    used: 256,
    H: 7168,
    dtype: 'bf16',
    cf: 1.0,
    policy: 'position',
    align: 8,
    pad: true,
  },
  // n = 1024 but R = 256·64 = 16384 rows: the layout's grid of blocks after capacity's single block.
  {
    name: 'n=1024 with R=16384 (padding rows)',
    T: 128,
    k: 8,
    E: 256,
    used: 256,
    H: 64,
    dtype: 'f32',
    cf: 1.0,
    policy: 'position',
    align: 64,
    pad: true,
  },
];

describe.skipIf(!hasGpu)('capacity and permute on CUDA against the CPU reference', () => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
  });
  afterEach(() => {
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  it.each(cases)('$name', (c) => {
    const { T, k, E, H, dtype, align, pad } = c;
    const ro = routing(T, k, c.used, freshSeed());
    using iC = Tensor.fromArray(ro.idx, { dtype: 'i32', shape: [T, k], device: cpu });
    using wC = Tensor.fromArray(ro.w, { dtype: 'f32', shape: [T, k], device: cpu });
    using iG = iC.to(gpu);
    using wG = wC.to(gpu);
    const opts = (device: DeviceLike) => ({
      numExperts: E,
      dropPolicy: c.policy,
      out: poisonedCapacity(T, k, E, device),
      ...(c.cf === undefined ? {} : { capacityFactor: c.cf }),
    });
    const capC: CapacityResult = capacity(iC, wC, opts(cpu));
    const capG: CapacityResult = capacity(iG, wG, opts(gpu));
    for (const key of ['slot', 'keptPerExpert', 'dropped', 'invalid'] as const) expect(same(capG[key], capC[key]), key).toBe(true);
    if (c.cf !== undefined && c.cf < 1) expect(capC.dropped.item()).toBeGreaterThan(0);

    using f = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
    using xC = f.cast(dtype);
    using xG = xC.to(gpu);
    const R = c.pad ? E * Math.ceil((capC.capacity as number) / align) * align : -1;
    const pC: PermuteResult = permute(xC, iC, wC, capC, { align, padToCapacity: pad });
    const Rn = pC.numRows;
    if (R >= 0) expect(Rn).toBe(R);
    const pG: PermuteResult = permute(xG, iG, wG, capG, { align, padToCapacity: pad, out: poisonedPermute(T, k, E, Rn, H, dtype, gpu) });
    for (const key of ['offsets', 'rowOf', 'rowWeight', 'rowToken', 'rows'] as const) expect(same(pG[key], pC[key]), key).toBe(true);
    expect(pG.invalid.item()).toBe(0);
    // permute() copies in token order (rowOf); the gather by rowToken alone gives the same rows.
    using gathered = poisoned([Rn, H], dtype, gpu);
    native().permuteRows(xG.handle, pG.rowToken.handle, gathered.handle);
    expect(same(gathered, pC.rows), 'rows by the gather').toBe(true);

    // unpermute into both dtypes.
    for (const ydt of ['f32', 'bf16'] as const) {
      using yC = unpermute(pC.rows, pC.rowOf, wC, { dtype: ydt });
      using yG = poisoned([T, H], ydt, gpu);
      unpermute(pG.rows, pG.rowOf, wG, { out: yG });
      expect(relErr(yG.toFloat32Array(), yC.toFloat32Array()), `unpermute -> ${ydt}`).toBeLessThan(ydt === 'f32' ? 1e-6 : 4e-3);
    }

    // Backward: dy random; dRows, dWeights and dx.
    using gdy = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
    using dyC = gdy.cast(dtype);
    using dyG = dyC.to(gpu);
    const gC = unpermuteBackward(dyC, pC.rows, wC, pC.rowOf, pC.rowToken);
    const gG = unpermuteBackward(dyG, pG.rows, wG, pG.rowOf, pG.rowToken, {
      out: { dRows: poisoned([Rn, H], dtype, gpu), dWeights: poisoned([T, k], 'f32', gpu) },
    });
    expect(relErr(gG.dRows.toFloat32Array(), gC.dRows.toFloat32Array()), 'dRows').toBeLessThan(dtype === 'f32' ? 1e-6 : 4e-3);
    expect(relErr(gG.dWeights.toFloat32Array(), gC.dWeights.toFloat32Array()), 'dWeights').toBeLessThan(1e-4);
    using dxC = permuteBackward(gC.dRows, pC.rowOf, { dtype: 'f32' });
    using dxG = poisoned([T, H], 'f32', gpu);
    permuteBackward(gG.dRows, pG.rowOf, { out: dxG });
    expect(relErr(dxG.toFloat32Array(), dxC.toFloat32Array()), 'dx').toBeLessThan(1e-5);
    // dx + add in the same pass (the layer's router dx), in f32 and in the rows' dtype.
    for (const dxdt of ['f32', dtype] as const) {
      const seed = freshSeed();
      using addF = Tensor.randn([T, H], { seed, device: cpu });
      using addC = addF.cast(dxdt);
      using addG = addC.to(gpu);
      using dxAddC = permuteBackward(gC.dRows, pC.rowOf, { dtype: dxdt, add: addC });
      using dxAddG = poisoned([T, H], dxdt, gpu);
      permuteBackward(gG.dRows, pG.rowOf, { out: dxAddG, add: addG });
      expect(relErr(dxAddG.toFloat32Array(), dxAddC.toFloat32Array()), `dx + add -> ${dxdt}, seed ${seed}`).toBeLessThan(
        dxdt === 'f32' ? 1e-5 : 4e-3,
      );
    }

    for (const o of [capC, capG, pC, pG, gC, gG]) disposeAll(o);
  });

  it('out-of-range expert ids are skipped and counted, not read', () => {
    const T = 300;
    const k = 2;
    const E = 8;
    const ro = routing(T, k, E, freshSeed());
    ro.idx[5] = 8;
    ro.idx[17] = -3;
    ro.idx[400] = 1 << 20;
    using iG = Tensor.fromArray(ro.idx, { dtype: 'i32', shape: [T, k], device: gpu });
    using wG = Tensor.fromArray(ro.w, { dtype: 'f32', shape: [T, k], device: gpu });
    for (const policy of ['probs', 'position'] as const) {
      const cap = capacity(iG, wG, { numExperts: E, capacityFactor: 1, dropPolicy: policy, out: poisonedCapacity(T, k, E, gpu) });
      expect(cap.invalid.item(), policy).toBe(3);
      const slot = cap.slot.toArray() as Int32Array;
      expect([slot[5], slot[17], slot[400]], policy).toEqual([-1, -1, -1]);
      const kept = Array.from(cap.keptPerExpert.toArray() as Int32Array);
      expect(kept.reduce((a, b) => a + b, 0) + cap.dropped.item() + 3, policy).toBe(T * k);
      disposeAll(cap);
    }
  });

  it('a slot used twice is skipped and counted, and the gap it leaves is padding (token -1, weight 0, zero row)', () => {
    const T = 40;
    const k = 2;
    const E = 4;
    const seed = freshSeed();
    const ro = routing(T, k, E, seed);
    using iG = Tensor.fromArray(ro.idx, { dtype: 'i32', shape: [T, k], device: gpu });
    using wG = Tensor.fromArray(ro.w, { dtype: 'f32', shape: [T, k], device: gpu });
    const cap = capacity(iG, wG, { numExperts: E });
    // Two assignments of one expert given the same slot: the later one's slot repeats the earlier's.
    const slot = Array.from(cap.slot.toArray() as Int32Array);
    const e0 = ro.idx[0] as number;
    const twin = ro.idx.findIndex((e, i) => i > 0 && e === e0);
    expect(twin, `seed ${seed}: a second assignment of expert ${e0}`).toBeGreaterThan(0);
    const gap = slot[twin] as number;
    slot[twin] = slot[0] as number;
    using slotG = Tensor.fromArray(slot, { dtype: 'i32', shape: [T, k], device: gpu });
    const kept = Array.from(cap.keptPerExpert.toArray() as Int32Array);
    const R = kept.reduce((a, b) => a + b, 0);
    using x = Tensor.randn([T, 8], { seed, device: gpu });
    const p = permute(x, iG, wG, { ...cap, slot: slotG }, { out: poisonedPermute(T, k, E, R, 8, 'f32', gpu) });
    expect(p.invalid.item(), `seed ${seed}`).toBe(1);
    const rowOf = p.rowOf.toArray() as Int32Array;
    // Which of the two claims the row is a race; exactly one does.
    expect([rowOf[0], rowOf[twin]].filter((r) => r === -1).length, `seed ${seed}: one claimant is dropped`).toBe(1);
    const offsets = p.offsets.toArray() as Int32Array;
    const gapRow = (offsets[e0] as number) + gap;
    expect((p.rowToken.toArray() as Int32Array)[gapRow], `seed ${seed}: the gap's token`).toBe(-1);
    expect((p.rowWeight.toArray() as Float32Array)[gapRow], `seed ${seed}: the gap's weight`).toBe(0);
    const gapRowValues = p.rows.narrow(0, gapRow, 1);
    expect(
      Array.from(gapRowValues.toFloat32Array()).every((v) => v === 0),
      `seed ${seed}: the gap's row`,
    ).toBe(true);
    gapRowValues.dispose();
    disposeAll(p);
    disposeAll(cap);
  });
});

// ------------------------------------------------------------------------------------------------
// Capacity's two CUDA paths (native/ops/moe/capacity/cuda.cu, chunked_path): 'position' and
// dropless with n = T·k ≤ 2^20 and E ≤ 512 run in chunks of 8192 assignments, a block each (one
// chunk: one kernel; more: a counting pass, then the assigning pass adding the earlier chunks'
// counts); 'probs' with a capacity, larger n or larger E run the radix sorts. Each case names the
// path its shape takes ('one chunk', 'chunks' or 'radix').

/** Position policy / dropless as plain loops, with out-of-range ids skipped and counted (the CUDA
 *  contract; the CPU op throws for them instead). Checked against the CPU op where ids are valid. */
function positionReference(idx: Int32Array, E: number, cap: number | null) {
  const count = new Int32Array(E);
  const slot = new Int32Array(idx.length);
  let invalid = 0;
  idx.forEach((e, i) => {
    if (e < 0 || e >= E) {
      slot[i] = -1;
      invalid++;
      return;
    }
    const r = count[e] as number;
    count[e] = r + 1;
    slot[i] = cap === null || r < cap ? r : -1;
  });
  const kept = count.map((c) => (cap === null ? c : Math.min(c, cap)));
  const valid = count.reduce((a, b) => a + b, 0);
  const keptTotal = kept.reduce((a, b) => a + b, 0);
  return { slot, keptPerExpert: kept, dropped: Int32Array.of(valid - keptTotal), invalid: Int32Array.of(invalid) };
}

interface CapacityCase {
  name: string;
  T: number;
  k: number;
  E: number;
  used: number;
  cf?: number;
  policy: DropPolicy;
  /** Assignments given an out-of-range expert id (compared with positionReference). */
  bad?: number;
  /** Every assignment goes to expert 0 (k = 1). */
  oneExpert?: boolean;
}

const capacityCases: CapacityCase[] = [
  // chunked path, one chunk
  { name: 'one chunk: n = 0, dropless', T: 0, k: 2, E: 8, used: 8, policy: 'position' },
  { name: 'one chunk: n = 0, position', T: 0, k: 2, E: 8, used: 8, cf: 1, policy: 'position' },
  { name: 'one chunk: n = 1, dropless', T: 1, k: 1, E: 8, used: 8, policy: 'probs' },
  { name: 'one chunk: n = 1, C = 0 drops it', T: 1, k: 1, E: 8, used: 8, cf: 1e-12, policy: 'position' },
  { name: 'one chunk: Mixtral decode T=64 k=2 E=8, dropless', T: 64, k: 2, E: 8, used: 8, policy: 'probs' },
  { name: 'one chunk: Mixtral decode, position cf=0.5', T: 64, k: 2, E: 8, used: 8, cf: 0.5, policy: 'position' },
  { name: 'one chunk: DeepSeek-V3 decode T=128 k=8 E=256, dropless', T: 128, k: 8, E: 256, used: 256, policy: 'position' },
  { name: 'one chunk: DeepSeek-V3 decode, position cf=0.5', T: 128, k: 8, E: 256, used: 200, cf: 0.5, policy: 'position' },
  { name: 'one chunk: n = 8192 (a whole chunk), E=256, position cf=0.8', T: 1024, k: 8, E: 256, used: 256, cf: 0.8, policy: 'position' },
  { name: 'one chunk: E = 512 (the limit), n = 8000, dropless', T: 1000, k: 8, E: 512, used: 512, policy: 'position' },
  { name: 'one chunk: E = 1, n = 999, position cf=0.5', T: 999, k: 1, E: 1, used: 1, cf: 0.5, policy: 'position' },
  { name: 'one chunk: one expert takes all 8192, dropless', T: 8192, k: 1, E: 4, used: 4, policy: 'position', oneExpert: true },
  { name: 'one chunk: out-of-range ids, E=8, position cf=1', T: 300, k: 2, E: 8, used: 8, cf: 1, policy: 'position', bad: 7 },
  { name: 'one chunk: out-of-range ids, E=256, dropless', T: 128, k: 8, E: 256, used: 256, policy: 'position', bad: 30 },
  // chunked path, several chunks
  { name: 'chunks: n = 8193 (a second chunk of 1), dropless', T: 8193, k: 1, E: 8, used: 8, policy: 'position' },
  { name: 'chunks: n = 8193, position cf=0.5', T: 8193, k: 1, E: 8, used: 8, cf: 0.5, policy: 'position' },
  { name: 'chunks: n = 16384, E=256, position cf=0.9', T: 2048, k: 8, E: 256, used: 256, cf: 0.9, policy: 'position' },
  { name: "chunks: the main layer's T=4096 k=8 E=32, dropless", T: 4096, k: 8, E: 32, used: 32, policy: 'probs' },
  { name: "chunks: the fine layer's T=4096 k=8 E=128, dropless", T: 4096, k: 8, E: 128, used: 128, policy: 'probs' },
  {
    name: 'chunks: E = 512, n = 40000 (a partial last chunk), position cf=0.7',
    T: 5000,
    k: 8,
    E: 512,
    used: 512,
    cf: 0.7,
    policy: 'position',
  },
  {
    name: 'chunks: one expert takes all 100000 (slots past 65535), dropless',
    T: 100000,
    k: 1,
    E: 4,
    used: 4,
    policy: 'position',
    oneExpert: true,
  },
  { name: 'chunks: n = 2^20 (the limit), E=64, position cf=1', T: 131072, k: 8, E: 64, used: 64, cf: 1, policy: 'position' },
  { name: 'chunks: out-of-range ids, n = 16384, dropless', T: 2048, k: 8, E: 256, used: 256, policy: 'position', bad: 50 },
  { name: 'chunks: out-of-range ids, n = 20000, position cf=0.6', T: 2500, k: 8, E: 64, used: 64, cf: 0.6, policy: 'position', bad: 40 },
  {
    name: 'chunks: a capacity past 2^20 (cf = 1e6: clamped, nothing dropped), n = 20000',
    T: 2500,
    k: 8,
    E: 64,
    used: 64,
    cf: 1e6,
    policy: 'position',
  },
  // radix path
  { name: 'radix: n = 2^20 + 8 (past the chunked limit), dropless', T: 131073, k: 8, E: 64, used: 64, policy: 'position' },
  { name: 'radix: E = 513, n = 512, dropless', T: 64, k: 8, E: 513, used: 513, policy: 'position' },
  { name: 'radix: E = 1024, n = 1024, position cf=0.5', T: 128, k: 8, E: 1024, used: 700, cf: 0.5, policy: 'position' },
  { name: "radix: 'probs' with a capacity at n = 128", T: 64, k: 2, E: 8, used: 8, cf: 0.5, policy: 'probs' },
  { name: 'radix: out-of-range ids, E = 1024, position cf=0.5', T: 128, k: 8, E: 1024, used: 1024, cf: 0.5, policy: 'position', bad: 10 },
];

describe.skipIf(!hasGpu)('capacity: the chunked and the radix CUDA paths against the CPU reference', () => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
  });
  afterEach(() => {
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  it.each(capacityCases)('$name', (c) => {
    const { T, k, E } = c;
    const seed = freshSeed();
    const ro = routing(T, k, c.used, seed);
    if (c.oneExpert) ro.idx.fill(0);
    const r = rng(seed ^ 0x5bd1e995);
    const badIds = [-1, -7, E, E + 1, 1 << 20, -(1 << 30)];
    for (let b = 0; b < (c.bad ?? 0); b++) ro.idx[Math.floor(r() * T * k)] = badIds[b % badIds.length] as number;
    const label = `seed ${seed}`;
    using iG = Tensor.fromArray(ro.idx, { dtype: 'i32', shape: [T, k], device: gpu });
    using wG = Tensor.fromArray(ro.w, { dtype: 'f32', shape: [T, k], device: gpu });
    const opts = (device: DeviceLike) => ({
      numExperts: E,
      dropPolicy: c.policy,
      out: poisonedCapacity(T, k, E, device),
      ...(c.cf === undefined ? {} : { capacityFactor: c.cf }),
    });
    const capG: CapacityResult = capacity(iG, wG, opts(gpu));
    const got = {
      slot: capG.slot.toArray() as Int32Array,
      keptPerExpert: capG.keptPerExpert.toArray() as Int32Array,
      dropped: capG.dropped.toArray() as Int32Array,
      invalid: capG.invalid.toArray() as Int32Array,
    };
    if (c.bad === undefined) {
      using iC = Tensor.fromArray(ro.idx, { dtype: 'i32', shape: [T, k], device: cpu });
      using wC = Tensor.fromArray(ro.w, { dtype: 'f32', shape: [T, k], device: cpu });
      const capC: CapacityResult = capacity(iC, wC, opts(cpu));
      for (const key of ['slot', 'keptPerExpert', 'dropped', 'invalid'] as const)
        expect(same(capG[key], capC[key]), `${key}, ${label}`).toBe(true);
      if (c.policy === 'position' || c.cf === undefined) {
        // The plain-loop reference used for out-of-range ids agrees with the CPU op on valid ones.
        const ref = positionReference(ro.idx, E, capC.capacity);
        for (const key of ['slot', 'keptPerExpert', 'dropped', 'invalid'] as const)
          expect(Array.from(capC[key].toArray() as Int32Array), `reference ${key}, ${label}`).toEqual(Array.from(ref[key]));
      }
      if (c.cf !== undefined && c.cf < 1 && T > 0) expect(capC.dropped.item(), `drops happen, ${label}`).toBeGreaterThan(0);
      disposeAll(capC);
    } else {
      const ref = positionReference(ro.idx, E, capG.capacity);
      expect(ref.invalid[0], label).toBeGreaterThan(0);
      for (const key of ['slot', 'keptPerExpert', 'dropped', 'invalid'] as const)
        expect(Array.from(got[key]), `${key}, ${label}`).toEqual(Array.from(ref[key]));
    }
    disposeAll(capG);
  });
});

// ------------------------------------------------------------------------------------------------
// Unpermute (and permuteBackward, the same kernel with weights 1 and an optional add) at few tokens,
// where the CUDA kernel splits each token's columns over several blocks, and at T ≥ 1024, one block
// per token. Every variant against the CPU reference; and each output element's fp32 sum has a fixed
// order whatever the grid, so the rows of a few-token call equal, bit for bit, the same tokens' rows
// of a many-token call.

interface UnpermuteShape {
  name: string;
  H: number;
  k: number;
}
const unpermuteShapes: UnpermuteShape[] = [
  { name: 'DeepSeek-V3 H=7168 k=8', H: 7168, k: 8 },
  { name: 'Mixtral H=4096 k=2', H: 4096, k: 2 },
  { name: 'H=64·37 (a partial last column chunk) k=3', H: 64 * 37, k: 3 },
  { name: 'H=301 (one element per access) k=10 (two load tiles)', H: 301, k: 10 },
];
const bigT = 1031; // ≥ 1024 tokens: one block per token
const smallTs = [1, 7, 128] as const;

describe.skipIf(!hasGpu)('unpermute at few and many tokens against the CPU reference', () => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
  });
  afterEach(() => {
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  it.each(unpermuteShapes)('$name', ({ H, k }) => {
    const seed = freshSeed();
    const label = `seed ${seed}`;
    const r = rng(seed);
    // rowOf: a random permutation of the rows, about one assignment in 8 dropped (-1).
    const R = bigT * k;
    const perm = Int32Array.from({ length: R }, (_, i) => i);
    for (let i = R - 1; i > 0; i--) {
      const p = Math.floor(r() * (i + 1));
      [perm[i], perm[p]] = [perm[p] as number, perm[i] as number];
    }
    const rowOf = perm.map((v) => (r() < 0.125 ? -1 : v));
    const w = Float32Array.from({ length: R }, () => Math.fround(r() * 2 - 0.5));
    const add = Float32Array.from({ length: bigT * H }, () => Math.fround(r() * 4 - 2));
    using rowsF = Tensor.randn([R, H], { seed: seed + 1, device: cpu });

    for (const rdt of ['bf16', 'f32'] as const) {
      using rowsC = rowsF.cast(rdt);
      using rowsG = rowsC.to(gpu);
      // Variants: [what, output dtype, with weights, add dtype or null, tolerance against the CPU].
      const variants: Array<[string, 'f32' | 'bf16', boolean, boolean, number]> = [
        ['unpermute', 'f32', true, false, 1e-6],
        ['unpermute', 'bf16', true, false, 4e-3],
        ['permuteBackward', 'f32', false, false, 1e-5],
        ['permuteBackward + add', 'f32', false, true, 1e-5],
        ['permuteBackward + add', rdt, false, true, rdt === 'f32' ? 1e-5 : 4e-3],
      ];
      for (const [what, odt, weighted, withAdd, tol] of variants) {
        const tag = `${what}, rows ${rdt} -> ${odt}, ${label}`;
        // Runs the variant on tokens [t0, t0 + T) on `device`, into a poisoned output there.
        const run = (device: DeviceLike, t0: number, T: number): Tensor => {
          using ro = Tensor.fromArray(rowOf.subarray(t0 * k, (t0 + T) * k), { dtype: 'i32', shape: [T, k], device });
          const rows = device === cpu ? rowsC : rowsG;
          const out = poisoned([T, H], odt, device);
          if (weighted) {
            using wt = Tensor.fromArray(w.subarray(t0 * k, (t0 + T) * k), { dtype: 'f32', shape: [T, k], device });
            unpermute(rows, ro, wt, { out });
          } else if (withAdd) {
            using addF = Tensor.fromArray(add.subarray(t0 * H, (t0 + T) * H), { dtype: 'f32', shape: [T, H], device });
            using addT = addF.cast(odt);
            permuteBackward(rows, ro, { out, add: addT });
          } else {
            permuteBackward(rows, ro, { out });
          }
          return out;
        };
        using yC = run(cpu, 0, bigT);
        using yG = run(gpu, 0, bigT);
        const refAll = yC.toFloat32Array();
        expect(relErr(yG.toFloat32Array(), refAll), `T=${bigT}: ${tag}`).toBeLessThan(tol);
        const bigBytes = bytes(yG);
        const esize = odt === 'f32' ? 4 : 2;
        for (const T of smallTs) {
          const t0 = Math.min(bigT - T, 5 + T);
          using ySmall = run(gpu, t0, T);
          const want = bigBytes.subarray(t0 * H * esize, (t0 + T) * H * esize);
          expect(bytes(ySmall).equals(want), `T=${T} (tokens ${t0}..): bit-identical to the same tokens at T=${bigT}, ${tag}`).toBe(true);
          expect(relErr(ySmall.toFloat32Array(), refAll.subarray(t0 * H, (t0 + T) * H)), `T=${T}: ${tag}`).toBeLessThan(tol);
        }
      }
    }
  });
});
