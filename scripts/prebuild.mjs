#!/usr/bin/env node
// `npm pack` / `npm publish` (prepack) and `npm run prebuilds`: builds the addon with prebuildify into
// prebuilds/<platform>-<arch>/moe-ep.node, with the MPI backend (moe_ep_mpi.so) beside it when MPI is
// found, so that installing the tarball compiles nothing. Then loads it in a child process.
//
// CUDA is asked for explicitly: MOE_EP_CUDA=on|off, or, unset, on when nvcc is found (a packing
// machine needs no GPU). prebuildify's node-gyp step is scripts/build-addon.mjs (Node-API: no Node
// headers to download). Its own CMake folder (MOE_EP_CMAKE_DIR, default build/prebuild) keeps a
// clone's build/cmake as it was; the clone's build/Release addon is put back afterwards.
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, readdirSync, renameSync, rmSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { delimiter, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const require = createRequire(import.meta.url);
const env = { ...process.env };
if (!env.MOE_EP_CUDA || env.MOE_EP_CUDA === 'auto') {
  const nvcc = [...(env.PATH ?? '').split(delimiter), env.CUDA_HOME && join(env.CUDA_HOME, 'bin'), '/usr/local/cuda/bin'].some(
    (d) => d && existsSync(join(d, 'nvcc')),
  );
  env.MOE_EP_CUDA = nvcc ? 'on' : 'off';
  console.log(
    `moe-ep prebuild: MOE_EP_CUDA=${env.MOE_EP_CUDA} (${nvcc ? 'nvcc found' : 'no nvcc: THE PREBUILD IS CPU-ONLY'}; set MOE_EP_CUDA to choose)`,
  );
}
env.MOE_EP_CMAKE_DIR ??= join(root, 'build', 'prebuild');

const platformDir = join(root, 'prebuilds', `${process.platform}-${process.arch}`);
rmSync(join(root, 'prebuilds'), { recursive: true, force: true });
// prebuildify moves build/Release/*.node into prebuilds/: keep the clone's own build aside.
const release = join(root, 'build', 'Release');
const kept = mkdtempSync(join(tmpdir(), 'moe-ep-release-'));
const keepable = existsSync(release) ? readdirSync(release).filter((f) => f === 'moe_ep.node' || f === 'moe_ep_mpi.so') : [];
for (const f of keepable) renameSync(join(release, f), join(kept, f));

const started = Date.now();
let status;
try {
  const prebuildify = require.resolve('prebuildify/bin.js');
  status = spawnSync(process.execPath, [prebuildify, '--napi', '--strip', '--node-gyp', join(root, 'scripts', 'build-addon.mjs')], {
    stdio: 'inherit',
    cwd: root,
    env,
  }).status;
} finally {
  for (const f of ['moe_ep.node', 'moe_ep_mpi.so']) rmSync(join(release, f), { force: true });
  for (const f of keepable) copyFileSync(join(kept, f), join(release, f));
  rmSync(kept, { recursive: true, force: true });
}
if (status !== 0) {
  console.error(`moe-ep prebuild: prebuildify failed (exit ${status})`);
  process.exit(status ?? 1);
}

// The prebuild must load from where it lies, and find its MPI backend there.
const addon = join(platformDir, 'moe-ep.node');
const check = spawnSync(
  process.execPath,
  [
    '-e',
    `const b = require(${JSON.stringify(addon)}); const i = b.buildInfo(); const m = b.mpiStatus(true);
  console.log(JSON.stringify({ cuda: i.cuda, archs: i.cudaArchitectures, mpiBuilt: m.built, mpiLoaded: m.loaded, mpiPath: m.path, mpiError: m.error }));`,
  ],
  { encoding: 'utf8' },
);
if (check.status !== 0) {
  console.error(`moe-ep prebuild: ${addon} does not load:\n${check.stderr}`);
  process.exit(1);
}
const facts = JSON.parse(check.stdout.trim());
if (facts.mpiBuilt && !facts.mpiLoaded) {
  console.error(`moe-ep prebuild: the MPI backend was built but does not load from the prebuild folder: ${facts.mpiError}`);
  process.exit(1);
}
const files = readdirSync(platformDir).map((f) => `${f} (${(statSync(join(platformDir, f)).size / 2 ** 20).toFixed(1)} MiB)`);
console.log(
  `moe-ep prebuild: ${platformDir}: ${files.join(', ')}; ${facts.cuda ? `CUDA ${facts.archs}` : 'CPU-only'}${facts.mpiBuilt ? `, MPI backend loads from ${facts.mpiPath}` : ', no MPI backend'}; ${((Date.now() - started) / 1000).toFixed(0)} s`,
);
