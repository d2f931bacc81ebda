// Training with routing 'expert-choice' on the CPU: the default task is learned with every expert
// at exactly C tokens, the experts-per-token metric adds up, the CLI writes it to metrics.jsonl and
// plots it, checkpoints resume exactly and refuse a model with the other routing, and the config
// rules name the field.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { CheckpointError, loadCheckpoint, loadMoELayer } from '../lib/index.js';
import { packageRoot } from '../lib/native.js';
import { resolveConfig } from '../lib/train/config.js';
import { Trainer } from '../lib/train/trainer.js';

const small = { hidden: 16, ffn: 8, experts: 4, topK: 2, sharedFfn: 4 };

describe('training with expert-choice routing (CPU)', () => {
  it('learns the default task; every expert takes exactly C tokens; experts per token add up', () => {
    const cfg = resolveConfig({ model: { routing: 'expert-choice' }, train: { device: 'cpu', steps: 300, progress: false } });
    using t = new Trainer(cfg);
    const steps = t.run();
    const T = cfg.data.tokensPerStep,
      E = cfg.model.experts;
    const C = Math.ceil((T * cfg.model.topK) / E); // capacityFactor null: topK, the compute of top-k token choice
    for (const s of steps) {
      for (const l of s.layers) {
        expect(l.tokensPerExpert).toEqual(new Array(E).fill(C));
        expect(l.maxVio).toBe(0);
        expect(l.dropped).toBe(0);
        const h = l.expertsPerToken as number[];
        expect(h.reduce((a, b) => a + b, 0)).toBe(T);
        expect(h.reduce((a, b, n) => a + n * b, 0)).toBe(E * C);
      }
    }
    const first = steps[0]?.loss as number;
    const last = steps.slice(-20).reduce((a, s) => a + s.loss, 0) / 20;
    expect(first).toBeGreaterThan(1.5);
    expect(last).toBeLessThan(0.25 * first);
    // the balancing bias is never moved (there is nothing to balance)
    for (const layer of t.model.layers) expect(Array.from(layer.bias.toFloat32Array())).toEqual(new Array(E).fill(0));
  });

  it('moe-ep train --model.routing expert-choice: metrics.jsonl has experts per token, the report plots it', () => {
    const out = mkdtempSync(join(tmpdir(), 'moe-train-ec-'));
    try {
      const cli = join(packageRoot(), 'dist', 'lib', 'cli', 'main.js');
      const r = spawnSync(
        process.execPath,
        [cli, 'train', '--steps', '20', '--out', out, '--model.routing', 'expert-choice', '--model.capacityFactor', '1.5', '--no-progress'],
        { encoding: 'utf8' },
      );
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toMatch(/8 experts \(expert choice, 1\.5 experts per token on average, sigmoid\)/);
      const last = JSON.parse(readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n')[19] as string);
      expect(last.layers[0].tokensPerExpert).toEqual(new Array(8).fill(48)); // ceil(256·1.5/8)
      expect(last.layers[0].expertsPerToken.reduce((a: number, b: number) => a + b, 0)).toBe(256);
      const html = readFileSync(join(out, 'report.html'), 'utf8');
      expect(html).toContain('Experts per token (fraction of tokens), layer 1');
      const manifest = JSON.parse(readFileSync(join(out, 'checkpoints', 'step-00000020', 'manifest.json'), 'utf8'));
      expect(manifest.config.model.routing).toBe('expert-choice');
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });
});

describe('checkpoints with expert-choice routing', () => {
  it('resume follows the uninterrupted run exactly; a model with the other routing is refused, both ways', () => {
    const dir = mkdtempSync(join(tmpdir(), 'moe-resume-ec-'));
    const tcDir = mkdtempSync(join(tmpdir(), 'moe-resume-tc-'));
    try {
      const cfg = resolveConfig({
        model: { ...small, routing: 'expert-choice' },
        data: { tokensPerStep: 64 },
        train: { device: 'cpu', steps: 24, progress: false },
      });
      let straight: number[];
      {
        using a = new Trainer(cfg);
        straight = a.run().map((s) => s.loss);
      }
      {
        using b = new Trainer(cfg);
        for (let i = 0; i < 10; i++) b.trainStep();
        b.saveCheckpoint(dir, 2);
      }
      {
        using c = new Trainer(cfg);
        expect(c.resume(dir)).toBe(10);
        expect(c.run().map((s) => s.loss)).toEqual(straight.slice(10));
      }
      const tcCfg = resolveConfig({ ...cfg, model: { ...cfg.model, routing: 'token-choice' } });
      {
        using d = new Trainer(tcCfg);
        expect(() => d.resume(dir)).toThrow(CheckpointError);
        // The trainer compares the recorded config first; loadMoELayer, for code that loads layers
        // itself, refuses on its own.
        expect(() => d.resume(dir)).toThrow(/saved by a run with model\.routing "expert-choice" \(this run: "token-choice"\)/);
        const reader = loadCheckpoint(dir);
        try {
          expect(() => loadMoELayer(reader, d.model.layers[0]!, 0)).toThrow(
            /layer 0 was trained with routing 'expert-choice' \(manifest config\.model\.routing\) but this layer routes 'token-choice'/,
          );
        } finally {
          reader.close();
        }
        d.trainStep();
        d.saveCheckpoint(tcDir);
      }
      using e = new Trainer(cfg);
      expect(() => e.resume(tcDir)).toThrow(/saved by a run with model\.routing "token-choice" \(this run: "expert-choice"\)/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
      rmSync(tcDir, { recursive: true, force: true });
    }
  });
});

describe('config rules for expert-choice routing', () => {
  it('name the field', () => {
    expect(() => resolveConfig({ model: { routing: 'expert-choice', groups: 2, topkGroups: 1 } })).toThrow(
      /config\.model\.groups: must be 1 with routing 'expert-choice'/,
    );
    expect(() => resolveConfig({ model: { routing: 'expert-choice' }, balance: { auxLossCoef: 0.01 } })).toThrow(
      /config\.balance\.auxLossCoef and seqAuxLossCoef: must be 0 with routing 'expert-choice'/,
    );
    expect(() => resolveConfig({ model: { routing: 'experts' } } as unknown as Parameters<typeof resolveConfig>[0])).toThrow(
      /config\.model\.routing: must be one of "token-choice", "expert-choice"/,
    );
    expect(resolveConfig({}).model.routing).toBe('token-choice');
  });
});
