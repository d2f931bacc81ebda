#!/usr/bin/env node
// `npm run bench`: every benchmarks/*.bench.mjs in turn (or those whose names contain the given
// words), each writing its JSON to benchmarks/results/ (or --out DIR) and printing its table.
//   npm run bench                      all of them (a GPU machine; see benchmarks/README.md)
//   npm run bench -- router permute    just these
//   npm run bench -- --quick           fewer repeats
import { spawnSync } from 'node:child_process';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';

const here = import.meta.dirname;
const args = process.argv.slice(2);
const names = args.filter((a) => !a.startsWith('--') && !/^\d+$/.test(a) && args[args.indexOf(a) - 1] !== '--out');
const pass = args.filter((a) => !names.includes(a));
const scripts = readdirSync(here)
  .filter((f) => f.endsWith('.bench.mjs'))
  .filter((f) => names.length === 0 || names.some((n) => f.includes(n)))
  .sort();
if (scripts.length === 0) {
  console.error(`bench: nothing matches ${names.join(', ')}`);
  process.exit(2);
}
let failed = 0;
for (const s of scripts) {
  console.log(`\n=== ${s}`);
  const r = spawnSync(process.execPath, [join(here, s), ...pass], { stdio: 'inherit' });
  if (r.status !== 0) {
    failed++;
    console.error(`bench: ${s} exited ${r.status}`);
  }
}
process.exit(failed ? 1 : 0);
