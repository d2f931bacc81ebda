// CUDA graphs on the GPU: a captured sequence of ops replayed with new inputs gives the eager
// result bit for bit (the same kernels run), temporaries freed inside the capture are reused from
// the graph's pool and outputs stay valid across replays (and after the graph is disposed); a
// capture that waits for the host or copies from the host fails with a GraphCaptureError naming
// what broke it, even when `fn` swallowed the error, and the stream is usable afterwards;
// MoEInference.captureDecode for T = 1, 8, 64 (Mixtral-like, DeepSeek-like, capacity) equals the
// eager forward bit for bit, and a replayed step waits for nothing and allocates nothing.
import { describe, expect, it } from 'vitest';

import {
  cuda,
  CudaError,
  CudaGraph,
  emptyCache,
  Event,
  GraphCaptureError,
  InvalidArgumentError,
  memoryStats,
  type MoEGradBuffers,
  MoEInference,
  type MoEInferenceConfig,
  MoELayer,
  type MoELayerConfig,
  ops,
  Stream,
  synchronize,
  Tensor,
  tidy,
  withStream,
} from '../../lib/index.js';
import { freshSeed, MOE_WEIGHT_GRADS, relErr } from '../helpers.js';
import { hasGpu } from './gpu.js';

const gpu = 'cuda:0' as const;
const bits = (t: Tensor): Buffer => Buffer.from((t.toArray() as Uint16Array | Float32Array).buffer);
const bf16Randn = (shape: number[], seed: number, std = 1): Tensor =>
  tidy(() => Tensor.randn(shape, { seed, std, device: gpu }).cast('bf16'));

/** Expects fn to throw a GraphCaptureError whose message matches `pattern`. */
function expectCaptureError(fn: () => unknown, pattern: RegExp): GraphCaptureError {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err, String(err)).toBeInstanceOf(GraphCaptureError);
  expect((err as Error).message).toMatch(pattern);
  return err as GraphCaptureError;
}

