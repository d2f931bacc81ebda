// CUDA graphs where there is no GPU (or no CUDA in the build): CudaGraph.capture names bad
// arguments and refuses a CPU stream with UnavailableError without running `fn`.
// The GPU side is test/gpu/61-graph.gpu.test.ts.
import { describe, expect, it } from 'vitest';

import {
  cuda,
  CudaGraph,
  DisposedError,
  GraphCaptureError,
  memoryStats,
  Stream,
  Tensor,
  UnavailableError,
} from '../lib/index.js';
import { native } from '../lib/native.js';
import { expectInvalidArgument } from './helpers.js';

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
    expectInvalidArgument(() => CudaGraph.capture(null as unknown as Stream, fn), /CudaGraph\.capture: 'stream' must be a Stream; received null/);
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
    expect((err as Error).message).toMatch(native().buildInfo().cuda ? /CudaGraph\.capture: CUDA graphs need a CUDA stream; 'stream' is on cpu/ : /CudaGraph\.capture: CUDA graphs need CUDA, and this moe-ep addon was built without it/);
    expect(ran).toBe(false);
    expect(memoryStats(cpu).liveBytes).toBe(before);
  });

  it('memoryStats has graphPoolBytes (0 on the CPU)', () => {
    expect(memoryStats(cpu).graphPoolBytes).toBe(0);
  });
});
