#!/usr/bin/env node
// The repository's layout, in one place:
//   node scripts/format.mjs           (npm run format)  prettier --write, then clang-format -i over native/
//   node scripts/format.mjs --check   (in npm run lint) writes nothing; exits 1 naming each file that differs
// Prettier takes the TypeScript and JavaScript (.prettierrc.json; .prettierignore says what it leaves
// alone), clang-format the C++ and CUDA under native/ (.clang-format). Paths listed in .prettierignore's
// block "BEGIN not yet formatted" are left to both; they are formatted in one commit once the moves of
// lib/ and native/ have landed (delete the block, run npm run format, commit).
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const check = process.argv.includes('--check');
const CLANG_FORMAT_MAJOR = 14; // the version .clang-format is written for (Debian 12's)

/** Paths in .prettierignore's "not yet formatted" block: 'dir/' for a folder, else a file. */
function pending() {
  const lines = readFileSync(join(root, '.prettierignore'), 'utf8').split('\n');
  const begin = lines.findIndex((l) => l.startsWith('# BEGIN not yet formatted'));
  if (begin < 0) return [];
  const end = lines.findIndex((l, i) => i > begin && l.startsWith('# END not yet formatted'));
  return lines
    .slice(begin + 1, end < 0 ? undefined : end)
    .filter((l) => l.trim() !== '' && !l.startsWith('#'))
    .map((l) => l.trim().replace(/^\//, ''));
}

function nativeSources(skip) {
  const out = [];
  const walk = (dir) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      const rel = relative(root, p);
      if (skip.some((s) => (s.endsWith('/') ? `${rel}/`.startsWith(s) : rel === s))) continue;
      if (e.isDirectory()) walk(p);
      else if (/\.(cc|cpp|h|hpp|cu|cuh)$/.test(e.name)) out.push(rel);
    }
  };
  walk(join(root, 'native'));
  return out.sort();
}

let failed = false;

const prettier = spawnSync(
  process.execPath,
  [join(root, 'node_modules/prettier/bin/prettier.cjs'), check ? '--check' : '--write', '--log-level', check ? 'log' : 'warn', '.'],
  {
    cwd: root,
    stdio: 'inherit',
  },
);
if (prettier.status !== 0) failed = true;

const version = spawnSync('clang-format', ['--version'], { encoding: 'utf8' });
if (version.error) {
  console.error(
    'format: clang-format not found (Debian/Ubuntu: apt-get install clang-format); native/ was not ' + (check ? 'checked' : 'formatted'),
  );
  process.exit(1);
}
const major = Number(/version (\d+)/.exec(version.stdout)?.[1]);
if (major !== CLANG_FORMAT_MAJOR)
  console.warn(`format: ${version.stdout.trim()}; .clang-format is written for ${CLANG_FORMAT_MAJOR}, so a few lines may differ`);
const files = nativeSources(pending());
if (files.length > 0) {
  // --dry-run --Werror: a warning (and exit 1) for each place whose layout differs.
  const args = check ? ['--dry-run', '--Werror', ...files] : ['-i', ...files];
  const r = spawnSync('clang-format', args, { cwd: root, encoding: 'utf8' });
  if (r.status !== 0) {
    failed = true;
    const differ = [...new Set([...r.stderr.matchAll(/^(\S+?):\d+:\d+: (?:error|warning)/gm)].map((m) => m[1]))];
    if (differ.length > 0)
      console.error(`clang-format: ${differ.length} file(s) differ; npm run format lays them out:\n  ${differ.join('\n  ')}`);
    else console.error(r.stderr);
  }
}
console.log(
  `format: clang-format ${check ? 'checked' : 'formatted'} ${files.length} file(s) under native/${files.length === 0 ? ' (all of native/ is in .prettierignore\'s "not yet formatted" block)' : ''}`,
);
process.exit(failed ? 1 : 0);
