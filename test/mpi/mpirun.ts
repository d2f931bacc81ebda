// Starting the scripts in test/mpi/ under a real mpirun (OpenMPI), shared by test/mpi/run.test.ts
// (CPU) and test/gpu/21-mpi-shared-gpu.gpu.test.ts (ranks sharing one GPU).
import { spawnSync } from 'node:child_process';
import { isAbsolute, join } from 'node:path';

import { packageRoot } from '../../lib/native.js';

export const hasMpirun = spawnSync('mpirun', ['--version'], { encoding: 'utf8' }).status === 0;

/** Runs test/mpi/<script> (or an absolute path) on `np` ranks, in `cwd`; `env` is added to this process's environment. */
export function mpirun(
  np: number,
  script: string,
  timeoutMs = 60_000,
  args: string[] = [],
  env: NodeJS.ProcessEnv = {},
  cwd?: string,
): { status: number | null; out: string; ms: number } {
  const t0 = Date.now();
  const r = spawnSync(
    'mpirun',
    [
      '--allow-run-as-root',
      '--oversubscribe',
      '-np',
      String(np),
      process.execPath,
      isAbsolute(script) ? script : join(packageRoot(), 'test', 'mpi', script),
      ...args,
    ],
    {
      encoding: 'utf8',
      timeout: timeoutMs,
      env: { ...process.env, OMPI_MCA_rmaps_base_oversubscribe: '1', ...env },
      ...(cwd ? { cwd } : {}),
    },
  );
  return { status: r.status, out: `${r.stdout}\n${r.stderr}`, ms: Date.now() - t0 };
}

/** Several programs in one job (mpirun's `-np 1 a : -np 1 b` form): one rank per entry of `apps`, each `[program, ...args]`. */
export function mpirunApps(
  apps: string[][],
  timeoutMs = 60_000,
  env: NodeJS.ProcessEnv = {},
  cwd?: string,
): { status: number | null; out: string; ms: number } {
  const t0 = Date.now();
  const argv = ['--allow-run-as-root', '--oversubscribe'];
  apps.forEach((app, i) => argv.push(...(i ? [':'] : []), '-np', '1', ...app));
  const r = spawnSync('mpirun', argv, {
    encoding: 'utf8',
    timeout: timeoutMs,
    cwd,
    env: { ...process.env, OMPI_MCA_rmaps_base_oversubscribe: '1', ...env },
  });
  return { status: r.status, out: `${r.stdout}\n${r.stderr}`, ms: Date.now() - t0 };
}
