// Two ranks sharing one GPU under `mpirun -np 2`: both put their tensors on cuda:0 and talk through
// the MPI communicator, which stages device buffers through pinned host memory (NCCL refuses two
// ranks on one GPU, so init() must pick MPI and say why). The scripts are test/mpi's own, run with
// `--device cuda`; they check their results on every rank against the CPU (moe-layer.mjs) or
// against the one-rank run (train.mjs) and exit non-zero with a message otherwise.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { native, packageRoot } from '../../lib/native.js';
import { hasMpirun, mpirun } from '../mpi/mpirun.js';
import { hasGpu } from './gpu.js';

const hasMpi = hasGpu && native().mpiStatus(true).loaded;
// One GPU for both ranks, also on a machine with several: the first visible one.
// A rank that dies of a signal leaves no JS error: each prints the stages it completed and, from the
// addon's handler, the signal and its native backtrace (test/mpi/common.mjs progress(),
// native/addon/crash_report.cc), all in the failure message below.
const oneGpu = {
  CUDA_VISIBLE_DEVICES: (process.env['CUDA_VISIBLE_DEVICES'] ?? '0').split(',')[0] ?? '0',
  MOE_EP_TEST_PROGRESS: '1',
  MOE_EP_CRASH_BACKTRACE: '1',
};

describe.skipIf(!(hasGpu && hasMpirun && hasMpi))('2 ranks sharing one GPU through MPI staging', () => {
  it('dispatch → combine identity (f32 and fp8 rows), the EP=2 layer forward and backward against the one-rank CPU reference (bf16 tolerances), a comm stream changing nothing; init chose MPI and said why', () => {
    const r = mpirun(2, 'moe-layer.mjs', 240_000, ['--device', 'cuda'], oneGpu);
    expect(r.status, r.out).toBe(0);
    for (let k = 0; k < 2; k++) expect(r.out).toContain(`ok rank ${k} of 2`);
    expect(r.out).toMatch(
      // CUDA_VISIBLE_DEVICES is set, so init asks the ranks over MPI for their GPUs' PCI bus ids (lib/parallel/init.ts).
      /moe-ep init: 2 ranks \(\w+\), backend mpi, rank 0 on cuda:0: ranks on this node share a GPU \(the same PCI bus id\); NCCL refuses two ranks on one GPU/,
    );
  }, 300_000);

  it('training 8 steps at EP=2 and at EP=1 × EDP=2 follows EP=1 on the same GPU (bf16, within 2e-2); the EP=2 checkpoint resumes at EP=1 on the same trajectory', () => {
    const r = mpirun(2, 'train.mjs', 400_000, ['--device', 'cuda'], oneGpu);
    expect(r.status, r.out).toBe(0);
    for (let k = 0; k < 2; k++) expect(r.out).toContain(`ok rank ${k} of 2`);
  }, 450_000);

  it('a checkpoint saved by 2 ranks on the GPU loads at EP=2 and in one process (EP=1) with the same outputs, bit for bit', () => {
    const dir = mkdtempSync(join(tmpdir(), 'moe-ep-gpu-ckpt-'));
    try {
      const save = mpirun(2, 'checkpoint.mjs', 240_000, ['save', dir, '--device', 'cuda'], oneGpu);
      expect(save.status, save.out).toBe(0);
      for (let k = 0; k < 2; k++) expect(save.out).toContain(`ok rank ${k} of 2`);
      const one = spawnSync(
        process.execPath,
        [join(packageRoot(), 'test', 'mpi', 'checkpoint.mjs'), 'load', dir, join(dir, 'y.bin'), '--device', 'cuda'],
        {
          encoding: 'utf8',
          env: { ...process.env, ...oneGpu },
          timeout: 120_000,
        },
      );
      expect(one.status, `${one.stdout}${one.stderr}`).toBe(0);
      expect(one.stdout).toContain('ok rank 0 of 1');
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 400_000);
});
