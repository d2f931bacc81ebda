#!/usr/bin/env node
// Builds the native addon with cmake-js from CMakeLists.txt and places it at build/Release/moe_ep.node
// (and the MPI backend, moe_ep_mpi.so, next to it). Called by scripts/install.mjs when no prebuilt
// addon fits, by `npm run build:native`, and by prebuildify in
// place of node-gyp (scripts/prebuild.mjs: its `rebuild --target=... --release` arguments are
// ignored, as a Node-API addon needs no per-Node headers).
//
//   MOE_EP_CUDA=auto|on|off   CUDA kernels when a GPU driver answers and nvcc is found (auto, the
//                             default), required, or never.
//   MOE_EP_CUDA_ARCHS=list    CMake CUDA architectures (default 80-real;90-real;90-virtual), e.g. 90-real
//                             for a smaller, faster build for H100/H200 only (the sm_90a Hopper GEMM is built either way).
//   MOE_EP_MPI=auto|on|off    the MPI backend library (moe_ep_mpi.so) when MPI is found (auto), required, or never.
//   MOE_EP_BUILD_TYPE=Release|Debug|RelWithDebInfo
//   MOE_EP_BUILD_JOBS=N       parallel compile jobs (default: number of cores)
//   MOE_EP_CMAKE_DIR=path     CMake's build folder (default build/cmake)
import { spawn, spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, existsSync, mkdirSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { delimiter, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const outIndex = process.argv.indexOf('--out');
const outDir = outIndex > 0 ? resolve(process.argv[outIndex + 1]) : join(root, 'build', 'Release');
const cmakeDir = resolve(process.env.MOE_EP_CMAKE_DIR ?? join(root, 'build', 'cmake'));
const buildType = process.env.MOE_EP_BUILD_TYPE ?? 'Release';
const jobs = process.env.MOE_EP_BUILD_JOBS ?? String(availableParallelism());
const version = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).version;
const mpi = (process.env.MOE_EP_MPI ?? 'auto').toUpperCase();

// Compile time from scratch on this project's 2-core machine, in core-minutes (1m52s and 13m55s with
// 2 jobs: benchmarks/results/install-and-train-2core-ad200dc.txt); an estimate divides them by the jobs.
const CPU_CORE_MINUTES = 4;
const CUDA_CORE_MINUTES = 28;

// npm runs a dependency's install script with its output hidden: what the user must see also goes
// to the terminal itself when there is one.
let tty = null;
if (!process.stdout.isTTY && process.env.npm_lifecycle_event === 'install') {
  try {
    tty = openSync('/dev/tty', 'w');
  } catch {
    tty = null;
  }
}
function say(line) {
  console.log(line);
  if (tty !== null) {
    try {
      writeSync(tty, line + '\n');
    } catch {
      tty = null;
    }
  }
}
function fail(line, code) {
  console.error(line);
  if (tty !== null) writeSync(tty, line + '\n');
  process.exit(code);
}

const requested = (process.env.MOE_EP_CUDA ?? process.env.npm_config_moe_ep_cuda ?? 'auto').toLowerCase();
if (!['auto', 'on', 'off'].includes(requested)) fail(`moe-ep: MOE_EP_CUDA must be auto, on or off (got '${requested}')`, 2);
const cuda = requested === 'auto' ? decideCuda() : requested;

const minutes = Math.max(
  1,
  Math.round((cuda === 'on' ? CUDA_CORE_MINUTES : CPU_CORE_MINUTES) / Math.max(1, Math.min(Number(jobs), availableParallelism()))),
);
const archs = process.env.MOE_EP_CUDA_ARCHS ?? 'default';
say(
  `moe-ep: building the native addon from source: ${cuda === 'on' ? `CPU code and CUDA kernels (architectures ${archs === 'default' ? '80-real;90-real;90-virtual' : archs})` : 'CPU-only'}, ` +
    `${buildType}, ${jobs} jobs (from scratch: about ${minutes} min here)`,
);
if (cuda === 'on') say('moe-ep: to skip the CUDA kernels (a CPU-only addon in a few minutes): MOE_EP_CUDA=off');

// Resolved like any dependency: inside a consumer's project cmake-js is usually hoisted above us.
const cmakeJs = createRequire(import.meta.url).resolve('cmake-js/bin/cmake-js');
const common = ['--directory', root, '--out', cmakeDir, '--config', buildType, '--parallel', jobs];
// Every switch is passed on every configure, so none lingers in CMake's cache from an earlier build.
const defines = [
  `--CDMOE_EP_MPI=${mpi}`,
  `--CDMOE_EP_CUDA=${cuda.toUpperCase()}`,
  `--CDMOE_EP_CUDA_ARCHS=${archs}`,
  `--CDMOE_EP_PACKAGE_VERSION=${version}`,
  `--CDCMAKE_BUILD_TYPE=${buildType}`,
];
const started = Date.now();
const elapsed = () => {
  const s = Math.round((Date.now() - started) / 1000);
  return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
};
// Configure every time (cheap when nothing changed) so a changed switch takes effect in an existing
// build folder; `cmake-js compile` would skip configuring when a cache exists.
let status = await run([cmakeJs, 'configure', ...common, ...defines]);
if (status === 0) status = await run([cmakeJs, 'build', ...common, ...defines]);
if (status !== 0) {
  fail(
    `moe-ep: the native build failed (exit ${status}) after ${elapsed()}. It needs g++, cmake (3.18+) and make` +
      (cuda === 'on' ? '; MOE_EP_CUDA=off builds the CPU-only addon without the CUDA toolkit.' : '.'),
    status || 1,
  );
}
mkdirSync(outDir, { recursive: true });
copyFileSync(join(cmakeDir, buildType, 'moe_ep.node'), join(outDir, 'moe_ep.node'));
// The MPI backend library (built when MPI was found) sits next to the addon, which opens it on
// first use; a stale copy from an earlier build with MPI is removed so `info` tells the truth.
const mpiLib = join(cmakeDir, buildType, 'moe_ep_mpi.so');
const mpiOut = join(outDir, 'moe_ep_mpi.so');
if (existsSync(mpiLib) && /MOE_EP_MPI_BUILT:INTERNAL=ON/.test(readCache())) {
  copyFileSync(mpiLib, mpiOut);
  console.log(`moe-ep: MPI backend at ${mpiOut}`);
} else {
  rmSync(mpiOut, { force: true });
  console.log('moe-ep: built without the MPI backend (no MPI found; install libopenmpi-dev and rebuild for multi-rank CPU runs)');
}
say(`moe-ep: addon built in ${elapsed()}: ${join(outDir, 'moe_ep.node')}`);
if (tty !== null) closeSync(tty);

/**
 * MOE_EP_CUDA=auto: CUDA kernels only when there is a GPU to run them, that is when an NVIDIA
 * driver answers, and nvcc to compile them. nvcc alone (a toolkit in a CPU container) is not enough.
 */
function decideCuda() {
  const nvcc = findNvcc();
  const driver = findDriver();
  if (driver && nvcc) {
    say(`moe-ep: MOE_EP_CUDA=auto: a GPU driver answers (${driver}) and nvcc is at ${nvcc}: building the CUDA kernels`);
    return 'on';
  }
  if (driver)
    say(
      `moe-ep: MOE_EP_CUDA=auto: a GPU driver answers (${driver}) but no nvcc was found (PATH, CUDA_HOME, /usr/local/cuda): CPU-only addon`,
    );
  else if (nvcc)
    say(
      `moe-ep: MOE_EP_CUDA=auto: nvcc is at ${nvcc} but no GPU driver answers: CPU-only addon (MOE_EP_CUDA=on builds the CUDA kernels anyway)`,
    );
  return 'off';
}

function findNvcc() {
  const dirs = [
    ...(process.env.PATH ?? '').split(delimiter),
    process.env.CUDA_HOME && join(process.env.CUDA_HOME, 'bin'),
    process.env.CUDA_PATH && join(process.env.CUDA_PATH, 'bin'),
    '/usr/local/cuda/bin',
  ];
  for (const d of dirs) if (d && existsSync(join(d, 'nvcc'))) return join(d, 'nvcc');
  return null;
}

function findDriver() {
  // The kernel driver's control device (also inside containers given a GPU) or its /proc entry.
  for (const path of ['/dev/nvidiactl', '/proc/driver/nvidia/version']) if (existsSync(path)) return path;
  // Elsewhere (WSL) the driver's own tool lists the GPUs.
  const r = spawnSync('nvidia-smi', ['-L'], { encoding: 'utf8', timeout: 15_000 });
  return r.status === 0 && /^GPU \d+:/m.test(r.stdout ?? '') ? 'nvidia-smi -L' : null;
}

/** Runs cmake-js, passing its output on with the elapsed time on make's progress lines. */
function run(args) {
  return new Promise((done) => {
    const child = spawn(process.execPath, args, { cwd: root, stdio: ['ignore', 'pipe', 'inherit'] });
    let pending = '';
    let lastProgress = Date.now();
    child.stdout.setEncoding('utf8');
    child.stdout.on('data', (chunk) => {
      pending += chunk;
      const lines = pending.split('\n');
      pending = lines.pop() ?? '';
      for (const line of lines) {
        // make prints "[ 45%] Building ...", ninja "[27/62] Building ...".
        const m = /^\[\s*(\d+%|\d+\/\d+)\]\s+(.*)$/.exec(line);
        if (!m) {
          console.log(line);
          continue;
        }
        lastProgress = Date.now();
        // The terminal gets compile steps only: "moe-ep: [27/62] 2m10s native/ops/moe/router/forward_fast.cu".
        const source = /object .*?\/(native\/\S+?)\.o$/.exec(m[2] ?? '')?.[1];
        if (tty !== null && source) writeSync(tty, `moe-ep: [${m[1]}] ${elapsed()} ${source}\n`);
        console.log(`[${m[1]}] ${elapsed()} ${m[2]}`);
      }
    });
    // A CUDA file can take minutes; say that the build is alive.
    const heartbeat = setInterval(() => {
      if (Date.now() - lastProgress >= 60_000) {
        say(`moe-ep: still compiling (${elapsed()} so far)`);
        lastProgress = Date.now();
      }
    }, 5_000);
    child.on('close', (code) => {
      clearInterval(heartbeat);
      if (pending) console.log(pending);
      done(code ?? 1);
    });
  });
}

function readCache() {
  try {
    return readFileSync(join(cmakeDir, 'CMakeCache.txt'), 'utf8');
  } catch {
    return '';
  }
}
