#!/usr/bin/env node
// npm's install step for moe-ep. Uses the prebuilt addon in prebuilds/<platform>-<arch>/ when one
// loads here (nothing is compiled); otherwise, or when asked, compiles from source with
// scripts/build-addon.mjs, saying why first. A prebuild that does not load (an older glibc, say) is
// named with its error before the source build replaces it.
//
//   MOE_EP_BUILD_FROM_SOURCE=1 (or npm install --build-from-source)   compile even when a prebuild fits
import { spawnSync } from 'node:child_process';
import { existsSync, openSync, writeSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const local = join(root, 'build', 'Release', 'moe_ep.node');
const prebuild = join(root, 'prebuilds', `${process.platform}-${process.arch}`, 'moe-ep.node');

// npm hides an installing package's output; the reason for a long compile goes to the terminal too.
function say(line) {
  console.log(line);
  if (process.stdout.isTTY || process.env.npm_lifecycle_event !== 'install') return;
  try {
    writeSync(openSync('/dev/tty', 'w'), line + '\n');
  } catch {
    // no terminal (CI): npm's log has it
  }
}

/** Loads an addon in a child process (a broken binary cannot take this one down): its build facts, or the error. */
function tryLoad(path) {
  const script = `const b = require(${JSON.stringify(path)}); const i = b.buildInfo(); const m = b.mpiStatus(false);
    console.log(JSON.stringify({ cuda: i.cuda ? i.cudaArchitectures : '', mpi: m.built }));`;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 60_000 });
  if (r.status === 0) {
    try {
      return { ok: true, info: JSON.parse(r.stdout.trim().split('\n').pop()) };
    } catch {
      // fall through: unexpected output
    }
  }
  if (r.signal) return { ok: false, error: `loading it killed a test process with ${r.signal}` };
  const error = (r.stderr ?? '').split('\n').find((l) => /Error|error:/.test(l)) ?? r.error?.message ?? `exit ${r.status}`;
  return { ok: false, error: error.trim() };
}

function build(reason) {
  say(`moe-ep: ${reason}`);
  const r = spawnSync(process.execPath, [join(root, 'scripts', 'build-addon.mjs')], { stdio: 'inherit', cwd: root });
  process.exit(r.status ?? 1);
}

const fromSource = process.env.MOE_EP_BUILD_FROM_SOURCE === '1' || process.env.npm_config_build_from_source === 'true';
if (fromSource) build('building from source as asked (MOE_EP_BUILD_FROM_SOURCE / --build-from-source)');

// A clone (or a rebuilt install) that already has a working local build keeps it.
if (existsSync(local) && tryLoad(local).ok) {
  console.log(`moe-ep: using the local build ${relative(root, local)}`);
  process.exit(0);
}
if (existsSync(prebuild)) {
  const r = tryLoad(prebuild);
  if (r.ok) {
    console.log(
      `moe-ep: using the prebuilt addon ${relative(root, prebuild)} (${r.info.cuda ? `CUDA ${r.info.cuda}` : 'CPU-only'}${r.info.mpi ? ', MPI backend' : ''}); nothing to compile`,
    );
    process.exit(0);
  }
  build(`the prebuilt addon ${relative(root, prebuild)} does not load here (${r.error}); compiling from source instead`);
}
build(`no prebuilt addon for ${process.platform}-${process.arch} in this copy of moe-ep; compiling from source`);
