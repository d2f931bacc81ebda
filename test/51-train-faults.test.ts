// `moe-ep train` faults that must never pass silently (issue 14, items 4-7): SIGTERM and SIGHUP stop
// like Ctrl-C (the step finishes, a checkpoint and the report are written), a closed stdout too;
// `--config` naming a FIFO or /dev/zero fails at once; `--__proto__.x` never reaches
// Object.prototype; a configuration far too large for the machine fails before allocating.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { latestCheckpoint } from '../lib/index.js';
import { packageRoot } from '../lib/native.js';
import { estimateMemory, overridesFromArgs, resolveConfig } from '../lib/train/config.js';

const cli = join(packageRoot(), 'dist', 'lib', 'cli', 'main.js');
const dirs: string[] = [];
function tmp(): string {
  const d = mkdtempSync(join(tmpdir(), 'moe-train-faults-'));
  dirs.push(d);
  return d;
}
afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

// A small model: steps of a few milliseconds.
const small = ['--model.experts', '4', '--data.tokensPerStep', '64', '--no-progress'];

/** `moe-ep train …` with 4 GB of address space and a deadline, so that a regression cannot take the machine or hang. */
function trainBounded(
  args: string[],
  timeout = 60_000,
): { status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string } {
  const r = spawnSync('/bin/sh', ['-c', 'ulimit -v 4000000 && exec "$0" "$@"', process.execPath, cli, 'train', ...args], {
    encoding: 'utf8',
    timeout,
  });
  return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr };
}

