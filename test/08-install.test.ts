// npm's install step (scripts/install.mjs) in a copy of the package: a prebuild that loads is used
// and nothing is compiled; one that does not load is named, with its error, before a source build;
// MOE_EP_BUILD_FROM_SOURCE asks for the source build. The source builds here have no compiler on
// their PATH, so they stop at once: what is checked is what the install says and decides.
import { spawnSync } from 'node:child_process';
import { copyFileSync, cpSync, existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { addonPath, packageRoot } from '../lib/native.js';

const root = packageRoot();
const dirs: string[] = [];

/** A package folder with the install scripts and `addon` as its prebuild; PATH holds node and sh only. */
function install(addon: Buffer | string, env: Record<string, string> = {}): { status: number | null; out: string; dir: string } {
  const dir = mkdtempSync(join(tmpdir(), 'moe-install-'));
  dirs.push(dir);
  mkdirSync(join(dir, 'scripts'));
  for (const f of ['install.mjs', 'build-addon.mjs']) copyFileSync(join(root, 'scripts', f), join(dir, 'scripts', f));
  cpSync(join(root, 'package.json'), join(dir, 'package.json'));
  symlinkSync(join(root, 'node_modules'), join(dir, 'node_modules'));
  const prebuilds = join(dir, 'prebuilds', `${process.platform}-${process.arch}`);
  mkdirSync(prebuilds, { recursive: true });
  if (typeof addon === 'string') copyFileSync(addon, join(prebuilds, 'moe-ep.node'));
  else writeFileSync(join(prebuilds, 'moe-ep.node'), addon);
  const bin = join(dir, 'bin');
  mkdirSync(bin);
  symlinkSync(process.execPath, join(bin, 'node'));
  symlinkSync('/bin/sh', join(bin, 'sh'));
  const r = spawnSync(process.execPath, [join(dir, 'scripts', 'install.mjs')], {
    cwd: dir,
    encoding: 'utf8',
    env: { HOME: process.env['HOME'] ?? '/tmp', PATH: bin, ...env },
  });
  return { status: r.status, out: `${r.stdout}\n${r.stderr}`, dir };
}

afterAll(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

describe('npm install step', () => {
  it('a prebuild that loads is used and nothing is built', () => {
    const r = install(addonPath());
    expect(r.status, r.out).toBe(0);
    expect(r.out).toMatch(
      /moe-ep: using the prebuilt addon prebuilds\/linux-x64\/moe-ep\.node \((CUDA [\w;,-]+|CPU-only)(, MPI backend)?\); nothing to compile/,
    );
    expect(existsSync(join(r.dir, 'build'))).toBe(false);
  });

  it('a prebuild that does not load is named with its error, then a source build is tried', () => {
    const r = install(Buffer.from('not a shared object'));
    expect(r.out).toMatch(
      /moe-ep: the prebuilt addon prebuilds\/linux-x64\/moe-ep\.node does not load here \(Error: .*(file too short|invalid ELF header).*\); compiling from source instead/,
    );
    expect(r.out).toMatch(/moe-ep: building the native addon from source: .*\(from scratch: about \d+ min here\)/);
    // No compiler on this PATH: the build fails, saying what it needs.
    expect(r.status).not.toBe(0);
    expect(r.out).toMatch(/moe-ep: the native build failed \(exit \d+\) after \d+m\d\ds\. It needs g\+\+, cmake \(3\.18\+\) and make/);
  });

  it('MOE_EP_BUILD_FROM_SOURCE=1 builds even when the prebuild loads, and MOE_EP_CUDA=off says CPU-only', () => {
    const r = install(addonPath(), { MOE_EP_BUILD_FROM_SOURCE: '1', MOE_EP_CUDA: 'off' });
    expect(r.out).toContain('moe-ep: building from source as asked (MOE_EP_BUILD_FROM_SOURCE / --build-from-source)');
    expect(r.out).toMatch(/building the native addon from source: CPU-only,/);
    expect(r.status).not.toBe(0);
  });
});
