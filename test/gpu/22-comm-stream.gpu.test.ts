// Communication on its own stream on cuda:0 (correctness, not timing): the dispatcher with a
// one-rank NCCL communicator runs dispatch, combine and both backward passes on a comm stream
// while matmuls run on the compute stream; every result equals the CPU dispatcher's, and the
// matmuls are right too. A group of one moves no rows through its communicator, so NCCL's own
// allToAllV is run on the comm stream separately (runOnStream), with and without its host-side
// timeout wait. The allocator holds back a block used on two streams until both are done; the MoE
// layer with a comm stream gives the same outputs. Live device bytes back at baseline.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';

import { afterEach, beforeEach, describe, expect, it } from 'vitest';

import {
  capacity,
  Communicator,
  currentStream,
  Dispatcher,
  DisposedError,
  emptyCache,
  Event,
  memoryStats,
  MoELayer,
  ops,
  runOnStream,
  Stream,
  synchronize,
  Tensor,
  tidy,
  withStream,
} from '../../lib/index.js';
import { native, packageRoot } from '../../lib/native.js';
import { freshSeed, relErr, rng, values } from '../helpers.js';
import { hasGpu } from './gpu.js';

const gpu = 'cuda:0' as const;
const cpu = 'cpu' as const;
const hasNccl = hasGpu && native().ncclStatus().loaded;

const bytes = (t: Tensor): Buffer => {
  const a = t.toArray() as ArrayBufferView;
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
};
// Buffer.equals, not toEqual: vitest's deep equality takes minutes on tens of megabytes.
const same = (a: Tensor, b: Tensor): boolean => bytes(a).equals(bytes(b));

/** k distinct experts per token among the first E − 1 (the last expert idles). */
function routing(T: number, k: number, E: number, seed: number): { indices: Tensor; weights: Tensor } {
  const r = rng(seed);
  const idx = new Int32Array(T * k);
  const pool = Array.from({ length: E - 1 }, (_, i) => i);
  for (let t = 0; t < T; t++)
    for (let j = 0; j < k; j++) {
      const p = j + Math.floor(r() * (E - 1 - j));
      [pool[j], pool[p]] = [pool[p] as number, pool[j] as number];
      idx[t * k + j] = pool[j] as number;
    }
  return {
    indices: Tensor.fromArray(idx, { dtype: 'i32', shape: [T, k], device: cpu }),
    weights: Tensor.rand([T, k], { seed: freshSeed(), device: cpu }),
  };
}

