// Shared by the benchmark scripts (benchmarks/<area>.bench.mjs), run on the GPU machine:
//   node benchmarks/<area>.bench.mjs [--out DIR] [--quick]
// - timeRegion(body, opts) / timeCuda(fn): median ms over repeats after warm-up, CUDA events on a GPU;
// - writeInputs(dir, tensors): raw little-endian files plus a manifest, so a Python peer script
//   times PyTorch on exactly the same inputs in the same run;
// - runPeer(script, args): runs python3 benchmarks/peers/<script>, which prints one JSON object;
// - startPeer(script, args): the same script kept alive and driven by JSON lines on stdin/stdout
//   (one request, one answer), so that ours and the peer can alternate in rounds on inputs loaded once;
// - writeResult(area, rows): JSON in --out (default benchmarks/results) with commit, GPU and
//   versions, the SM clock and power the run drew (gpu-power.mjs: nvidia-smi sampled from the first
//   timed region on a GPU), and a table printed last; printTable(title, rows) for further tables.
// --dry-run (each script's tiny CPU shapes) goes through the same calls: events are created, recorded
// and synchronised on the CPU too (wall-clock times), and writeInputs writes in small slices.
import { execFileSync, spawn } from 'node:child_process';
import { Console } from 'node:console';
import { closeSync, mkdirSync, openSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';

import {
  dtypeSize,
  Event,
  getDefaultDevice,
  info,
  init,
  InvalidArgumentError,
  kernelOptions,
  launchEnv,
  synchronize,
  Tensor,
} from '../dist/lib/index.js';
import { allGatherJson } from '../dist/lib/parallel/gather-json.js';
import { gpuPowerSummary, startGpuSampler } from './gpu-power.mjs';
import { mulberry32 } from './mulberry32.mjs';

export const args = process.argv.slice(2);
export const quick = args.includes('--quick');
export const dryRun = args.includes('--dry-run');
const outIndex = args.indexOf('--out');
export const outDir = outIndex >= 0 ? args[outIndex + 1] : join(import.meta.dirname, 'results');

/** The value after `name` on the command line (`--rounds 5`), or `fallback`. */
export function flag(name, fallback) {
  const i = args.indexOf(name);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
}

/** Median of the finite values (an even count, e.g. --rounds 4: the mean of the middle two); NaN for none. */
export function median(a) {
  const s = a.filter(Number.isFinite).sort((p, q) => p - q);
  if (!s.length) return NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** [min, max] of the finite values ([NaN, NaN] for none). */
export function range(a) {
  const s = a.filter(Number.isFinite);
  return s.length ? [Math.min(...s), Math.max(...s)] : [NaN, NaN];
}

/** ‖a − b‖ / ‖b‖ of two equal-length arrays of numbers (host values: toArray() of f32 tensors). */
export function relErrInNorm(a, b) {
  let num2 = 0;
  let den2 = 0;
  for (let i = 0; i < a.length; i++) {
    num2 += (a[i] - b[i]) ** 2;
    den2 += b[i] * b[i];
  }
  return Math.sqrt(num2 / Math.max(den2, 1e-30));
}

/** A finite number rounded to `d` decimals for a result file, else null. */
export const num = (v, d = 3) => (typeof v === 'number' && Number.isFinite(v) ? +v.toFixed(d) : null);
/**
 * Median ms per call of body(ctx, call) over `repeats` timed regions after `warmup`: CUDA events
 * around the region on a GPU, the wall clock on the CPU (dry runs). A region makes `inner`
 * back-to-back calls (default 1) and the time is divided by `inner`: with inner > 1 the host work
 * of one call overlaps the device work of the previous one, so a short kernel is timed without
 * the host's per-call cost in front of it (the device is idle when a region starts). `call`
 * counts every call from 0, warm-up included, for bodies that rotate among several input sets
 * (so that repeated calls do not find their inputs in L2). Per region, untimed: setup() makes ctx,
 * before() (default: wait for the device, so each region starts idle) lines the ranks up, and
 * functions the body returns are called afterwards as its cleanup.
 */
export function timeRegion(body, { device = 'cuda:0', warmup = 5, repeats = quick ? 10 : 50, inner = 1, setup, before } = {}) {
  const onGpu = device !== 'cpu';
  if (onGpu) startGpuSampler(device); // the clock and power each result ran at (gpu-power.mjs)
  const times = [];
  let call = 0;
  for (let i = 0; i < warmup + repeats; i++) {
    const ctx = setup?.();
    if (before) before();
    else if (onGpu) synchronize(device);
    const results = [];
    // The same Event calls on the CPU (they complete at once there), timed by the wall clock.
    const start = new Event(device, { timing: onGpu });
    const end = new Event(device, { timing: onGpu });
    const t0 = performance.now();
    start.record();
    for (let c = 0; c < inner; c++) results.push(body(ctx, call++));
    end.record();
    end.synchronize();
    const ms = onGpu ? start.elapsedTime(end) : performance.now() - t0;
    start.dispose();
    end.dispose();
    for (const result of results) if (typeof result === 'function') result();
    if (i >= warmup) times.push(ms / inner);
  }
  times.sort((a, b) => a - b);
  return times[Math.floor(times.length / 2)];
}

/** Median ms of fn() on cuda:0 (timeRegion with its defaults). */
export function timeCuda(fn, options = {}) {
  return timeRegion(fn, options);
}

/**
 * Writes each tensor's raw bytes to dir/<name>.bin and a manifest (dtype, shape) to dir/inputs.json;
 * returns the bytes written. Device tensors are copied to the host in slices of dim 0 of at most
 * `sliceBytes` (one ArrayBuffer cannot hold a multi-GiB tensor); dry runs use small slices so that
 * the slicing runs there too.
 */
export function writeInputs(dir, tensors, { sliceBytes = dryRun ? 4096 : 512 << 20 } = {}) {
  mkdirSync(dir, { recursive: true });
  const manifest = {};
  let total = 0;
  for (const [name, t] of Object.entries(tensors)) {
    const fd = openSync(join(dir, `${name}.bin`), 'w');
    try {
      const rows = t.ndim === 0 ? 1 : t.shape[0];
      const rowBytes = t.ndim === 0 || rows === 0 ? 1 : (t.numel / rows) * dtypeSize[t.dtype];
      const step = Math.max(1, Math.floor(sliceBytes / rowBytes));
      for (let start = 0; start < rows; start += step) {
        const slice = t.ndim === 0 || (start === 0 && step >= rows) ? t : t.narrow(0, start, Math.min(step, rows - start));
        const raw = slice.toArray();
        writeSync(fd, new Uint8Array(raw.buffer, raw.byteOffset, raw.byteLength));
        total += raw.byteLength;
        if (slice !== t) slice.dispose();
      }
    } finally {
      closeSync(fd);
    }
    manifest[name] = { dtype: t.dtype, shape: t.shape };
  }
  writeFileSync(join(dir, 'inputs.json'), JSON.stringify(manifest));
  return total;
}

/**
 * Runs a peer script (benchmarks/peers/<script>) and returns the JSON object it prints last. Its
 * stderr goes to ours; past `timeoutMs` it is killed and this throws.
 */
export function runPeer(script, peerArgs = [], { timeoutMs = 600_000, env = {} } = {}) {
  const out = execFileSync('python3', [join(import.meta.dirname, 'peers', script), ...peerArgs], {
    encoding: 'utf8',
    env: { ...process.env, PYTHONUNBUFFERED: '1', ...env },
    maxBuffer: 64 << 20,
    stdio: ['ignore', 'pipe', 'inherit'],
    timeout: timeoutMs,
    killSignal: 'SIGKILL',
  });
  const lines = out.trim().split('\n');
  return JSON.parse(lines[lines.length - 1]);
}

/**
 * A peer script kept alive: it answers each JSON line written to its stdin with one JSON line on
 * its stdout (lines that are not JSON objects are skipped; its stderr goes to ours). The first
 * answer is read with ready(); request(obj) writes obj and waits for the next answer. Past a call's
 * timeout, or when the process exits, the call throws and the process is killed (SIGKILL): the
 * caller goes on without it. close() asks it to quit ({"cmd": "quit"}) and kills it if it does not.
 */
export class PeerSession {
  #child;
  #buffer = '';
  #answers = [];
  #waiter = null;
  #exit = null;
  #onExit;
  constructor(script, peerArgs = [], { env = {} } = {}) {
    this.script = script;
    this.#child = spawn('python3', [join(import.meta.dirname, 'peers', script), ...peerArgs], {
      env: { ...process.env, PYTHONUNBUFFERED: '1', ...env },
      stdio: ['pipe', 'pipe', 'inherit'],
    });
    this.#child.stdout.setEncoding('utf8');
    this.#child.stdout.on('data', (chunk) => {
      this.#buffer += chunk;
      let nl;
      while ((nl = this.#buffer.indexOf('\n')) >= 0) {
        const line = this.#buffer.slice(0, nl).trim();
        this.#buffer = this.#buffer.slice(nl + 1);
        if (!line.startsWith('{')) continue;
        try {
          this.#answers.push(JSON.parse(line));
        } catch {
          continue;
        }
        this.#wake();
      }
    });
    this.#child.stdin.on('error', () => {}); // a dead peer's closed pipe: reported through the exit
    this.#child.on('error', (e) => {
      this.#exit ??= `could not run python3: ${e.message}`;
      this.#wake();
    });
    this.#child.on('exit', (code, signal) => {
      this.#exit ??= `${script} exited (${signal ?? `code ${code}`})`;
      this.#wake();
    });
    // Never outlive the benchmark (this process's own child, by its handle).
    this.#onExit = () => this.#child.kill('SIGKILL');
    process.once('exit', this.#onExit);
  }
  #wake() {
    const w = this.#waiter;
    this.#waiter = null;
    w?.();
  }
  get alive() {
    return this.#exit === null;
  }
  /** The next answer (the first one: what the peer says once it has loaded its inputs). */
  async ready(timeoutMs = 600_000) {
    return this.#next(timeoutMs);
  }
  /** Sends one request and waits for its answer. */
  async request(obj, timeoutMs = 600_000) {
    if (this.#exit !== null) throw new Error(`peer ${this.script} is gone: ${this.#exit}`);
    this.#child.stdin.write(JSON.stringify(obj) + '\n');
    return this.#next(timeoutMs);
  }
  async #next(timeoutMs) {
    const deadline = Date.now() + timeoutMs;
    while (this.#answers.length === 0) {
      if (this.#exit !== null) throw new Error(`peer ${this.script} is gone: ${this.#exit}`);
      const left = deadline - Date.now();
      if (left <= 0) {
        this.#child.kill('SIGKILL');
        throw new Error(`peer ${this.script} did not answer within ${timeoutMs} ms (killed)`);
      }
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
    return this.#answers.shift();
  }
  /** Asks the peer to quit; kills it after `timeoutMs`. */
  async close(timeoutMs = 30_000) {
    if (this.#exit === null) {
      try {
        this.#child.stdin.end(JSON.stringify({ cmd: 'quit' }) + '\n');
      } catch {
        // already closed
      }
      const deadline = Date.now() + timeoutMs;
      while (this.#exit === null && Date.now() < deadline) {
        await new Promise((resolve) => {
          const timer = setTimeout(resolve, Math.max(1, deadline - Date.now()));
          this.#waiter = () => {
            clearTimeout(timer);
            resolve();
          };
        });
      }
      if (this.#exit === null) this.#child.kill('SIGKILL');
    }
    process.removeListener('exit', this.#onExit);
  }
}

/** Whether python3 finds torch (the peers need it), without importing it (a quick look-up). */
export function torchAvailable() {
  try {
    execFileSync('python3', ['-c', 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch") is None)'], {
      stdio: 'ignore',
      timeout: 60_000,
    });
    return true;
  } catch {
    return false;
  }
}

function run(file, fileArgs) {
  try {
    return execFileSync(file, fileArgs, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'], timeout: 60_000 }).trim();
  } catch {
    return null;
  }
}

/** Versions of what a figure depends on. The commit: MOE_EP_COMMIT, else git, else 'unknown'. */
export function environment() {
  const i = info();
  const commit = process.env.MOE_EP_COMMIT || run('git', ['-C', import.meta.dirname, 'rev-parse', '--short', 'HEAD']) || 'unknown';
  const torch = run('python3', ['-c', 'import torch; print(torch.__version__)']);
  return {
    commit,
    date: new Date().toISOString(),
    machine: process.env.MOE_EP_MACHINE ?? null,
    gpu: i.cuda.devices.map((d) => d.name).join(', '),
    gpus: i.cuda.devices.length,
    driver: i.cuda.driverVersion,
    cudaRuntime: i.cuda.runtimeVersion,
    addon: `${i.addon.backend}${i.addon.cudaArchitectures.length ? ` (${i.addon.cudaArchitectures.join(' ')})` : ''}`,
    nccl: i.nccl.versionString,
    mpi: i.mpi.available ? i.mpi.library : null,
    node: process.version,
    moeEp: i.version,
    torch,
    // The kernel switches in force when the result is written (the environment's MOE_EP_GG_* and the
    // like set them at load): which kernels the default rows ran.
    kernelOptions: kernelOptions(),
  };
}

/**
 * Writes <area>-<commit>.json and prints the rows as a table. `extra`: more top-level fields of the
 * file (after rows), for data that is not a table row. `print`: 'console' (default: console.table),
 * 'compact' (printTable's narrower text) or 'none'.
 */
export function writeResult(area, rows, notes = {}, extra = {}, { print = 'console' } = {}) {
  mkdirSync(outDir, { recursive: true });
  const env = environment();
  const file = join(outDir, `${area}-${env.commit}.json`);
  const gpuPower = gpuPowerSummary();
  writeFileSync(file, JSON.stringify({ area, ...env, notes, rows, ...extra, gpuPower }, null, 2) + '\n');
  console.log(`\n${area} on ${env.gpu || 'the CPU'} (commit ${env.commit}, torch ${env.torch ?? 'absent'}) -> ${file}`);
  if (gpuPower?.smClockMHzUnderLoad) {
    const { smClockMHzUnderLoad: c, powerWUnderLoad: w } = gpuPower;
    console.log(
      `GPU under load: SM clock ${c.median} MHz (${c.min}-${c.max}; max ${gpuPower.maxSmClockMHz}), power ${w.median} W (limit ${gpuPower.powerLimitW}), ${Math.round(gpuPower.shareAtLimit * 100)}% of the samples at the limit`,
    );
  }
  // No colours: under mpirun stdout is a pty, and the table also goes to logs.
  if (print === 'console') new Console({ stdout: process.stdout, stderr: process.stderr, colorMode: false }).table(rows);
  else if (print === 'compact') printTable(null, rows);
  return file;
}

/**
 * Prints rows as a compact text table (no index column, no quotes, numbers right-aligned, empty
 * cells for null), under a title line when one is given.
 */
export function printTable(title, rows) {
  if (title) console.log(`\n${title}`);
  const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))];
  const cell = (v) => (v === null || v === undefined ? '' : typeof v === 'string' ? v : String(v));
  const width = cols.map((c) => Math.max(c.length, ...rows.map((r) => cell(r[c]).length)));
  const line = (vals, right) =>
    vals
      .map((v, i) => (right[i] ? v.padStart(width[i]) : v.padEnd(width[i])))
      .join('  ')
      .trimEnd();
  const numeric = cols.map((c) => rows.every((r) => r[c] === null || r[c] === undefined || typeof r[c] === 'number'));
  console.log(line(cols, numeric));
  console.log(
    line(
      width.map((w) => '-'.repeat(w)),
      numeric,
    ),
  );
  for (const r of rows)
    console.log(
      line(
        cols.map((c) => cell(r[c])),
        numeric,
      ),
    );
}

