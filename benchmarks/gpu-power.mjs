// The GPU's SM clock and power draw through a benchmark run. Held for seconds, every GEMM of the
// layer measured that way reaches the GPU's power limit (700 W on an H200) and its SM clock settles
// well below the boost clock (benchmarks/kernels-notes.md, "The power limit sets the pace"), so a
// figure means little without the clock it ran at. The harness starts the sampler at the first timed
// region on a GPU: nvidia-smi writes a sample every 50 ms to a temporary file (with its own
// timestamps, so that a host blocked in a CUDA synchronize loses none). writeResult adds the summary
// of the samples drawn under load to the result file.
// Without nvidia-smi (the CPU, dry runs) nothing starts and the summary is null. The sampler lives
// only as long as this process: a shell holds the read end of a pipe from it and stops nvidia-smi
// when the pipe closes, which happens however the process ends (exit, a signal, SIGKILL); `timeout`
// bounds it in any case.
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const SAMPLE_MS = 50;
const MAX_SECONDS = 3600; // the sampler's bound when nothing stops it
// A sample is "under load" when the GPU draws at least this share of its power limit, and "at the
// limit" within LIMIT_BAND of it.
const LOAD_SHARE = 0.5;
const LIMIT_BAND = 0.03;

let sampler; // undefined: not tried; null: no nvidia-smi; else { file, gpu, powerField, powerLimitW, maxSmClockMHz }

/**
 * The nvidia-smi id of `device` ('cuda:N'): entry N of CUDA_VISIBLE_DEVICES when that lists GPU
 * indices or UUIDs (nvidia-smi -i takes both), else N. (nvidia-smi counts in PCI bus order, CUDA
 * fastest first: the same on a machine of one GPU model.)
 */
export function gpuIndex(device, visible = process.env.CUDA_VISIBLE_DEVICES) {
  const ordinal = Number(/^cuda:(\d+)$/.exec(device)?.[1] ?? 0);
  const listed = (visible ?? '').split(',').map((v) => v.trim());
  const usable = visible && listed.every((v) => /^\d+$/.test(v) || /^(GPU|MIG)-[\w-]+$/.test(v));
  return usable && ordinal < listed.length ? listed[ordinal] : String(ordinal);
}

/** Runs nvidia-smi once on GPU `gpu` for `fields`; its first line, or null when it fails. */
function querySmi(gpu, fields) {
  const r = spawnSync('nvidia-smi', ['-i', gpu, `--query-gpu=${fields}`, '--format=csv,noheader,nounits'], {
    encoding: 'utf8',
    timeout: 15_000,
  });
  return r.status === 0 && r.stdout ? r.stdout.split('\n')[0] : null;
}

// The sampler's shell: nvidia-smi in the background, then a wait on the pipe from this process; at
// EOF (this process gone) it stops nvidia-smi. The shell then ignores INT, TERM and HUP (cat inherits
// that; nvidia-smi, started before, does not), so that a signal to the whole process group does not
// take it down before it has stopped nvidia-smi.
const SAMPLER_SCRIPT = `timeout "$4" nvidia-smi -i "$1" --query-gpu=timestamp,clocks.sm,"$2" --format=csv,noheader,nounits -lms "$3" &
p=$!
trap '' INT TERM HUP
cat > /dev/null
kill $p 2> /dev/null`;

/** Starts sampling the GPU behind `device` ('cuda:N'), once per process; a no-op without nvidia-smi. */
export function startGpuSampler(device = 'cuda:0') {
  if (sampler !== undefined) return;
  sampler = null;
  const gpu = gpuIndex(device);
  const limits = querySmi(gpu, 'power.limit,clocks.max.sm');
  if (limits === null) return;
  const [powerLimitW, maxSmClockMHz] = limits.split(',').map((v) => Number(v));
  // power.draw is a 1 s average on recent drivers; power.draw.instant, where there is one, is not.
  const powerField = querySmi(gpu, 'power.draw.instant') !== null ? 'power.draw.instant' : 'power.draw';
  const dir = mkdtempSync(join(tmpdir(), 'moe-ep-gpu-power-'));
  const file = join(dir, 'samples.csv');
  const fd = openSync(file, 'w');
  const child = spawn('sh', ['-c', SAMPLER_SCRIPT, 'sh', gpu, powerField, String(SAMPLE_MS), String(MAX_SECONDS)], {
    stdio: ['pipe', fd, 'ignore'],
  });
  closeSync(fd);
  child.on('error', () => {}); // no sh: no samples, the summary says so
  child.stdin.on('error', () => {});
  child.unref();
  child.stdin.unref(); // the pipe must not keep this process alive; its end closing is the signal
  process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
  sampler = {
    file,
    gpu,
    powerField,
    powerLimitW: Number.isFinite(powerLimitW) ? powerLimitW : null,
    maxSmClockMHz: Number.isFinite(maxSmClockMHz) ? maxSmClockMHz : null,
  };
}

/** Parses nvidia-smi's lines (timestamp, SM clock MHz, power W); lines that do not parse are skipped. */
export function parseSamples(text) {
  const samples = [];
  for (const line of text.split('\n')) {
    const [, clock, power] = line.split(',').map((v) => v.trim());
    const smClockMHz = Number(clock);
    const powerW = Number(power);
    if (clock && power && Number.isFinite(smClockMHz) && Number.isFinite(powerW)) samples.push({ smClockMHz, powerW });
  }
  return samples;
}

function quantiles(values) {
  const v = [...values].sort((a, b) => a - b);
  return { median: v[Math.floor(v.length / 2)], min: v[0], max: v[v.length - 1] };
}

/**
 * The samples so far summarised: those under load (at least LOAD_SHARE of the power limit) give the
 * SM clock and the power the timed work ran at (ours and any peer's alike: one GPU, one run). Null
 * when no sampler runs.
 */
export function summariseSamples(samples, powerLimitW, maxSmClockMHz) {
  const loaded = powerLimitW ? samples.filter((s) => s.powerW >= LOAD_SHARE * powerLimitW) : [];
  return {
    what: `nvidia-smi every ${SAMPLE_MS} ms through the run so far; under load: drawing at least ${LOAD_SHARE * 100}% of the power limit (ours and the peer's work alike); at the limit: within ${LIMIT_BAND * 100}% of it`,
    powerLimitW,
    maxSmClockMHz,
    samples: samples.length,
    underLoad: loaded.length,
    smClockMHzUnderLoad: loaded.length ? quantiles(loaded.map((s) => s.smClockMHz)) : null,
    powerWUnderLoad: loaded.length ? quantiles(loaded.map((s) => s.powerW)) : null,
    shareAtLimit: loaded.length
      ? +(loaded.filter((s) => s.powerW >= (1 - LIMIT_BAND) * powerLimitW).length / loaded.length).toFixed(3)
      : null,
  };
}

/** The summary of this process's samples so far (summariseSamples), or null without a sampler. */
export function gpuPowerSummary() {
  if (!sampler) return null;
  let text = '';
  try {
    text = readFileSync(sampler.file, 'utf8');
  } catch {
    // the file went with the process's exit: nothing sampled
  }
  return {
    gpu: sampler.gpu,
    powerField: sampler.powerField,
    ...summariseSamples(parseSamples(text), sampler.powerLimitW, sampler.maxSmClockMHz),
  };
}