describe.skipIf(!hasNccl)('communication on its own stream, NCCL one rank on cuda:0', () => {
  let baseline = 0;
  beforeEach(() => {
    baseline = memoryStats(gpu).liveBytes;
  });
  afterEach(() => {
    synchronize(gpu);
    expect(memoryStats(gpu).liveBytes, 'live device bytes back at baseline').toBe(baseline);
  });

  it.each([
    ['dropless (the counts are read on the comm stream)', undefined, false],
    ['capacity 1.25 padded (no host sync)', 1.25, true],
  ] as const)(
    'dispatch, combine and both backward passes on a comm stream beside compute-stream matmuls equal the CPU: %s',
    (_n, cf, pad) => {
      const [T, E, k, H, align] = [4096, 32, 4, 512, pad ? 16 : 1];
      using c = Communicator.nccl(0, 1, Communicator.ncclUniqueId(), 0, { timeoutMs: 30_000 });
      using comm = new Stream(gpu);
      const side = new Dispatcher({ numExperts: E, group: c, commStream: comm, align, padToCapacity: pad });
      const ref = new Dispatcher({ numExperts: E, align, padToCapacity: pad });
      tidy(() => {
        const { indices: iC, weights: wC } = routing(T, k, E, freshSeed());
        const xC = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
        const dyC = Tensor.randn([T, H], { seed: freshSeed(), device: cpu });
        const [iG, wG, xG, dyG] = [iC, wC, xC, dyC].map((t) => t.to(gpu)) as [Tensor, Tensor, Tensor, Tensor];
        const capOpts = { numExperts: E, ...(cf === undefined ? {} : { capacityFactor: cf }) };

        // CPU reference: "experts" scale their rows by 2.
        const rC = ref.dispatch(xC, iC, wC, capacity(iC, wC, capOpts));
        const outC = ops.scale(rC.rows, 2);
        const yC = ref.combine(outC, rC.handle, wC);
        const cbC = ref.combineBackward(dyC, outC, rC.handle, wC);
        const dxC = ref.dispatchBackward(cbC.dExpertOut, rC.handle);

        // GPU: the compute stream keeps busy with matmuls around every communication.
        const a = Tensor.randn([2048, 2048], { seed: freshSeed(), dtype: 'bf16', device: gpu });
        const b = Tensor.randn([2048, 2048], { seed: freshSeed(), dtype: 'bf16', device: gpu });
        const busy: Tensor[] = [];
        const capG = capacity(iG, wG, capOpts);
        const routed = new Event(gpu);
        routed.record();
        busy.push(ops.matmul(a, b, { dtype: 'f32' })); // queued before the dispatch, runs beside it
        const work = side.dispatchAsync(xG, iG, wG, capG, { after: routed });
        busy.push(ops.matmul(a, b, { dtype: 'f32' }));
        const got = work.wait();
        expect(same(got.rows, rC.rows), 'rows').toBe(true);
        expect(same(got.weights, rC.weights), 'row weights').toBe(true);
        expect(got.handle.localRows).toEqual(rC.handle.localRows);
        const outG = ops.scale(got.rows, 2);
        const yWork = side.combineAsync(outG, got.handle, wG);
        busy.push(ops.matmul(a, b, { dtype: 'f32' }));
        expect(relErr(values(yWork.wait()), values(yC)), 'combine').toBeLessThan(1e-6);
        const cbWork = side.combineBackwardAsync(dyG, outG, got.handle, wG);
        busy.push(ops.matmul(a, b, { dtype: 'f32' }));
        const cb = cbWork.wait();
        // The tolerances of test/gpu/11-capacity-permute for the same ops.
        expect(relErr(values(cb.dExpertOut), values(cbC.dExpertOut)), 'dExpertOut').toBeLessThan(1e-6);
        expect(relErr(values(cb.dWeights), values(cbC.dWeights)), 'dWeights').toBeLessThan(1e-4);
        const dxWork = side.dispatchBackwardAsync(cb.dExpertOut, got.handle);
        busy.push(ops.matmul(a, b, { dtype: 'f32' }));
        expect(relErr(values(dxWork.wait()), values(dxC)), 'dx').toBeLessThan(1e-5);
        // `add` made on the compute stream just before the call, behind a matmul (as the layer makes
        // the router's dx): the comm stream reads it only after it is made.
        const addSeed = freshSeed();
        const addC = Tensor.randn([T, H], { seed: addSeed, device: cpu });
        busy.push(ops.matmul(a, b, { dtype: 'f32' }));
        const addG = ops.scale(addC.to(gpu), 1);
        const dxAddWork = side.dispatchBackwardAsync(cb.dExpertOut, got.handle, { add: addG });
        busy.push(ops.matmul(a, b, { dtype: 'f32' }));
        const addV = values(addC);
        const dxAddRef = values(dxC).map((v, i) => v + (addV[i] as number));
        expect(relErr(values(dxAddWork.wait()), dxAddRef), `dx + add, seed ${addSeed}`).toBeLessThan(1e-5);
        for (const w of [work, yWork, cbWork, dxWork, dxAddWork]) w.dispose();

        // The compute stream's work was not disturbed: every matmul equals the first, whose leading
        // rows equal the CPU's.
        for (const m of busy.slice(1)) expect(same(m, busy[0] as Tensor), 'matmul').toBe(true);
        const rowsC = ops.matmul(a.narrow(0, 0, 16).to(cpu), b.to(cpu), { dtype: 'f32' });
        expect(relErr(values((busy[0] as Tensor).narrow(0, 0, 16)), values(rowsC))).toBeLessThan(1e-5);
        routed.dispose();
        for (const h of [rC.handle, got.handle]) h.dispose();
      });
      side.dispose();
      ref.dispose();
    },
  );

  it.each([
    ['timeout 0: stream-ordered only', 0],
    ['timeout 30 s: the host polls the comm stream', 30_000],
  ] as const)("NCCL's allToAllV on the comm stream (runOnStream) beside a matmul: the CPU result (%s)", (_n, timeoutMs) => {
    using c = Communicator.nccl(0, 1, Communicator.ncclUniqueId(), 0, { timeoutMs });
    using comm = new Stream(gpu);
    tidy(() => {
      const xC = Tensor.randn([3000, 256], { seed: freshSeed(), device: cpu });
      const send = ops.scale(xC.to(gpu), 3); // produced on the compute stream
      const work = runOnStream(
        comm,
        () => {
          const recv = Tensor.empty([3000, 256], { device: gpu });
          c.allToAllV(send, [3000], recv, [3000]);
          return recv;
        },
        { inputs: [send] },
      );
      const a = Tensor.randn([2048, 2048], { seed: freshSeed(), dtype: 'bf16', device: gpu });
      const m = ops.matmul(a, a, { dtype: 'f32' });
      const recv = work.wait();
      expect(same(recv, ops.scale(xC, 3))).toBe(true);
      expect(m.shape).toEqual([2048, 2048]);
      work.dispose();
    });
  });
});

