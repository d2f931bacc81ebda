// Capacity and permute/unpermute on the CPU against float64 oracles written here, outputs poisoned
// before each run; gradients against central finite differences; bad calls give named errors.
import { describe, expect, it } from 'vitest';

import {
  capacity,
  type CapacityResult,
  type DropPolicy,
  expertCapacity,
  permute,
  permuteBackward,
  permutedRowCount,
  Tensor,
  unpermute,
  unpermuteBackward,
} from '../lib/index.js';
import { bf16ToNumber, expectInvalidArgument, freshSeed, poisoned, relErr, rng } from './helpers.js';

const cpu = 'cpu' as const;

interface Routing {
  T: number;
  k: number;
  E: number;
  idx: Int32Array;
  w: Float32Array;
}

/**
 * Random routing: k distinct experts per token drawn from the first `usedExperts` (so the others get
 * no tokens), weights from a few levels so ties happen.
 */
function routing(T: number, k: number, E: number, seed: number, usedExperts = E, levels = 5): Routing {
  const r = rng(seed);
  const idx = new Int32Array(T * k);
  const w = new Float32Array(T * k);
  for (let t = 0; t < T; t++) {
    const pool = Array.from({ length: usedExperts }, (_, i) => i);
    for (let j = 0; j < k; j++) {
      const p = j + Math.floor(r() * (pool.length - j));
      [pool[j], pool[p]] = [pool[p] as number, pool[j] as number];
      idx[t * k + j] = pool[j] as number;
      w[t * k + j] = Math.fround((1 + Math.floor(r() * levels)) / (levels + 1));
    }
  }
  return { T, k, E, idx, w };
}

function tensors(ro: Routing): { indices: Tensor; weights: Tensor } {
  return {
    indices: Tensor.fromArray(ro.idx, { dtype: 'i32', shape: [ro.T, ro.k], device: cpu }),
    weights: Tensor.fromArray(ro.w, { dtype: 'f32', shape: [ro.T, ro.k], device: cpu }),
  };
}

/** The oracle: per expert, sort (by descending weight then position, or by position), keep C, number in order. */
function oracleCapacity(ro: Routing, C: number | null, policy: DropPolicy): { slot: number[]; kept: number[]; dropped: number } {
  const slot = new Array<number>(ro.T * ro.k).fill(-1);
  const kept: number[] = [];
  for (let e = 0; e < ro.E; e++) {
    let list: number[] = [];
    for (let i = 0; i < ro.T * ro.k; i++) if (ro.idx[i] === e) list.push(i);
    if (policy === 'probs') list.sort((a, b) => (ro.w[b] as number) - (ro.w[a] as number) || a - b);
    list = list.slice(0, C ?? list.length).sort((a, b) => a - b);
    list.forEach((i, s) => (slot[i] = s));
    kept.push(list.length);
  }
  return { slot, kept, dropped: ro.T * ro.k - kept.reduce((a, b) => a + b, 0) };
}

function runCapacity(ro: Routing, cf: number | undefined, policy: DropPolicy): CapacityResult {
  const { indices, weights } = tensors(ro);
  const out = {
    slot: poisoned([ro.T, ro.k], 'i32', cpu),
    keptPerExpert: poisoned([ro.E], 'i32', cpu),
    dropped: poisoned([1], 'i32', cpu),
    invalid: poisoned([1], 'i32', cpu),
  };
  const opts =
    cf === undefined ? { numExperts: ro.E, dropPolicy: policy, out } : { numExperts: ro.E, capacityFactor: cf, dropPolicy: policy, out };
  const r = capacity(indices, weights, opts);
  indices.dispose();
  weights.dispose();
  return r;
}

function disposeAll(o: object): void {
  for (const v of Object.values(o)) if (v instanceof Tensor) v.dispose();
}

