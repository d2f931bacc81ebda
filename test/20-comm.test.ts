// Communicators on the CPU: the single-rank backend's collectives (values checked), argument checks
// with clear errors, launcher environment parsing, backend choice, and the TCP rendezvous between
// two child processes. Multi-rank runs under mpirun are in test/mpi/.
import { spawn } from 'node:child_process';
import { connect, createServer, type Server } from 'node:net';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import {
  chooseBackend,
  Communicator,
  expertGroups,
  init,
  InvalidArgumentError,
  jobId,
  launchEnv,
  memoryStats,
  rendezvous,
  Tensor,
  TimeoutError,
} from '../lib/index.js';
import { expectInvalidArgument } from './helpers.js';
import { packageRoot } from '../lib/native.js';
import { rendezvousPort } from '../lib/parallel/init.js';

const cpu = { device: 'cpu' as const };

describe('single-rank communicator', () => {
  it('has rank 0 of 1, backend single, the default timeout, settable', () => {
    using c = Communicator.single();
    expect([c.rank, c.size, c.backend, c.timeoutMs]).toEqual([0, 1, 'single', 300_000]);
    c.timeoutMs = 0;
    expect(c.timeoutMs).toBe(0);
    expect(() => (c.timeoutMs = -1)).toThrow(/'timeoutMs' must be a non-negative integer/);
  });

  it('collectives give the one-rank results', () => {
    const before = memoryStats('cpu').liveBytes;
    {
      using c = Communicator.single();
      using t = Tensor.fromArray([1, -2, 3], cpu);
      for (const op of ['sum', 'max', 'min', 'avg'] as const) expect(c.allReduce(t, op).toNumbers()).toEqual([1, -2, 3]);
      using g = c.allGather(Tensor.fromArray([1, 2, 3, 4], { ...cpu, shape: [2, 2] }));
      expect(g.shape).toEqual([2, 2]);
      expect(g.toNumbers()).toEqual([1, 2, 3, 4]);
      expect(c.broadcast(t, 0).toNumbers()).toEqual([1, -2, 3]);
      c.barrier();
      using a = c.allToAll(Tensor.fromArray([5, 6, 7], { ...cpu, dtype: 'i32', shape: [3, 1] }));
      expect(a.toNumbers()).toEqual([5, 6, 7]);
      using s = Tensor.fromArray([1, 2, 3, 4, 5, 6], { ...cpu, dtype: 'bf16', shape: [3, 2] });
      using r = Tensor.zeros([3, 2], { ...cpu, dtype: 'bf16' });
      expect(c.allToAllV(s, [3], r, [3]).toFloat32Array()).toEqual(new Float32Array([1, 2, 3, 4, 5, 6]));
      using e = Tensor.zeros([0, 2], cpu);
      c.allToAllV(e, [0], Tensor.zeros([0, 2], cpu), [0]);
      const sub = c.split(0, 0);
      expect(sub?.size).toBe(1);
      sub?.dispose();
      expect(c.split(-1, 0)).toBeNull();
      const { ep, edp } = expertGroups(c, 1);
      expect([ep.size, edp.size]).toEqual([1, 1]);
      ep.dispose();
      edp.dispose();
    }
    if (globalThis.gc) expect(memoryStats('cpu').liveBytes).toBe(before);
  });

  it('bad calls throw InvalidArgumentError naming the op and the argument', () => {
    using c = Communicator.single();
    const f32 = (shape: number[]): Tensor => Tensor.zeros(shape, cpu);
    const cases: [() => unknown, RegExp][] = [
      [() => c.allToAllV(f32([3, 2]), [2], f32([3, 2]), [3]), /allToAllV: 'sendRows' adds up to 2 rows but 'send' f32\[3,2\] cpu has 3/],
      [() => c.allToAllV(f32([3, 2]), [3], f32([2, 2]), [3]), /allToAllV: 'recvRows' adds up to 3 rows but 'recv' f32\[2,2\] cpu has 2/],
      [() => c.allToAllV(f32([0, 2]), [-1], f32([0, 2]), [0]), /allToAllV: 'sendRows'\[0\] = -1 is negative/],
      [() => c.allToAllV(f32([3, 2]), [3, 0], f32([3, 2]), [3]), /allToAllV: 'sendRows' has 2 entries but the communicator has 1 ranks/],
      [() => c.allToAllV(f32([3, 2]), [1.5] as number[], f32([3, 2]), [3]), /allToAllV: 'sendRows'\[0\] = 1.5 is not an integer/],
      [
        () => c.allToAllV(f32([3, 2]), [3], Tensor.zeros([3, 2], { ...cpu, dtype: 'bf16' }), [3]),
        /allToAllV: 'recv' bf16\[3,2\] cpu has dtype bf16 but 'send' f32\[3,2\] cpu has f32/,
      ],
      [
        () => c.allToAllV(f32([3, 2]), [3], f32([3, 3]), [3]),
        /allToAllV: 'recv' f32\[3,3\] cpu and 'send' f32\[3,2\] cpu must have the same row shape/,
      ],
      // the call agreement with itself (shared by every backend): one rank's sendRows[0] is what it receives
      [
        () => c.allToAllV(f32([3, 2]), [3], f32([2, 2]), [2]),
        /^allToAllV: rank 0 of 1: rank 0 sends 3 rows to rank 0 but rank 0 expects 2 \(recvRows\[0\]\); exchange the counts first/,
      ],
      [() => c.allToAll(f32([2, 2]), f32([3, 2])), /allToAll: 'recv' f32\[3,2\] cpu must have as many rows as 'send'/],
      [() => c.allGather(f32([2, 2]), f32([3, 2])), /allGather: 'output' f32\[3,2\] cpu must have 1·2 = 2 rows/],
      [() => c.broadcast(f32([2]), 1), /broadcast: 'root' 1 is not a rank of this communicator of size 1/],
      [() => c.allReduce(f32([2, 2]).transpose(0, 1)), /allReduce: 'tensor' f32\[2,2\] cpu strided is not contiguous/],
      [() => c.allReduce(f32([2]), 'prod' as 'sum'), /allReduce: 'op' must be sum, max, min or avg/],
      [() => c.split(0, -1), /split: 'key' -1 must be in/],
    ];
    for (const [fn, re] of cases) expectInvalidArgument(fn, re);
  });

  it('abort() makes every later call throw; dispose() too', () => {
    const c = Communicator.single();
    c.abort();
    expect(c.aborted).toBe(true);
    expect(() => c.barrier()).toThrow(/barrier: the single communicator \(rank 0 of 1\) was aborted/);
    c.dispose();
    expect(() => c.barrier()).toThrow(/disposed/);
  });

  it('init() with no launcher gives the single communicator; MOE_EP_BACKEND is validated', async () => {
    using c = await init({ env: {}, setDevice: false });
    expect(c.backend).toBe('single');
    await expect(init({ env: { MOE_EP_BACKEND: 'gloo' }, setDevice: false })).rejects.toThrow(
      /MOE_EP_BACKEND must be auto, single, mpi or nccl; received "gloo"/,
    );
  });

  it('the NCCL factory checks its arguments before touching NCCL', () => {
    expect(() => Communicator.nccl(0, 1, new Uint8Array(5), 0)).toThrow(/commNccl: 'uniqueId' has 5 bytes; an NCCL unique id has 128/);
    expect(() => Communicator.nccl(2, 2, new Uint8Array(128), 0)).toThrow(/commNccl: 'rank' 2 is not in \[0, 2\)/);
  });
});

