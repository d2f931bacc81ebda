#!/usr/bin/env node
// Builds the native addon with cmake-js from CMakeLists.txt and places it at build/Release/moe_ep.node,
// where node-gyp-build looks. Called by `npm install` (through node-gyp-build -> node-gyp ->
// binding.gyp, which hands over to this script), by `npm run build:native`, and by prebuildify.
//
//   MOE_EP_CUDA=auto|on|off   CUDA kernels when nvcc is found (auto, the default), required, or never.
//   MOE_EP_BUILD_TYPE=Release|Debug|RelWithDebInfo
//   MOE_EP_BUILD_JOBS=N       parallel compile jobs (default: number of cores)
//   MOE_EP_CMAKE_DIR=path     CMake's build folder (default build/cmake)
//   MOE_EP_MPI=auto|on|off    the MPI backend library (moe_ep_mpi.so) when MPI is found (auto), required, or never.
//   MOE_EP_CUDA_ARCHS=list    CMake CUDA architectures (default 80-real;90-real;90-virtual), e.g. 90-real
//                             for a smaller, faster build for H100/H200 only (the sm_90a Hopper GEMM is built either way).
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const outIndex = process.argv.indexOf('--out');
const outDir = outIndex > 0 ? resolve(process.argv[outIndex + 1]) : join(root, 'build', 'Release');
const cmakeDir = resolve(process.env.MOE_EP_CMAKE_DIR ?? join(root, 'build', 'cmake'));
const cuda = (process.env.MOE_EP_CUDA ?? process.env.npm_config_moe_ep_cuda ?? 'auto').toUpperCase();
if (!['AUTO', 'ON', 'OFF'].includes(cuda)) {
  console.error(`moe-ep: MOE_EP_CUDA must be auto, on or off (got '${process.env.MOE_EP_CUDA}')`);
  process.exit(2);
}
const buildType = process.env.MOE_EP_BUILD_TYPE ?? 'Release';
const jobs = process.env.MOE_EP_BUILD_JOBS ?? String(availableParallelism());
const version = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')).version;

// Resolved like any dependency: inside a consumer's project cmake-js is usually hoisted above us.
const cmakeJs = createRequire(import.meta.url).resolve('cmake-js/bin/cmake-js');
const common = ['--directory', root, '--out', cmakeDir, '--config', buildType, '--parallel', jobs];
const mpi = (process.env.MOE_EP_MPI ?? 'auto').toUpperCase();
const defines = [`--CDMOE_EP_MPI=${mpi}`, `--CDMOE_EP_CUDA=${cuda}`, `--CDMOE_EP_PACKAGE_VERSION=${version}`, `--CDCMAKE_BUILD_TYPE=${buildType}`];
if (process.env.MOE_EP_CUDA_ARCHS) defines.push(`--CDCMAKE_CUDA_ARCHITECTURES=${process.env.MOE_EP_CUDA_ARCHS}`);
console.log(`moe-ep: building the addon (MOE_EP_CUDA=${cuda.toLowerCase()}, ${buildType}, ${jobs} jobs)`);
// Configure every time (cheap when nothing changed) so a changed switch takes effect in an existing
// build folder; `cmake-js compile` would skip configuring when a cache exists.
let r = spawnSync(process.execPath, [cmakeJs, 'configure', ...common, ...defines], { stdio: 'inherit', cwd: root });
if (r.status === 0) r = spawnSync(process.execPath, [cmakeJs, 'build', ...common, ...defines], { stdio: 'inherit', cwd: root });
if (r.status !== 0) {
  console.error(`moe-ep: the native build failed (exit ${r.status}). With no CUDA toolkit, MOE_EP_CUDA=off builds the CPU-only addon.`);
  process.exit(r.status ?? 1);
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
console.log(`moe-ep: addon at ${join(outDir, 'moe_ep.node')}`);

function readCache() {
  try {
    return readFileSync(join(cmakeDir, 'CMakeCache.txt'), 'utf8');
  } catch {
    return '';
  }
}
