// The caching allocator, out-of-memory recovery, streams and events, and NCCL on a real GPU.
import { describe, expect, it } from 'vitest';

import { emptyCache, Event, info, memoryStats, ops, OutOfMemoryError, Stream, Tensor, withStream } from '../../lib/index.js';
import { native } from '../../lib/native.js';
import { hasGpu } from './gpu.js';

const gpu = 'cuda:0' as const;

describe.skipIf(!hasGpu)('caching allocator', () => {
  it('reuses freed blocks without new cudaMalloc calls and returns live bytes to baseline', () => {
    const before = memoryStats(gpu);
    for (let i = 0; i < 50; i++) {
      using a = Tensor.empty([1024, 1024], { device: gpu });
      using b = Tensor.empty([333], { dtype: 'bf16', device: gpu });
      void a;
      void b;
    }
    const after = memoryStats(gpu);
    expect(after.liveBytes).toBe(before.liveBytes);
    expect(after.allocations - before.allocations).toBe(100);
    expect(after.deviceMallocs - before.deviceMallocs).toBeLessThanOrEqual(2);
    expect(after.cacheHits - before.cacheHits).toBeGreaterThanOrEqual(98);
    expect(after.cachedBytes).toBeGreaterThanOrEqual(4 * 1024 * 1024);
  });

  it('emptyCache gives cached blocks back to the driver', () => {
    {
      using a = Tensor.empty([4096, 4096], { device: gpu });
      void a;
    }
    expect(memoryStats(gpu).cachedBytes).toBeGreaterThan(0);
    emptyCache(gpu);
    const s = memoryStats(gpu);
    expect(s.cachedBytes).toBe(0);
    expect(s.reservedBytes).toBe(s.liveBytes);
  });

  it('out of memory is its own error class and the allocator keeps working after it', () => {
    const before = memoryStats(gpu);
    const total = info().cuda.devices[0]!.totalMemory;
    let caught: unknown;
    try {
      Tensor.empty([Math.ceil((total * 2) / 4)], { device: gpu });
    } catch (e) {
      caught = e;
    }
    expect(caught).toBeInstanceOf(OutOfMemoryError);
    expect((caught as Error).message).toMatch(/CUDA out of memory on cuda:0 allocating .* MiB/);
    expect(memoryStats(gpu).outOfMemory).toBe(before.outOfMemory + 1);
    using t = Tensor.full([1000], 3, { device: gpu });
    expect(ops.sum(t, 0).item()).toBe(3000);
  });

  it('peak tracks the high-water mark', () => {
    native().resetPeakMemory(1, 0);
    const base = memoryStats(gpu).liveBytes;
    {
      using a = Tensor.empty([8 << 20], { dtype: 'u8', device: gpu });
      void a;
    }
    expect(memoryStats(gpu).peakBytes - base).toBeGreaterThanOrEqual(8 << 20);
  });
});

describe.skipIf(!hasGpu)('streams and events', () => {
  it('orders work across streams through events and times it', () => {
    using s1 = new Stream(gpu);
    using s2 = new Stream(gpu);
    using a = Tensor.zeros([4096, 4096], { device: gpu });
    const start = new Event(gpu, { timing: true });
    const end = new Event(gpu, { timing: true });
    withStream(s1, () => {
      start.record();
      for (let i = 0; i < 20; i++) a.fill_(i + 1);
      end.record();
    });
    // s2 waits for s1's last fill, then scales: the result must see value 20.
    s2.waitEvent(end);
    const out = Tensor.empty([4096, 4096], { device: gpu });
    withStream(s2, () => ops.scale(a, 2, { out }));
    s2.synchronize();
    expect(
      out
        .narrow(0, 4095, 1)
        .toNumbers()
        .every((v) => v === 40),
    ).toBe(true);
    expect(end.query()).toBe(true);
    expect(start.elapsedTime(end)).toBeGreaterThan(0);
    out.dispose();
    start.dispose();
    end.dispose();
  });
});

describe.skipIf(!hasGpu)('NCCL', () => {
  it('loads from the system and reports its version', () => {
    const s = native().ncclStatus();
    expect(s.loaded, s.error).toBe(true);
    expect(s.version).toBeGreaterThanOrEqual(22000);
    expect(s.path).toMatch(/libnccl\.so/);
  });
});
