// The docs' complete programs compile against the package's own declarations, as a user's strict
// TypeScript project would build them. A code block is a complete program when it imports from
// 'moe-ep' (the others are fragments or signature lists); TypeScript blocks are checked as ES
// modules (.mts), JavaScript ones with checkJs (.mjs). Running them is test 07-readme's (the
// README's quickstart) and the examples' own tests' business; this catches a renamed option, a
// changed signature or a name the example never defines.
import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { packageRoot } from '../lib/native.js';

const root = packageRoot();
const scratch = mkdtempSync(join(tmpdir(), 'moe-ep-docs-examples-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

interface Example {
  name: string;
  file: string;
}

/** Every fenced ts/js block of README.md and docs/*.md that imports from 'moe-ep'. */
function examples(): Example[] {
  const sources = [
    'README.md',
    ...readdirSync(join(root, 'docs'))
      .filter((f) => f.endsWith('.md'))
      .map((f) => join('docs', f)),
  ];
  const found: Example[] = [];
  for (const source of sources) {
    const text = readFileSync(join(root, source), 'utf8');
    let n = 0;
    for (const [, lang, code] of text.matchAll(/```(ts|js)\n([\s\S]*?)```/g)) {
      if (!/from 'moe-ep'/.test(code as string)) continue;
      n++;
      const file = `${source.replace(/[/.]/g, '_')}_${n}.${lang === 'ts' ? 'mts' : 'mjs'}`;
      writeFileSync(join(scratch, file), `${lang === 'js' ? '// @ts-check\n' : ''}${code as string}\nexport {};\n`);
      found.push({ name: `${source} example ${n}`, file });
    }
  }
  return found;
}

describe('the docs’ complete programs', () => {
  it('compile with strict TypeScript against the package (module nodenext)', () => {
    const all = examples();
    expect(all.length).toBeGreaterThanOrEqual(8);
    // 'moe-ep' resolves as in a user's project: node_modules/moe-ep, its package.json "exports".
    mkdirSync(join(scratch, 'node_modules'));
    symlinkSync(root, join(scratch, 'node_modules', 'moe-ep'), 'dir');
    writeFileSync(join(scratch, 'package.json'), JSON.stringify({ type: 'module' }));
    writeFileSync(
      join(scratch, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: {
          target: 'ES2022',
          lib: ['ES2023', 'ESNext.Disposable'],
          module: 'nodenext',
          strict: true,
          noEmit: true,
          allowJs: true,
          checkJs: true,
          skipLibCheck: true,
          types: ['node'],
          typeRoots: [join(root, 'node_modules', '@types')],
        },
        files: all.map((e) => e.file),
      }),
    );
    const tsc = join(root, 'node_modules', 'typescript-7', 'bin', 'tsc');
    let out = '';
    try {
      execFileSync(process.execPath, [tsc, '-p', join(scratch, 'tsconfig.json')], { cwd: scratch, encoding: 'utf8' });
    } catch (e) {
      out = String((e as { stdout?: string }).stdout ?? e);
    }
    // Name the doc of each error, not the scratch file.
    const named = all.reduce((text, e) => text.replaceAll(e.file, e.name), out);
    expect(named, named).toBe('');
  }, 120_000);
});