const shapes: [string, number, number, number, number][] = [
  // name, T, k, E, experts that receive tokens
  ['typical', 97, 2, 8, 8],
  ['E=1', 33, 1, 1, 1],
  ['k=E', 29, 4, 4, 4],
  ['idle experts', 61, 3, 16, 9],
  ['T not a tile multiple', 131, 8, 32, 32],
];

describe('capacity', () => {
  it.each(shapes)('%s: both policies and dropless match the sorting oracle', (_name, T, k, E, used) => {
    const ro = routing(T, k, E, freshSeed(), used);
    for (const policy of ['probs', 'position'] as const) {
      for (const cf of [undefined, 0.5, 1.0, 1.25, 3]) {
        const C = cf === undefined ? null : expertCapacity(T, k, E, cf);
        const r = runCapacity(ro, cf, policy);
        const ref = oracleCapacity(ro, C, policy);
        const label = `${policy} cf=${cf}`;
        expect(r.capacity, label).toBe(C);
        expect(Array.from(r.slot.toArray() as Int32Array), label).toEqual(ref.slot);
        const kept = Array.from(r.keptPerExpert.toArray() as Int32Array);
        expect(kept, label).toEqual(ref.kept);
        expect(r.dropped.item(), label).toBe(ref.dropped);
        expect(r.invalid.item(), label).toBe(0);
        // Semantics independent of the oracle: capacity never exceeded, counts add up, slots 0..kept-1.
        if (C !== null) expect(Math.max(...kept), label).toBeLessThanOrEqual(C);
        expect(kept.reduce((a, b) => a + b, 0) + r.dropped.item(), label).toBe(T * k);
        if (cf === undefined) expect(r.dropped.item(), label).toBe(0);
        const slots = Array.from(r.slot.toArray() as Int32Array);
        for (let e = 0; e < E; e++) {
          const mine = slots.filter((s, i) => ro.idx[i] === e && s >= 0);
          expect(mine, `${label} expert ${e}`).toEqual(Array.from({ length: kept[e] as number }, (_, s) => s));
        }
        disposeAll(r);
      }
    }
  });

  it("'probs' keeps the heaviest, 'position' the earliest (hand-made case)", () => {
    // Expert 0 receives 4 assignments with weights 0.1, 0.9, 0.5, 0.9; C = 2.
    const ro: Routing = { T: 4, k: 1, E: 2, idx: Int32Array.from([0, 0, 0, 0]), w: Float32Array.from([0.1, 0.9, 0.5, 0.9]) };
    const probs = runCapacity(ro, 1, 'probs'); // C = ceil(1·4·1/2) = 2
    expect(Array.from(probs.slot.toArray() as Int32Array)).toEqual([-1, 0, -1, 1]);
    const pos = runCapacity(ro, 1, 'position');
    expect(Array.from(pos.slot.toArray() as Int32Array)).toEqual([0, 1, -1, -1]);
    expect(pos.dropped.item()).toBe(2);
    expect(Array.from(pos.keptPerExpert.toArray() as Int32Array)).toEqual([2, 0]);
    disposeAll(probs);
    disposeAll(pos);
  });

  it('expertCapacity is min(ceil(cf·T·k/E), T·k) without float noise', () => {
    expect(expertCapacity(100, 1, 10, 1.1)).toBe(11);
    expect(expertCapacity(97, 2, 8, 1)).toBe(25);
    expect(expertCapacity(4096, 8, 256, 1.25)).toBe(160);
    expect(expertCapacity(0, 2, 8, 1)).toBe(0);
    // Never more than the T·k assignments: an absurd factor pads no more than that (it asked for
    // gigabytes of padding rows), and does not overflow i32.
    expect(expertCapacity(3, 2, 3, 2.7e8)).toBe(6);
    expect(expertCapacity(3, 1, 4, 1e12)).toBe(3);
    expect(expertCapacity(100, 2, 8, 4)).toBe(100);
  });
});

// ------------------------------------------------------------------------------------ permute

interface LayoutRef {
  offsets: number[];
  rowOf: number[];
  rowToken: number[];
  rowWeight: number[];
}