describe.skipIf(!hasGpu)('CudaGraph on the GPU', () => {
  it('replays a captured sequence of ops with new inputs: the eager result bit for bit; pool reuse; outputs outlive the graph', () => {
    const seed = freshSeed();
    const base = memoryStats(gpu);
    {
      using stream = new Stream(gpu);
      using x = bf16Randn([64, 256], seed);
      using w1 = bf16Randn([256, 128], seed + 1, 0.05);
      using b = bf16Randn([128], seed + 2);
      using w2 = bf16Randn([128, 64], seed + 3, 0.05);
      // The inner scope frees the first product inside the capture; scale's output, the same size,
      // is then served from the graph's pool (same stream, in stream order).
      const f = (): Tensor =>
        tidy(() => {
          const h = tidy(() => ops.add(ops.matmul(x, w1), b));
          return ops.matmul(ops.scale(h, 0.5), w2).cast('f32');
        });
      using ref = f();
      const pool0 = memoryStats(gpu);
      const graph = CudaGraph.capture(stream, f, { retain: [x, w1, b, w2] });
      const y = graph.outputs;
      expect(y.shape).toEqual([64, 64]);
      expect(y.dtype).toBe('f32');
      expect(graph.nodeCount, 'matmul, add, scale, matmul, cast: one node at least each').toBeGreaterThanOrEqual(5);
      expect(graph.poolBytes).toBeGreaterThan(0);
      const captured = memoryStats(gpu);
      expect(captured.graphPoolBytes - pool0.graphPoolBytes).toBe(graph.poolBytes);
      // Five outputs allocated in the capture (matmul, add, scale, matmul, cast); scale's came from the
      // pool's free list (the first product's block), the rest from cudaMalloc into the pool.
      expect(captured.allocations - pool0.allocations).toBe(5);
      expect(captured.cacheHits - pool0.cacheHits, 'a temporary freed inside the capture reused in it').toBeGreaterThanOrEqual(1);
      // Capture records the work; nothing ran and no device memory was taken from the general cache.
      graph.replay();
      expect(bits(y).equals(bits(ref)), `seed ${seed}: first replay against eager`).toBe(true);
      const poolAfterFirst = graph.poolBytes;
      for (let round = 0; round < 3; round++) {
        tidy(() => x.copy_(bf16Randn([64, 256], seed + 10 + round)));
        graph.replay();
        using eager = f();
        expect(bits(y).equals(bits(eager)), `seed ${seed}, round ${round}: replay with new inputs against eager`).toBe(true);
      }
      // On another stream, ordered after the input write on the current one by an event.
      tidy(() => x.copy_(bf16Randn([64, 256], seed + 20)));
      using s2 = new Stream(gpu);
      using written = new Event(gpu);
      written.record();
      s2.waitEvent(written);
      graph.replay(s2);
      s2.synchronize();
      using eager2 = f();
      expect(bits(y).equals(bits(eager2)), `seed ${seed}: replay on another stream`).toBe(true);
      expect(graph.replays).toBe(5);
      expect(graph.poolBytes, 'replays allocate nothing').toBe(poolAfterFirst);
      // The output outlives the graph: its block leaves the pool with the tensor.
      const last = bits(y);
      graph.dispose();
      expect(graph.disposed).toBe(true);
      expect(() => graph.replay()).toThrow(/CudaGraph: the graph was disposed/);
      expect(memoryStats(gpu).graphPoolBytes).toBe(base.graphPoolBytes);
      expect(bits(y).equals(last)).toBe(true);
      y.dispose();
    }
    synchronize(gpu);
    expect(memoryStats(gpu).liveBytes).toBe(base.liveBytes);
    expect(memoryStats(gpu).graphPoolBytes).toBe(base.graphPoolBytes);
  });

  it("a disposed graph's memory serves any stream once the work queued on it is done (not only its capture stream)", () => {
    const seed = freshSeed();
    const n = 8 << 20; // 32 MiB of f32: blocks no other test leaves at this size
    using x = Tensor.rand([n], { seed, device: gpu });
    synchronize(gpu);
    emptyCache(gpu); // nothing cached: a block served below can only be the graph's
    {
      using capture = new Stream(gpu);
      const graph = CudaGraph.capture(capture, () => tidy(() => ops.scale(ops.scale(x, 2), 0.5)), { retain: [x] });
      graph.replay();
      const y = graph.outputs;
      graph.dispose();
      y.dispose(); // the intermediate's block and the output's are both the released graph's
    }
    synchronize(gpu); // (the released blocks count as cached once an allocation finds their events passed)
    const before = memoryStats(gpu);
    // The current stream, not the capture stream: two blocks of that size, both from the cache.
    using a = Tensor.empty([n], { device: gpu });
    using b = Tensor.empty([n], { device: gpu });
    const after = memoryStats(gpu);
    expect(after.reservedBytes, `seed ${seed}: no new device memory`).toBe(before.reservedBytes);
    expect(after.cacheHits - before.cacheHits).toBe(2);
    // Still correct to use: written and read on this stream.
    a.copy_(x);
    expect(bits(a).equals(bits(x))).toBe(true);
    expect(b.numel).toBe(n);
  });

  it('a block freed on the default stream is not handed to another stream (only idle released graph blocks serve any stream)', () => {
    const n = 6 << 20; // 24 MiB of f32: a size no other test leaves cached
    synchronize(gpu);
    emptyCache(gpu);
    {
      using _t = Tensor.zeros([n], { device: gpu }); // on the default stream, its fill maybe still queued
    }
    using s = new Stream(gpu);
    const before = memoryStats(gpu);
    withStream(s, () => {
      using u = Tensor.empty([n], { device: gpu });
      expect(u.numel).toBe(n);
    });
    const after = memoryStats(gpu);
    expect(after.cacheHits - before.cacheHits, "the default stream's block is not another stream's").toBe(0);
    expect(after.reservedBytes - before.reservedBytes).toBeGreaterThanOrEqual(n * 4);
  });

  it('a capture that waits for the host or copies from it fails naming the op, also when fn swallows the error; the stream stays usable', () => {
    const seed = freshSeed();
    using stream = new Stream(gpu);
    using x = tidy(() => Tensor.randn([8, 32], { seed, device: gpu }));
    synchronize(gpu);
    const before = memoryStats(gpu);
    const waits0 = cuda.hostWaitCounts();
    const read = expectCaptureError(
      () =>
        CudaGraph.capture(stream, () => {
          const y = ops.scale(x, 2);
          y.toArray();
          return y;
        }),
      /^CudaGraph\.capture: the capture was broken by toArray, which reads a device tensor on the host .*Nothing was captured and the stream is no longer capturing/,
    );
    expect(read.cause).toBeInstanceOf(CudaError);
    expect((read.cause as Error).message).toMatch(/^toArray: not allowed while a CUDA graph is being captured on this thread/);
    expectCaptureError(
      () =>
        CudaGraph.capture(stream, () => {
          const y = ops.scale(x, 2);
          try {
            y.toArray();
          } catch {
            // swallowed: the capture must still fail
          }
          return y;
        }),
      /^CudaGraph\.capture: the capture was broken by toArray, which reads a device tensor on the host/,
    );
    expectCaptureError(
      () =>
        CudaGraph.capture(stream, () => {
          ops.scale(x, 2);
          stream.synchronize();
        }),
      /the capture was broken by Stream\.synchronize, which waits for the device/,
    );
    expectCaptureError(
      () =>
        CudaGraph.capture(stream, () => {
          ops.scale(x, 2);
          synchronize(gpu);
        }),
      /the capture was broken by synchronize, which waits for the device/,
    );
    expectCaptureError(
      () => CudaGraph.capture(stream, () => Tensor.fromArray([1, 2, 3], { device: gpu })),
      /the capture was broken by copy, which copies host memory to the device/,
    );
    // Refused before any CUDA call: the host counters did not move.
    expect(cuda.hostWaitCounts()).toEqual(waits0);
    // Captures do not nest; an error that does not break the capture is rethrown as it is.
    using inner = new Stream(gpu);
    expect(() => CudaGraph.capture(stream, () => CudaGraph.capture(inner, () => undefined))).toThrow(InvalidArgumentError);
    expect(() => CudaGraph.capture(stream, () => CudaGraph.capture(inner, () => undefined))).toThrow(
      /this thread is already capturing a CUDA graph/,
    );
    expect(() =>
      CudaGraph.capture(stream, () => {
        throw new RangeError('boom');
      }),
    ).toThrow(RangeError);
    // The stream works eagerly again, and nothing was kept.
    const z = withStream(stream, () => ops.scale(x, 3));
    stream.synchronize();
    expect(stream.query()).toBe(true);
    const xs = Array.from(x.toArray() as Float32Array);
    expect(Array.from(z.toArray() as Float32Array)).toEqual(xs.map((v) => Math.fround(v * 3)));
    z.dispose();
    expect(memoryStats(gpu).liveBytes).toBe(before.liveBytes);
    expect(memoryStats(gpu).graphPoolBytes).toBe(before.graphPoolBytes);
    // And it captures fine afterwards.
    using g = CudaGraph.capture(stream, () => ops.scale(x, 4), { retain: [x] });
    g.replay();
    expect(Array.from(g.outputs.toArray() as Float32Array)).toEqual(xs.map((v) => Math.fround(v * 4)));
    g.outputs.dispose();
  });
});