/**
 * Uniformly random top-k distinct experts per token (partial Fisher-Yates) and positive gate
 * weights, from a seeded mulberry32 stream: the same routing on every run and every rank.
 */
export function randomRouting(T, k, E, seed) {
  const r = mulberry32(seed);
  const idx = new Int32Array(T * k);
  const w = new Float32Array(T * k);
  const pool = Int32Array.from({ length: E }, (_, i) => i);
  for (let t = 0; t < T; t++) {
    for (let j = 0; j < k; j++) {
      const p = j + Math.floor(r() * (E - j));
      const tmp = pool[j];
      pool[j] = pool[p];
      pool[p] = tmp;
      idx[t * k + j] = pool[j];
      w[t * k + j] = 0.05 + r();
    }
  }
  return { idx, w };
}

/**
 * The ranks of a multi-rank benchmark (under mpirun, or one process): the world communicator, this
 * rank's device, the launcher's environment (le) and a log that only rank 0 prints. Dry runs stay on the CPU with the MPI backend
 * (several ranks) or none. `timeoutMs` bounds every collective.
 */
/**
 * What every rank's part of a stage ended with, agreed by all ranks: `failure` is this rank's
 * error message (null: its part went well); the result lists the failed ranks' messages
 * ("rank r: …"), empty when none failed. Every rank gets the same list, so all go on with the next
 * stage or all drop the failed one together: a rank that skipped a collective its peers make would
 * leave them out of step. A peer may still be inside the failed stage's collective when this rank
 * arrives: the call check refuses the mismatched pair on both (nothing moves, the communicator
 * stays usable), the peer's stage fails there and it comes here too, so a refused agreement is
 * tried again. An aborted communicator (a peer timed out) cannot agree: this rank's own message.
 */
