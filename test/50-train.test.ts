// The training runtime on the CPU: the default task is learned, bias balancing evens the loads at a
// bounded cost, experts beat one expert at equal per-token FLOPs, memory stays flat, and the CLI
// writes metrics and a report.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

import { describe, expect, it } from 'vitest';

import {
  CheckpointError,
  cuda,
  defaultConfig,
  Device,
  loadCheckpoint,
  loadMoELayer,
  memoryStats,
  MoELayer,
  singleRankGroup,
  Tensor,
} from '../lib/index.js';
import { packageRoot } from '../lib/native.js';
import { overridesFromArgs, resolveConfig } from '../lib/train/config.js';
import { MoEModel, releaseForward } from '../lib/train/model.js';
import { createOptimState, disposeOptimState, optimizerStep } from '../lib/train/optimizer.js';
import { Trainer } from '../lib/train/trainer.js';

type Partial2 = Parameters<typeof resolveConfig>[0];

/** The charts a report.html draws (the JSON it embeds). */
function reportCharts(html: string): { id: string; option: { series: { data: number[][] }[] } }[] {
  const m = /const charts = (.*);\n/.exec(html);
  if (!m) throw new Error('no charts in the report');
  return JSON.parse(m[1] as string);
}

/** Trains and returns the mean loss and MaxVio over the last `tail` steps. */
function train(overrides: Record<string, Record<string, unknown>>, tail = 100): { loss: number; maxVio: number; first: number } {
  const cfg = resolveConfig({ ...overrides, train: { device: 'cpu', progress: false, ...(overrides['train'] ?? {}) } } as Partial2);
  using t = new Trainer(cfg);
  const steps = t.run();
  const last = steps.slice(-tail);
  const mean = (f: (s: (typeof steps)[number]) => number): number => last.reduce((a, s) => a + f(s), 0) / last.length;
  return { loss: mean((s) => s.loss), maxVio: mean((s) => Math.max(...s.layers.map((l) => l.maxVio))), first: steps[0]?.loss ?? NaN };
}

describe('training on the default task (CPU)', () => {
  it('the default configuration learns: loss falls from ~2.3 to below 0.06', () => {
    const r = train({});
    expect(r.first).toBeGreaterThan(1.5);
    expect(r.loss).toBeLessThan(0.06);
  });

  it('bias balancing cuts MaxVio; with γ = 3e-4 the loss stays within 15% of the unbalanced run', () => {
    const off = train({ balance: { gamma: 0 } });
    const on = train({}); // default γ = 1e-3
    const mild = train({ balance: { gamma: 3e-4 } });
    expect(on.maxVio).toBeLessThan(0.3 * off.maxVio);
    expect(mild.maxVio).toBeLessThan(0.6 * off.maxVio);
    expect(mild.loss).toBeLessThan(1.15 * off.loss);
    expect(on.loss).toBeLessThan(1.5 * off.loss); // the price of forcing balance on Zipf-skewed data
  });

  it('data.onDevice on the CPU is the CPU data path: the same losses, bit for bit', () => {
    const plain = train({ train: { steps: 30 } as never });
    const onDevice = train({ data: { onDevice: true } as never, train: { steps: 30 } as never });
    expect(onDevice.loss).toBe(plain.loss);
    expect(onDevice.first).toBe(plain.first);
  });

  it('at equal per-token FLOPs, 8 experts (top-2, ffn 8) beat one expert (ffn 16) by at least 20%', () => {
    const moe = train({ model: { experts: 8, topK: 2, ffn: 8 } });
    // softmax over one expert: its weight is exactly 1, a dense FFN (sigmoid top-1 would be a gate)
    const dense = train({ model: { experts: 1, topK: 1, ffn: 16, scoreFunction: 'softmax' } });
    expect(moe.loss).toBeLessThan(0.8 * dense.loss);
  });

  it("model.fp8Dispatch reaches every layer's dispatcher, from the command line too; hidden must be a multiple of 128", () => {
    const overrides = overridesFromArgs(['--model.fp8Dispatch', 'keep', '--model.hidden', '128', '--steps', '3']);
    const cfg = resolveConfig({ ...overrides, train: { ...overrides['train'], device: 'cpu', progress: false } } as Partial2);
    using t = new Trainer(cfg);
    expect(t.model.layers.map((l) => l.dispatcher.fp8)).toEqual(['keep', 'keep']);
    expect(t.run().every((s) => Number.isFinite(s.loss))).toBe(true);
    expect(() => resolveConfig({ model: { fp8Dispatch: true } })).toThrow(
      /config\.model\.fp8Dispatch: needs config\.model\.hidden to be a multiple of 128 \(received 32\)/,
    );
    expect(() => resolveConfig({ model: { fp8Dispatch: 'yes' as never } })).toThrow(
      /config\.model\.fp8Dispatch: must be one of false, true, "keep"/,
    );
  });

  it('the classification variant (cross-entropy on the argmax class) reaches over 85% accuracy', () => {
    const cfg = resolveConfig({ model: { loss: 'cross-entropy' }, train: { device: 'cpu', progress: false } });
    using t = new Trainer(cfg);
    const steps = t.run();
    const last = steps.slice(-100);
    const acc = last.reduce((a, s) => a + (s.accuracy ?? 0), 0) / last.length;
    expect(steps[0]?.accuracy).toBeLessThan(0.3);
    expect(acc).toBeGreaterThan(0.85);
  });

  it('a few thousand steps leave allocator live bytes flat', () => {
    const cfg = resolveConfig({
      model: { hidden: 8, ffn: 4, experts: 4, topK: 2 },
      data: { tokensPerStep: 32 },
      train: { device: 'cpu', steps: 3000, progress: false },
    });
    using t = new Trainer(cfg);
    for (let i = 0; i < 50; i++) t.trainStep();
    const before = memoryStats('cpu').liveBytes;
    t.run();
    expect(memoryStats('cpu').liveBytes).toBe(before);
  });
});