const decodeCases: [string, MoELayerConfig][] = [
  ['Mixtral-like: softmax top-2 of 8, normalised, dropless', { hidden: 512, ffn: 256, numExperts: 8, topK: 2, normalize: true }],
  [
    'DeepSeek-like: sigmoid + bias, 4 groups keep 2, top-4 of 32, route scale, shared expert, dropless',
    { hidden: 256, ffn: 128, numExperts: 32, topK: 4, scoreFunction: 'sigmoid', groups: 4, topkGroups: 2, routeScale: 2.5, sharedFfn: 256 },
  ],
  ['capacity 1.25 (fixed segments, drop by probability)', { hidden: 256, ffn: 128, numExperts: 8, topK: 2, capacityFactor: 1.25 }],
];

describe.skipIf(!hasGpu)('MoEInference.captureDecode on the GPU', () => {
  for (const [name, config] of decodeCases) {
    it(`${name}: the graph equals the eager forward bit for bit at T = 1, 8, 64; a replayed step waits for nothing and allocates nothing`, () => {
      const seed = freshSeed();
      const H = config.hidden;
      const base = memoryStats(gpu);
      {
        using layer = new MoELayer({ ...config, seed, device: gpu });
        tidy(() => layer.bias.copy_(Tensor.randn([config.numExperts], { std: 0.02, seed: seed + 1, device: gpu })));
        using eager = MoEInference.fromLayer(layer);
        using graphed = MoEInference.fromLayer(layer);
        const Ts = [1, 8, 64];
        let pools = 0;
        for (const T of Ts) {
          const info = graphed.captureDecode(T);
          expect(info.T).toBe(T);
          expect(info.ioBytes).toBe(2 * T * H * 2);
          expect(info.workspaceBytes).toBe(eager.workspaceBytes(T));
          expect(info.poolBytes, 'capacity() and the grouped GEMMs take scratch inside').toBeGreaterThan(0);
          expect(info.nodes).toBeGreaterThan(5);
          expect(graphed.captureDecode(T), 'capturing again returns the same graph').toEqual(info);
          pools += info.poolBytes;
        }
        expect(graphed.decodeGraphs().map((g) => g.T)).toEqual(Ts);
        expect(memoryStats(gpu).graphPoolBytes - base.graphPoolBytes).toBe(pools);
        for (const T of Ts) {
          using ye = Tensor.empty([T, H], { dtype: 'bf16', device: gpu });
          using yg = Tensor.empty([T, H], { dtype: 'bf16', device: gpu });
          for (let round = 0; round < 3; round++) {
            using x = bf16Randn([T, H], seed + 100 * T + round);
            eager.forward(x, { out: ye });
            graphed.forward(x, { out: yg });
            expect(bits(yg).equals(bits(ye)), `seed ${seed}, T ${T}, round ${round}: graph against eager`).toBe(true);
          }
          tidy(() => {
            const x = bf16Randn([T, H], seed + 100 * T + 7);
            expect(bits(graphed.forward(x)).equals(bits(eager.forward(x))), `seed ${seed}, T ${T}: without out`).toBe(true);
          });
        }
        // A replayed step: no host wait of any kind, no allocation (not even from the cache), pools unchanged.
        using x8 = bf16Randn([8, H], seed + 5);
        using y8 = Tensor.empty([8, H], { dtype: 'bf16', device: gpu });
        graphed.forward(x8, { out: y8 });
        synchronize(gpu);
        const waits0 = cuda.hostWaitCounts();
        const m0 = memoryStats(gpu);
        for (let i = 0; i < 10; i++) graphed.forward(x8, { out: y8 });
        const waits1 = cuda.hostWaitCounts();
        const m1 = memoryStats(gpu);
        expect(waits1, 'host waits during 10 replayed steps').toEqual(waits0);
        expect(m1.allocations - m0.allocations, 'allocations during 10 replayed steps').toBe(0);
        expect(m1.deviceMallocs - m0.deviceMallocs).toBe(0);
        expect(m1.graphPoolBytes).toBe(m0.graphPoolBytes);
        using y8e = eager.forward(x8);
        expect(bits(y8).equals(bits(y8e))).toBe(true);
        // Released: the pools go back, and forwards of those T run eagerly again with the same result.
        graphed.releaseGraphs();
        expect(graphed.decodeGraphs()).toEqual([]);
        expect(memoryStats(gpu).graphPoolBytes).toBe(base.graphPoolBytes);
        using again = graphed.forward(x8);
        expect(bits(again).equals(bits(y8e))).toBe(true);
      }
      synchronize(gpu);
      expect(memoryStats(gpu).liveBytes).toBe(base.liveBytes);
      expect(memoryStats(gpu).graphPoolBytes).toBe(base.graphPoolBytes);
    });
  }
});

