// Communicators on a GPU. A single-rank NCCL communicator's allToAll / allToAllV / allReduce /
// allGather on cuda:0 against the CPU results (and on host tensors, staged through its GPU), and a
// single-rank MPI communicator staging CUDA tensors through pinned host memory.
import { spawnSync } from 'node:child_process';

import { describe, expect, it } from 'vitest';

import { Communicator, emptyCache, memoryStats, Tensor } from '../../lib/index.js';
import { native } from '../../lib/native.js';
import { hasGpu } from './gpu.js';

const gpu = 'cuda:0' as const;
const hasNccl = hasGpu && native().ncclStatus().loaded;
const hasMpi = native().mpiStatus(true).loaded && spawnSync('mpirun', ['--version']).status === 0;

function data(n: number, seed: number): Tensor {
  return Tensor.rand([n, 8], { seed, device: 'cpu' });
}

describe.skipIf(!hasNccl)('NCCL communicator, one rank on cuda:0', () => {
  it('allToAll, allToAllV, allReduce, allGather equal the CPU results', () => {
    using c = Communicator.nccl(0, 1, Communicator.ncclUniqueId(), 0, { timeoutMs: 30_000 });
    expect([c.rank, c.size, c.backend]).toEqual([0, 1, 'nccl']);
    using x = data(6, 1);
    using xd = x.to(gpu);
    using a = c.allToAll(xd);
    expect(a.to('cpu').toFloat32Array()).toEqual(x.toFloat32Array());
    using r = Tensor.zeros([6, 8], { device: gpu });
    c.allToAllV(xd, [6], r, [6]);
    expect(r.to('cpu').toFloat32Array()).toEqual(x.toFloat32Array());
    using s = xd.clone();
    c.allReduce(s, 'sum');
    expect(s.to('cpu').toFloat32Array()).toEqual(x.toFloat32Array());
    using g = c.allGather(xd);
    expect(g.to('cpu').toFloat32Array()).toEqual(x.toFloat32Array());
    c.barrier();
  });

  it('the call agreement runs on the device (ncclAllGather of the headers, then of the counts): mismatched allToAllV counts throw naming the pair; the communicator stays usable, also with timeoutMs 0', () => {
    for (const timeoutMs of [30_000, 0]) {
      using c = Communicator.nccl(0, 1, Communicator.ncclUniqueId(), 0, { timeoutMs });
      using s = Tensor.zeros([3, 8], { device: gpu });
      using r = Tensor.zeros([2, 8], { device: gpu });
      expect(() => c.allToAllV(s, [3], r, [2])).toThrow(
        /^allToAllV: rank 0 of 1: rank 0 sends 3 rows to rank 0 but rank 0 expects 2 \(recvRows\[0\]\); exchange the counts first \(nothing was sent; the nccl communicator stays usable\)$/,
      );
      expect(c.aborted).toBe(false);
      using t = Tensor.full([4], 1, { device: gpu });
      expect(c.allReduce(t).to('cpu').toNumbers()).toEqual([1, 1, 1, 1]);
      c.barrier();
    }
  });

  it('host tensors go through the GPU and back (NCCL moves device memory only)', () => {
    using c = Communicator.nccl(0, 1, Communicator.ncclUniqueId(), 0, { timeoutMs: 30_000 });
    expect(c.device?.toString()).toBe(gpu);
    using x = data(6, 3);
    // Results land in poisoned host tensors: nothing copied back leaves NaNs.
    using r = Tensor.full([6, 8], Number.NaN, { device: 'cpu' });
    c.allToAllV(x, [6], r, [6]);
    expect(r.toFloat32Array()).toEqual(x.toFloat32Array());
    using g = Tensor.full([6, 8], Number.NaN, { device: 'cpu' });
    c.allGather(x, g);
    expect(g.toFloat32Array()).toEqual(x.toFloat32Array());
    using a = c.allToAll(x);
    expect(a.device.toString()).toBe('cpu');
    expect(a.toFloat32Array()).toEqual(x.toFloat32Array());
    using s = x.clone();
    c.allReduce(s, 'max');
    expect(s.toFloat32Array()).toEqual(x.toFloat32Array());
    using flag = Tensor.fromArray([7], { dtype: 'i32', device: 'cpu' });
    c.broadcast(flag, 0);
    expect(flag.item()).toBe(7);
  });
});

describe.skipIf(!(hasGpu && hasMpi))('MPI communicator with CUDA tensors (pinned staging)', () => {
  it('allReduce / allToAllV on cuda:0 (one rank, MPI singleton)', () => {
    using c = Communicator.mpi({ timeoutMs: 30_000 });
    using x = data(4, 2);
    using xd = x.to(gpu);
    using r = Tensor.zeros([4, 8], { device: gpu });
    c.allToAllV(xd, [4], r, [4]);
    expect(r.to('cpu').toFloat32Array()).toEqual(x.toFloat32Array());
    using b = Tensor.fromArray([1, 2, 3], { device: gpu, dtype: 'bf16' });
    c.allReduce(b, 'sum');
    expect(b.to('cpu').toFloat32Array()).toEqual(new Float32Array([1, 2, 3]));
  });

  it('keeps its pinned staging buffers for the next call; emptyCache(cpu) frees them', () => {
    using c = Communicator.mpi({ timeoutMs: 30_000 });
    emptyCache('cpu');
    expect(memoryStats('cpu').cachedBytes).toBe(0);
    const rows = 1 << 16; // 2 MiB of f32 per tensor
    using x = Tensor.rand([rows, 8], { seed: 5, device: 'cpu' });
    using xd = x.to(gpu);
    for (let i = 0; i < 3; i++) {
      using r = Tensor.full([rows, 8], Number.NaN, { device: gpu });
      c.allToAllV(xd, [rows], r, [rows]);
      expect(r.to('cpu').toFloat32Array()).toEqual(x.toFloat32Array());
      // The send and receive staging buffers are back in the cache, and the next call reuses them.
      expect(memoryStats('cpu').cachedBytes).toBeGreaterThanOrEqual(2 * xd.numel * 4);
      expect(memoryStats('cpu').cachedBytes).toBeLessThanOrEqual(2 * 2 * xd.numel * 4);
    }
    emptyCache('cpu');
    expect(memoryStats('cpu').cachedBytes).toBe(0);
  });
});
