// Tensors: creation, round trips for every dtype, views sharing storage, copies, lifetime.
import { describe, expect, it } from 'vitest';

import { DisposedError, DTYPES, keep, memoryStats, ops, Tensor, tidy } from '../lib/index.js';
import { expectNoLeak, freshSeed } from './helpers.js';

const cpu = 'cpu' as const;

describe('creation', () => {
  it('round-trips raw values of every dtype', () => {
    const samples = {
      f32: Float32Array.from([1.5, -2.25, 3e-8, 1e30]),
      bf16: Uint16Array.from([0x3f80, 0xbfc0, 0x0001, 0x7f7f]),
      f16: Uint16Array.from([0x3c00, 0xbe00, 0x0001, 0x7bff]),
      i32: Int32Array.from([1, -2, 2147483647, -2147483648]),
      i64: BigInt64Array.from([1n, -2n, 2n ** 62n, -(2n ** 63n)]),
      u8: Uint8Array.from([0, 1, 128, 255]),
      fp8e4m3: Uint8Array.from([0x38, 0xb8, 0x01, 0x7e]),
    } as const;
    for (const dtype of DTYPES) {
      using t = Tensor.fromArray(samples[dtype], { dtype, shape: [2, 2], device: cpu });
      expect(t.shape).toEqual([2, 2]);
      expect(t.dtype).toBe(dtype);
      expect(Array.from(t.toArray() as ArrayLike<unknown>)).toEqual(Array.from(samples[dtype] as ArrayLike<unknown>));
    }
  });

  it('fills with full/zeros and rounds plain numbers into the dtype', () => {
    using z = Tensor.zeros([3, 5], { dtype: 'bf16', device: cpu });
    expect(z.toNumbers()).toEqual(new Array(15).fill(0));
    using f = Tensor.full([4], 1 / 3, { dtype: 'bf16', device: cpu });
    expect(f.toNumbers()).toEqual(new Array(4).fill(0.333984375));
    using i = Tensor.full([2], -7, { dtype: 'i64', device: cpu });
    expect(i.toNumbers()).toEqual([-7, -7]);
    using n = Tensor.fromArray([0.1, 0.2], { dtype: 'f16', device: cpu });
    expect(n.toNumbers()).toEqual([0.0999755859375, 0.199951171875]);
  });

  it('handles empty tensors and scalars', () => {
    using e = Tensor.empty([0, 4], { device: cpu });
    expect(e.numel).toBe(0);
    expect(e.toArray().length).toBe(0);
    using s = Tensor.fromArray([42], { shape: [], device: cpu });
    expect(s.ndim).toBe(0);
    expect(s.item()).toBe(42);
  });

  it('draws reproducible random numbers from a seed, independent of how the work is split', () => {
    const seed = freshSeed();
    using a = Tensor.rand([1000], { seed, device: cpu });
    using b = Tensor.rand([1000], { seed, device: cpu });
    expect(a.toNumbers()).toEqual(b.toNumbers());
    using c = Tensor.rand([1000], { seed: seed + 1, device: cpu });
    expect(c.toNumbers()).not.toEqual(a.toNumbers());
    // uniform: inside [low, high), mean and variance as expected
    using u = Tensor.rand([200_000], { seed, low: -2, high: 3, device: cpu });
    const uv = u.toNumbers();
    expect(uv.every((v) => v >= -2 && v < 3)).toBe(true);
    const mean = uv.reduce((x, y) => x + y, 0) / uv.length;
    expect(Math.abs(mean - 0.5)).toBeLessThan(0.02);
    // normal: mean, std, and a tail fraction
    using g = Tensor.randn([200_000], { seed, mean: 1, std: 2, device: cpu });
    const gv = g.toNumbers();
    const gm = gv.reduce((x, y) => x + y, 0) / gv.length;
    const gs = Math.sqrt(gv.reduce((x, y) => x + (y - gm) ** 2, 0) / gv.length);
    expect(Math.abs(gm - 1)).toBeLessThan(0.02);
    expect(Math.abs(gs - 2)).toBeLessThan(0.02);
    const beyond2 = gv.filter((v) => Math.abs(v - 1) > 4).length / gv.length; // P(|z| > 2) = 0.0455
    expect(Math.abs(beyond2 - 0.0455)).toBeLessThan(0.003);
  });
});