describe('launcher environments', () => {
  it('OpenMPI', () => {
    expect(
      launchEnv({ OMPI_COMM_WORLD_RANK: '3', OMPI_COMM_WORLD_SIZE: '8', OMPI_COMM_WORLD_LOCAL_RANK: '1', OMPI_COMM_WORLD_LOCAL_SIZE: '4' }),
    ).toEqual({
      launcher: 'openmpi',
      rank: 3,
      size: 8,
      localRank: 1,
      localSize: 4,
    });
  });
  it('MPICH / Hydra', () => {
    expect(launchEnv({ PMI_RANK: '5', PMI_SIZE: '6', MPI_LOCALRANKID: '2', MPI_LOCALNRANKS: '3' })).toEqual({
      launcher: 'mpich',
      rank: 5,
      size: 6,
      localRank: 2,
      localSize: 3,
    });
  });
  it('Slurm, with its compressed tasks-per-node list', () => {
    expect(
      launchEnv({ SLURM_PROCID: '7', SLURM_NTASKS: '9', SLURM_LOCALID: '3', SLURM_NODEID: '1', SLURM_TASKS_PER_NODE: '4(x2),1' }),
    ).toEqual({
      launcher: 'slurm',
      rank: 7,
      size: 9,
      localRank: 3,
      localSize: 4,
    });
    expect(
      launchEnv({ SLURM_PROCID: '8', SLURM_NTASKS: '9', SLURM_LOCALID: '0', SLURM_NODEID: '2', SLURM_TASKS_PER_NODE: '4(x2),1' }),
    ).toMatchObject({
      localSize: 1,
    });
  });
  it('RANK / WORLD_SIZE / LOCAL_RANK, and nothing at all', () => {
    expect(launchEnv({ RANK: '1', WORLD_SIZE: '2', LOCAL_RANK: '1' })).toMatchObject({ launcher: 'env', rank: 1, size: 2, localRank: 1 });
    expect(launchEnv({})).toEqual({ launcher: 'none', rank: 0, size: 1, localRank: 0, localSize: 1 });
  });
  it('malformed values are rejected naming the variable', () => {
    expect(() => launchEnv({ OMPI_COMM_WORLD_RANK: 'x', OMPI_COMM_WORLD_SIZE: '2' })).toThrow(
      /OMPI_COMM_WORLD_RANK="x" is not a non-negative integer/,
    );
    expect(() => launchEnv({ PMI_RANK: '4', PMI_SIZE: '4', MPI_LOCALRANKID: '0' })).toThrow(/rank 4 is not in \[0, 4\)/);
  });
  it('backend choice: single, mpi on CPU or shared GPUs, nccl with a GPU per rank and NCCL', () => {
    const le = (size: number, localRank: number, localSize?: number) => ({
      launcher: 'openmpi' as const,
      rank: localRank,
      size,
      localRank,
      localSize,
    });
    expect(chooseBackend(le(1, 0, 1), 'auto', 8, () => true)).toMatchObject({ backend: 'single', device: 'cuda:0' });
    expect(chooseBackend(le(4, 1, 4), 'auto', 0, () => true)).toMatchObject({ backend: 'mpi', device: 'cpu' });
    expect(chooseBackend(le(4, 3, 4), 'auto', 2, () => true)).toMatchObject({ backend: 'mpi', device: 'cuda:1' });
    expect(chooseBackend(le(4, 3, 4), 'auto', 4, () => false)).toMatchObject({ backend: 'mpi', reason: 'NCCL does not load' });
    expect(chooseBackend(le(16, 3, 8), 'auto', 8, () => true)).toMatchObject({ backend: 'nccl', device: 'cuda:3' });
    expect(chooseBackend(le(16, 3, 8), 'mpi', 8, () => true)).toMatchObject({ backend: 'mpi' });
  });
  it('ranks sharing a GPU: auto picks MPI and says why; nccl requested is refused up front, naming the reason', () => {
    const le = (size: number, localRank: number, localSize?: number) => ({
      launcher: 'openmpi' as const,
      rank: localRank,
      size,
      localRank,
      localSize,
    });
    const c = chooseBackend(le(2, 1, 2), 'auto', 1, () => true);
    expect(c).toMatchObject({ backend: 'mpi', device: 'cuda:0' });
    expect(c.reason).toMatch(
      /^2 ranks on this node share 1 GPU\(s\); NCCL refuses two ranks on one GPU, so MPI carries the data, staging device buffers through pinned host memory$/,
    );
    expect(() => chooseBackend(le(2, 1, 2), 'nccl', 1, () => true)).toThrow(
      /init: backend 'nccl' was requested but 2 ranks on this node share 1 GPU\(s\); NCCL refuses two ranks on one GPU: use 'mpi'/,
    );
    expect(chooseBackend(le(2, 1, 2), 'nccl', 2, () => true)).toMatchObject({ backend: 'nccl', device: 'cuda:1' });
  });
  it('ranks started from RANK/WORLD_SIZE (not by an MPI launcher) are refused the MPI backend rather than each becoming rank 0 of 1', () => {
    const env = { launcher: 'env' as const, rank: 1, size: 2, localRank: 1, localSize: 2 };
    expect(() => chooseBackend(env, 'auto', 0, () => true)).toThrow(
      /init: rank 1 of 2 was started from RANK\/WORLD_SIZE \(env\), not by mpirun, mpiexec or srun, so the MPI backend cannot join the ranks \(no usable GPU\)/,
    );
    expect(() => chooseBackend(env, 'auto', 1, () => true)).toThrow(/share 1 GPU/);
    expect(() => chooseBackend(env, 'auto', 2, () => false)).toThrow(/NCCL does not load/);
    expect(() => chooseBackend(env, 'mpi', 2, () => true)).toThrow(/cannot join the ranks \(requested\)/);
    expect(chooseBackend(env, 'auto', 2, () => true)).toMatchObject({ backend: 'nccl', device: 'cuda:1' });
    expect(chooseBackend({ ...env, launcher: 'openmpi' }, 'auto', 0, () => true)).toMatchObject({ backend: 'mpi' });
  });
  // From an audit: torchrun under srun or in an sbatch script inherits Slurm's variables, which
  // describe torchrun's own task; a partial environment was read as a world of one.
  it('torchrun wins over the Slurm variables it inherits; its ranks need LOCAL_RANK', () => {
    const slurm = { SLURM_PROCID: '1', SLURM_NTASKS: '2', SLURM_LOCALID: '0', SLURM_TASKS_PER_NODE: '1(x2)', SLURM_NODEID: '1' };
    const torch = { TORCHELASTIC_RUN_ID: 'job7', RANK: '13', WORLD_SIZE: '16', LOCAL_RANK: '5', LOCAL_WORLD_SIZE: '8' };
    expect(launchEnv({ ...slurm, ...torch })).toEqual({ launcher: 'torchrun', rank: 13, size: 16, localRank: 5, localSize: 8 });
    expect(() => launchEnv({ ...slurm, ...torch, LOCAL_RANK: undefined })).toThrow(
      /init: launcher torchrun started 16 ranks but none of LOCAL_RANK is set: which GPU is this rank's\?/,
    );
    expect(() => launchEnv({ TORCHELASTIC_RUN_ID: 'none', WORLD_SIZE: '4' })).toThrow(
      /WORLD_SIZE=4 \(launcher torchrun\) but RANK is not set/,
    );
    // Slurm's rank and a RANK/WORLD_SIZE that disagree, without torchrun to say which is inner
    expect(() => launchEnv({ ...slurm, RANK: '3', WORLD_SIZE: '8' })).toThrow(
      /Slurm says rank 1 of 2 \(SLURM_PROCID, SLURM_NTASKS\) but RANK=3, WORLD_SIZE=8: two launchers' variables disagree/,
    );
    expect(launchEnv({ ...slurm, RANK: '1', WORLD_SIZE: '2' })).toMatchObject({ launcher: 'slurm', rank: 1, size: 2 });
  });
  it('a partial or inconsistent launcher environment is refused, naming the variables', () => {
    expect(() => launchEnv({ WORLD_SIZE: '4' })).toThrow(/init: WORLD_SIZE=4 \(launcher env\) but RANK is not set/);
    expect(launchEnv({ WORLD_SIZE: '1' })).toMatchObject({ launcher: 'none', size: 1 });
    expect(launchEnv({ WORLD_SIZE: '', RANK: '' })).toMatchObject({ launcher: 'none', size: 1 }); // empty is unset
    // an sbatch script's inherited SLURM_LOCALID is not this PMI rank's: not read
    expect(() => launchEnv({ PMI_RANK: '2', PMI_SIZE: '4', SLURM_PROCID: '0', SLURM_NTASKS: '1', SLURM_LOCALID: '0' })).toThrow(
      /launcher mpich started 4 ranks but none of MPI_LOCALRANKID, PMI_LOCAL_RANK, PALS_LOCAL_RANKID is set/,
    );
    expect(() => launchEnv({ OMPI_COMM_WORLD_SIZE: '2', OMPI_COMM_WORLD_LOCAL_RANK: '0' })).toThrow(
      /OMPI_COMM_WORLD_SIZE=2 \(launcher openmpi\) but OMPI_COMM_WORLD_RANK is not set/,
    );
    expect(() => launchEnv({ PMI_RANK: '1', PMI_SIZE: '4' })).toThrow(
      /launcher mpich started 4 ranks but none of MPI_LOCALRANKID, PMI_LOCAL_RANK, PALS_LOCAL_RANKID is set/,
    );
    // Cray PALS and srun --mpi=pmi2 name the local rank otherwise
    expect(launchEnv({ PMI_RANK: '5', PMI_SIZE: '8', PALS_LOCAL_RANKID: '1', PALS_LOCAL_SIZE: '4' })).toMatchObject({
      launcher: 'mpich',
      localRank: 1,
      localSize: 4,
    });
    expect(
      launchEnv({
        PMI_RANK: '3',
        PMI_SIZE: '4',
        SLURM_PROCID: '3',
        SLURM_NTASKS: '4',
        SLURM_LOCALID: '1',
        SLURM_TASKS_PER_NODE: '2(x2)',
        SLURM_NODEID: '1',
      }),
    ).toMatchObject({
      launcher: 'mpich',
      localRank: 1,
      localSize: 2,
    });
    expect(() => launchEnv({ RANK: '1', WORLD_SIZE: '4', LOCAL_RANK: '3', LOCAL_WORLD_SIZE: '2' })).toThrow(
      /launcher env: local rank 3 is not in \[0, 2\) \(the ranks on this node\)/,
    );
    for (const odd of ['0x2', '1e1', ' 3 ', '+2', '2.0'])
      expect(() => launchEnv({ RANK: odd, WORLD_SIZE: '16' }), odd).toThrow(/RANK=".*" is not a non-negative integer/);
  });
  it("GPU sharing: counted only where the ranks per node are known; the ranks' own answer wins", () => {
    const le = (localSize?: number) => ({ launcher: 'openmpi' as const, rank: 1, size: 4, localRank: 1, localSize });
    // a pod per rank: no local size, one GPU each: not a shared GPU
    expect(chooseBackend({ ...le(), launcher: 'env' }, 'auto', 1, () => true)).toMatchObject({ backend: 'nccl', device: 'cuda:0' });
    // a GPU per rank by CUDA_VISIBLE_DEVICES: 4 ranks on the node, each seeing its own (asked: no sharing)
    expect(chooseBackend(le(4), 'auto', 1, () => true, { sharesGpu: false })).toMatchObject({ backend: 'nccl', device: 'cuda:0' });
    expect(chooseBackend(le(4), 'nccl', 1, () => true, { sharesGpu: false })).toMatchObject({ backend: 'nccl' });
    const asked = chooseBackend(le(4), 'auto', 1, () => true, { sharesGpu: true, visibleDevicesSet: true });
    expect(asked.backend).toBe('mpi');
    expect(asked.reason).toMatch(/^ranks on this node share a GPU \(the same PCI bus id\); NCCL refuses[^(]*$/);
    expect(() => chooseBackend(le(4), 'nccl', 1, () => true, { sharesGpu: true })).toThrow(/share a GPU \(the same PCI bus id\)/);
    // not asked (no MPI launcher) but CUDA_VISIBLE_DEVICES set: counted for 'auto', saying how to take
    // NCCL; a requested 'nccl' is let through to NCCL's own duplicate check
    const unsure = chooseBackend({ ...le(4), launcher: 'slurm' }, 'auto', 1, () => true, { visibleDevicesSet: true });
    expect(unsure).toMatchObject({ backend: 'mpi' });
    expect(unsure.reason).toMatch(
      /\(counted: where CUDA_VISIBLE_DEVICES gives each rank a GPU of its own, MOE_EP_BACKEND=nccl takes NCCL\)$/,
    );
    expect(chooseBackend({ ...le(4), launcher: 'slurm' }, 'nccl', 1, () => true, { visibleDevicesSet: true })).toMatchObject({
      backend: 'nccl',
    });
  });
  it("init's 'log' must be a boolean or a function", async () => {
    await expect(init({ log: 'yes' as unknown as boolean, env: {} })).rejects.toThrow(
      /init: 'log' must be a boolean or a function; received yes/,
    );
  });
});

describe('TCP rendezvous', () => {
  function child(rank: number, port: number, blobHex: string): Promise<string> {
    const lib = join(packageRoot(), 'dist', 'lib', 'index.js');
    const code = `import { rendezvous } from ${JSON.stringify(lib)};
      const blob = ${rank} === 0 ? Uint8Array.from(Buffer.from(${JSON.stringify(blobHex)}, 'hex')) : undefined;
      const got = await rendezvous({ rank: ${rank}, size: 2, addr: '127.0.0.1', port: ${port}, blob, timeoutMs: 10000 });
      console.log(Buffer.from(got).toString('hex'));`;
    return new Promise((resolve, reject) => {
      const p = spawn(process.execPath, ['--input-type=module', '-e', code], { stdio: ['ignore', 'pipe', 'pipe'] });
      let out = '';
      let err = '';
      p.stdout.on('data', (d: Buffer) => (out += d.toString()));
      p.stderr.on('data', (d: Buffer) => (err += d.toString()));
      p.on('close', (status) => (status === 0 ? resolve(out.trim()) : reject(new Error(`rank ${rank} exited ${status}: ${err}`))));
    });
  }

  it('two processes on 127.0.0.1 share a 128-byte blob from rank 0 (rank 1 may start first)', async () => {
    const blob = Buffer.alloc(128);
    for (let i = 0; i < 128; i++) blob[i] = (i * 37 + 11) & 0xff;
    const port = 20000 + (process.pid % 20000);
    const r1 = child(1, port, '');
    await new Promise((r) => setTimeout(r, 300));
    const r0 = child(0, port, blob.toString('hex'));
    const [a, b] = await Promise.all([r0, r1]);
    expect(a).toBe(blob.toString('hex'));
    expect(b).toBe(blob.toString('hex'));
  });

  /** Listens on a free port of 127.0.0.1 and returns it. */
  function listen(server: Server): Promise<number> {
    return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve((server.address() as { port: number }).port)));
  }
  async function freePort(): Promise<number> {
    const s = createServer();
    const port = await listen(s);
    await new Promise((r) => s.close(r));
    return port;
  }
  async function errorOf(p: Promise<unknown>): Promise<Error> {
    try {
      await p;
    } catch (e) {
      return e as Error;
    }
    throw new Error('resolved, but an error was expected');
  }
  const local = { addr: '127.0.0.1', timeoutMs: 20_000 };
  const blob = Uint8Array.from([7, 8, 9]);

  // Issue 14, item 5: the deadline was only checked between connection attempts.
  it('something that accepts the connection and never answers: rank 1 still gives up at its deadline', async () => {
    const silent = createServer(() => {}); // accepts; never reads, never writes
    const port = await listen(silent);
    try {
      const e = await errorOf(rendezvous({ rank: 1, size: 2, addr: '127.0.0.1', port, timeoutMs: 500 }));
      expect(e).toBeInstanceOf(TimeoutError);
      expect(e.message).toMatch(
        /^rendezvous: timed out after 500 ms on rank 1; not heard from rank 0 at 127\.0\.0\.1:\d+ \(connected; no answer yet: rank 0 answers once all 2 ranks have checked in, or another program may hold this port \(torchrun's own store listens on MASTER_PORT\); MOE_EP_MASTER_PORT gives moe-ep a port of its own\)$/,
      );
    } finally {
      silent.close();
    }
  }, 20_000);

  it('another service on the port is named as such, at once', async () => {
    const http = createServer((s) => s.end('HTTP/1.1 400 Bad Request\r\n\r\n'));
    const port = await listen(http);
    try {
      const e = await errorOf(rendezvous({ rank: 1, size: 2, port, ...local }));
      expect(e).toBeInstanceOf(InvalidArgumentError);
      expect(e.message).toMatch(/^rendezvous: what answers at 127\.0\.0\.1:\d+ is not a moe-ep rank 0/);
    } finally {
      http.close();
    }
  }, 20_000);

  // From an audit: rank 0 listened on 0.0.0.0, which an IPv6 MASTER_ADDR never reaches.
  it("rank 0 on '::' serves IPv6 and IPv4 parties alike; an IPv6 address is bracketed in messages", async () => {
    for (const addr of ['::1', '127.0.0.1']) {
      const port = await freePort();
      const zero = rendezvous({ rank: 0, size: 2, addr: '::', port, blob, timeoutMs: 20_000 });
      expect([...(await rendezvous({ rank: 1, size: 2, addr, port, timeoutMs: 20_000 }))], addr).toEqual([7, 8, 9]);
      expect([...(await zero)]).toEqual([7, 8, 9]);
    }
    const e = await errorOf(rendezvous({ rank: 1, size: 2, addr: '::1', port: await freePort(), timeoutMs: 300 }));
    expect(e.message).toMatch(/not heard from rank 0 at \[::1\]:\d+/);
  }, 20_000);

  it("a port another program holds (torchrun's store holds MASTER_PORT) fails rank 0 at once, naming MOE_EP_MASTER_PORT", async () => {
    const other = createServer(() => {});
    const port = await listen(other);
    try {
      const e = await errorOf(rendezvous({ rank: 0, size: 2, port, blob, ...local }));
      expect(e.message).toMatch(
        /^rendezvous: rank 0 cannot listen on 127\.0\.0\.1:\d+: listen EADDRINUSE.*: another program may hold this port \(torchrun's own store listens on MASTER_PORT\); MOE_EP_MASTER_PORT gives moe-ep a port of its own$/,
      );
    } finally {
      other.close();
    }
    const le = launchEnv({ TORCHELASTIC_RUN_ID: 'j', RANK: '0', WORLD_SIZE: '2', LOCAL_RANK: '0' });
    expect(rendezvousPort(le, { MASTER_PORT: '29500' }, {})).toBe(29501);
    expect(rendezvousPort(le, { MASTER_PORT: '29500', MOE_EP_MASTER_PORT: '31000' }, {})).toBe(31000);
    expect(rendezvousPort(le, { MASTER_PORT: '29500' }, { masterPort: 4242 })).toBe(4242);
    expect(rendezvousPort({ ...le, launcher: 'env' }, { MASTER_PORT: '29500' }, {})).toBe(29500);
    expect(() => rendezvousPort(le, { MASTER_PORT: '29500x' }, {})).toThrow(/MASTER_PORT="29500x" is not a non-negative integer/);
    expect(() => rendezvousPort(le, { MASTER_PORT: '65535' }, {})).toThrow(
      /init: the rendezvous port 65536 \(MASTER_PORT \+ 1 under torchrun\) must be 1\.\.65535; MOE_EP_MASTER_PORT sets another/,
    );
    expect(() => rendezvousPort(le, { MOE_EP_MASTER_PORT: '0' }, {})).toThrow(/the rendezvous port 0 \(MOE_EP_MASTER_PORT\)/);
  }, 20_000);

  it('two jobs on one port: a party of the other job is refused naming both job ids; rank 0 still serves its own job', async () => {
    const port = await freePort();
    const zero = rendezvous({ rank: 0, size: 2, port, blob, jobId: 'job-a', ...local });
    const other = await errorOf(rendezvous({ rank: 1, size: 2, port, jobId: 'job-b', ...local }));
    expect(other).toBeInstanceOf(InvalidArgumentError);
    expect(other.message).toMatch(
      /^rendezvous: rank 1 of 2 was refused by rank 0 at 127\.0\.0\.1:\d+: rank 0 at 127\.0\.0\.1:\d+ serves job "job-a", not job "job-b" of rank 1: two jobs share this MASTER_PORT/,
    );
    expect([...(await rendezvous({ rank: 1, size: 2, port, jobId: 'job-a', ...local }))]).toEqual([7, 8, 9]);
    expect([...(await zero)]).toEqual([7, 8, 9]);
  }, 20_000);

  /** A hand-made hello (rendezvous() itself refuses a rank out of range); resolves with rank 0's answer. */
  function rawHello(port: number, rank: number, size: number): Promise<{ status: number; text: string }> {
    const hello = Buffer.alloc(16);
    hello.write('MOE2', 0);
    hello.writeUInt32LE(rank, 4);
    hello.writeUInt32LE(size, 8);
    return new Promise((resolve) => {
      const attempt = (): void => {
        let buf = Buffer.alloc(0);
        const s = connect(port, '127.0.0.1', () => s.write(hello));
        s.on('data', (d: Buffer) => (buf = Buffer.concat([buf, d])));
        s.on('error', () => setTimeout(attempt, 50)); // rank 0 not listening yet
        s.on('end', () => resolve({ status: buf.readUInt8(4), text: buf.subarray(9).toString('utf8') }));
      };
      attempt();
    });
  }

  it('a party claiming a rank out of range, or a rank already claimed, fails rank 0 and every party waiting, naming it', async () => {
    let port = await freePort();
    const zero = errorOf(rendezvous({ rank: 0, size: 2, port, blob, ...local }));
    const answer = await rawHello(port, 5, 2);
    expect(answer.status).toBe(1);
    expect(answer.text).toMatch(/^a party claims rank 5 of 2, but rank 0 \(127\.0\.0\.1:\d+\) serves ranks 1\.\.1: RANK is out of range$/);
    expect((await zero).message).toMatch(/^rendezvous: a party claims rank 5 of 2/);

    port = await freePort();
    const zero3 = errorOf(rendezvous({ rank: 0, size: 3, port, blob, ...local }));
    const twice = await Promise.all([
      errorOf(rendezvous({ rank: 1, size: 3, port, ...local })),
      errorOf(rendezvous({ rank: 1, size: 3, port, ...local })),
    ]);
    for (const e of [...twice, await zero3]) {
      expect(e).toBeInstanceOf(InvalidArgumentError);
      expect(e.message).toMatch(
        /two parties claim rank 1 of 3 at rank 0 \(127\.0\.0\.1:\d+\): RANK is set twice, or two jobs share this MASTER_PORT/,
      );
    }
  }, 20_000);

  it('a rank with another WORLD_SIZE: rank 0 and every party waiting get the error, not a timeout', async () => {
    const port = await freePort();
    const zero = errorOf(rendezvous({ rank: 0, size: 3, port, blob, ...local }));
    const one = errorOf(rendezvous({ rank: 1, size: 3, port, ...local })); // right: waits for rank 2
    await new Promise((r) => setTimeout(r, 1000)); // rank 1 checks in first
    const wrong = errorOf(rendezvous({ rank: 2, size: 4, port, ...local }));
    for (const e of await Promise.all([zero, one, wrong])) {
      expect(e).toBeInstanceOf(InvalidArgumentError);
      expect(e.message).toMatch(
        /rank 2 says the world has 4 ranks but rank 0 \(127\.0\.0\.1:\d+\) has 3: WORLD_SIZE differs between the ranks$/,
      );
    }
  }, 30_000);

  it("the job id: MOE_EP_JOB_ID, else the launcher's, else none", () => {
    expect(jobId({ MOE_EP_JOB_ID: 'x', SLURM_JOB_ID: '5' })).toBe('x');
    expect(jobId({ SLURM_JOB_ID: '5', SLURM_STEP_ID: '0' })).toBe('slurm:5.0');
    expect(jobId({ TORCHELASTIC_RUN_ID: 'r' })).toBe('torchelastic:r');
    expect(jobId({ PMIX_NAMESPACE: '123' })).toBe('pmix:123');
    expect(jobId({})).toBe('');
  });

  it('a rank 1 with no rank 0 times out naming rank 0', async () => {
    const { rendezvous } = await import('../lib/index.js');
    await expect(rendezvous({ rank: 1, size: 2, addr: '127.0.0.1', port: 1, timeoutMs: 500 })).rejects.toThrow(
      /rendezvous: timed out after 500 ms on rank 1; not heard from rank 0 at 127.0.0.1:1/,
    );
  });
});
