// The README is a quickstart: its first screen holds install, train and test; its code example runs
// as written; its and docs/'s links lead somewhere; the result files that docs/ cite exist; it points
// at nothing that is not in the package.
import { execFileSync } from 'node:child_process';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { packageRoot } from '../lib/native.js';

const root = packageRoot();
const readme = readFileSync(join(root, 'README.md'), 'utf8');
const docs = readdirSync(join(root, 'docs')).filter((f) => f.endsWith('.md'));

describe('README and docs', () => {
  it('the first 60 lines hold install, train and test', () => {
    const first = readme.split('\n').slice(0, 60).join('\n');
    expect(first).toContain('npm install moe-ep');
    expect(first).toMatch(/^npx moe-ep train /m);
    expect(first).toMatch(/^npm test /m);
    expect(first).toContain('](docs/report.png)');
  });

  it('the code example runs as written (importing the package by its name)', () => {
    const code = /## Use it from code\n\n```js\n([\s\S]*?)```/.exec(readme)?.[1];
    expect(code).toBeDefined();
    // From the package root, 'moe-ep' resolves to this package (a self-reference through "exports").
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', code as string], {
      cwd: root,
      encoding: 'utf8',
      env: { ...process.env, CUDA_VISIBLE_DEVICES: '' },
    });
    const m = /^loss ([\d.]+), tokens per expert ((?:\d+ ?){8})$/m.exec(out);
    expect(m, out).not.toBeNull();
    // 256 tokens, top-2, dropless: every assignment lands on an expert.
    expect(
      m![2]!
        .trim()
        .split(' ')
        .map(Number)
        .reduce((a, b) => a + b, 0),
    ).toBe(512);
  });

  it('relative links in README.md and docs/ lead to files that exist', () => {
    for (const [file, text] of [
      ['README.md', readme],
      ...docs.map((d) => [join('docs', d), readFileSync(join(root, 'docs', d), 'utf8')]),
    ] as [string, string][]) {
      for (const [, target] of text.matchAll(/\]\(([^)#\s]+)(?:#[^)]*)?\)/g)) {
        if (/^[a-z]+:/.test(target as string)) continue;
        expect(existsSync(join(root, dirname(file), target as string)), `${file} links to ${target}`).toBe(true);
      }
    }
  });

  it('every result file docs/ names is committed in benchmarks/results/', () => {
    const results = new Set(readdirSync(join(root, 'benchmarks', 'results')));
    let named = 0;
    for (const d of docs) {
      for (const [name] of readFileSync(join(root, 'docs', d), 'utf8').matchAll(/[\w.-]+-[0-9a-f]{7}\.(?:json|txt)/g)) {
        named++;
        expect(results.has(name), `docs/${d} names ${name}`).toBe(true);
      }
    }
    expect(named).toBeGreaterThan(5);
  });

  it('the README points at no script, test or benchmark path (they are not in the package)', () => {
    const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { files: string[] };
    expect(pkg.files).toContain('docs');
    for (const [path] of readme.matchAll(/\b(?:scripts|test|benchmarks|examples)\/[\w./-]+/g)) throw new Error(`README.md names ${path}`);
  });
});