describe('views', () => {
  it('view, narrow and transpose share storage and index correctly', () => {
    using a = Tensor.fromArray(
      Float32Array.from({ length: 24 }, (_, i) => i),
      { shape: [2, 3, 4], device: cpu },
    );
    using v = a.view(6, -1);
    expect(v.shape).toEqual([6, 4]);
    expect(v.sharesStorageWith(a)).toBe(true);
    using n = a.narrow(2, 1, 2); // [2,3,2]
    expect(n.isContiguous).toBe(false);
    expect(n.toNumbers()).toEqual([1, 2, 5, 6, 9, 10, 13, 14, 17, 18, 21, 22]);
    using t = a.view(6, 4).transpose(0, 1); // [4,6]
    expect(t.shape).toEqual([4, 6]);
    expect(t.toNumbers().slice(0, 6)).toEqual([0, 4, 8, 12, 16, 20]);
    using rows = a.view(6, 4).narrow(0, 2, 3); // contiguous rows
    expect(rows.isContiguous).toBe(true);
    expect(rows.toNumbers()).toEqual(Array.from({ length: 12 }, (_, i) => i + 8));
  });

  it('writes through a view land in the base tensor', () => {
    using a = Tensor.zeros([3, 4], { device: cpu });
    using col = a.narrow(1, 2, 1);
    col.fill_(7);
    expect(a.toNumbers()).toEqual([0, 0, 7, 0, 0, 0, 7, 0, 0, 0, 7, 0]);
    using src = Tensor.fromArray([1, 2, 3, 4, 5, 6], { shape: [2, 3], device: cpu });
    using dstT = Tensor.zeros([3, 2], { device: cpu });
    dstT.transpose().copy_(src); // strided destination
    expect(dstT.toNumbers()).toEqual([1, 4, 2, 5, 3, 6]);
  });

  it('copies and casts strided sources', () => {
    using a = Tensor.rand([5, 7], { seed: freshSeed(), device: cpu });
    using t = a.transpose();
    using c = t.contiguous();
    expect(c.isContiguous).toBe(true);
    const av = a.toNumbers();
    const cv = c.toNumbers();
    for (let i = 0; i < 7; i++) for (let j = 0; j < 5; j++) expect(cv[i * 5 + j]).toBe(av[j * 7 + i]);
    using h = t.cast('bf16');
    expect(h.isContiguous).toBe(true);
    expect(h.shape).toEqual([7, 5]);
  });
});

describe('lifetime', () => {
  it('dispose releases memory at once; views keep the storage alive', () => {
    const base = memoryStats(cpu).liveBytes;
    const a = Tensor.empty([1024, 256], { device: cpu });
    expect(memoryStats(cpu).liveBytes - base).toBe(1024 * 256 * 4);
    const v = a.narrow(0, 0, 10);
    a.dispose();
    expect(memoryStats(cpu).liveBytes - base).toBe(1024 * 256 * 4);
    v.dispose();
    expect(memoryStats(cpu).liveBytes).toBe(base);
  });

  it('use after dispose throws DisposedError, and dispose twice is harmless', () => {
    const a = Tensor.zeros([2], { device: cpu });
    a.dispose();
    a.dispose();
    expect(a.disposed).toBe(true);
    expect(() => a.toArray()).toThrow(DisposedError);
    expect(() => a.view(1, 2)).toThrow(DisposedError);
    expect(String(a)).toBe('Tensor(disposed)');
  });

  it('`using` disposes at the end of the block', () => {
    expectNoLeak(cpu, () => {
      using a = Tensor.rand([100, 100], { device: cpu });
      using b = a.cast('bf16');
      expect(b.numel).toBe(10_000);
    });
  });

  it('tracks peak and allocation counts', () => {
    const before = memoryStats(cpu);
    expectNoLeak(cpu, () => {
      using a = Tensor.empty([1000], { device: cpu });
      using b = Tensor.empty([1000], { device: cpu });
      expect(memoryStats(cpu).liveAllocations).toBe(before.liveAllocations + 2);
      expect(memoryStats(cpu).peakBytes).toBeGreaterThanOrEqual(before.liveBytes + 8000);
      void a;
      void b;
    });
    expect(memoryStats(cpu).allocations).toBe(before.allocations + 2);
  });

  it('tidy disposes intermediates, keeps what is returned or kept, and cleans up on throw', () => {
    const base = memoryStats(cpu).liveBytes;
    let kept: Tensor | undefined;
    const [y, pair] = tidy(() => {
      const a = Tensor.rand([8, 8], { device: cpu });
      const b = ops.matmul(a, a.transpose()); // the transpose view is an intermediate
      kept = keep(Tensor.zeros([2], { device: cpu }));
      const inner = tidy(() => ops.scale(b, 2));
      return [ops.add(inner, b), { s: ops.sum(b, 0) }] as const;
    });
    expect(y.disposed).toBe(false);
    expect(pair.s.disposed).toBe(false);
    expect(kept?.disposed).toBe(false);
    expect(memoryStats(cpu).liveBytes - base).toBe(256 + 64 + 64); // host blocks round up to 64 bytes
    y.dispose();
    pair.s.dispose();
    kept?.dispose();
    expect(memoryStats(cpu).liveBytes).toBe(base);
    expect(() =>
      tidy(() => {
        Tensor.zeros([100], { device: cpu });
        throw new Error('boom');
      }),
    ).toThrow('boom');
    expect(memoryStats(cpu).liveBytes).toBe(base);
  });

  it('tidy never calls a getter of what it returns (a getter may read the device: a host wait)', () => {
    let calls = 0;
    let lazy: Tensor | undefined;
    const out = tidy(() => {
      const t = Tensor.zeros([4], { device: cpu });
      const made = Tensor.zeros([4], { device: cpu }); // reachable through the getter alone: released
      lazy = made;
      return {
        t,
        nested: [{ t }],
        get counts(): number {
          calls++;
          return made.numel;
        },
        bytes: new Float32Array(4), // a typed array: no tensors in it
      };
    });
    expect(calls).toBe(0);
    expect(out.t.disposed).toBe(false);
    expect(lazy?.disposed).toBe(true);
    out.t.dispose();
  });
});
