// Several ranks under a real mpirun on the CPU (OpenMPI; .ci/run installs it). Each script checks
// its results on every rank and exits non-zero with a message on failure. Skipped without mpirun.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { native, packageRoot } from '../../lib/native.js';

const root = packageRoot();
const hasMpirun = spawnSync('mpirun', ['--version'], { encoding: 'utf8' }).status === 0;

function mpirun(np: number, script: string, timeoutMs = 60_000): { status: number | null; out: string; ms: number } {
  const t0 = Date.now();
  const r = spawnSync(
    'mpirun',
    ['--allow-run-as-root', '--oversubscribe', '-np', String(np), process.execPath, join(root, 'test', 'mpi', script)],
    { encoding: 'utf8', timeout: timeoutMs, env: { ...process.env, OMPI_MCA_rmaps_base_oversubscribe: '1' } },
  );
  return { status: r.status, out: `${r.stdout}\n${r.stderr}`, ms: Date.now() - t0 };
}

describe.skipIf(!hasMpirun)('under mpirun (CPU, MPI backend)', () => {
  it('the MPI backend library is built and loads', () => {
    const s = native().mpiStatus(true);
    expect(s.loaded, s.error).toBe(true);
  });

  it.each([2, 4])('collectives on %i ranks: allReduce, allGather, broadcast, allToAll, ragged allToAllV, mismatch, EP/EDP split', (np) => {
    const r = mpirun(np, 'collectives.mjs');
    expect(r.status, r.out).toBe(0);
    for (let k = 0; k < np; k++) expect(r.out).toContain(`ok rank ${k} of ${np}`);
  });

  it.each([2, 4])('dispatch/combine and the MoE layer at EP=%i equal one-rank references (forward, backward, expert gradients)', (np) => {
    const r = mpirun(np, 'moe-layer.mjs');
    expect(r.status, r.out).toBe(0);
    for (let k = 0; k < np; k++) expect(r.out).toContain(`ok rank ${k} of ${np}`);
  });

  it.each([2, 4])('training at EP=%i follows the EP=1 loss trajectory on the same global batches', (np) => {
    const r = mpirun(np, 'train.mjs');
    expect(r.status, r.out).toBe(0);
    for (let k = 0; k < np; k++) expect(r.out).toContain(`ok rank ${k} of ${np}`);
  });

  it.each([2, 4])('a rank 3 s late on %i ranks: the others throw TimeoutError naming allToAllV and rank 1 after 2 s; all exit cleanly', (np) => {
    const r = mpirun(np, 'timeout.mjs');
    expect(r.status, r.out).toBe(0);
    for (let k = 0; k < np; k++) expect(r.out).toContain(`ok rank ${k}`);
  });

  // OpenMPI (4.1) notices the dead rank and kills the whole job at once (exit 137, "exited on signal
  // 9"), usually before the others' timeout fires. What is reliable: the job ends, non-zero, quickly.
  it('a rank killed mid-run: the job ends non-zero within the timeout plus slack, nothing hangs', () => {
    const r = mpirun(2, 'kill.mjs', 30_000);
    expect(r.status, r.out).not.toBe(0);
    expect(r.status, 'mpirun itself was not killed by the test timeout').not.toBeNull();
    expect(r.ms).toBeLessThan(15_000);
  });
});
