// Streams and events on the CPU: they exist so device-agnostic code runs unchanged, and complete at once.
import { describe, expect, it } from 'vitest';

import { CommWork, currentStream, DisposedError, Event, memoryStats, ops, runOnStream, Stream, Tensor, withStream } from '../lib/index.js';

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
    expect(() => withStream(s, () => { throw new Error('boom'); })).toThrow('boom');
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
    expect(() => runOnStream(s, () => 1, { inputs: [1] as unknown as Tensor[] })).toThrow(/runOnStream: 'inputs' must be an array of Tensors/);
    expect(() => runOnStream(s, () => 1, { after: {} as Event })).toThrow(/runOnStream: 'after' must be an Event/);
    const gone = new Stream('cpu');
    gone.dispose();
    expect(() => runOnStream(gone, () => 1)).toThrow(/runOnStream: 'stream' was disposed/);
  });

  it('events without timing cannot be timed', () => {
    using a = new Event('cpu');
    using b = new Event('cpu');
    a.record();
    b.record();
    expect(() => a.elapsedTime(b)).toThrow(/timing/);
  });
});
