// The dispatcher on one rank (multi-rank runs are in test/mpi): dispatch → experts → combine
// against plain loops, layouts for the grouped GEMM, and both backward passes.
import { describe, expect, it } from 'vitest';

import { DisposedError, Event, memoryStats, Stream, Tensor, tidy, trace } from '../lib/index.js';
import { CommWork } from '../lib/parallel/overlap.js';
import { capacity } from '../lib/moe/capacity.js';
import { type DispatchHandle, Dispatcher } from '../lib/moe/dispatcher.js';
import { peerDecodeBuffers, peerDecodeNeed } from '../lib/moe/peer-dispatch.js';
import { Device } from '../lib/device.js';
import { dequantizeFp8 } from '../lib/moe/fp8.js';
import { expectInvalidArgument, freshSeed, relErr, values } from './helpers.js';

const cpu = 'cpu' as const;

function routing(T: number, E: number, k: number): { indices: Tensor; weights: Tensor } {
  // distinct experts per token, some experts unused
  const idx: number[] = [];
  let s = freshSeed();
  const rnd = (): number => (s = (s * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  for (let t = 0; t < T; t++) {
    const chosen = new Set<number>();
    while (chosen.size < k) chosen.add(Math.floor(rnd() * (E - 1))); // expert E-1 never chosen
    idx.push(...chosen);
  }
  return {
    indices: Tensor.fromArray(idx, { dtype: 'i32', shape: [T, k], device: cpu }),
    weights: Tensor.rand([T, k], { seed: freshSeed(), device: cpu }),
  };
}

describe.each([
  ['dropless', undefined, false],
  ['capacity 1.0, padded', 1.0, true],
] as const)('dispatcher on one rank, %s', (_name, cf, pad) => {
  it('dispatch → per-expert scaling → combine equals the loop oracle; backward matches', () => {
    const [T, E, k, H] = [37, 8, 3, 16];
    const before = memoryStats(cpu).liveBytes;
    tidy(() => {
      const x = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
      const { indices, weights } = routing(T, E, k);
      const cap = capacity(indices, weights, { numExperts: E, ...(cf === undefined ? {} : { capacityFactor: cf }) });
      const d = new Dispatcher({ numExperts: E, padToCapacity: pad, align: pad ? 4 : 1 });
      const { rows, weights: rowW, handle } = d.dispatch(x, indices, weights, cap);
      // Expert e multiplies its rows by (e + 1): rows are expert-contiguous per localOffsets.
      const off = Array.from(handle.localOffsets.toArray() as Int32Array);
      const rv = values(rows);
      const scaled = rv.map((v, i) => {
        const r = Math.floor(i / H);
        const e = off.findIndex((o, j) => j < E && r >= o && r < (off[j + 1] as number));
        return v * (e + 1);
      });
      const expertOut = Tensor.fromArray(Float32Array.from(scaled), { shape: [rows.shape[0] as number, H], device: cpu });
      const y = d.combine(expertOut, handle, weights);
      // oracle: y[t] = Σ_j kept(t,j) · w[t,j] · (e+1) · x[t]
      const slot = Array.from(cap.slot.toArray() as Int32Array);
      const iv = Array.from(indices.toArray() as Int32Array),
        wv = values(weights),
        xv = values(x);
      const ref = new Array(T * H).fill(0);
      for (let t = 0; t < T; t++)
        for (let j = 0; j < k; j++) {
          if ((slot[t * k + j] as number) < 0) continue;
          const f = (wv[t * k + j] as number) * ((iv[t * k + j] as number) + 1);
          for (let h = 0; h < H; h++) ref[t * H + h] += f * (xv[t * H + h] as number);
        }
      expect(relErr(values(y), ref)).toBeLessThan(1e-6);
      // the gate weight travelled with each row
      const rw = values(rowW);
      const kept = rw.filter((w) => w !== 0).sort();
      const expectKept = wv.filter((_, i) => (slot[i] as number) >= 0).sort();
      expect(kept).toEqual(expectKept);
      // backward of combine then of dispatch, against the oracle's derivatives
      const dy = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
      const { dExpertOut, dWeights } = d.combineBackward(dy, expertOut, handle, weights);
      const dx = d.dispatchBackward(dExpertOut, handle);
      const dyv = values(dy),
        dwv = values(dWeights),
        dxv = values(dx);
      for (let t = 0; t < T; t++)
        for (let j = 0; j < k; j++) {
          const keptTJ = (slot[t * k + j] as number) >= 0;
          let dot = 0;
          for (let h = 0; h < H; h++) dot += (dyv[t * H + h] as number) * (xv[t * H + h] as number) * ((iv[t * k + j] as number) + 1);
          expect(dwv[t * k + j]).toBeCloseTo(keptTJ ? dot : 0, 4);
        }
      // dx from the dispatch backward of dExpertOut (which is w·dy per row): Σ_j kept w[t,j]·dy[t]
      const dxRef = new Array(T * H).fill(0);
      for (let t = 0; t < T; t++)
        for (let j = 0; j < k; j++)
          if ((slot[t * k + j] as number) >= 0)
            for (let h = 0; h < H; h++) dxRef[t * H + h] += (wv[t * k + j] as number) * (dyv[t * H + h] as number);
      expect(relErr(dxv, dxRef)).toBeLessThan(1e-6);
      // With `add` (the layer passes the router's dx): the same sum plus add.
      using extra = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
      using dxAdd = d.dispatchBackward(dExpertOut, handle, { add: extra });
      const ev = values(extra);
      expect(
        relErr(
          values(dxAdd),
          dxRef.map((v: number, i) => v + (ev[i] as number)),
        ),
      ).toBeLessThan(1e-6);
      // A wrong `add` is refused before anything is queued, naming it.
      using short = Tensor.zeros([T - 1, H], { device: cpu });
      expect(() => d.dispatchBackward(dExpertOut, handle, { add: short })).toThrow(/dispatchBackward: 'add' f32 \[\d+,\d+\] must be f32/);
      handle.dispose();
      d.dispose();
    });
    expect(memoryStats(cpu).liveBytes).toBe(before);
  });
});

describe('fp8 dispatch', () => {
  /** 33 bf16 rows of 256 (one with a large block, to exercise per-block scales), their routing and capacity. */
  function fp8Inputs(cf: number | undefined) {
    const [T, E, k, H] = [33, 8, 2, 256];
    const x = Tensor.randn([T, H], { seed: freshSeed(), device: cpu }).cast('bf16');
    x.narrow(0, 0, 1).narrow(1, 0, 128).fill_(300);
    const { indices, weights } = routing(T, E, k);
    const cap = capacity(indices, weights, { numExperts: E, ...(cf === undefined ? {} : { capacityFactor: cf }) });
    return { E, H, x, indices, weights, cap };
  }
  it.each([
    ['dropless', {}, undefined],
    ['segments aligned to 4 rows', { align: 4 }, undefined],
    ['capacity mode, padded', { padToCapacity: true, align: 4 }, 1.0],
  ] as const)('rows arrive within fp8 e4m3 precision of the bf16 dispatch, per-128 scales (%s)', (_name, layout, cf) => {
    tidy(() => {
      const { E, H, x, indices, weights, cap } = fp8Inputs(cf);
      const plain = new Dispatcher({ numExperts: E, ...layout }).dispatch(x, indices, weights, cap);
      const fp8 = new Dispatcher({ numExperts: E, fp8: true, ...layout }).dispatch(x, indices, weights, cap);
      expect(fp8.rows.dtype).toBe('bf16');
      expect(fp8.rows.shape).toEqual(plain.rows.shape);
      const a = values(fp8.rows),
        b = values(plain.rows);
      expect(relErr(a, b)).toBeLessThan(0.05);
      expect(relErr(a, b)).toBeGreaterThan(0); // it did quantise
      // Padding rows (weight 0) are zeros in both.
      const w = values(plain.weights);
      for (let r = 0; r < w.length; r++) if (w[r] === 0) expect(a.slice(r * H, (r + 1) * H).every((v) => v === 0)).toBe(true);
      plain.handle.dispose();
      fp8.handle.dispose();
    });
  });
  it.each([
    ['dropless', {}, undefined],
    ['capacity mode, padded', { padToCapacity: true, align: 4 }, 1.0],
  ] as const)("fp8: 'keep' delivers the e4m3 rows and their scales, which dequantise to the fp8: true rows (%s)", (_name, layout, cf) => {
    tidy(() => {
      const { E, H, x, indices, weights, cap } = fp8Inputs(cf);
      const kept = new Dispatcher({ numExperts: E, fp8: 'keep', ...layout }).dispatch(x, indices, weights, cap);
      const deq = new Dispatcher({ numExperts: E, fp8: true, ...layout }).dispatch(x, indices, weights, cap);
      expect(kept.rows.dtype).toBe('fp8e4m3');
      expect(kept.rows.shape).toEqual(deq.rows.shape);
      expect(deq.scales).toBeUndefined();
      const scales = kept.scales as Tensor;
      expect(scales.shape).toEqual([kept.rows.shape[0], H / 128]);
      expect(values(dequantizeFp8({ q: kept.rows, scales }, 'bf16'))).toEqual(values(deq.rows));
      expect(values(kept.weights)).toEqual(values(deq.weights));
      // Padding rows (weight 0): zero bytes and zero scales.
      const w = values(kept.weights),
        s = values(scales);
      for (let r = 0; r < w.length; r++) if (w[r] === 0) expect(s.slice(r * 2, r * 2 + 2)).toEqual([0, 0]);
      kept.handle.dispose();
      deq.handle.dispose();
    });
  });
  it("refuses an fp8 setting other than true, false or 'keep'", () => {
    expect(() => new Dispatcher({ numExperts: 8, fp8: 'yes' as never })).toThrow(/'fp8' must be true, false or 'keep'; received "yes"/);
  });
  it('rows whose length is not a multiple of 128 are refused', () => {
    expect(() =>
      new Dispatcher({ numExperts: 8, fp8: true }).dispatch(
        Tensor.zeros([2, 100], { device: cpu }),
        Tensor.zeros([2, 1], { dtype: 'i32', device: cpu }),
        Tensor.zeros([2, 1], { device: cpu }),
        capacity(Tensor.zeros([2, 1], { dtype: 'i32', device: cpu }), null, { numExperts: 8 }),
      ),
    ).toThrow(/not a multiple of 128/);
  });
});

describe('dispatcher configuration', () => {
  it('rejects expert counts that do not divide over the group, and bad alignment', () => {
    const group = { rank: 0, size: 3, allToAll: () => undefined, allToAllV: () => undefined };
    expect(() => new Dispatcher({ numExperts: 8, group })).toThrow(/'numExperts' 8 must be a multiple of the expert-parallel group size 3/);
    expect(() => new Dispatcher({ numExperts: 8, align: 0 })).toThrow(/'align' must be an integer in \[1, 65536\]; received 0/);
  });
});

describe('dispatch that fails mid-way', () => {
  it.each([
    ['bf16 rows', false, false],
    ['fp8 rows', true, false],
    ['capacity mode', false, true],
  ] as const)('a peer lost in the row exchange (%s): the error comes through and nothing stays live', (_name, fp8, pad) => {
    const [T, E, k, H] = [12, 4, 2, 256];
    // Two ranks whose counts exchange works (each pretends the other sent what it sent) but whose
    // row exchange fails, as when a peer dies between the two.
    const group = {
      rank: 0,
      size: 2,
      allToAll: (send: Tensor, recv: Tensor) => recv.copy_(send),
      allToAllV: () => {
        throw new Error('peer 1 is gone');
      },
    };
    // Outside tidy(): what the failed dispatch made must be freed by dispatch itself.
    const x = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
    const { indices, weights } = routing(T, E, k);
    const cap = capacity(indices, weights, { numExperts: E, ...(pad ? { capacityFactor: 1.5 } : {}) });
    const d = new Dispatcher({ numExperts: E, group, fp8, padToCapacity: pad });
    const before = memoryStats(cpu).liveBytes;
    expect(() => d.dispatch(x, indices, weights, cap)).toThrow(/peer 1 is gone/);
    d.dispose(); // capacity-mode layout maps are cached by the dispatcher until this
    expect(memoryStats(cpu).liveBytes).toBe(before);
    for (const t of [x, indices, weights, ...Object.values(cap)]) if (t instanceof Tensor) t.dispose();
  });
});

/** Bits of a tensor, for exact comparisons. */
const bits = (t: Tensor): number[] => Array.from(new Uint8Array((t.toArray() as Float32Array).buffer));

describe.each([
  ['dropless', undefined, false],
  ['capacity 1.0, padded', 1.0, true],
] as const)('communication on its own stream (CPU: its events are complete at once), %s', (_name, cf, pad) => {
  it('dispatch, combine and both backward passes give the same bits with and without the comm stream, sync and async', () => {
    const [T, E, k, H] = [29, 8, 2, 16];
    const before = memoryStats(cpu).liveBytes;
    {
      using comm = new Stream(cpu);
      const plain = new Dispatcher({ numExperts: E, padToCapacity: pad, align: pad ? 4 : 1 });
      const side = new Dispatcher({ numExperts: E, padToCapacity: pad, align: pad ? 4 : 1, commStream: comm });
      tidy(() => {
        const x = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
        const dy = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
        const { indices, weights } = routing(T, E, k);
        const cap = capacity(indices, weights, { numExperts: E, ...(cf === undefined ? {} : { capacityFactor: cf }) });
        // The reference: the plain dispatcher on the current stream.
        const ref = plain.dispatch(x, indices, weights, cap);
        const out = ref.rows.clone().fill_(0).add_(ref.rows, 2); // some "expert" arithmetic: 2·rows
        const yRef = plain.combine(out, ref.handle, weights);
        const cbRef = plain.combineBackward(dy, out, ref.handle, weights);
        const dxRef = plain.dispatchBackward(cbRef.dExpertOut, ref.handle);

        // Async on the comm stream, with an explicit producer event for one of them.
        using produced = new Event(cpu);
        produced.record();
        const work = side.dispatchAsync(x, indices, weights, cap, { after: produced });
        expect(work).toBeInstanceOf(CommWork);
        expect(work.event).toBeInstanceOf(Event);
        expect(work.query()).toBe(true);
        const got = work.wait();
        expect(work.wait()).toBe(got); // waiting again hands out the same result
        work.dispose();
        expect(bits(got.rows)).toEqual(bits(ref.rows));
        expect(bits(got.weights)).toEqual(bits(ref.weights));
        expect(got.handle.localRows).toEqual(ref.handle.localRows);
        const outA = got.rows.clone().fill_(0).add_(got.rows, 2);
        using yWork = side.combineAsync(outA, got.handle, weights);
        expect(bits(yWork.waitOn(comm))).toEqual(bits(yRef));
        using cbWork = side.combineBackwardAsync(dy, outA, got.handle, weights);
        const cb = cbWork.synchronize();
        expect(bits(cb.dExpertOut)).toEqual(bits(cbRef.dExpertOut));
        expect(bits(cb.dWeights)).toEqual(bits(cbRef.dWeights));
        using dxWork = side.dispatchBackwardAsync(cb.dExpertOut, got.handle);
        expect(bits(dxWork.wait())).toEqual(bits(dxRef));

        // The plain methods of a dispatcher with a comm stream wait for themselves.
        const s = side.dispatch(x, indices, weights, cap);
        expect(bits(s.rows)).toEqual(bits(ref.rows));
        expect(bits(side.combine(out, s.handle, weights))).toEqual(bits(yRef));
        expect(bits(side.dispatchBackward(side.combineBackward(dy, out, s.handle, weights).dExpertOut, s.handle))).toEqual(bits(dxRef));
        for (const h of [ref.handle, got.handle, s.handle]) h.dispose();
      });
      plain.dispose();
      side.dispose();
    }
    expect(memoryStats(cpu).liveBytes).toBe(before);
  });
});

describe('CommWork: the result only through wait', () => {
  const setup = (commStream?: Stream) => {
    const [T, E, k, H] = [11, 4, 2, 8];
    const d = new Dispatcher({ numExperts: E, ...(commStream ? { commStream } : {}) });
    const x = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
    const { indices, weights } = routing(T, E, k);
    const cap = capacity(indices, weights, { numExperts: E });
    return { d, x, indices, weights, cap };
  };

  it('a work never waited for frees its result on dispose, also out of tidy(); a returned work keeps it', () => {
    using comm = new Stream(cpu);
    const before = memoryStats(cpu).liveBytes;
    const { d, x, indices, weights, cap } = setup(comm);
    const inputs = memoryStats(cpu).liveBytes;
    d.dispatchAsync(x, indices, weights, cap).dispose();
    expect(memoryStats(cpu).liveBytes).toBe(inputs);
    tidy(() => void d.dispatchAsync(x, indices, weights, cap)); // dropped inside tidy: freed by it
    expect(memoryStats(cpu).liveBytes).toBe(inputs);
    const kept = tidy(() => d.dispatchAsync(x, indices, weights, cap)); // returned: its tensors survive
    const { rows, weights: rowWeights, handle } = kept.wait();
    expect(rows.disposed).toBe(false);
    expect(rows.shape[0]).toBe(handle.localRows.reduce((a, b) => a + b, 0));
    kept.dispose(); // after wait the result is the caller's
    expect(rows.disposed).toBe(false);
    expect(() => kept.wait()).toThrow(DisposedError);
    expect(() => kept.query()).toThrow(/CommWork.query: the work was disposed/);
    for (const t of [rows, rowWeights]) t.dispose();
    handle.dispose();
    for (const t of [x, indices, weights, ...Object.values(cap)]) if (t instanceof Tensor) t.dispose();
    d.dispose();
    expect(memoryStats(cpu).liveBytes).toBe(before);
  });

  it('without a comm stream the work ran in line: no event, complete, the same result', () => {
    const { d, x, indices, weights, cap } = setup();
    tidy(() => {
      using w = d.dispatchAsync(x, indices, weights, cap);
      expect(w.event).toBeNull();
      expect(w.query()).toBe(true);
      const got = w.wait();
      const ref = d.dispatch(x, indices, weights, cap);
      expect(bits(got.rows)).toEqual(bits(ref.rows));
      got.handle.dispose();
      ref.handle.dispose();
    });
  });

  it('bad arguments are named', () => {
    using comm = new Stream(cpu);
    const { d, x, indices, weights, cap } = setup(comm);
    const side = d;
    expectInvalidArgument(
      () => new Dispatcher({ numExperts: 4, commStream: 'side' as unknown as Stream }),
      /Dispatcher: 'commStream' must be a Stream; received side/,
    );
    expectInvalidArgument(
      () => side.dispatchAsync(x, indices, weights, cap, { after: 5 as unknown as Event }),
      /dispatch: 'after' must be an Event/,
    );
    expectInvalidArgument(() => side.dispatchAsync([1, 2] as unknown as Tensor, indices, weights, cap), /dispatch: 'x' must be a Tensor/);
    expectInvalidArgument(
      () => side.combineAsync(x, {} as DispatchHandle, weights),
      /combine: 'handle' must be the handle dispatch\(\) returned/,
    );
    expectInvalidArgument(
      () => side.dispatchBackwardAsync(x, null as unknown as DispatchHandle),
      /dispatchBackward: 'handle' must be the handle/,
    );
    tidy(() => {
      using w = side.dispatchAsync(x, indices, weights, cap);
      expectInvalidArgument(() => w.waitOn('now' as unknown as Stream), /CommWork.waitOn: 'stream' must be a Stream/);
      w.wait().handle.dispose();
    });
    const gone = new Stream(cpu);
    gone.dispose();
    const late = new Dispatcher({ numExperts: 4, commStream: gone });
    expect(() => late.dispatch(x, indices, weights, cap)).toThrow(/dispatch: 'commStream' was disposed/);
    d.dispose();
  });
});

describe('trace: the phase timeline', () => {
  it('records the dispatcher phases in order only while enabled, then starts afresh', () => {
    const [T, E, k, H] = [16, 4, 2, 8];
    tidy(() => {
      const x = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
      const { indices, weights } = routing(T, E, k);
      const cap = capacity(indices, weights, { numExperts: E });
      const d = new Dispatcher({ numExperts: E });
      const dy = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
      const run = (): void => {
        const out = d.dispatch(x, indices, weights, cap);
        d.combine(out.rows, out.handle, weights);
        const { dExpertOut } = d.combineBackward(dy, out.rows, out.handle, weights);
        d.dispatchBackward(dExpertOut, out.handle);
        out.handle.dispose();
      };
      run();
      expect(trace.collect()).toEqual([]); // off: nothing recorded
      trace.enable();
      try {
        run();
        const rows = trace.collect();
        expect(rows.map((r) => r.name)).toEqual([
          // One rank ('local'): the permute is the dispatch; nothing is exchanged or read.
          'dispatch: start',
          'dispatch: permuted',
          'combine: start',
          'combine: rows home',
          'combine: unpermuted',
          'combineBackward: start',
          'combineBackward: expert outputs home',
          'combineBackward: row gradients exchanged',
          'combineBackward: regrouped',
          'dispatchBackward: start',
          'dispatchBackward: row gradients home',
          'dispatchBackward: summed per token',
        ]);
        expect(rows[0]!.hostMs).toBe(0);
        for (let i = 1; i < rows.length; i++) expect(rows[i]!.hostMs).toBeGreaterThanOrEqual(rows[i - 1]!.hostMs);
        expect(rows.every((r) => r.gpuMs === null)).toBe(true); // CPU marks have no GPU time
        expect(trace.collect()).toEqual([]);
      } finally {
        trace.disable();
      }
    });
  });
});

describe('the low-latency decode buffers (peer transport, capacity mode)', () => {
  it('are sized for T tokens, P ranks and C rows per (local expert, source); offsets l·P·C; all disposed', () => {
    const before = memoryStats(cpu).liveBytes;
    const [P, El, T, k, H, C] = [4, 3, 8, 2, 16, 5];
    const b = peerDecodeBuffers({ P, localExperts: El, T, topK: k, hidden: H, segment: C, dtype: 'bf16' }, Device.parse(cpu, 'test'));
    const N = El * P * C;
    expect(b.pos.shape).toEqual([T, P]);
    expect(b.dest.shape).toEqual([T, k]);
    expect(b.rows.shape).toEqual([N, H]);
    expect(b.rows.dtype).toBe('bf16');
    expect(b.rowWeights.shape).toEqual([N]);
    expect(b.rowSrc.shape).toEqual([N]);
    expect(b.recvRowOf.shape).toEqual([P, T, k]);
    expect(b.recvWeight.shape).toEqual([P, T, k]);
    expect(b.recvTokens.shape).toEqual([P]);
    expect(Array.from(b.offsets.toArray() as Int32Array)).toEqual([0, P * C, 2 * P * C, 3 * P * C]);
    expect(b.tensors).toHaveLength(9);
    expect(peerDecodeNeed(T, k, H, 'bf16', El)).toEqual({ tokens: T, rowBytes: 2 * H, topK: k, localExperts: El });
    for (const t of b.tensors) t.dispose();
    expect(memoryStats(cpu).liveBytes).toBe(before);
  });
});