// MoEInference's own modes (not MoELayer options): Llama 4's router weight on the experts' input,
// gpt-oss's router bias, expert biases and clamped SwiGLU (expertBias and clampedSwiglu's CUDA
// kernels inside the step). Captured against eager bit for bit, eager against the CPU (the same
// routing there: CPU and GPU logits differ by accumulation order alone, ~1e-6, far below the gaps
// between these random logits but for a rare near-tie, which the seed in the message reproduces).
describe.skipIf(!hasGpu)("MoEInference's Llama 4 and gpt-oss modes on the GPU", () => {
  const H = 256,
    F = 128,
    E = 8;
  for (const mode of ['llama4', 'gpt-oss'] as const)
    for (const capacityFactor of [undefined, 1.25])
      it(`${mode}, ${capacityFactor === undefined ? 'dropless' : `capacity ${capacityFactor}`}: eager equals the CPU; the graph equals eager bit for bit (T = 1, 8, 64)`, () => {
        const seed = freshSeed();
        const gptOss = mode === 'gpt-oss';
        const config: MoEInferenceConfig = {
          hidden: H,
          ffn: F,
          numExperts: E,
          topK: gptOss ? 4 : 1,
          ...(capacityFactor === undefined ? {} : { capacityFactor }),
          ...(gptOss
            ? { normalize: true, routerBias: true, expertBias: true, activation: 'clamped-swiglu' }
            : { scoreFunction: 'sigmoid', routeWeightsOn: 'input', sharedFfn: F }),
        };
        const base = memoryStats(gpu).liveBytes;
        {
          const made = (device: 'cpu' | typeof gpu) =>
            tidy(() => {
              const r = (shape: number[], s: number, std: number): Tensor => bf16Randn(shape, seed + s, std).to(device);
              return {
                router: r([1, H, E], 1, 0.1),
                w13: r([E, H, 2 * F], 2, 0.06),
                w2: r([E, F, H], 3, 0.09),
                ...(gptOss
                  ? {
                      routerBias: Tensor.randn([E], { std: 0.5, seed: seed + 4, device: 'cpu' }).to(device),
                      w13Bias: r([E, 2 * F], 5, 3),
                      w2Bias: r([E, H], 6, 0.5),
                    }
                  : { sharedW13: r([1, H, 2 * F], 7, 0.06), sharedW2: r([1, F, H], 8, 0.09) }),
              };
            });
          using onCpu = new MoEInference({ ...config, device: 'cpu' }, made('cpu'));
          using eager = new MoEInference({ ...config, device: gpu }, made(gpu));
          using graphed = new MoEInference({ ...config, device: gpu }, made(gpu));
          for (const T of [1, 8, 64]) {
            graphed.captureDecode(T);
            for (let round = 0; round < 2; round++)
              tidy(() => {
                const x = bf16Randn([T, H], seed + 100 * T + round);
                const ye = eager.forward(x);
                expect(bits(graphed.forward(x)).equals(bits(ye)), `seed ${seed}, T ${T}: graph against eager`).toBe(true);
                const yc = Array.from(onCpu.forward(x.to('cpu')).toFloat32Array());
                const err = relErr(Array.from(ye.toFloat32Array()), yc);
                expect(err, `seed ${seed}, T ${T}: GPU against CPU`).toBeLessThan(2e-2);
              });
          }
        }
        synchronize(gpu);
        expect(memoryStats(gpu).liveBytes).toBe(base);
      });
});

