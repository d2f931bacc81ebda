// The benchmarks' clock and power sampler (benchmarks/gpu-power.mjs): nvidia-smi's lines parsed and
// summarised, and the sampler's life in a process, against a fake nvidia-smi on PATH (this machine
// may have none): it starts at the first call, its samples reach the summary, and it is gone once
// the process exits. Without nvidia-smi nothing starts and the summary is null.
import { spawn, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

import { afterAll, describe, expect, it } from 'vitest';

import { packageRoot } from '../lib/native.js';

const modulePath = join(packageRoot(), 'benchmarks', 'gpu-power.mjs');
const moduleUrl = pathToFileURL(modulePath).href;

type Quantiles = { median: number; min: number; max: number };
type Summary = {
  gpu?: string;
  powerLimitW: number | null;
  maxSmClockMHz: number | null;
  samples: number;
  underLoad: number;
  smClockMHzUnderLoad: Quantiles | null;
  powerWUnderLoad: Quantiles | null;
  shareAtLimit: number | null;
};
type GpuPower = {
  gpuIndex(device: string, visible?: string): string;
  parseSamples(text: string): { smClockMHz: number; powerW: number }[];
  summariseSamples(samples: { smClockMHz: number; powerW: number }[], powerLimitW: number | null, maxSmClockMHz: number | null): Summary;
};

const scratch = mkdtempSync(join(tmpdir(), 'moe-ep-gpu-power-test-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

/** Runs `code` (an ES module importing the sampler as `power`) in a fresh node with `path` as PATH; its stdout. */
function runWithPath(code: string, path: string, env: Record<string, string> = {}): string {
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', `import * as power from ${JSON.stringify(moduleUrl)};\n${code}`], {
    encoding: 'utf8',
    env: { ...process.env, PATH: path, ...env },
    timeout: 30_000,
  });
  expect(r.status, r.stderr).toBe(0);
  return r.stdout;
}

describe('gpu-power.mjs: parsing and summary', () => {
  it('parses nvidia-smi lines and skips what does not parse', async () => {
    const power = (await import(moduleUrl)) as GpuPower;
    const text =
      '2026/12/03 17:10:40.123, 1485, 691.2\nno sample here\n2026/12/03 17:10:40.173, [N/A], 12\n2026/12/03 17:10:40.223, 1980, 121.5\n';
    expect(power.parseSamples(text)).toEqual([
      { smClockMHz: 1485, powerW: 691.2 },
      { smClockMHz: 1980, powerW: 121.5 },
    ]);
  });

  it('summarises only the samples under load, with the share at the limit', async () => {
    const power = (await import(moduleUrl)) as GpuPower;
    const samples = [
      { smClockMHz: 1980, powerW: 120 }, // idle: left out
      { smClockMHz: 1500, powerW: 690 },
      { smClockMHz: 1470, powerW: 695 },
      { smClockMHz: 1800, powerW: 500 }, // under load, below the limit's band
    ];
    const s = power.summariseSamples(samples, 700, 1980);
    expect(s.samples).toBe(4);
    expect(s.underLoad).toBe(3);
    expect(s.smClockMHzUnderLoad).toEqual({ median: 1500, min: 1470, max: 1800 });
    expect(s.powerWUnderLoad).toEqual({ median: 690, min: 500, max: 695 });
    expect(s.shareAtLimit).toBeCloseTo(2 / 3, 3);
    // No limit known: nothing counts as under load.
    const unknown = power.summariseSamples(samples, null, null);
    expect(unknown.underLoad).toBe(0);
    expect(unknown.smClockMHzUnderLoad).toBeNull();
  });
});

describe('gpu-power.mjs: which GPU', () => {
  it("maps 'cuda:N' through CUDA_VISIBLE_DEVICES when it lists indices or UUIDs", async () => {
    const power = (await import(moduleUrl)) as GpuPower;
    expect(power.gpuIndex('cuda:0', '')).toBe('0');
    expect(power.gpuIndex('cuda:2', '')).toBe('2');
    expect(power.gpuIndex('cuda:1', '3,1')).toBe('1');
    expect(power.gpuIndex('cuda:0', '3,1')).toBe('3');
    // UUIDs pass through (nvidia-smi -i takes them); anything else, or an ordinal past the list: the ordinal.
    expect(power.gpuIndex('cuda:1', 'GPU-1234,GPU-5678')).toBe('GPU-5678');
    expect(power.gpuIndex('cuda:1', 'all,none')).toBe('1');
    expect(power.gpuIndex('cuda:4', '3,1')).toBe('4');
  });
});

describe('gpu-power.mjs: the sampler in a process', () => {
  const bin = join(scratch, 'bin');
  const pidFile = join(scratch, 'sampler.pid');
  const argsFile = join(scratch, 'sampler.args');
  // The fake answers the probes (power limit and max clock; power.draw.instant) and, when looping
  // (-lms), writes a sample every 20 ms until stopped, after noting its pid and arguments. Its
  // columns are timestamp, clock, power: the test checks that this is the order asked for.
  const writeFake = () => {
    mkdirSync(bin, { recursive: true });
    writeFileSync(
      join(bin, 'nvidia-smi'),
      `#!/bin/sh
case "$*" in
  *-lms*) echo $$ > ${JSON.stringify(pidFile)}; echo "$*" > ${JSON.stringify(argsFile)}
          while true; do echo "2026/12/03 17:10:40.123, 1485, 691.5"; echo "2026/12/03 17:10:40.143, 1980, 100"; sleep 0.02; done ;;
  *power.limit*) echo "700.00, 1980" ;;
  *power.draw.instant*) echo "95.0" ;;
  *) exit 1 ;;
esac
`,
    );
    chmodSync(join(bin, 'nvidia-smi'), 0o755);
    rmSync(pidFile, { force: true });
  };
  /** Whether process `pid` still runs (a zombie counts as gone). */
  const running = (pid: number): boolean => {
    try {
      return !readFileSync(`/proc/${pid}/stat`, 'utf8').includes(') Z ');
    } catch {
      return false; // gone between the check and the read, or never there
    }
  };
  /** Waits up to 5 s for `pid` to stop; whether it did. */
  const stops = (pid: number): boolean => {
    for (let i = 0; i < 50; i++) {
      if (!running(pid)) return true;
      spawnSync('sleep', ['0.1']);
    }
    return false;
  };

  it('samples through a fake nvidia-smi, and the sampler is gone after the process exits', () => {
    writeFake();
    const out = runWithPath(
      `power.startGpuSampler('cuda:0'); power.startGpuSampler('cuda:1');
       await new Promise((r) => setTimeout(r, 600));
       console.log(JSON.stringify(power.gpuPowerSummary()));`,
      `${bin}:${process.env.PATH ?? ''}`,
      { CUDA_VISIBLE_DEVICES: '3,1' },
    );
    const summary = JSON.parse(out.trim()) as Summary & { powerField: string };
    expect(summary.gpu).toBe('3'); // cuda:0 is the first visible GPU; the second start did nothing
    expect(summary.powerField).toBe('power.draw.instant');
    expect(summary.powerLimitW).toBe(700);
    expect(summary.maxSmClockMHz).toBe(1980);
    expect(summary.underLoad).toBeGreaterThan(0);
    expect(summary.samples).toBeGreaterThan(summary.underLoad); // the idle samples are counted, not summarised
    expect(summary.smClockMHzUnderLoad?.median).toBe(1485);
    expect(summary.powerWUnderLoad?.median).toBe(691.5);
    expect(summary.shareAtLimit).toBe(1);
    expect(readFileSync(argsFile, 'utf8').trim()).toBe(
      '-i 3 --query-gpu=timestamp,clocks.sm,power.draw.instant --format=csv,noheader,nounits -lms 50',
    );
    // Stopped with the process: the loop's pid is gone.
    expect(stops(Number(readFileSync(pidFile, 'utf8').trim()))).toBe(true);
  });

  it('the sampler also stops when the process is killed (SIGTERM, SIGKILL)', async () => {
    writeFake();
    for (const signal of ['SIGTERM', 'SIGKILL'] as const) {
      rmSync(pidFile, { force: true });
      const child = spawn(
        process.execPath,
        [
          '--input-type=module',
          '-e',
          `import * as power from ${JSON.stringify(moduleUrl)};\npower.startGpuSampler(); setInterval(() => {}, 1000);`,
        ],
        { env: { ...process.env, PATH: `${bin}:${process.env.PATH ?? ''}` }, stdio: 'ignore' },
      );
      for (let i = 0; i < 100 && !existsSync(pidFile); i++) await new Promise((r) => setTimeout(r, 50));
      expect(existsSync(pidFile), `the sampler started (${signal})`).toBe(true);
      const loop = Number(readFileSync(pidFile, 'utf8').trim());
      expect(running(loop)).toBe(true);
      const exited = new Promise((r) => child.on('exit', r));
      child.kill(signal);
      await exited;
      expect(stops(loop), `the loop stopped after ${signal}`).toBe(true);
    }
  });

  it('with an nvidia-smi that fails (as without one) nothing starts and the summary is null', () => {
    // A failing fake first on PATH stands for a machine without a GPU, even on one that has nvidia-smi.
    const failing = join(scratch, 'failing-bin');
    mkdirSync(failing, { recursive: true });
    writeFileSync(join(failing, 'nvidia-smi'), '#!/bin/sh\nexit 9\n');
    chmodSync(join(failing, 'nvidia-smi'), 0o755);
    const out = runWithPath(
      `power.startGpuSampler(); console.log(JSON.stringify(power.gpuPowerSummary()));`,
      `${failing}:${process.env.PATH ?? ''}`,
    );
    expect(out.trim()).toBe('null');
  });
});