describe('moe-ep train stops cleanly on every stop request', () => {
  it.each(['SIGTERM', 'SIGHUP'] as const)('%s: finishes the step, saves a checkpoint and writes the report', async (signal) => {
    const out = tmp();
    const child = spawn(process.execPath, [cli, 'train', '--steps', '1000000', '--out', out, ...small], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stdout = '';
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<[number | null, NodeJS.Signals | null]>((r) => child.on('exit', (c, s) => r([c, s])));
    await new Promise<void>((r) =>
      child.stdout.on('data', (d: Buffer) => {
        stdout += d.toString();
        if (stdout.includes('step 1/')) r();
      }),
    );
    await new Promise((r) => setTimeout(r, 200));
    child.kill(signal);
    const [code, killedBy] = await exited;
    expect([code, killedBy], stderr).toEqual([0, null]);
    expect(stderr).toContain(`moe-ep: ${signal}: stopping after the current step`);
    const steps = Number(/final loss [\d.]+ after (\d+) steps/.exec(stdout)?.[1]);
    expect(steps).toBeGreaterThan(0);
    expect(latestCheckpoint(join(out, 'checkpoints'))?.step).toBe(steps);
    expect(readFileSync(join(out, 'report.html'), 'utf8')).toContain(`by ${signal}`);
  });

  it('a closed stdout (`| head`): no unhandled EPIPE; it stops after the step with a checkpoint and the report', async () => {
    const out = tmp();
    // 400 steps print every 20: the first write after the pipe closes fails.
    const child = spawn(process.execPath, [cli, 'train', '--steps', '400', '--out', out, ...small], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const exited = new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
    await new Promise<void>((r) => child.stdout.once('data', () => r()));
    child.stdout.destroy(); // what `head` does when it has its lines
    const code = await exited;
    expect(code, stderr).toBe(0);
    expect(stderr).not.toMatch(/Unhandled|Error: write/);
    expect(stderr).toMatch(/moe-ep: output closed \(EPIPE\): stopping after the current step/);
    const saved = latestCheckpoint(join(out, 'checkpoints'));
    expect(saved?.step).toBeGreaterThan(0);
    expect(saved?.step).toBeLessThan(400);
    expect(readFileSync(join(out, 'report.html'), 'utf8')).toContain('by output closed (EPIPE)');
  });
});

describe('bad configurations fail at once, naming what to change', () => {
  it('--config naming a FIFO or /dev/zero: an error, neither a hang nor a read without end', () => {
    const dir = tmp();
    const fifo = join(dir, 'config.json');
    spawnSync('mkfifo', [fifo]);
    for (const [path, kind] of [
      [fifo, 'a FIFO'],
      ['/dev/zero', 'a character device'],
    ]) {
      const r = trainBounded(['--config', path as string, '--steps', '1'], 20_000);
      expect(r.signal, r.stderr).toBeNull();
      expect(r.status).toBe(1);
      expect(r.stderr).toContain(`cannot read the config file ${path}: is ${kind}; only regular files are read`);
    }
  });

  it('--__proto__.x never reaches Object.prototype; --constructor.x and unknown fields are refused', () => {
    try {
      expect(() => overridesFromArgs(['--__proto__.polluted', '1'])).toThrow(
        /'--__proto__\.polluted': unknown section '__proto__' \(one of model, balance, optimizer, data, train, checkpoint\)/,
      );
      expect(({} as Record<string, unknown>)['polluted']).toBeUndefined();
      expect(() => overridesFromArgs(['--constructor.x', '1'])).toThrow(/unknown section 'constructor'/);
      expect(() => overridesFromArgs(['--model.__proto__', '1'])).toThrow(/config\.model: unknown field '__proto__'/);
      expect(() => overridesFromArgs(['--model.toString', '1'])).toThrow(/config\.model: unknown field 'toString'/);
      // The same through a config file (JSON.parse makes `__proto__` an own key).
      expect(() => resolveConfig(JSON.parse('{"__proto__": {"polluted": 1}}'))).toThrow(/config: unknown field '__proto__'/);
      expect(() => resolveConfig(JSON.parse('{"model": {"__proto__": {"experts": 1}}}'))).toThrow(
        /config\.model: unknown field '__proto__'/,
      );
    } finally {
      delete (Object.prototype as Record<string, unknown>)['polluted'];
    }
  });

  it('integers are bounded (int32)', () => {
    expect(() => resolveConfig({ train: { steps: 1e300 } })).toThrow(/config\.train\.steps: must be <= 2147483647/);
    expect(() => resolveConfig({ model: { experts: 2 ** 31 } })).toThrow(/config\.model\.experts: must be <= 2147483647/);
  });

  it('a model far beyond the memory there is fails before allocating, naming the fields', () => {
    const big = resolveConfig({ model: { experts: 1_000_000 } });
    const est = estimateMemory(big);
    expect(est.params).toBeGreaterThan(50 * 2 ** 30); // 1e6 experts × 3·32·16 weights × 20 bytes, 2 layers
    expect(estimateMemory(resolveConfig({})).params).toBeLessThan(2 ** 20);
    // A backward keeps one pass's activations: micro-batches divide them, not the parameters.
    const quarter = estimateMemory(resolveConfig({ model: { experts: 1_000_000 }, train: { microBatches: 4 } }));
    expect(quarter.activations).toBe(est.activations / 4);
    expect(quarter.params).toBe(est.params);
    // Recompute: the layers but the one in backward keep less (2 layers; experts drop M·(3F+H) of
    // M·(2H+3F) routed values and the shared expert's, layer all of them), parameters unchanged.
    const kept = (recompute: 'experts' | 'layer') =>
      estimateMemory(resolveConfig({ model: { experts: 1_000_000, sharedFfn: 8 }, train: { recompute } }));
    const whole = estimateMemory(resolveConfig({ model: { experts: 1_000_000, sharedFfn: 8 } }));
    const [H, F, E, S, k, T] = [32, 16, 1_000_000, 8, 2, 256];
    const layerValues = T * (4 * H + 3 * E + 3 * S) + T * k * (2 * H + 3 * F);
    expect(whole.activations).toBe(2 * layerValues * 8);
    expect(kept('experts').activations).toBe((layerValues + layerValues - T * 3 * S - T * k * (H + 3 * F)) * 8);
    expect(kept('layer').activations).toBe((layerValues + layerValues - T * 3 * S - T * k * (2 * H + 3 * F)) * 8);
    expect(kept('layer').params).toBe(whole.params);
    const out = tmp();
    const r = trainBounded(['--model.experts', '1000000', '--steps', '1', '--out', out, '--no-progress']);
    expect(r.signal, r.stderr).toBeNull();
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(
      /this configuration needs about [\d.]+ GiB per rank on cpu \(parameters and optimizer state [\d.]+ GiB, activations [\d.]+ GiB, data task [\d.]+ GiB\) but it has [\d.]+ GiB: reduce config\.model\.experts \(1000000\).*raise train\.microBatches \(1: the activations shrink with it\), set train\.recompute \(none: 'experts' or 'layer' keep less\)/,
    );
    expect(existsSync(join(out, 'checkpoints'))).toBe(false);
  });
});

describe('--resume reads only inside the checkpoint root', () => {
  it('latest naming a step folder linked out of the root: passed over with the reason printed; the run resumes from the one inside', () => {
    const [a, b] = [tmp(), tmp()];
    for (const [out, steps] of [
      [a, '4'],
      [b, '2'],
    ] as const) {
      const r = spawnSync(process.execPath, [cli, 'train', '--steps', steps, '--out', out, ...small], { encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
    }
    symlinkSync(join(a, 'checkpoints', 'step-00000004'), join(b, 'checkpoints', 'step-00000004'));
    writeFileSync(join(b, 'checkpoints', 'latest'), 'step-00000004\n');
    const r = spawnSync(process.execPath, [cli, 'train', '--steps', '3', '--out', b, '--resume', ...small], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/resumed from .* at step 2/);
    expect(r.stderr).toMatch(
      /moe-ep: passed over .*step-00000004: checkpoint .*step-00000004: resolves outside its folder through a symbolic link/,
    );
    expect(latestCheckpoint(join(b, 'checkpoints'))?.step).toBe(3);
  });
});