function oracleLayout(ro: Routing, slot: number[], kept: number[], C: number | null, align: number, pad: boolean): LayoutRef {
  const seg = kept.map((c) => Math.ceil((pad ? (C as number) : c) / align) * align);
  const offsets = [0];
  for (const s of seg) offsets.push((offsets[offsets.length - 1] as number) + s);
  const R = offsets[ro.E] as number;
  const rowToken = new Array<number>(R).fill(-1);
  const rowWeight = new Array<number>(R).fill(0);
  const rowOf = slot.map((s, i) => {
    if (s < 0) return -1;
    const r = (offsets[ro.idx[i] as number] as number) + s;
    rowToken[r] = Math.floor(i / ro.k);
    rowWeight[r] = ro.w[i] as number;
    return r;
  });
  return { offsets, rowOf, rowToken, rowWeight };
}

function randomX(T: number, H: number, dtype: 'f32' | 'bf16'): Tensor {
  using f = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
  return f.cast(dtype);
}

describe('permute and unpermute', () => {
  const cases: [string, number, number, number, number, number | undefined, number, boolean][] = [
    // name, T, k, E, used, cf, align, padToCapacity
    ['dropless', 53, 2, 8, 6, undefined, 1, false],
    ['dropless aligned to 4', 53, 2, 8, 6, undefined, 4, false],
    ['capacity, padded to C', 61, 3, 16, 9, 1.0, 1, true],
    ['capacity, padded to C and aligned', 61, 3, 16, 9, 0.75, 8, true],
    ['capacity, unpadded', 40, 4, 4, 4, 0.5, 1, false],
    ['E=1', 17, 1, 1, 1, undefined, 8, false],
  ];
  it.each(cases)('%s: layout, rows, unpermute against the oracle (f32 and bf16)', (_n, T, k, E, used, cf, align, pad) => {
    const ro = routing(T, k, E, freshSeed(), used);
    const cap = runCapacity(ro, cf, 'probs');
    const slot = Array.from(cap.slot.toArray() as Int32Array);
    const kept = Array.from(cap.keptPerExpert.toArray() as Int32Array);
    const ref = oracleLayout(ro, slot, kept, cap.capacity, align, pad);
    const R = ref.offsets[E] as number;
    expect(permutedRowCount(cap, { align, padToCapacity: pad })).toBe(R);
    const { indices, weights } = tensors(ro);
    for (const dtype of ['f32', 'bf16'] as const) {
      const H = 24;
      using x = randomX(T, H, dtype);
      const xv = Array.from(x.toFloat32Array());
      const out = {
        rows: poisoned([R, H], dtype, cpu),
        offsets: poisoned([E + 1], 'i32', cpu),
        rowOf: poisoned([T, k], 'i32', cpu),
        rowWeight: poisoned([R], 'f32', cpu),
        rowToken: poisoned([R], 'i32', cpu),
        invalid: poisoned([1], 'i32', cpu),
      };
      const p = permute(x, indices, weights, cap, { align, padToCapacity: pad, out });
      expect(p.numRows).toBe(R);
      expect(Array.from(p.offsets.toArray() as Int32Array)).toEqual(ref.offsets);
      // The segment sizes known on the host step exactly as the device offsets do.
      expect(p.segmentRows).toEqual(ref.offsets.slice(1).map((o, e) => (o as number) - (ref.offsets[e] as number)));
      expect(Array.from(p.rowOf.toArray() as Int32Array)).toEqual(ref.rowOf);
      expect(Array.from(p.rowToken.toArray() as Int32Array)).toEqual(ref.rowToken);
      expect(Array.from(p.rowWeight.toFloat32Array())).toEqual(ref.rowWeight);
      const rows = Array.from(p.rows.toFloat32Array());
      const rowsRef = ref.rowToken.flatMap((t) => (t < 0 ? new Array<number>(H).fill(0) : xv.slice(t * H, (t + 1) * H)));
      expect(rows).toEqual(rowsRef); // a copy: exact, and padding rows are zero
      if (R > (kept.reduce((a, b) => a + b, 0) as number)) expect(rows.some((v) => v !== 0)).toBe(true);

      // unpermute: float64 oracle, f32 and bf16 results.
      const yRef: number[] = [];
      for (let t = 0; t < T; t++)
        for (let h = 0; h < H; h++) {
          let s = 0;
          for (let j = 0; j < k; j++) {
            const r = ref.rowOf[t * k + j] as number;
            if (r >= 0) s += (ro.w[t * k + j] as number) * (rows[r * H + h] as number);
          }
          yRef.push(s);
        }
      for (const ydt of ['f32', 'bf16'] as const) {
        using y = poisoned([T, H], ydt, cpu);
        unpermute(p.rows, p.rowOf, weights, { out: y });
        const yv = Array.from(y.toFloat32Array());
        expect(relErr(yv, yRef), `unpermute ${dtype} -> ${ydt}`).toBeLessThan(ydt === 'f32' ? 1e-6 : 5e-3);
        // Tokens with every assignment dropped give exact zeros.
        for (let t = 0; t < T; t++)
          if (ref.rowOf.slice(t * k, (t + 1) * k).every((r) => r < 0))
            expect(yv.slice(t * H, (t + 1) * H).every((v) => v === 0)).toBe(true);
      }
      disposeAll(p);
    }
    indices.dispose();
    weights.dispose();
    disposeAll(cap);
  });

  it('permute then unpermute with weights 1 and k = 1 returns x exactly (f32 and bf16)', () => {
    const T = 45;
    const ro = routing(T, 1, 6, freshSeed());
    ro.w.fill(1);
    const cap = runCapacity(ro, undefined, 'position');
    const { indices, weights } = tensors(ro);
    for (const dtype of ['f32', 'bf16'] as const) {
      using x = randomX(T, 40, dtype);
      const p = permute(x, indices, weights, cap, { align: 16 });
      using y = unpermute(p.rows, p.rowOf, weights);
      expect(y.dtype).toBe(dtype);
      expect(Array.from(y.toArray() as ArrayLike<number>)).toEqual(Array.from(x.toArray() as ArrayLike<number>));
      disposeAll(p);
    }
    indices.dispose();
    weights.dispose();
    disposeAll(cap);
  });

  it('bf16 rows keep their bits through the gather', () => {
    using x = Tensor.fromArray(Uint16Array.from([0x3f80, 0xc000, 0x7f80, 0x0001]), { dtype: 'bf16', shape: [2, 2], device: cpu });
    const ro: Routing = { T: 2, k: 1, E: 2, idx: Int32Array.from([1, 0]), w: Float32Array.from([1, 1]) };
    const cap = runCapacity(ro, undefined, 'position');
    const { indices, weights } = tensors(ro);
    const p = permute(x, indices, weights, cap);
    expect(Array.from(p.rows.toArray() as Uint16Array)).toEqual([0x7f80, 0x0001, 0x3f80, 0xc000]);
    expect(bf16ToNumber(0x3f80)).toBe(1);
    disposeAll(p);
    indices.dispose();
    weights.dispose();
    disposeAll(cap);
  });
});

