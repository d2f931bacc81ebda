// Found by probing the stateful objects (session 31), each fixed and kept here: an `out` over the
// serving layer's own weights; tidy() running an async function and dropping its rejection; a capacity
// factor whose product overflows; Trainer.run checking its options after a step, agreeToStop taking
// any value, no disposed state; a refused resume leaving the model half loaded (and a smaller model
// resuming a larger checkpoint); a dispatch handle accepted by another Dispatcher.
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import {
  capacity,
  Dispatcher,
  disposeSaved,
  expertCapacity,
  MoEInference,
  MoELayer,
  routerForward,
  Tensor,
  tidy,
  Trainer,
} from '../lib/index.js';

const roots: string[] = [];
afterAll(() => {
  for (const d of roots) fs.rmSync(d, { recursive: true, force: true });
});
const cpu = { device: 'cpu' } as const;

describe('MoEInference.forward', () => {
  it("refuses an 'out' over the layer's own weights (the weights stay, later outputs stay right)", () => {
    using inf = MoEInference.fromLayer(new MoELayer({ hidden: 16, ffn: 8, numExperts: 4, topK: 2, dtype: 'f32', ...cpu }));
    using x = Tensor.randn([4, 16], { seed: 5, ...cpu });
    const y0 = Array.from(inf.forward(x).toArray() as Float32Array);
    const w0 = Array.from(inf.weights.w13.toArray() as Float32Array);
    using out = inf.weights.w13.view(-1).narrow(0, 0, 64).view(4, 16);
    expect(() => inf.forward(x, { out })).toThrow(/MoEInference\.forward: 'out' overlaps 'weights\.w13' in memory/);
    expect(Array.from(inf.weights.w13.toArray() as Float32Array)).toEqual(w0);
    expect(Array.from(inf.forward(x).toArray() as Float32Array)).toEqual(y0);
  });
});

describe('tidy', () => {
  it('refuses an async function before running it', () => {
    let ran = false;
    expect(() =>
      tidy(async () => {
        ran = true;
        await Promise.resolve();
      }),
    ).toThrow(/tidy: 'fn' is an async function; tidy scopes are synchronous/);
    expect(ran).toBe(false);
  });
});

describe('capacity factors', () => {
  it('one so large that cf·T·k overflows keeps every assignment (it gave NaN)', () => {
    expect(expertCapacity(6, 2, 4, 1e308)).toBe(12);
    using layer = new MoELayer({ hidden: 16, ffn: 8, numExperts: 4, topK: 2, capacityFactor: 1e308, dtype: 'f32', ...cpu });
    using x = Tensor.randn([6, 16], { seed: 1, ...cpu });
    const fwd = layer.forward(x);
    expect(fwd.y.shape).toEqual([6, 16]);
    disposeSaved(fwd);
  });
});

describe('Trainer', () => {
  const cfg = (layers: number) => ({
    model: { layers, hidden: 16, ffn: 8, experts: 4, topK: 2 },
    data: { tokensPerStep: 32, clusters: 4 },
    train: { steps: 5, device: 'cpu', progress: false },
  });

  it('run() checks its options before the first step; agreeToStop takes a boolean; a disposed trainer says so', () => {
    const t = new Trainer(cfg(1) as never);
    expect(() => t.run({ onStep: 5 as never })).toThrow(/Trainer\.run: 'onStep' must be a function/);
    expect(() => t.run({ control: { stop: 'no' } as never })).toThrow(/Trainer\.run: 'control' must be an object \{ stop: boolean \}/);
    expect(t.step).toBe(0);
    expect(() => t.agreeToStop('false' as never)).toThrow(/Trainer\.agreeToStop: 'localStop' must be a boolean/);
    expect(t.agreeToStop(false)).toBe(false);
    t.dispose();
    t.dispose();
    expect(() => t.trainStep()).toThrow(/Trainer\.trainStep: the trainer was disposed/);
    expect(() => t.saveCheckpoint(join(tmpdir(), 'never'))).toThrow(/Trainer\.saveCheckpoint: the trainer was disposed/);
  });

  it('a resume refused part way (a checkpoint without its config record) leaves the model as it was; a smaller model is refused', () => {
    const dir = fs.mkdtempSync(join(tmpdir(), 'moe-ep-resume-'));
    roots.push(dir);
    {
      using a = new Trainer(cfg(2) as never);
      a.trainStep();
      a.saveCheckpoint(dir);
    }
    // Written by other code: no config for checkSameRun to compare.
    const step = join(
      dir,
      fs.readdirSync(dir).find((n) => n.startsWith('step'))!,
    );
    const manifest = JSON.parse(fs.readFileSync(join(step, 'manifest.json'), 'utf8'));
    delete manifest.config;
    fs.writeFileSync(join(step, 'manifest.json'), JSON.stringify(manifest));
    using b = new Trainer(cfg(3) as never);
    const before = Array.from(b.model.layers[0]!.master.w13.toArray() as Float32Array);
    expect(() => b.resume(dir)).toThrow(/no tensor 'layers\.2\./);
    expect(Array.from(b.model.layers[0]!.master.w13.toArray() as Float32Array)).toEqual(before);
    expect(b.step).toBe(0);
    using c = new Trainer(cfg(1) as never);
    expect(() => c.resume(dir)).toThrow(/it holds '(optim\.)?layers\.1\.[^']+' but this model has 1 layers \(config\.model\.layers\)/);
  });
});

describe('Dispatcher', () => {
  it("refuses a handle made by another Dispatcher's dispatch()", () => {
    const E = 4;
    const r = routerForward(Tensor.randn([6, E], { seed: 1, ...cpu }), { numExperts: E, topK: 2 });
    const cap = capacity(r.indices, r.weights, { numExperts: E });
    using x = Tensor.randn([6, 8], { seed: 2, ...cpu });
    const d1 = new Dispatcher({ numExperts: E });
    const d2 = new Dispatcher({ numExperts: E });
    const a = d1.dispatch(x, r.indices, r.weights, cap);
    expect(() => d2.combine(a.rows, a.handle, r.weights)).toThrow(/combine: 'handle' was not made by this Dispatcher's dispatch\(\)/);
    expect(() => d2.dispatchBackward(a.rows, a.handle)).toThrow(/dispatchBackward: 'handle' was not made by this Dispatcher/);
    expect(d1.combine(a.rows, a.handle, r.weights).shape).toEqual([6, 8]);
  });
});