describe.skipIf(!hasGpu)('communication streams on cuda:0 without NCCL', () => {
  it('the allocator reuses a block used on two streams only after both are done (recordStream)', () => {
    using comm = new Stream(gpu);
    const n = 1 << 20;
    emptyCache(gpu); // no cached blocks from earlier tests: every hit below is one of ours
    tidy(() => {
      const a = Tensor.randn([4096, 4096], { seed: freshSeed(), dtype: 'bf16', device: gpu });
      // Load the kernels used below first: CUDA loads a kernel's module at its first launch (lazy
      // loading), and that launch waited for the whole queue of matmuls (H200, f838df1: the first
      // f32 fill blocked the host 291 ms), so the GPU was idle by the check and the reuse legitimate.
      Tensor.empty([n], { device: gpu }).fill_(1).dispose();
      // A block for the comm stream, used on the compute stream behind ~0.3 s of matmuls there.
      const t = withStream(comm, () => Tensor.empty([n], { device: gpu }));
      t.recordStream();
      let m = ops.matmul(a, a, { dtype: 'bf16' });
      for (let i = 0; i < 40; i++) m = ops.matmul(m, a, { dtype: 'bf16' }); // ~9 ms each (the SIMT matmul), chained
      t.fill_(1); // queued on the compute stream behind the matmuls
      const busy = new Event(gpu);
      busy.record();
      t.dispose(); // freed on the host at once; the compute stream still has it queued
      const before = memoryStats(gpu);
      const u = withStream(comm, () => Tensor.empty([n], { device: gpu }));
      const stillBusy = !busy.query();
      busy.dispose();
      expect(stillBusy, 'premise: the compute stream is still working through the matmuls').toBe(true);
      expect(memoryStats(gpu).cacheHits, 'not handed out again while the compute stream may use it').toBe(before.cacheHits);
      synchronize(gpu);
      u.dispose();
      const after = memoryStats(gpu);
      const v = withStream(comm, () => Tensor.empty([n], { device: gpu }));
      expect(memoryStats(gpu).cacheHits, 'reused once both streams are done').toBe(after.cacheHits + 1);
      v.dispose();
      expect(m.shape).toEqual([4096, 4096]);
    });
  });

  // The 2-rank MPI run of test/mpi/moe-layer.mjs died of SIGSEGV here: its comm stream was disposed
  // (then cudaStreamDestroy) before the tensors launch() had marked as used on it were freed, and
  // freeing them recorded an allocator event on the destroyed stream. Streams are pooled now.
  it('a stream disposed while tensors marked as used on it are live: freeing them afterwards is safe', () => {
    const n = 1 << 16;
    const before = memoryStats(gpu).liveBytes;
    for (let i = 0; i < 64; i++) {
      const s = new Stream(gpu);
      const x = Tensor.randn([n], { seed: freshSeed(), device: gpu });
      const work = runOnStream(s, () => ops.scale(x, 2), { inputs: [x] }); // x's block: used on s
      const y = work.wait(); // allocated on s
      work.dispose();
      s.dispose();
      expect(s.disposed).toBe(true);
      x.dispose();
      expect(y.toNumbers().length).toBe(n);
      y.dispose();
    }
    synchronize(gpu);
    expect(memoryStats(gpu).liveBytes).toBe(before);
  });

  it("a disposed stream's CUDA stream goes back to a pool: the next Stream gets it, with its cached blocks", () => {
    const n = 1 << 16;
    emptyCache(gpu); // no cached blocks from earlier tests
    const a = new Stream(gpu);
    withStream(a, () => Tensor.empty([n], { device: gpu })).dispose(); // a cached block for a's stream
    a.dispose();
    const hits = memoryStats(gpu).cacheHits;
    using b = new Stream(gpu);
    const t = withStream(b, () => Tensor.empty([n], { device: gpu }));
    expect(memoryStats(gpu).cacheHits, 'served from the block cached for the same CUDA stream').toBe(hits + 1);
    t.dispose();
  });

  it('a stream disposed inside withStream: ops fall back to the default stream; withStream refuses it afterwards', () => {
    const s = new Stream(gpu);
    withStream(s, () => {
      expect(currentStream(gpu)).toBe(s);
      s.dispose();
      expect(currentStream(gpu)).toBeUndefined();
      using t = Tensor.full([4], 3, { device: gpu });
      expect(t.toNumbers()).toEqual([3, 3, 3, 3]);
    });
    expect(currentStream(gpu)).toBeUndefined();
    expect(() => withStream(s, () => 1)).toThrow(DisposedError);
    using z = Tensor.zeros([2], { device: gpu });
    expect(() => z.recordStream(s)).toThrow(DisposedError);
  });

  it('streams dropped without dispose and collected while tensors marked as used on them are live (a child process with --expose-gc)', () => {
    const script = `
      const { ops, runOnStream, Stream, synchronize, Tensor } = await import(${JSON.stringify(join(packageRoot(), 'dist', 'lib', 'index.js'))});
      const keep = [];
      for (let i = 0; i < 32; i++) {
        const x = Tensor.randn([4096], { seed: i, device: 'cuda:0' });
        const w = runOnStream(new Stream('cuda:0'), () => ops.scale(x, 2), { inputs: [x] }); // the Stream: unreachable after this
        keep.push(x, w.wait());
        w.dispose();
      }
      for (let r = 0; r < 8; r++) { globalThis.gc(); await new Promise((res) => setImmediate(res)); }
      for (const t of keep) t.dispose();
      synchronize('cuda:0');
      console.log('ok');
    `;
    const r = spawnSync(process.execPath, ['--expose-gc', '--input-type=module', '-e', script], {
      encoding: 'utf8',
      timeout: 60_000,
      env: { ...process.env, MOE_EP_CRASH_BACKTRACE: '1' },
    });
    expect(r.status, `${r.stdout}\n${r.stderr}`).toBe(0);
    expect(r.stdout).toContain('ok');
  });

  it('the MoE layer with a comm stream: the same outputs and gradients as without (bf16, dropless with a shared expert)', () => {
    const seed = freshSeed();
    const cfg = {
      hidden: 256,
      ffn: 128,
      numExperts: 16,
      topK: 4,
      sharedFfn: 64,
      seed,
      device: gpu,
      dtype: 'bf16' as const,
      auxLossCoef: 0.01,
    };
    const before = memoryStats(gpu).liveBytes;
    {
      using plain = new MoELayer(cfg);
      using overlap = new MoELayer({ ...cfg, commStream: true });
      tidy(() => {
        const x = Tensor.randn([2000, 256], { seed: freshSeed(), dtype: 'bf16', device: gpu });
        const dy = Tensor.randn([2000, 256], { seed: freshSeed(), dtype: 'bf16', device: gpu });
        const f0 = plain.forward(x);
        const f1 = overlap.forward(x);
        expect(relErr(values(f1.y), values(f0.y)), 'y').toBeLessThan(1e-5);
        const g0 = plain.backward(f0, dy);
        const g1 = overlap.backward(f1, dy);
        for (const key of ['dx', 'router', 'w13', 'w2', 'sharedW13', 'sharedW2'] as const) {
          expect(relErr(values(g1[key] as Tensor), values(g0[key] as Tensor)), key).toBeLessThan(1e-5);
        }
      });
    }
    synchronize(gpu);
    expect(memoryStats(gpu).liveBytes).toBe(before);
  });
});