// -------------------------------------------------------------------------------- gradients

/** Σ a ⊙ b in float64. */
const dot = (a: ArrayLike<number>, b: ArrayLike<number>): number => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += (a[i] as number) * (b[i] as number);
  return s;
};

describe('gradients against central finite differences (f32)', () => {
  const T = 7;
  const k = 2;
  const E = 4;
  const H = 5;
  const step = 1e-2;

  function setup() {
    const ro = routing(T, k, E, freshSeed(), E, 1000);
    const cap = runCapacity(ro, 0.75, 'probs'); // some drops, padding to capacity
    const { indices, weights } = tensors(ro);
    const x = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
    const p = permute(x, indices, weights, cap, { padToCapacity: true, align: 2 });
    const G = Tensor.randn([T, H], { seed: freshSeed(), device: cpu }); // L = Σ y ⊙ G
    return { ro, cap, indices, weights, x, p, G };
  }

  it('unpermute w.r.t. rows and weights', () => {
    const { cap, indices, weights, x, p, G } = setup();
    const g = Array.from(G.toFloat32Array());
    const loss = (rows: Tensor, w: Tensor): number => {
      using y = unpermute(rows, p.rowOf, w);
      return dot(y.toFloat32Array(), g);
    };
    const grads = unpermuteBackward(G, p.rows, weights, p.rowOf, p.rowToken, {
      out: { dRows: poisoned(p.rows.shape, 'f32', cpu), dWeights: poisoned([T, k], 'f32', cpu) },
    });
    const rowsV = Array.from(p.rows.toFloat32Array());
    const fdRows = rowsV.map((_, i) => {
      const plus = rowsV.slice();
      const minus = rowsV.slice();
      plus[i] = (plus[i] as number) + step;
      minus[i] = (minus[i] as number) - step;
      using rp = Tensor.fromArray(plus, { shape: p.rows.shape, device: cpu });
      using rm = Tensor.fromArray(minus, { shape: p.rows.shape, device: cpu });
      return (loss(rp, weights) - loss(rm, weights)) / (2 * step);
    });
    const dRows = Array.from(grads.dRows.toFloat32Array());
    expect(relErr(dRows, fdRows)).toBeLessThan(1e-3);
    expect(dRows.some((v) => Math.abs(v) > 0.1)).toBe(true);
    const wV = Array.from(weights.toFloat32Array());
    const fdW = wV.map((_, i) => {
      const plus = wV.slice();
      const minus = wV.slice();
      plus[i] = (plus[i] as number) + step;
      minus[i] = (minus[i] as number) - step;
      using wp = Tensor.fromArray(plus, { shape: [T, k], device: cpu });
      using wm = Tensor.fromArray(minus, { shape: [T, k], device: cpu });
      return (loss(p.rows, wp) - loss(p.rows, wm)) / (2 * step);
    });
    const dW = Array.from(grads.dWeights.toFloat32Array());
    expect(relErr(dW, fdW)).toBeLessThan(1e-3);
    expect(dW.some((v) => Math.abs(v) > 0.1)).toBe(true);
    // Dropped assignments get 0; padding rows of dRows are zero.
    const rowOf = Array.from(p.rowOf.toArray() as Int32Array);
    rowOf.forEach((r, i) => r < 0 && expect(dW[i]).toBe(0));
    expect(rowOf.some((r) => r < 0)).toBe(true);
    disposeAll(grads);
    for (const t of [indices, weights, x, G]) t.dispose();
    disposeAll(p);
    disposeAll(cap);
  });

  it('permute w.r.t. x', () => {
    const { cap, indices, weights, x, p, G: _g } = setup();
    const GR = Tensor.randn(p.rows.shape, { seed: freshSeed(), device: cpu }); // L = Σ rows ⊙ GR
    const gr = Array.from(GR.toFloat32Array());
    const xv = Array.from(x.toFloat32Array());
    const loss = (xs: number[]): number => {
      using xt = Tensor.fromArray(xs, { shape: [T, H], device: cpu });
      const q = permute(xt, indices, weights, cap, { padToCapacity: true, align: 2 });
      const l = dot(q.rows.toFloat32Array(), gr);
      disposeAll(q);
      return l;
    };
    const fd = xv.map((_, i) => {
      const plus = xv.slice();
      const minus = xv.slice();
      plus[i] = (plus[i] as number) + step;
      minus[i] = (minus[i] as number) - step;
      return (loss(plus) - loss(minus)) / (2 * step);
    });
    using dx = poisoned([T, H], 'f32', cpu);
    permuteBackward(GR, p.rowOf, { out: dx });
    const dxv = Array.from(dx.toFloat32Array());
    expect(relErr(dxv, fd)).toBeLessThan(1e-3);
    expect(dxv.some((v) => Math.abs(v) > 0.1)).toBe(true);
    // `add` joins the sum: dx + add, for another gradient of x (the router's in the layer).
    using extra = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
    using dxAdd = poisoned([T, H], 'f32', cpu);
    permuteBackward(GR, p.rowOf, { out: dxAdd, add: extra });
    const ev = Array.from(extra.toFloat32Array());
    expect(
      relErr(
        Array.from(dxAdd.toFloat32Array()),
        dxv.map((v, i) => v + (ev[i] as number)),
      ),
    ).toBeLessThan(1e-6);
    for (const t of [indices, weights, x, GR, _g]) t.dispose();
    disposeAll(p);
    disposeAll(cap);
  });
});

