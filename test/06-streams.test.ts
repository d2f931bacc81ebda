// Streams and events on the CPU: they exist so device-agnostic code runs unchanged, and complete at once.
import { describe, expect, it } from 'vitest';

import {
  capacity,
  CommWork,
  currentStream,
  Dispatcher,
  DisposedError,
  Event,
  memoryStats,
  ops,
  runOnStream,
  Stream,
  Tensor,
  withStream,
} from '../lib/index.js';
import { native } from '../lib/native.js';

describe('streams and events on the CPU', () => {
  it('complete immediately and can be disposed', () => {
    using s = new Stream('cpu');
    expect(s.query()).toBe(true);
    s.synchronize();
    using e = s.recordEvent();
    expect(e.query()).toBe(true);
    e.synchronize();
    s.waitEvent(e);
  });

  it('withStream runs the function, returns its value and restores on throw', async () => {
    using s = new Stream('cpu');
    using a = Tensor.full([3], 2, { device: 'cpu' });
    const r = withStream(s, () => ops.scale(a, 2).toNumbers());
    expect(r).toEqual([4, 4, 4]);
    expect(() =>
      withStream(s, () => {
        throw new Error('boom');
      }),
    ).toThrow('boom');
    expect(currentStream('cpu')).toBeUndefined();
    expect(await withStream(s, async () => 7)).toBe(7);
  });

  it('Event.wait and Tensor.recordStream have nothing to order on the CPU; bad arguments are named', () => {
    using s = new Stream('cpu');
    using e = s.recordEvent();
    e.wait();
    e.wait(s);
    using t = Tensor.zeros([2], { device: 'cpu' });
    expect(t.recordStream(s)).toBe(t);
    t.recordStream();
    expect(() => e.wait('s' as unknown as Stream)).toThrow(/Event.wait: 'stream' must be a Stream; received s/);
    expect(() => t.recordStream({} as Stream)).toThrow(/recordStream: 'stream' must be a Stream/);
    const gone = new Stream('cpu');
    gone.dispose();
    expect(() => t.recordStream(gone)).toThrow(DisposedError);
    expect(() => e.wait(gone)).toThrow(DisposedError);
  });

  it('runOnStream: the result through wait(); an unwaited result is freed on dispose, its inputs are not', () => {
    using s = new Stream('cpu');
    const before = memoryStats('cpu').liveBytes;
    {
      using a = Tensor.fromArray([1, 2, 3], { device: 'cpu' });
      using w = runOnStream(s, () => ({ twice: ops.scale(a, 2), same: a }), { inputs: [a] });
      expect(w).toBeInstanceOf(CommWork);
      expect(w.query()).toBe(true);
      const r = w.synchronize();
      expect(r.twice.toNumbers()).toEqual([2, 4, 6]);
      expect(r.same).toBe(a);
      r.twice.dispose();
      const dropped = runOnStream(s, () => [ops.scale(a, 3), a], { inputs: [a] });
      dropped.dispose();
      expect(a.disposed).toBe(false);
      expect(() => dropped.wait()).toThrow(/CommWork.wait: the work was disposed/);
    }
    expect(memoryStats('cpu').liveBytes).toBe(before);
    expect(() => runOnStream('s' as unknown as Stream, () => 1)).toThrow(/runOnStream: 'stream' must be a Stream/);
    expect(() => runOnStream(s, () => 1, { inputs: [1] as unknown as Tensor[] })).toThrow(
      /runOnStream: 'inputs' must be an array of Tensors/,
    );
    expect(() => runOnStream(s, () => 1, { after: {} as Event })).toThrow(/runOnStream: 'after' must be an Event/);
    const gone = new Stream('cpu');
    gone.dispose();
    expect(() => runOnStream(gone, () => 1)).toThrow(/runOnStream: 'stream' was disposed/);
  });

  it('a disposed stream is refused everywhere with a DisposedError naming the call, also on the CPU', () => {
    const gone = new Stream('cpu');
    gone.dispose();
    gone.dispose(); // twice is fine
    expect(gone.disposed).toBe(true);
    expect(() => withStream(gone, () => 1)).toThrow(DisposedError);
    expect(() => withStream(gone, () => 1)).toThrow(/withStream: 'stream' was disposed/);
    expect(() => gone.query()).toThrow(DisposedError);
    expect(() => gone.recordEvent()).toThrow(DisposedError);
    using e = new Event('cpu');
    expect(() => gone.waitEvent(e)).toThrow(DisposedError);
    expect(() => e.record(gone)).toThrow(DisposedError);
    {
      using x = Tensor.zeros([1, 4], { device: 'cpu' });
      using indices = Tensor.zeros([1, 1], { dtype: 'i32', device: 'cpu' });
      using weights = Tensor.full([1, 1], 1, { device: 'cpu' });
      const cap = capacity(indices, weights, { numExperts: 2 });
      const d = new Dispatcher({ numExperts: 2, commStream: gone });
      expect(() => d.dispatchAsync(x, indices, weights, cap)).toThrow(/dispatch: 'commStream' was disposed/);
      for (const t of Object.values(cap)) if (t instanceof Tensor) t.dispose();
    }
    expect(() => withStream('s' as unknown as Stream, () => 1)).toThrow(/withStream: 'stream' must be a Stream/);
    using s = new Stream('cpu');
    expect(() => withStream(s, 1 as unknown as () => number)).toThrow(/withStream: 'fn' must be a function/);
  });

  it('the raw setCurrentStream refuses a stream of another device or a disposed one, naming it', () => {
    const s = new Stream('cpu');
    const raw = s.handle;
    expect(() => native().setCurrentStream(0, raw)).toThrow(/setCurrentStream: 'stream' is on cpu but 'deviceIndex' is 0/);
    s.dispose();
    expect(() => native().setCurrentStream(0, raw)).toThrow(DisposedError);
    expect(() => native().setCurrentStream(0, raw)).toThrow(/setCurrentStream: 'stream' was disposed/);
    native().setCurrentStream(0, null); // the default stream: always fine
  });

  it('CPU events cannot be timed, and say why', () => {
    using a = new Event('cpu');
    using b = new Event('cpu', { timing: true });
    expect(a.timing).toBe(false);
    expect(b.timing).toBe(true);
    a.record();
    b.record();
    expect(() => a.elapsedTime(b)).toThrow(/events on the CPU hold no times/);
    expect(() => b.elapsedTime(b)).toThrow(/events on the CPU hold no times/);
  });
});
