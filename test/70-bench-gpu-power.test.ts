// The benchmarks' clock and power sampler (benchmarks/gpu-power.mjs): nvidia-smi's lines parsed and
// summarised, and the sampler's life in a process, against a fake nvidia-smi on PATH (this machine
// may have none): it starts at the first call, its samples reach the summary, and it is gone once
// the process exits. Without nvidia-smi nothing starts and the summary is null.
import { spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
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
  it("maps 'cuda:N' through CUDA_VISIBLE_DEVICES when it lists indices", async () => {
    const power = (await import(moduleUrl)) as GpuPower;
    expect(power.gpuIndex('cuda:0', '')).toBe('0');
    expect(power.gpuIndex('cuda:2', '')).toBe('2');
    expect(power.gpuIndex('cuda:1', '3,1')).toBe('1');
    expect(power.gpuIndex('cuda:0', '3,1')).toBe('3');
    // UUIDs, or an ordinal past the list: the ordinal itself.
    expect(power.gpuIndex('cuda:1', 'GPU-1234,GPU-5678')).toBe('1');
    expect(power.gpuIndex('cuda:4', '3,1')).toBe('4');
  });
});

describe('gpu-power.mjs: the sampler in a process', () => {
  it('samples through a fake nvidia-smi, and the sampler is gone after the process exits', () => {
    const bin = join(scratch, 'bin');
    const pidFile = join(scratch, 'sampler.pid');
    const argsFile = join(scratch, 'sampler.args');
    spawnSync('mkdir', ['-p', bin]);
    // The fake answers the probe (power limit, max clock) and, when looping (-lms), writes a sample
    // every 20 ms until killed, after noting its pid and arguments.
    writeFileSync(
      join(bin, 'nvidia-smi'),
      `#!/bin/sh
case "$*" in
  *-lms*) echo $$ > ${JSON.stringify(pidFile)}; echo "$*" > ${JSON.stringify(argsFile)}
          while true; do echo "2026/12/03 17:10:40.123, 1485, 691.5"; echo "2026/12/03 17:10:40.143, 1980, 100"; sleep 0.02; done ;;
  *power.limit*) echo "700.00, 1980" ;;
  *) exit 1 ;;
esac
`,
    );
    chmodSync(join(bin, 'nvidia-smi'), 0o755);
    const out = runWithPath(
      `power.startGpuSampler('cuda:0'); power.startGpuSampler('cuda:1');
       await new Promise((r) => setTimeout(r, 600));
       console.log(JSON.stringify(power.gpuPowerSummary()));`,
      `${bin}:${process.env.PATH ?? ''}`,
      { CUDA_VISIBLE_DEVICES: '3,1' },
    );
    const summary = JSON.parse(out.trim()) as Summary;
    expect(summary.gpu).toBe('3'); // cuda:0 is the first visible GPU; the second start did nothing
    expect(summary.powerLimitW).toBe(700);
    expect(summary.maxSmClockMHz).toBe(1980);
    expect(summary.underLoad).toBeGreaterThan(0);
    expect(summary.samples).toBeGreaterThan(summary.underLoad); // the idle samples are counted, not summarised
    expect(summary.smClockMHzUnderLoad?.median).toBe(1485);
    expect(summary.powerWUnderLoad?.median).toBe(691.5);
    expect(summary.shareAtLimit).toBe(1);
    expect(readFileSync(argsFile, 'utf8')).toContain('-i 3');
    // Started once (a second call does nothing), and stopped with the process: the loop's pid is gone.
    const pid = Number(readFileSync(pidFile, 'utf8').trim());
    let alive = true;
    for (let i = 0; i < 50 && alive; i++) {
      alive = existsSync(`/proc/${pid}`) && !readFileSync(`/proc/${pid}/stat`, 'utf8').includes(') Z ');
      if (alive) spawnSync('sleep', ['0.1']);
    }
    expect(alive).toBe(false);
  });

  it('with an nvidia-smi that fails (as without one) nothing starts and the summary is null', () => {
    // A failing fake first on PATH stands for a machine without a GPU, even on one that has nvidia-smi.
    const failing = join(scratch, 'failing-bin');
    spawnSync('mkdir', ['-p', failing]);
    writeFileSync(join(failing, 'nvidia-smi'), '#!/bin/sh\nexit 9\n');
    chmodSync(join(failing, 'nvidia-smi'), 0o755);
    const out = runWithPath(
      `power.startGpuSampler(); console.log(JSON.stringify(power.gpuPowerSummary()));`,
      `${failing}:${process.env.PATH ?? ''}`,
    );
    expect(out.trim()).toBe('null');
  });
});
