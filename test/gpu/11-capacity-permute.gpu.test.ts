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