export function agreeFailures(world, failure) {
  const own = failure === null ? [] : [`rank ${world.rank}: ${failure}`];
  if (world.size === 1) return own;
  for (let attempt = 0; attempt < 4; attempt++) {
    if (world.aborted) break;
    try {
      return allGatherJson(world, failure).flatMap((m, r) => (m === null ? [] : [`rank ${r}: ${m}`]));
    } catch (e) {
      if (!(e instanceof InvalidArgumentError)) break;
    }
  }
  return own.length ? own : [`rank ${world.rank}: the ranks could not agree (the communicator was aborted)`];
}

/**
 * A multi-rank bench's failures: each stage a rank fails is logged (`failed`, which returns the
 * message), agreed by every rank (`stageFailed`: true when any rank failed it, every rank's message
 * kept in `errors`), and reported: `gather` collects every rank's numbers (this rank's alone once
 * the communicator is aborted), `notes` says what failed in the result file, and `end` closes the
 * world and makes the exit status say it. The result file is always written by rank 0.
 */
export function benchFailures(world) {
  const errors = {};
  const failed = (name, e) => {
    const message = `${e?.name ?? 'Error'}: ${e?.message ?? String(e)}`;
    console.error(`rank ${world.rank} ${name}: ${message}`);
    return message;
  };
  return {
    errors,
    failed,
    stageFailed(name, failure) {
      const failures = agreeFailures(world, failure);
      if (failures.length) errors[name] = failures.join('; ');
      return failures.length > 0;
    },
    /** Every rank's `values` (f32) back to back in rank order, or this rank's alone. */
    gather(values) {
      const mine = Tensor.fromArray(values, { dtype: 'f32', device: 'cpu' });
      try {
        if (world.size > 1 && !world.aborted) {
          try {
            const all = world.allGather(mine.view(1, -1));
            const out = Array.from(all.toArray());
            all.dispose();
            return out;
          } catch (e) {
            errors.gather = failed('gather', e);
          }
        }
        return Array.from(mine.toArray());
      } finally {
        mine.dispose();
      }
    },
    /** The result file's notes on failures; `reported` ranks' rows are in it. */
    notes(reported) {
      return {
        ...(Object.keys(errors).length ? { errors } : {}),
        ...(reported < world.size
          ? { reportedRanks: `rank 0 only: the communicator was aborted (${Object.values(errors).join('; ')})` }
          : {}),
      };
    },
    /**
     * After an abort rank 0 writes the file with its own figures; a rank that left first with a
     * failure would make mpirun end the job before it does, so the others give it time (mpirun ends
     * them when rank 0 exits). Then the world is closed, and the exit status says whether anything
     * failed (the file is written all the same; device-session marks the task).
     */
    async end() {
      if (world.aborted && world.rank !== 0) await new Promise((resolve) => setTimeout(resolve, 90_000));
      world.dispose();
      if (Object.keys(errors).length) process.exitCode = 1;
    },
  };
}

export async function benchWorld({ timeoutMs } = {}) {
  // --timeout-ms N overrides the benchmark's choice (0: no timeout, so NCCL collectives are only
  // queued, with no host wait after each: what that wait costs).
  const flag = args.indexOf('--timeout-ms');
  if (flag >= 0) timeoutMs = Number(args[flag + 1]);
  const le = launchEnv();
  const world = await init({
    ...(dryRun ? { setDevice: false, backend: le.size > 1 ? 'mpi' : 'single' } : {}),
    ...(timeoutMs !== undefined ? { timeoutMs } : {}),
  });
  const dev = dryRun ? 'cpu' : getDefaultDevice().toString();
  const log = (...m) => {
    if (world.rank === 0) console.error(...m);
  };
  return { world, le, P: world.size, rank: world.rank, dev, onGpu: dev !== 'cpu', log };
}