// -------------------------------------------------------------------------------- bad calls

describe('bad calls give named errors', () => {
  const ro = routing(6, 2, 4, 1);

  function expectError(fn: () => unknown, op: string, pattern: RegExp): void {
    expectInvalidArgument(fn, new RegExp(`^${op}: `), pattern);
  }

  it('capacity', () => {
    const { indices, weights } = tensors(ro);
    expectError(() => capacity(indices, weights, { numExperts: 4, capacityFactor: 0 }), 'capacity', /'capacityFactor'/);
    expectError(() => capacity(indices, weights, { numExperts: 4, capacityFactor: -1 }), 'capacity', /'capacityFactor'/);
    expectError(() => capacity(indices, weights, { numExperts: 0 }), 'capacity', /'numExperts'/);
    expectError(() => capacity(indices, weights, { numExperts: 4, dropPolicy: 'random' as DropPolicy }), 'capacity', /'dropPolicy'/);
    expectError(() => capacity(indices, null, { numExperts: 4, capacityFactor: 1 }), 'capacity', /'weights'/);
    // Expert ids out of range: numExperts too small, and a negative id.
    expectError(() => capacity(indices, weights, { numExperts: 3 }), 'capacity', /'indices'\[\d+,\d+\] = 3 is outside \[0, 3\)/);
    using neg = Tensor.fromArray([0, -1, 2, 3], { dtype: 'i32', shape: [2, 2], device: cpu });
    using negW = Tensor.fromArray([1, 1, 1, 1], { shape: [2, 2], device: cpu });
    expectError(() => capacity(neg, negW, { numExperts: 4 }), 'capacity', /'indices'\[0,1\] = -1/);
    using fIdx = indices.cast('f32');
    expectError(() => capacity(fIdx, weights, { numExperts: 4 }), 'capacity', /'indices'.*expected one of i32/);
    using bW = weights.cast('bf16');
    expectError(() => capacity(indices, bW, { numExperts: 4, capacityFactor: 1 }), 'capacity', /'weights'.*expected one of f32/);
    using wShort = weights.narrow(0, 0, 3);
    expectError(() => capacity(indices, wShort, { numExperts: 4, capacityFactor: 1 }), 'capacity', /'weights' has shape \[3,2\]/);
    using badSlot = Tensor.zeros([6, 3], { dtype: 'i32', device: cpu });
    expectError(() => capacity(indices, weights, { numExperts: 4, out: { slot: badSlot } }), 'capacity', /'slot' has shape \[6,3\]/);
    indices.dispose();
    weights.dispose();
  });

  it('permute, unpermute and backward', () => {
    const { indices, weights } = tensors(ro);
    const cap = capacity(indices, weights, { numExperts: 4, capacityFactor: 1 });
    using x = Tensor.randn([6, 8], { device: cpu });
    expectError(() => permute(x, indices, weights, cap, { align: 0 }), 'permute', /'align'/);
    expectError(() => permute(x, indices, weights, cap, { align: -4 }), 'permute', /'align'/);
    using x5 = Tensor.randn([5, 8], { device: cpu });
    expectError(() => permute(x5, indices, weights, cap), 'permute', /'indices' \[6,2\] has 6 tokens but 'x' \[5,8\] has 5/);
    using xi = x.cast('i32');
    expectError(() => permute(xi, indices, weights, cap), 'permute', /'x'.*expected one of f32, bf16, f16/);
    const dropless = capacity(indices, weights, { numExperts: 4 });
    expectError(() => permute(x, indices, weights, dropless, { padToCapacity: true }), 'permute', /'padToCapacity' needs a capacity/);
    // Indices changed after capacity: an expert id out of range is caught by the layout.
    using bad = Tensor.fromArray(
      Array.from(ro.idx, (e, i) => (i === 3 ? 9 : e)),
      { dtype: 'i32', shape: [6, 2], device: cpu },
    );
    const badCap = { ...cap, slot: cap.slot, keptPerExpert: cap.keptPerExpert };
    const slot3 = (cap.slot.toArray() as Int32Array)[3] as number;
    if (slot3 >= 0) expectError(() => permute(x, bad, weights, badCap), 'permute', /'indices'\[1,1\] = 9 is outside \[0, 4\)/);
    else expectError(() => permute(x, bad, weights, { ...cap, numExperts: 3 }), 'permute', /'offsets' has shape|'cap.keptPerExpert'/);
    const p = permute(x, indices, weights, cap);
    // rowOf out of range for unpermute.
    using badRowOf = Tensor.fromArray(
      Array.from(p.rowOf.toArray() as Int32Array, (r, i) => (i === 0 ? p.numRows : r)),
      {
        dtype: 'i32',
        shape: [6, 2],
        device: cpu,
      },
    );
    expectError(() => unpermute(p.rows, badRowOf, weights), 'unpermute', /'rowOf'\[0,0\] = \d+ is outside \[-1, \d+\)/);
    expectError(() => permuteBackward(p.rows, badRowOf), 'permuteBackward', /'rowOf'\[0,0\]/);
    using add7 = Tensor.zeros([6, 7], { device: cpu });
    expectError(() => permuteBackward(p.rows, p.rowOf, { add: add7 }), 'permuteBackward', /'add' has shape \[6,7\]; expected \[6,8\]/);
    using addBf16 = Tensor.zeros([6, 8], { dtype: 'bf16', device: cpu });
    expectError(() => permuteBackward(p.rows, p.rowOf, { add: addBf16 }), 'permuteBackward', /'add'.*f32/);
    using w3 = weights.narrow(0, 0, 3);
    expectError(() => unpermute(p.rows, p.rowOf, w3), 'unpermute', /'weights' has shape \[3,2\]/);
    using yI = Tensor.empty([6, 8], { dtype: 'i32', device: cpu });
    expectError(() => unpermute(p.rows, p.rowOf, weights, { out: yI }), 'unpermute', /'out'.*expected one of f32, bf16/);
    using dy = Tensor.randn([6, 8], { device: cpu });
    using dy7 = Tensor.randn([6, 7], { device: cpu });
    expectError(() => unpermuteBackward(dy7, p.rows, weights, p.rowOf, p.rowToken), 'unpermuteBackward', /'dy' has shape \[6,7\]/);
    using tok = p.rowToken.clone();
    // A rowToken that disagrees with rowOf.
    const tv = tok.toArray() as Int32Array;
    const r0 = (p.rowOf.toArray() as Int32Array).find((r) => r >= 0) as number;
    using tokBad = Tensor.fromArray(
      Array.from(tv, (t, i) => (i === r0 ? (t + 1) % 6 : t)),
      { dtype: 'i32', device: cpu },
    );
    expectError(() => unpermuteBackward(dy, p.rows, weights, p.rowOf, tokBad), 'unpermuteBackward', /'rowToken'/);
    disposeAll(p);
    disposeAll(cap);
    disposeAll(dropless);
    indices.dispose();
    weights.dispose();
  });
});
