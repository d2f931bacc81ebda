// docs/serving.md's decode example runs as written (importing the package by its name) on a
// Mixtral-layout checkpoint built here, on the CPU.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { expect, it } from 'vitest';

import { packageRoot } from '../lib/native.js';
import { buildHfCheckpoint, testConfigs } from './hf-fixtures.mjs';

it("docs/serving.md's Mixtral decode example runs as written", () => {
  const root = packageRoot();
  const doc = fs.readFileSync(join(root, 'docs', 'serving.md'), 'utf8');
  const code = /## A decode step on a Mixtral-layout checkpoint\n\n```js\n([\s\S]*?)```/.exec(doc)?.[1];
  expect(code).toBeDefined();
  const dir = fs.mkdtempSync(join(tmpdir(), 'moe-serve-doc-'));
  try {
    buildHfCheckpoint(dir, testConfigs.mixtral, { dtype: 'bf16', shards: 2, seed: 9 });
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', code as string], {
      cwd: root,
      encoding: 'utf8',
      env: { ...process.env, MODEL_DIR: dir, CUDA_VISIBLE_DEVICES: '' },
    });
    // 8 experts × 3 matrices + the gate; T = 4 tokens, k = 2, H = 16, F = 12, bf16.
    expect(out).toMatch(/^mixtral layer 0: y \[4,16\], 25 tensors read, \d+ workspace bytes for T = 4$/m);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