describe('moe-ep train (CLI)', () => {
  const cli = join(packageRoot(), 'dist', 'lib', 'cli', 'main.js');
  it('runs, prints progress, writes metrics.jsonl and report.html, and reports their paths', () => {
    const out = mkdtempSync(join(tmpdir(), 'moe-train-'));
    try {
      const r = spawnSync(process.execPath, [cli, 'train', '--steps', '40', '--out', out, '--model.experts', '4'], { encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      expect(r.stdout).toMatch(/moe-ep train: 2 MoE layers, 4 experts/);
      expect(r.stdout).toMatch(/step 40\/40 +loss [\d.]+ +MaxVio/);
      expect(r.stdout).toContain(`report:  ${join(out, 'report.html')}`);
      const lines = readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n');
      expect(lines).toHaveLength(40);
      const last = JSON.parse(lines[39] as string);
      expect(last.layers[0].tokensPerExpert).toHaveLength(4);
      // Where the step's time went: five phases, each ≥ 0, together within the step's wall time.
      expect(Object.keys(last.phaseMs)).toEqual(['data', 'forward', 'backward', 'optimizer', 'metrics']);
      const phases = Object.values(last.phaseMs as Record<string, number>);
      expect(phases.every((v) => v >= 0)).toBe(true);
      expect(phases.reduce((a, b) => a + b, 0)).toBeLessThanOrEqual((256 / last.tokensPerSecond) * 1000 + 0.5);
      expect(r.stdout).toMatch(/per step \(ms, mean\): data [\d.]+, forward [\d.]+, backward [\d.]+, optimizer [\d.]+, metrics [\d.]+/);
      // The balancing bias per expert, after each step's update: it moves by gamma (1e-3) per step.
      expect(last.layers[1].bias).toHaveLength(4);
      const firstStep = JSON.parse(lines[0] as string);
      for (const b of firstStep.layers[0].bias) expect(Math.abs(b)).toBeCloseTo(1e-3, 6);
      // The configuration as run, with the run folder spelled out.
      const saved = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8'));
      expect(saved.model.experts).toBe(4);
      expect(saved.train.out).toBe(out);
      const charts = reportCharts(readFileSync(join(out, 'report.html'), 'utf8'));
      expect(charts.map((c) => c.id)).toEqual(['loss', 'maxvio', 'load0', 'load1', 'bias0', 'bias1', 'lr', 'gradnorm', 'tps']);
      const bias1 = charts.find((c) => c.id === 'bias1')!;
      expect(bias1.option.series).toHaveLength(4);
      expect(bias1.option.series[2]!.data[39]).toEqual([39, last.layers[1].bias[2]]);
      // load / mean per expert and step, around 1
      const load = charts.find((c) => c.id === 'load0')!.option.series[0]!.data as number[][];
      const mean = last.layers[0].tokensPerExpert.reduce((a: number, b: number) => a + b, 0) / 4;
      expect(load.find((d) => d[0] === 39 && d[1] === 3)?.[4]).toBeCloseTo(last.layers[0].tokensPerExpert[3] / mean, 3);
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  it('Ctrl-C stops after the current step and still writes the report', async () => {
    const out = mkdtempSync(join(tmpdir(), 'moe-sigint-'));
    try {
      const { spawn } = await import('node:child_process');
      const child = spawn(process.execPath, [cli, 'train', '--steps', '1000000', '--out', out, '--no-progress'], {
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      // Send the signal once training runs (its handler is installed by then), however slow the machine.
      const started = new Promise<void>((r) =>
        child.stdout.on('data', (d: Buffer) => {
          stdout += d.toString();
          if (stdout.includes('step 1/')) r();
        }),
      );
      await started;
      await new Promise((r) => setTimeout(r, 200));
      child.kill('SIGINT');
      const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
      expect(code, stdout).toBe(0);
      expect(stdout).toMatch(/final loss [\d.]+ after \d+ steps/);
      expect(readFileSync(join(out, 'report.html'), 'utf8')).toContain('by Ctrl-C');
      const stopped =
        /stopped by Ctrl-C after step (\d+) of 1000000; checkpoint (\S+)\nto resume: npx moe-ep train --config (\S+) --resume/.exec(stdout);
      expect(stopped, stdout).not.toBeNull();
      expect(stopped![2]).toBe(join(out, 'checkpoints', `step-${stopped![1]!.padStart(8, '0')}`));
      expect(resolve(stopped![3]!)).toBe(join(out, 'config.json'));
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  it('model.overlapComm (the all-to-alls on their own stream) follows the same loss trajectory bit for bit', () => {
    const run = (overlapComm: boolean): number[] => {
      const cfg = resolveConfig({
        model: { hidden: 16, ffn: 8, experts: 4, topK: 2, sharedFfn: 4, overlapComm },
        data: { tokensPerStep: 64 },
        train: { device: 'cpu', steps: 12, progress: false },
      });
      using t = new Trainer(cfg);
      return t.run().map((s) => s.loss);
    };
    const plain = run(false);
    expect(run(true)).toEqual(plain);
    expect(plain[plain.length - 1]).toBeLessThan(plain[0] as number);
    expect(() => resolveConfig({ model: { overlapComm: 'yes' } } as unknown as Partial2)).toThrow(
      /config\.model\.overlapComm: must be boolean/,
    );
  });

  it.each(['mse', 'cross-entropy'] as const)(
    'train.microBatches (%s): 2 and 4 passes a step, gradients accumulated, follow the one-pass trajectory',
    (loss) => {
      const run = (microBatches: number) => {
        const cfg = resolveConfig({
          model: { hidden: 16, ffn: 8, experts: 4, topK: 2, sharedFfn: 4, loss },
          // A large eps and no clipping make AdamW's step depend on the gradients' scale (it is
          // otherwise nearly scale-free), so a sum left undivided by the passes would show.
          ...(loss === 'mse' ? { optimizer: { eps: 0.1, clipNorm: 0 } } : {}),
          data: { tokensPerStep: 64 },
          train: { device: 'cpu', steps: 12, progress: false, microBatches },
        });
        using t = new Trainer(cfg);
        return t.run();
      };
      const one = run(1);
      for (const m of [2, 4]) {
        const steps = run(m);
        steps.forEach((s, i) => {
          const ref = one[i] as (typeof one)[number];
          // The same tokens and gradients, summed in another order: equal to fp32 rounding.
          expect(Math.abs(s.loss - ref.loss), `step ${i} loss, ${m} micro-batches`).toBeLessThan(1e-4 * ref.loss);
          expect(Math.abs(s.gradNorm - ref.gradNorm), `step ${i} gradNorm, ${m} micro-batches`).toBeLessThan(1e-3 * ref.gradNorm);
          expect(s.accuracy, `step ${i} accuracy`).toBe(ref.accuracy);
          expect(s.layers.map((l) => l.maxVio)).toEqual(ref.layers.map((l) => l.maxVio)); // loads are counts: exact
        });
      }
      expect(() => run(3)).toThrow(/config\.train\.microBatches 3 must divide each rank's 64 tokens/);
      expect(() => resolveConfig({ train: { microBatches: 0 } } as Partial2)).toThrow(/config\.train\.microBatches/);
    },
  );

  it("train.recompute: 'experts' and 'layer' reach every layer and follow the trajectory of 'none' bit for bit, with micro-batches too", () => {
    const run = (recompute: 'none' | 'experts' | 'layer', microBatches = 1) => {
      const cfg = resolveConfig({
        model: { hidden: 16, ffn: 8, experts: 4, topK: 2, sharedFfn: 4, capacityFactor: 1.5 },
        balance: { auxLossCoef: 1e-2 },
        data: { tokensPerStep: 64 },
        train: { device: 'cpu', steps: 6, progress: false, microBatches, recompute },
      });
      using t = new Trainer(cfg);
      for (const layer of t.model.layers) expect(layer.config.recompute).toBe(recompute);
      const steps = t.run().map(({ tokensPerSecond: _t, phaseMs: _p, ...s }) => s);
      return { steps, w13: Array.from(t.model.layers[1]?.master.w13.toFloat32Array() ?? []) };
    };
    expect(defaultConfig.train.recompute).toBe('none');
    for (const microBatches of [1, 2]) {
      const plain = run('none', microBatches);
      for (const mode of ['experts', 'layer'] as const) {
        const again = run(mode, microBatches);
        expect(again.steps, `${mode}, ${microBatches} micro-batches`).toEqual(plain.steps);
        expect(again.w13, `${mode}, ${microBatches} micro-batches: the weights after the run`).toEqual(plain.w13);
      }
    }
    expect(() => resolveConfig({ train: { recompute: 'all' } } as unknown as Partial2)).toThrow(
      /config\.train\.recompute: must be one of "none", "experts", "layer"/,
    );
  });

  it("train.weightGradDtype 'bf16': every layer gets it, the experts' gradients come in bf16 and the run follows f32's closely; micro-batches refused", () => {
    const run = (weightGradDtype: 'f32' | 'bf16') => {
      const cfg = resolveConfig({
        model: { hidden: 16, ffn: 8, experts: 4, topK: 2, sharedFfn: 4, layers: 2 },
        data: { tokensPerStep: 64 },
        train: { device: 'cpu', steps: 20, progress: false, weightGradDtype },
      });
      using t = new Trainer(cfg);
      for (const layer of t.model.layers) expect(layer.config.weightGradDtype).toBe(weightGradDtype);
      const losses = t.run().map((s) => s.loss);
      return { losses, w13: Array.from(t.model.layers[1]?.master.w13.toFloat32Array() ?? []) };
    };
    expect(defaultConfig.train.weightGradDtype).toBe('f32');
    const f32 = run('f32');
    const bf16 = run('bf16');
    // Each expert gradient is the f32 one rounded once (2^-9 relative): the runs part only by that.
    expect(bf16.w13, 'the weights moved apart').not.toEqual(f32.w13);
    const drift = Math.hypot(...bf16.w13.map((v, i) => v - (f32.w13[i] as number))) / Math.hypot(...f32.w13);
    expect(drift).toBeLessThan(1e-3); // 4e-5 when written
    bf16.losses.forEach((l, i) =>
      expect(Math.abs(l - (f32.losses[i] as number)), `step ${i}`).toBeLessThan(1e-3 * (f32.losses[i] as number)),
    );
    expect(bf16.losses.at(-1) as number).toBeLessThan(0.7 * (bf16.losses[0] as number));
    // The model's backward returns them in bf16 (the router's and the norms' stay f32).
    {
      using t = new Trainer(
        resolveConfig({
          model: { hidden: 16, ffn: 8, experts: 4, topK: 2, layers: 1 },
          train: { device: 'cpu', progress: false, weightGradDtype: 'bf16' },
        }),
      );
      using x = Tensor.randn([8, 16], { seed: 3 });
      using y = Tensor.randn([8, 16], { seed: 4 });
      const grads = t.model.backward(t.model.forward(x, y));
      try {
        expect(grads.get('layers.0.experts.w13')?.dtype).toBe('bf16');
        expect(grads.get('layers.0.experts.w2')?.dtype).toBe('bf16');
        expect(grads.get('layers.0.router.weight')?.dtype).toBe('f32');
        expect(grads.get('head.weight')?.dtype).toBe('f32');
      } finally {
        for (const g of grads.values()) g.dispose();
      }
    }
    expect(() => resolveConfig({ train: { weightGradDtype: 'bf16', microBatches: 2 } })).toThrow(
      /config\.train\.weightGradDtype 'bf16': needs config\.train\.microBatches 1 \(micro-batches accumulate into f32 gradients; received 2\)/,
    );
    expect(() => resolveConfig({ train: { weightGradDtype: 'f16' } } as unknown as Partial2)).toThrow(
      /config\.train\.weightGradDtype: must be one of "f32", "bf16"/,
    );
  });

  it("gpt-oss's biases are parameters: no weight decay on them, and a bf16 model's f32 router-bias copy follows its master", () => {
    using model = new MoEModel(
      { hidden: 16, ffn: 8, numExperts: 4, topK: 2, layers: 1, activation: 'clamped-swiglu', routerBias: true, expertBias: true },
      Device.cpu,
      'bf16',
      singleRankGroup,
      1,
    );
    const params = model.params();
    const byName = new Map(params.map((p) => [p.name, p]));
    const layer = model.layers[0] as MoELayer;
    expect(byName.get('layers.0.router.bias')?.master).toBe(layer.master.routerBias);
    expect(byName.get('layers.0.router.bias')?.computeF32).toBe(layer.compute.routerBias);
    expect(byName.get('layers.0.experts.b13')?.computeBf16).toBe(layer.compute.w13Bias);
    expect(byName.get('layers.0.experts.b2')?.kind).toBe('expert');
    const state = createOptimState(params, Device.cpu);
    try {
      // Gradients of ones, and the biases' masters set to 1: one step with weight decay 0.5.
      for (const name of ['layers.0.router.bias', 'layers.0.experts.b13', 'layers.0.experts.b2']) byName.get(name)?.master.fill_(1);
      const grads = new Map(params.map((p) => [p.name, Tensor.full(p.master.shape, 1)]));
      const before = Array.from(layer.master.router.toFloat32Array());
      optimizerStep(state, grads, { ...defaultConfig.optimizer, weightDecay: 0.5 }, { lr: 0.1, step: 1, gradScale: 1 });
      for (const g of grads.values()) g.dispose();
      // Adam's first step moves every weight by lr (g = 1); decay takes lr·wd·w more from decayed ones only.
      const bias = Array.from((layer.master.routerBias as Tensor).toFloat32Array());
      for (const v of bias) expect(v).toBeCloseTo(0.9, 6);
      for (const v of Array.from((layer.master.w2Bias as Tensor).toFloat32Array())) expect(v).toBeCloseTo(0.9, 6);
      Array.from(layer.master.router.toFloat32Array()).forEach((v, i) => expect(v).toBeCloseTo((before[i] as number) * 0.95 - 0.1, 5));
      expect(Array.from((layer.compute.routerBias as Tensor).toFloat32Array()), "the logits' f32 copy").toEqual(bias);
    } finally {
      disposeOptimState(state);
    }
    expect(() => resolveConfig({ model: { routerBias: 1 } } as unknown as Partial2)).toThrow(/config\.model\.routerBias/);
    expect(() => resolveConfig({ model: { expertBias: true } })).toThrow(
      /config\.model\.expertBias: needs config\.model\.activation 'clamped-swiglu' \(gpt-oss's; received 'swiglu'\)/,
    );
    expect(defaultConfig.model.routerBias || defaultConfig.model.expertBias).toBe(false);
  });

  it("train.microBatches: the clip compares the mean gradient's norm; aux losses, entropy and expert-choice counts combine over the passes", () => {
    const run = (microBatches: number, extra: Partial2 = {}) => {
      const cfg = resolveConfig({
        ...extra,
        model: { hidden: 16, ffn: 8, experts: 4, topK: 2, ...(extra?.model ?? {}) },
        data: { tokensPerStep: 64 },
        train: { device: 'cpu', steps: 8, progress: false, microBatches },
      } as Partial2);
      using t = new Trainer(cfg);
      return t.run();
    };
    // Clipping on (gradNorm is ~6-18 here, clipped to 0.5) with a scale-sensitive AdamW: clipping
    // the sum's norm instead of the mean's would step differently.
    const clipped = { optimizer: { eps: 0.1, clipNorm: 0.5 } } as Partial2;
    const one = run(1, clipped);
    const two = run(2, clipped);
    two.forEach((s, i) =>
      expect(Math.abs(s.loss - (one[i] as (typeof one)[number]).loss), `clipped, step ${i}`).toBeLessThan(
        1e-4 * (one[i] as (typeof one)[number]).loss,
      ),
    );
    // z-loss and the sequence-wise loss (seqLen dividing each pass): the logged aux loss and router
    // entropy are the passes' mean, equal to one pass's over the same tokens.
    const aux = { balance: { zLossCoef: 1e-3, seqAuxLossCoef: 1e-2, seqLen: 16 } } as Partial2;
    const aux1 = run(1, aux);
    for (const m of [2, 4]) {
      run(m, aux).forEach((s, i) => {
        const r = aux1[i] as (typeof aux1)[number];
        expect(Math.abs(s.auxLoss - r.auxLoss), `auxLoss step ${i}, ${m} passes`).toBeLessThan(1e-4 * r.auxLoss);
        s.layers.forEach((l, j) =>
          expect(Math.abs(l.routerEntropy - (r.layers[j] as (typeof r.layers)[number]).routerEntropy)).toBeLessThan(1e-5),
        );
      });
    }
    // Expert choice: each pass's experts pick among its tokens; the step's histogram covers every token.
    for (const s of run(4, { model: { routing: 'expert-choice' } } as Partial2))
      for (const l of s.layers) expect((l.expertsPerToken ?? []).reduce((a, b) => a + b, 0)).toBe(64);
  });

  it('MoEModel.backward checks every accumulate buffer before any product (a master as its own buffer took the gradient)', () => {
    const cfg = resolveConfig({
      model: { hidden: 16, ffn: 8, experts: 4, topK: 2 },
      data: { tokensPerStep: 32 },
      train: { device: 'cpu', steps: 1, progress: false },
    });
    using t = new Trainer(cfg);
    const model = t.model;
    const fresh = () => new Map(t.optimizerState().map((p) => [p.name, Tensor.zeros(p.param.shape, { device: 'cpu' })]));
    const x = Tensor.randn([32, 16], { seed: 1, device: 'cpu' });
    const y = Tensor.randn([32, 16], { seed: 2, device: 'cpu' });
    const headBefore = Array.from(model.head.toFloat32Array());
    const cases: [string, (m: Map<string, Tensor>) => void, RegExp][] = [
      ['missing', (m) => m.delete('layers.0.norm.weight'), /MoEModel\.backward: 'accumulate' has no buffer for 'layers\.0\.norm\.weight'/],
      ['the master itself', (m) => m.set('head.weight', model.head), /'accumulate 'head\.weight'' overlaps 'head\.weight' in memory/],
      [
        'one buffer for two layers',
        (m) => {
          m.get('layers.1.norm.weight')?.dispose();
          m.set('layers.1.norm.weight', m.get('layers.0.norm.weight') as Tensor);
        },
        /'accumulate' gives 'layers\.1\.norm\.weight' a tensor already given to another parameter/,
      ],
      [
        'bf16',
        (m) => m.set('layers.0.experts.w2', Tensor.zeros(model.layers[0]!.master.w2.shape, { dtype: 'bf16', device: 'cpu' })),
        /must be a contiguous f32/,
      ],
    ];
    for (const [what, edit, message] of cases) {
      const bufs = fresh();
      edit(bufs);
      const fwd = model.forward(x, y);
      expect(() => model.backward(fwd, { accumulate: bufs }), what).toThrow(message);
      expect(fwd.saved.last.disposed, `${what}: the refused backward released the forward`).toBe(true);
      for (const [name, b] of bufs)
        if (b !== model.head && b.dtype === 'f32')
          expect(
            Array.from(b.toFloat32Array()).every((v) => v === 0),
            `${what}: ${name} untouched`,
          ).toBe(true);
      releaseForward(fwd);
      for (const b of bufs.values()) if (b !== model.head) b.dispose();
    }
    expect(Array.from(model.head.toFloat32Array())).toEqual(headBefore);
    x.dispose();
    y.dispose();
  });

  it("with micro-batches the sequence-wise loss needs seqLen to divide each forward's tokens", () => {
    const cfg = resolveConfig({
      balance: { seqAuxLossCoef: 1e-3, seqLen: 32 },
      data: { tokensPerStep: 64 },
      train: { device: 'cpu', steps: 1, progress: false, microBatches: 4 },
    });
    expect(() => new Trainer(cfg)).toThrow(/config\.balance\.seqLen 32 must divide the 16 tokens of each forward .*and 4 micro-batches/);
  });

  it("model.normalize and model.routeScale reach every layer (Megatron-Core's default softmax router is normalize true); null keeps the router's default", () => {
    const layers = (model: Record<string, unknown>) => {
      const cfg = resolveConfig({
        model: { hidden: 16, ffn: 8, experts: 4, topK: 2, ...model },
        data: { tokensPerStep: 32 },
        train: { device: 'cpu', steps: 1, progress: false },
      } as Partial2);
      using t = new Trainer(cfg);
      return t.model.layers.map((l) => [l.config.normalize, l.config.routeScale]);
    };
    expect(defaultConfig.model.normalize).toBeNull();
    expect(layers({ scoreFunction: 'softmax' })).toEqual([
      [false, 1],
      [false, 1],
    ]);
    expect(layers({ scoreFunction: 'softmax', normalize: true, routeScale: 2.5 })).toEqual([
      [true, 2.5],
      [true, 2.5],
    ]);
    expect(layers({})[0]).toEqual([true, 1]); // sigmoid, top-2: renormalised by default
    expect(() => resolveConfig({ model: { routeScale: 0 } } as Partial2)).toThrow(/config\.model\.routeScale: must be > 0/);
  });

  it('model.transport reaches every layer; one process has no peers, so it refuses ipc and moves nothing for nccl', () => {
    const cfg = (transport: 'auto' | 'ipc' | 'nccl') =>
      resolveConfig({
        model: { hidden: 16, ffn: 8, experts: 4, topK: 2, transport },
        data: { tokensPerStep: 32 },
        train: { device: 'cpu', steps: 1, progress: false },
      });
    expect(defaultConfig.model.transport).toBe('auto');
    {
      using t = new Trainer(cfg('nccl'));
      t.trainStep();
      for (const layer of t.model.layers) expect([layer.dispatcher.transportChoice, layer.dispatcher.transport]).toEqual(['nccl', 'local']);
    }
    expect(() => new Trainer(cfg('ipc'))).toThrow(/'transport' 'ipc' needs a Communicator/);
    expect(() => resolveConfig({ model: { transport: 'nvlink' } } as unknown as Partial2)).toThrow(
      /config\.model\.transport: must be one of "auto", "ipc", "nccl"/,
    );
  });

  it('the programmatic example (examples/train.ts) trains', () => {
    const r = spawnSync(process.execPath, [join(packageRoot(), 'dist', 'examples', 'train.js'), '60'], { encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const losses = [...r.stdout.matchAll(/loss ([\d.]+)/g)].map((m) => Number(m[1]));
    expect(losses.length).toBeGreaterThanOrEqual(2);
    expect(losses[losses.length - 1]).toBeLessThan(0.5 * (losses[0] as number));
  });

  it.skipIf(cuda.isAvailable())('--device cuda without a usable GPU says so, naming the field', () => {
    const r = spawnSync(process.execPath, [cli, 'train', '--device', 'cuda', '--steps', '2', '--no-progress'], { encoding: 'utf8' });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/config.train.device is 'cuda' but no GPU is usable: /);
  });

  it('--help lists every field with its default and a description, aligned, within 100 columns', () => {
    const r = spawnSync(process.execPath, [cli, 'train', '--help'], { encoding: 'utf8' });
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/--model\.experts 8 /);
    expect(r.stdout).toMatch(/--checkpoint\.resume null/);
    const fields = r.stdout.split('\n').filter((l) => /^ {2}--\w+\.\w+ /.test(l));
    expect(fields).toHaveLength(Object.values(defaultConfig).reduce((a, section) => a + Object.keys(section).length, 0));
    for (const l of fields) expect(l, 'a field without a description').toMatch(/^ {2}\S+ \S+ {2,}\S/);
    const starts = new Set(fields.map((l) => (/^( {2}\S+ \S+ +)\S/.exec(l)?.[1] ?? '').length));
    expect(starts.size, 'descriptions start in one column').toBe(1);
    for (const l of r.stdout.split('\n')) expect([...l].length, l).toBeLessThanOrEqual(100);
  });

  it('a run folder that holds a run is refused; --resume continues it and the report covers the whole run; --overwrite replaces it', () => {
    const out = mkdtempSync(join(tmpdir(), 'moe-rerun-'));
    const train = (...args: string[]) =>
      spawnSync(process.execPath, [cli, 'train', '--out', out, '--no-progress', '--model.experts', '4', ...args], { encoding: 'utf8' });
    const steps = (): number[] =>
      readFileSync(join(out, 'metrics.jsonl'), 'utf8')
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l).step);
    try {
      expect(train('--steps', '30', '--checkpoint.every', '10').status).toBe(0);
      const before = readFileSync(join(out, 'metrics.jsonl'), 'utf8');
      const again = train('--steps', '30');
      expect(again.status).toBe(1);
      expect(again.stderr).toContain(
        `${out} already holds a run (metrics.jsonl, report.html, config.json, checkpoints): --resume continues it, --overwrite replaces it`,
      );
      expect(readFileSync(join(out, 'metrics.jsonl'), 'utf8')).toBe(before);
      // Resumed from step 20 (logged steps 20..29 came after that checkpoint): each step is in the file once.
      const resumed = spawnSync(
        process.execPath,
        [
          cli,
          'train',
          '--config',
          join(out, 'config.json'),
          '--steps',
          '40',
          '--resume',
          join(out, 'checkpoints', 'step-00000020'),
          '--no-progress',
        ],
        { encoding: 'utf8' },
      );
      expect(resumed.status, resumed.stderr).toBe(0);
      expect(steps()).toEqual(Array.from({ length: 40 }, (_, i) => i));
      const loss = reportCharts(readFileSync(join(out, 'report.html'), 'utf8')).find((c) => c.id === 'loss')!;
      expect(loss.option.series[0]!.data.map((p: number[]) => p[0])).toEqual(Array.from({ length: 40 }, (_, i) => i));
      expect(readFileSync(join(out, 'report.html'), 'utf8')).toContain('40 of 40 (resumed at step 20)');
      expect(train('--steps', '5', '--resume', '--overwrite').stderr).toMatch(/--overwrite and --resume contradict each other/);
      expect(train('--steps', '5', '--overwrite').status).toBe(0);
      expect(steps()).toEqual([0, 1, 2, 3, 4]);
      expect(readdirSync(join(out, 'checkpoints')).filter((f) => f.startsWith('step-'))).toEqual(['step-00000005']);
    } finally {
      rmSync(out, { recursive: true, force: true });
    }
  });

  it('--timeout-ms N sets train.timeoutMs, the collective (and start-up) timeout handed to init(); checked like any field', () => {
    expect(overridesFromArgs(['--timeout-ms', '1500'])).toEqual({ train: { timeoutMs: 1500 } });
    expect(resolveConfig({}).train.timeoutMs).toBe(300_000);
    expect(() => resolveConfig({ train: { timeoutMs: -1 } })).toThrow(/config\.train\.timeoutMs: must be >= 0/);
    expect(() => resolveConfig({ train: { timeoutMs: 1.5 } })).toThrow(/config\.train\.timeoutMs: must be integer/);
    const r = spawnSync(process.execPath, [cli, 'train', '--help'], { encoding: 'utf8' });
    expect(r.stdout).toMatch(/--train\.timeoutMs 300000 +collective timeout in ms/);
    expect(r.stdout).toMatch(/--timeout-ms N/);
  });

  it('a config section given as undefined keeps its defaults, as a missing one', () => {
    // A JavaScript caller (or a spread of an optional field) may pass it; the type does not allow it.
    expect(resolveConfig({ model: undefined, optimizer: { lr: 1e-3 } } as never)).toEqual(resolveConfig({ optimizer: { lr: 1e-3 } }));
  });

  it('reads --config and points at the bad field', () => {
    const dir = mkdtempSync(join(tmpdir(), 'moe-cfg-'));
    try {
      const file = join(dir, 'c.json');
      writeFileSync(file, JSON.stringify({ model: { experts: 0, topK: 1 }, optimizer: { lr: -1 } }));
      const r = spawnSync(process.execPath, [cli, 'train', '--config', file], { encoding: 'utf8' });
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/config\.model\.experts: must be >= 1/);
      expect(r.stderr).toMatch(/config\.optimizer\.lr: must be > 0/);
      const bad = spawnSync(process.execPath, [cli, 'train', '--model.expertz', '4'], { encoding: 'utf8' });
      expect(bad.status).toBe(2); // a command line naming no such field (a bad value in a file: 1, above)
      expect(bad.stderr).toMatch(/config\.model: unknown field 'expertz' \(did you mean 'experts'\?\)/);
      const groups = spawnSync(
        process.execPath,
        [cli, 'train', '--model.experts', '64', '--model.topK', '6', '--model.groups', '8', '--model.topkGroups', '4'],
        { encoding: 'utf8' },
      );
      expect(groups.stderr).toMatch(/config\.model\.topkGroups: 4 does not divide config\.model\.topK \(6\)/);
      expect(existsSync(file)).toBe(true);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe('checkpoints in training', () => {
  it.each([
    ['', false, {}],
    [' (a gated shared expert: its gate and moments saved and read)', true, {}],
    [" (Llama 4's router weight on the experts' input, top-1)", false, { topK: 1, routeWeightsOn: 'input', scoreFunction: 'sigmoid' }],
    [" (gpt-oss's clamped SwiGLU, limit 1.5)", false, { activation: 'clamped-swiglu', swigluLimit: 1.5 }],
    [
      " (gpt-oss's router and expert biases, trained: saved with their moments and read)",
      false,
      { activation: 'clamped-swiglu', swigluLimit: 7, routerBias: true, expertBias: true },
    ],
  ] as const)('a run resumed from a checkpoint follows the uninterrupted run exactly%s', async (_n, sharedGate, extra) => {
    const { mkdtempSync: mk, rmSync: rm } = await import('node:fs');
    const dir = mk(join(tmpdir(), 'moe-resume-'));
    try {
      const cfg = resolveConfig({
        model: { hidden: 16, ffn: 8, experts: 4, topK: 2, sharedFfn: 4, sharedGate, ...extra },
        data: { tokensPerStep: 64 },
        train: { device: 'cpu', steps: 30, progress: false },
      });
      let straight: number[];
      {
        using a = new Trainer(cfg);
        straight = a.run().map((s) => s.loss);
      }
      {
        using b = new Trainer(cfg);
        const gate0 = sharedGate ? Array.from((b.model.layers[0]?.master.sharedGate as Tensor).toFloat32Array()) : [];
        for (let i = 0; i < 12; i++) b.trainStep();
        b.saveCheckpoint(dir, 2);
        if (sharedGate) {
          // The gate is a trained parameter: it moved, and its AdamW moments are in the checkpoint.
          const gate = Array.from((b.model.layers[0]?.master.sharedGate as Tensor).toFloat32Array());
          expect(gate.some((g, i) => g !== gate0[i])).toBe(true);
          using r = loadCheckpoint(dir);
          expect(Object.keys(r.manifest.tensors)).toEqual(
            expect.arrayContaining(['layers.0.shared.gate', 'optim.layers.0.shared.gate.exp_avg', 'optim.layers.0.shared.gate.exp_avg_sq']),
          );
        }
        if ('routerBias' in extra) {
          // Both biases start at zero and are trained: they moved, and their moments are saved per expert.
          for (const t of [b.model.layers[0]?.master.routerBias, b.model.layers[0]?.master.w13Bias, b.model.layers[1]?.master.w2Bias])
            expect(Array.from((t as Tensor).toFloat32Array()).some((v) => v !== 0)).toBe(true);
          using r = loadCheckpoint(dir);
          expect(Object.keys(r.manifest.tensors)).toEqual(
            expect.arrayContaining([
              'layers.0.router.bias',
              'optim.layers.0.router.bias.exp_avg_sq',
              'layers.1.experts.3.b1',
              'optim.layers.1.experts.3.b1.exp_avg',
              'optim.layers.1.experts.3.b3.exp_avg_sq',
              'optim.layers.0.experts.0.b2.exp_avg',
            ]),
          );
        }
      }
      using c = new Trainer(cfg);
      expect(c.resume(dir)).toBe(12);
      const resumed = c.run().map((s) => s.loss);
      expect(resumed).toEqual(straight.slice(12));
      // The layer's function is the run's: a run of the other mode is refused at resume.
      if ('routeWeightsOn' in extra || 'activation' in extra) {
        const other = resolveConfig({
          model: { hidden: 16, ffn: 8, experts: 4, topK: 2, sharedFfn: 4, sharedGate },
          data: { tokensPerStep: 64 },
          train: { device: 'cpu', steps: 30, progress: false },
        });
        using d = new Trainer(other);
        expect(() => d.resume(dir)).toThrow(/saved by a run with model\.(topK|routeWeightsOn|activation|routerBias)/);
      }
    } finally {
      rm(dir, { recursive: true, force: true });
    }
  });

  it('model.groupTop reaches every layer and the manifest; a resume scoring groups otherwise is refused by the record', () => {
    const dir = mkdtempSync(join(tmpdir(), 'moe-group-top-'));
    try {
      const run = (groupTop: number | null) =>
        resolveConfig({
          model: { hidden: 16, ffn: 8, experts: 8, topK: 4, groups: 4, topkGroups: 2, groupTop, sharedFfn: 0 },
          data: { tokensPerStep: 64 },
          train: { device: 'cpu', steps: 2, progress: false },
        });
      {
        using t = new Trainer(run(1));
        for (const layer of t.model.layers) expect(layer.config.groupTop).toBe(1);
        t.trainStep();
        const saved = t.saveCheckpoint(dir);
        const manifest = JSON.parse(readFileSync(join(saved.dir, 'manifest.json'), 'utf8')) as { router: { groupTop?: number } };
        expect(manifest.router.groupTop).toBe(1);
      }
      {
        // null: topK/topkGroups = 2, not the checkpoint's 1.
        using t = new Trainer(run(null));
        expect(t.model.layers[0]!.config.groupTop).toBe(2);
        expect(() => t.resume(dir)).toThrow(/router was trained with groupTop 1 but this layer has groupTop 2/);
      }
      {
        using t = new Trainer(run(1));
        t.resume(dir);
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("the manifest records the router's weighting; a layer weighting otherwise, or a sigmoid topK 1 checkpoint from before the record, is refused", () => {
    const dir = mkdtempSync(join(tmpdir(), 'moe-router-record-'));
    const top1 = mkdtempSync(join(tmpdir(), 'moe-router-top1-'));
    try {
      const model = { hidden: 16, ffn: 8, experts: 4, topK: 2, sharedFfn: 0 };
      const cfg = resolveConfig({ model, data: { tokensPerStep: 64 }, train: { device: 'cpu', steps: 2, progress: false } });
      {
        using t = new Trainer(cfg);
        t.trainStep();
        const saved = t.saveCheckpoint(dir);
        const manifest = JSON.parse(readFileSync(join(saved.dir, 'manifest.json'), 'utf8')) as { router: unknown };
        expect(manifest.router).toEqual({
          normalize: true,
          routeScale: t.model.layers[0]!.config.routeScale,
          scoreFunction: 'sigmoid',
          topK: 2,
          groups: 1,
          topkGroups: 1,
          routeWeightsOn: 'output',
          activation: 'swiglu',
        });
      }
      const layerOf = (routeScale: number): MoELayer =>
        new MoELayer({ hidden: 16, ffn: 8, numExperts: 4, topK: 2, scoreFunction: 'sigmoid', routeScale, dtype: 'f32', device: 'cpu' });
      const reader = loadCheckpoint(dir);
      try {
        using other = layerOf(2.5);
        expect(() => loadMoELayer(reader, other, 0)).toThrow(CheckpointError);
        expect(() => loadMoELayer(reader, other, 0)).toThrow(
          /normalize true, routeScale 1 \(manifest router\) but this layer has normalize true, routeScale 2\.5/,
        );
        using same = layerOf(1);
        loadMoELayer(reader, same, 0);
        // A router that scores otherwise, or picks another k, computes something else with the same
        // weights; a shared expert the layer lacks would be dropped: each is refused, named.
        using softmax = new MoELayer({
          hidden: 16,
          ffn: 8,
          numExperts: 4,
          topK: 2,
          scoreFunction: 'softmax',
          normalize: true,
          dtype: 'f32',
          device: 'cpu',
        });
        expect(() => loadMoELayer(reader, softmax, 0)).toThrow(
          /router was trained with scoreFunction "sigmoid" but this layer has scoreFunction "softmax"/,
        );
        using top3 = new MoELayer({ hidden: 16, ffn: 8, numExperts: 4, topK: 3, scoreFunction: 'sigmoid', dtype: 'f32', device: 'cpu' });
        expect(() => loadMoELayer(reader, top3, 0)).toThrow(/router was trained with topK 2 but this layer has topK 3/);
        const m = same.master.w13;
        expect(() => loadMoELayer(reader, same, 0, { w13: { expAvg: m, expAvgSq: m } })).toThrow(
          /loadMoELayer: 'moments\.w13' was given without 'moments\.w2': give both or neither/,
        );
      } finally {
        reader.close();
      }
      // A sigmoid topK 1 run saved without the record (before it existed) normalised every weight.
      const cfg1 = resolveConfig({ ...cfg, model: { ...cfg.model, topK: 1 } });
      {
        using t = new Trainer(cfg1);
        t.trainStep();
        const saved = t.saveCheckpoint(top1);
        const path = join(saved.dir, 'manifest.json');
        const manifest = JSON.parse(readFileSync(path, 'utf8')) as { router?: unknown };
        expect(manifest.router).toMatchObject({ normalize: false, routeScale: t.model.layers[0]!.config.routeScale });
        delete manifest.router;
        writeFileSync(path, JSON.stringify(manifest));
      }
      using again = new Trainer(cfg1);
      expect(() => again.resume(top1)).toThrow(/saved before checkpoints recorded the router's weighting, by a sigmoid topK 1 run/);
    } finally {
      rmSync(dir, { recursive: true, force: true });
      rmSync(top1, { recursive: true, force: true });
    }
  });
});
