// CUDA graphs where there is no GPU (or no CUDA in the build): CudaGraph.capture names bad
// arguments, refuses a CPU stream with UnavailableError without running `fn`, and
// MoEInference.captureDecode refuses a CPU layer the same way and leaves the layer working.
// The GPU side is test/gpu/61-graph.gpu.test.ts.
import { describe, expect, it } from 'vitest';

import {
  cuda,
  CudaGraph,
  DisposedError,
  GraphCaptureError,
  memoryStats,
  MoEInference,
  MoELayer,
  Stream,
  Tensor,
  tidy,
  UnavailableError,
} from '../lib/index.js';
import { native } from '../lib/native.js';
import { expectInvalidArgument, expectNoLeak, freshSeed } from './helpers.js';

const cpu = 'cpu' as const;

describe('CudaGraph without a GPU', () => {
  it('isAvailable follows cuda.isAvailable(); GraphCaptureError is a CudaError of kind Cuda', () => {
    expect(CudaGraph.isAvailable()).toBe(cuda.isAvailable());
    const e = new GraphCaptureError('CudaGraph.capture: x', 'CudaGraph.capture', new Error('why'));
    expect(e.kind).toBe('Cuda');
    expect(e.name).toBe('GraphCaptureError');
    expect((e.cause as Error).message).toBe('why');
  });

  it('names bad arguments before capturing anything', () => {
    using s = new Stream(cpu);
    const fn = (): void => undefined;
    expectInvalidArgument(
      () => CudaGraph.capture(null as unknown as Stream, fn),
      /CudaGraph\.capture: 'stream' must be a Stream; received null/,
    );
    expectInvalidArgument(() => CudaGraph.capture('cuda' as unknown as Stream, fn), /'stream' must be a Stream; received cuda/);
    expectInvalidArgument(() => CudaGraph.capture(s, 42 as unknown as () => void), /'fn' must be a function; received number/);
    expectInvalidArgument(() => CudaGraph.capture(s, fn, { retian: [] } as never), /unknown option 'retian' \(did you mean 'retain'\?\)/);
    expectInvalidArgument(() => CudaGraph.capture(s, fn, { retain: 'x' as never }), /'retain' must be an array of tensors/);
    expectInvalidArgument(() => CudaGraph.capture(s, fn, { retain: [{} as Tensor] }), /'retain\[0\]' must be a Tensor/);
    const gone = new Stream(cpu);
    gone.dispose();
    expect(() => CudaGraph.capture(gone, fn)).toThrow(DisposedError);
  });

  it('a CPU stream is refused with UnavailableError, without running fn or allocating', () => {
    using s = new Stream(cpu);
    let ran = false;
    const before = memoryStats(cpu).liveBytes;
    let err: unknown;
    try {
      CudaGraph.capture(s, () => {
        ran = true;
        return Tensor.zeros([4], { device: cpu });
      });
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(UnavailableError);
    // A CPU-only build says CUDA is missing; a CUDA build says the stream is on the CPU.
    expect((err as Error).message).toMatch(
      native().buildInfo().cuda
        ? /CudaGraph\.capture: CUDA graphs need a CUDA stream; 'stream' is on cpu/
        : /CudaGraph\.capture: CUDA graphs need CUDA, and this moe-ep addon was built without it/,
    );
    expect(ran).toBe(false);
    expect(memoryStats(cpu).liveBytes).toBe(before);
  });

  it('memoryStats has graphPoolBytes (0 on the CPU)', () => {
    expect(memoryStats(cpu).graphPoolBytes).toBe(0);
  });
});

describe('MoEInference.captureDecode without a GPU', () => {
  it('a CPU layer is refused with UnavailableError and keeps working; bad T and a disposed layer are named', () => {
    const seed = freshSeed();
    expectNoLeak(cpu, () => {
      using layer = new MoELayer({ hidden: 16, ffn: 8, numExperts: 4, topK: 2, dtype: 'f32', device: cpu, seed });
      const inf = MoEInference.fromLayer(layer);
      expectInvalidArgument(() => inf.captureDecode(0), /MoEInference\.captureDecode: 'T' must be a positive integer; received 0/);
      expectInvalidArgument(() => inf.captureDecode(1.5), /'T' must be a positive integer; received 1.5/);
      expect(() => inf.captureDecode(4)).toThrow(UnavailableError);
      expect(() => inf.captureDecode(4)).toThrow(/MoEInference\.captureDecode: CUDA graphs need a CUDA device; this layer is on cpu/);
      expect(inf.decodeGraphs()).toEqual([]);
      tidy(() => {
        const x = Tensor.randn([4, 16], { seed: seed + 1, device: cpu });
        const y = inf.forward(x);
        expect(y.shape).toEqual([4, 16]);
        expect(Array.from(y.toArray() as Float32Array).every(Number.isFinite)).toBe(true);
      });
      inf.releaseGraphs();
      inf.dispose();
      expect(() => inf.captureDecode(4)).toThrow(DisposedError);
      tidy(() => {
        const x = Tensor.randn([4, 16], { device: cpu });
        expect(() => inf.forward(x)).toThrow(/MoEInference\.forward: the layer was disposed and cannot be used/);
      });
    });
  });
});
