// Several ranks under a real mpirun on the CPU (OpenMPI; .ci/run installs it). Each script checks
// its results on every rank and exits non-zero with a message on failure. Skipped without mpirun.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { native, packageRoot } from '../../lib/native.js';
import { hasMpirun, mpirun, mpirunApps } from './mpirun.js';

const root = packageRoot();
const cli = join(root, 'dist', 'lib', 'cli', 'main.js');

/** Kills the processes a run says it froze ("pid N stopping"), in case the launcher left them. */
function killFrozen(out: string): void {
  for (const m of out.matchAll(/pid (\d+) stopping/g)) {
    try {
      process.kill(Number(m[1]), 'SIGKILL');
    } catch {
      // already gone: the launcher ended it
    }
  }
}

describe.skipIf(!hasMpirun)('under mpirun (CPU, MPI backend)', () => {
  it('the MPI backend library is built and loads', () => {
    const s = native().mpiStatus(true);
    expect(s.loaded, s.error).toBe(true);
  });

  it.each([2, 4])('collectives on %i ranks: allReduce, allGather, broadcast, allToAll, ragged allToAllV, EP/EDP split, abort', (np) => {
    const r = mpirun(np, 'collectives.mjs');
    expect(r.status, r.out).toBe(0);
    for (let k = 0; k < np; k++) expect(r.out).toContain(`ok rank ${k} of ${np}`);
  });

  // Issue 14, item 1: these overran buffers (malloc(): corrupted top size) or hung.
  it.each([2, 3])(
    'mismatched calls on %i ranks (sizes, dtype, op, root, the call itself, allToAllV counts): an InvalidArgumentError on every rank naming the peers and both values; the communicator stays usable',
    (np) => {
      const r = mpirun(np, 'mismatch.mjs');
      expect(r.status, r.out).toBe(0);
      for (let k = 0; k < np; k++) expect(r.out).toContain(`ok rank ${k} of ${np} (mpi)`);
    },
  );

  it.each([2, 4])(
    'dispatch/combine and the MoE layer at EP=%i equal one-rank references (forward, backward, expert gradients; token choice with bf16 and fp8 dispatch, and expert choice against the plain-loop reference); a comm stream changes no bit',
    (np) => {
      const r = mpirun(np, 'moe-layer.mjs');
      expect(r.status, r.out).toBe(0);
      for (let k = 0; k < np; k++) expect(r.out).toContain(`ok rank ${k} of ${np}`);
    },
  );

  // Issue #18's benches run once on a rare multi-GPU machine: their scripts are kept runnable here.
  it('the EP benchmarks run dry on 2 ranks (dispatch; ep-step with a comm stream and a shared expert), and a transport that fails is recorded in the result file', () => {
    const out = fs.mkdtempSync(join(tmpdir(), 'moe-ep-bench-dry-'));
    const bench = (name: string) => join(root, 'benchmarks', name);
    const results = (dir: string): { rows: unknown[]; notes: { errors?: Record<string, string> } }[] =>
      fs.readdirSync(dir).map((f) => JSON.parse(fs.readFileSync(join(dir, f), 'utf8')));
    try {
      // [script, flags, exit status (1: something failed, the file written all the same), check]
      const runs: [string, string[], number, (r: { rows: unknown[]; notes: { errors?: Record<string, string> } }) => void][] = [
        ['dispatch.bench.mjs', ['--no-peer'], 0, (r) => expect(r.rows).toHaveLength(8)],
        [
          'dispatch.bench.mjs',
          ['--no-peer', '--transport', 'ipc'],
          1,
          (r) =>
            expect(r.notes.errors?.['ipc']).toMatch(
              /^rank 0: InvalidArgumentError: .*'ipc' cannot be used: the tensors are on the CPU; rank 1: /,
            ),
        ],
        ['ep-step.bench.mjs', ['--overlap', '--shared-ffn', '2048'], 0, (r) => expect(r.rows).toHaveLength(4)],
      ];
      runs.forEach(([name, args, status, check], i) => {
        const dir = join(out, String(i));
        const r = mpirun(2, bench(name), 120_000, ['--dry-run', '--out', dir, ...args]);
        expect(r.status, r.out).toBe(status);
        const files = results(dir);
        expect(files, `${name} ${args.join(' ')}`).toHaveLength(1);
        check(files[0]!);
      });
    } finally {
      fs.rmSync(out, { recursive: true, force: true });
    }
  });

  it("the README's multi-rank example (examples/multi-rank.ts) on 2 ranks: allReduce, ragged allToAllV, an MoE layer over both ranks with a comm stream", () => {
    // On the CPU even where there is a GPU (the whole suite runs there too).
    const r = mpirun(2, join(root, 'dist', 'examples', 'multi-rank.js'), 60_000, [], { CUDA_VISIBLE_DEVICES: '' });
    expect(r.status, r.out).toBe(0);
    expect(r.out).toContain('Communicator(mpi, rank 1 of 2) on cpu');
    expect(r.out).toContain('rank 0: allReduce 3, received 1 + 2 rows, 4 local experts, dx 128,64');
    expect(r.out).toContain('rank 1: allReduce 3, received 2 + 3 rows, 4 local experts, dx 128,64');
  });

  it.each([2, 4])(
    "training on %i ranks (EP = all ranks, and EP = half × EDP = 2) follows the EP=1 loss trajectory; checkpoints resume at EP=1 on it; expert choice trains at EP = all ranks; so do 2 micro-batches a step, the experts' gradients in bf16 and gpt-oss's biases",
    (np) => {
      const r = mpirun(np, 'train.mjs');
      expect(r.status, r.out).toBe(0);
      for (let k = 0; k < np; k++) expect(r.out).toContain(`ok rank ${k} of ${np}`);
    },
  );

  it("`moe-ep train` on 2 ranks with the default run folder: one folder holds both ranks' checkpoint shards", () => {
    const cwd = fs.mkdtempSync(join(tmpdir(), 'moe-cli-mpi-'));
    try {
      const r = mpirun(
        2,
        join(root, 'dist', 'lib', 'cli', 'main.js'),
        60_000,
        ['train', '--steps', '6', '--no-progress', '--model.experts', '4'],
        { CUDA_VISIBLE_DEVICES: '' },
        cwd,
      );
      expect(r.status, r.out).toBe(0);
      const runs = fs.readdirSync(join(cwd, 'runs'));
      expect(runs).toHaveLength(1);
      const step = join(cwd, 'runs', runs[0] as string, 'checkpoints', 'step-00000006');
      expect(fs.readdirSync(step).sort()).toEqual(['manifest.json', 'rank-0.safetensors', 'rank-1.safetensors', 'replicated.safetensors']);
      expect(r.out).toContain('2 rank(s) [mpi]');
    } finally {
      fs.rmSync(cwd, { recursive: true, force: true });
    }
  });

  // Found in review (session 31): rank 0 deleted the old run as soon as its own Trainer was built.
  it('--overwrite with a rank that cannot build its Trainer (less memory there): every rank stops, the old run stays whole', () => {
    const cwd = fs.mkdtempSync(join(tmpdir(), 'moe-cli-mpi-overwrite-'));
    try {
      const flags = ['train', '--steps', '2', '--no-progress', '--model.experts', '4', '--data.tokensPerStep', '64', '--out', 'run'];
      const env = { CUDA_VISIBLE_DEVICES: '' };
      expect(mpirun(2, cli, 60_000, flags, env, cwd).status).toBe(0);
      const before = fs.readFileSync(join(cwd, 'run', 'metrics.jsonl'), 'utf8');
      // Rank 1 sees a machine of 1 KiB: its Trainer's memory estimate refuses the model.
      const preload = join(cwd, 'small-node.mjs');
      fs.writeFileSync(
        preload,
        `import { createRequire, syncBuiltinESMExports } from 'node:module';\nif (process.env.OMPI_COMM_WORLD_RANK === '1') { createRequire(import.meta.url)('node:os').totalmem = () => 1024; syncBuiltinESMExports(); }\n`,
      );
      const r = mpirun(2, cli, 60_000, [...flags, '--overwrite'], { ...env, NODE_OPTIONS: `--import=${preload}` }, cwd);
      expect(r.status, r.out).not.toBe(0);
      expect(r.out).toMatch(/rank 1 could not build the model: Trainer: this configuration needs/);
      expect(fs.readFileSync(join(cwd, 'run', 'metrics.jsonl'), 'utf8')).toBe(before);
      expect(fs.readdirSync(join(cwd, 'run', 'checkpoints')).sort()).toEqual(['latest', 'step-00000002']);
    } finally {
      fs.rmSync(cwd, { recursive: true, force: true });
    }
  });

  it.each([2, 4])(
    'a rank 3 s late on %i ranks: the others throw TimeoutError naming allToAllV and rank 1 after 2 s, the late one naming them in turn; all exit cleanly',
    (np) => {
      const r = mpirun(np, 'timeout.mjs');
      expect(r.status, r.out).toBe(0);
      for (let k = 0; k < np; k++) expect(r.out).toContain(`ok rank ${k}`);
    },
  );

  // OpenMPI (4.1) notices the dead rank and kills the whole job at once (exit 137, "exited on signal
  // 9"), usually before the others' timeout fires. What is reliable: the job ends, non-zero, quickly.
  it('a rank killed mid-run: the job ends non-zero within the timeout plus slack, nothing hangs', () => {
    const r = mpirun(2, 'kill.mjs', 30_000);
    expect(r.status, r.out).not.toBe(0);
    expect(r.status, 'mpirun itself was not killed by the test timeout').not.toBeNull();
    expect(r.ms).toBeLessThan(15_000);
  });

  // Issue 14, item 5: a frozen peer used to leave the survivor blocked forever in MPI_Finalize at exit.
  it('a rank frozen (SIGSTOP) before a collective: the other throws a TimeoutError naming it after 1.5 s, then leaves (MPI_Finalize gets a deadline after a timeout) and the job ends', () => {
    const r = mpirun(2, 'freeze.mjs', 60_000);
    killFrozen(r.out);
    expect(r.status, `the job hung (mpirun was killed by the test's timeout):\n${r.out}`).not.toBeNull();
    expect(r.out).toMatch(
      /rank 0 after \d+ ms: TimeoutError: allReduce: timed out after 1500 ms on rank 0 of 2 \(mpi\); not heard from rank 1;/,
    );
  });

  it('moe-ep train --timeout-ms 1500 with a rank frozen mid-run: the other stops with a TimeoutError after 1.5 s naming the frozen rank, and the job ends', () => {
    const dir = fs.mkdtempSync(join(tmpdir(), 'moe-ep-mpi-freeze-'));
    const args = ['train', '--steps', '1000000', '--no-progress', '--timeout-ms', '1500', '--out', 'run'];
    try {
      const r = mpirunApps(
        [
          [process.execPath, cli, ...args],
          [process.execPath, join(root, 'test', 'mpi', 'stop-after.mjs'), '3000', ...args],
        ],
        90_000,
        {},
        dir,
      );
      killFrozen(r.out);
      expect(r.status, `the job hung (mpirun was killed by the test's timeout):\n${r.out}`).not.toBeNull();
      expect(r.status, r.out).not.toBe(0);
      expect(r.out).toMatch(/moe-ep: \w+: timed out after 1500 ms on rank 0 of 2 \(mpi\); not heard from rank 1;/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  // Issue 14, items 1 and 7: ranks given other sizes corrupted memory (malloc(): corrupted top size);
  // ranks given another tokensPerStep trained without complaint.
  it('ranks given different configurations stop before the first step, every rank naming each differing field; equal ones train into one run folder', () => {
    const dir = fs.mkdtempSync(join(tmpdir(), 'moe-ep-mpi-config-'));
    const args = ['train', '--steps', '2', '--no-progress'];
    try {
      let r = mpirunApps(
        [
          [process.execPath, cli, ...args, '--out', 'run'],
          [process.execPath, cli, ...args, '--out', 'run', '--model.hidden', '64', '--data.tokensPerStep', '512'],
        ],
        60_000,
        {},
        dir,
      );
      expect(r.status, r.out).not.toBe(0);
      for (const k of [0, 1])
        expect(r.out).toContain(
          `moe-ep: Trainer: rank ${k} of 2: the ranks were given different configurations, but every rank must train the same one:`,
        );
      expect(
        r.out.match(/config\.data\.tokensPerStep: 256 on rank 0; 512 on rank 1\n\s+config\.model\.hidden: 32 on rank 0; 64 on rank 1/g),
      ).toHaveLength(2);
      expect(r.out).not.toMatch(/corrupted|signal/);
      // Without --out every rank used to name the run folder after its own clock, scattering the
      // checkpoint's shards: rank 0's name now holds for all.
      r = mpirunApps(
        [
          [process.execPath, cli, ...args],
          [process.execPath, cli, ...args],
        ],
        60_000,
        {},
        dir,
      );
      expect(r.status, r.out).toBe(0);
      const runs = fs.readdirSync(join(dir, 'runs'));
      expect(runs).toHaveLength(1);
      expect(fs.readdirSync(join(dir, 'runs', runs[0]!, 'checkpoints', 'step-00000002')).sort()).toEqual([
        'manifest.json',
        'rank-0.safetensors',
        'rank-1.safetensors',
        'replicated.safetensors',
      ]);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('checkpoints: 2 ranks save; reload at EP=2 (own experts) and EP=1 (rank 0 reads all), tensors and outputs identical', () => {
    const dir = fs.mkdtempSync(join(tmpdir(), 'moe-ep-mpi-ckpt-'));
    try {
      const r = mpirun(2, 'checkpoint.mjs', 60_000, ['save', dir]);
      expect(r.status, r.out).toBe(0);
      for (let k = 0; k < 2; k++) expect(r.out).toContain(`ok rank ${k} of 2`);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('checkpoints: ranks that do not share the folder (a root per rank) are refused on every rank, nothing committed or pruned; a bad option on one rank fails every rank at once', () => {
    const dir = fs.mkdtempSync(join(tmpdir(), 'moe-ep-mpi-ckpt-'));
    try {
      const r = mpirun(2, 'checkpoint.mjs', 60_000, ['faults', dir]);
      expect(r.status, r.out).toBe(0);
      for (let k = 0; k < 2; k++) expect(r.out).toContain(`ok rank ${k} of 2`);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('checkpoints: saved at EP=4, resharded 4 → 2 → 1 offline (moe-ep ckpt reshard): the same model outputs as never resharding', () => {
    const dir = fs.mkdtempSync(join(tmpdir(), 'moe-ep-mpi-ckpt-'));
    const cli = (args: string[]) =>
      spawnSync(process.execPath, [join(root, 'dist', 'lib', 'cli', 'main.js'), 'ckpt', ...args], { encoding: 'utf8' });
    try {
      let r = mpirun(4, 'checkpoint.mjs', 90_000, ['save', dir]);
      expect(r.status, r.out).toBe(0);
      const y = join(dir, 'y.bin');
      const c2 = cli(['reshard', dir, '--ep', '2', '--out', join(dir, 'ep2')]);
      expect(c2.status, c2.stderr).toBe(0);
      const c1 = cli(['reshard', join(dir, 'ep2'), '--ep', '1', '--out', join(dir, 'ep1')]);
      expect(c1.status, c1.stderr).toBe(0);
      r = mpirun(2, 'checkpoint.mjs', 60_000, ['load', join(dir, 'ep2'), y]);
      expect(r.status, r.out).toBe(0);
      r = mpirun(2, 'checkpoint.mjs', 60_000, ['load', dir, y]); // EP=4 files read directly at EP=2
      expect(r.status, r.out).toBe(0);
      const one = spawnSync(process.execPath, [join(root, 'test', 'mpi', 'checkpoint.mjs'), 'load', join(dir, 'ep1'), y], {
        encoding: 'utf8',
      });
      expect(one.status, `${one.stdout}${one.stderr}`).toBe(0);
      expect(one.stdout).toContain('ok rank 0 of 1');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
