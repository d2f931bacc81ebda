// Streams and events on the CPU: they exist so device-agnostic code runs unchanged, and complete at once.
import { describe, expect, it } from 'vitest';

import { currentStream, DisposedError, Event, ops, Stream, Tensor, withStream } from '../lib/index.js';

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

  it('events without timing cannot be timed', () => {
    using a = new Event('cpu');
    using b = new Event('cpu');
    a.record();
    b.record();
    expect(() => a.elapsedTime(b)).toThrow(/timing/);
  });
});