// A MoELayer training step (forward, then backward with the weight gradients written into buffers)
// captured once after one eager step (which makes the layer's per-T tensors from the host), then
// replayed with new x and dy written into the captured inputs: y, dx, the aux loss and every
// gradient buffer the eager step's bits (the same kernels on the same values); a replay waits for
// nothing on the host and allocates nothing. The shapes a capture needs are fixed: one rank,
// dropless or padded to capacity.
const stepCases: [string, Partial<MoELayerConfig>][] = [
  ['dropless softmax, gated shared expert', { sharedFfn: 64, sharedGate: true }],
  [
    'capacity 1.25 padded, sigmoid in 4 groups keeping 2',
    { capacityFactor: 1.25, padToCapacity: true, scoreFunction: 'sigmoid', groups: 4, topkGroups: 2 },
  ],
  ["dropless, recompute 'layer', the experts' gradients in bf16", { recompute: 'layer', weightGradDtype: 'bf16' }],
  ["gpt-oss's biases and clamped SwiGLU", { routerBias: true, expertBias: true, activation: 'clamped-swiglu' }],
];

describe.skipIf(!hasGpu)('a MoELayer training step in a CudaGraph', () => {
  for (const [name, extra] of stepCases) {
    it(`${name}: captured once, replayed with new x and dy, equals the eager step bit for bit; a replay waits for nothing and allocates nothing`, () => {
      const seed = freshSeed();
      const base = memoryStats(gpu);
      {
        using layer = new MoELayer({ hidden: 256, ffn: 128, numExperts: 16, topK: 4, seed, device: gpu, dtype: 'bf16', ...extra });
        using stream = new Stream(gpu);
        using x = bf16Randn([1000, 256], seed + 1);
        using dy = bf16Randn([1000, 256], seed + 2);
        const experts = new Set<string>(['w13', 'w2', 'sharedW13', 'sharedW2']);
        const present = MOE_WEIGHT_GRADS.filter((k) => layer.master[k]);
        const buffers = (): MoEGradBuffers =>
          Object.fromEntries(
            present.map((k) => [
              k,
              Tensor.full((layer.master[k] as Tensor).shape, Number.NaN, {
                device: gpu,
                dtype: experts.has(k) ? layer.config.weightGradDtype : 'f32',
              }),
            ]),
          ) as unknown as MoEGradBuffers;
        const graphGrads = buffers();
        const eagerGrads = buffers();
        const step = (into: MoEGradBuffers) =>
          tidy(() => {
            const f = layer.forward(x);
            const g = layer.backward(f, dy, { out: into });
            return { y: f.y, aux: f.auxLoss, dx: g.dx };
          });
        for (const t of Object.values(step(eagerGrads))) t.dispose(); // the per-T caches, eagerly
        const graph = CudaGraph.capture(stream, () => step(graphGrads), { retain: [x, dy, ...(Object.values(graphGrads) as Tensor[])] });
        expect(graph.nodeCount).toBeGreaterThan(10);
        for (let round = 0; round < 3; round++) {
          if (round > 0)
            tidy(() => {
              x.copy_(bf16Randn([1000, 256], seed + 10 * round + 3));
              dy.copy_(bf16Randn([1000, 256], seed + 10 * round + 4));
            });
          synchronize(gpu);
          const waits0 = cuda.hostWaitCounts();
          const m0 = memoryStats(gpu);
          graph.replay();
          expect(cuda.hostWaitCounts(), 'host waits during a replayed step').toEqual(waits0);
          expect(memoryStats(gpu).allocations - m0.allocations, 'allocations during a replayed step').toBe(0);
          const eager = step(eagerGrads);
          for (const k of ['y', 'aux', 'dx'] as const)
            expect(bits(graph.outputs[k]).equals(bits(eager[k])), `seed ${seed}, round ${round}: ${k}`).toBe(true);
          for (const k of present)
            expect(bits(graphGrads[k] as Tensor).equals(bits(eagerGrads[k] as Tensor)), `seed ${seed}, round ${round}: ${k}`).toBe(true);
          for (const t of Object.values(eager)) t.dispose();
        }
        for (const t of Object.values(graph.outputs)) t.dispose();
        graph.dispose();
        for (const t of [...Object.values(graphGrads), ...Object.values(eagerGrads)] as Tensor[]) t.dispose();
      }
      synchronize(gpu);
      expect(memoryStats(gpu).liveBytes).toBe(base.liveBytes);
      expect(memoryStats(gpu).graphPoolBytes).toBe(base.graphPoolBytes);
    });
  }
});
