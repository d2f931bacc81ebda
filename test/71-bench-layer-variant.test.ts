// The layer benchmark's --variant (benchmarks/moe-layer.bench.mjs): a second 'ours' with some kernel
// switches set, timed in the same rounds as the default. Run here as a dry run (tiny shapes on the
// CPU, where the switches change no kernel): the plumbing — its own result file, a ratio per round
// for every metric and phase, its outputs checked against the default's, the switches put back
// before the file is written — and its refusals of a malformed, unknown or no-op variant.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { packageRoot } from '../lib/native.js';

const bench = join(packageRoot(), 'benchmarks', 'moe-layer.bench.mjs');
const scratch = mkdtempSync(join(tmpdir(), 'moe-ep-layer-variant-test-'));
afterAll(() => rmSync(scratch, { recursive: true, force: true }));

function runBench(extra: string[]) {
  return spawnSync(process.execPath, [bench, '--dry-run', '--shape', 'main', '--rounds', '2', '--no-peer', '--out', scratch, ...extra], {
    encoding: 'utf8',
    env: { ...process.env, MOE_EP_COMMIT: 'test' },
    timeout: 120_000,
  });
}

type Ratios = { perRound: number[]; median: number; range: number[] };
type Result = {
  kernelOptions: { groupedGemm: Record<string, boolean> };
  phases: { phase: string }[];
  variant: {
    switches: Record<string, Record<string, boolean>>;
    check: { result: string; rerouted: number; relErr: Record<string, number> };
    metrics: { what: string; ms: number; perRound: number[]; variantOverDefault: Ratios }[];
    phases: { phase: string; ms: number; variantOverDefault: Ratios }[];
  };
};

describe('moe-layer.bench.mjs --variant (dry run)', () => {
  it('times the variant beside the default in every round and writes its own file', () => {
    const r = runBench(['--variant', 'groupedGemm.trimTails=false,router.pdl=false']);
    expect(r.status, r.stderr.slice(-2000)).toBe(0);
    const file = join(scratch, 'moe-layer-vs-trimTails-off-pdl-off-dryrun-test.json');
    expect(existsSync(file)).toBe(true);
    const d = JSON.parse(readFileSync(file, 'utf8')) as Result;
    expect(d.variant.switches).toEqual({ groupedGemm: { trimTails: false }, router: { pdl: false } });
    expect((d.variant as unknown as { dWDtype: object }).dWDtype).toEqual({ default: 'f32', variant: 'f32' });
    expect((d.variant as unknown as { adamwGradDtype: object }).adamwGradDtype).toEqual({ default: 'f32', variant: 'f32' });
    // The default's switches are back in force when the file is written.
    expect(d.kernelOptions.groupedGemm.trimTails).toBe(true);
    // The same layer, the same kernels on the CPU: the outputs are the default's exactly.
    expect(d.variant.check.result).toMatch(/^passed/);
    expect(d.variant.check.rerouted).toBe(0);
    expect(Object.keys(d.variant.check.relErr)).toEqual(['y', 'dx', 'router', 'w13[0]', 'w13[31]', 'w2[0]', 'w2[31]']);
    for (const v of Object.values(d.variant.check.relErr)) expect(v).toBe(0);
    expect(d.variant.metrics.map((m) => m.what)).toEqual([
      'forward',
      'backward',
      'forward + backward',
      'forward + backward, host ahead',
      'forward + backward, 2 back to back',
      'AdamW',
    ]);
    // No torch peer here: no variant-against-torch ratios.
    for (const m of d.variant.metrics) expect((m as { torchOverVariant?: unknown }).torchOverVariant, m.what).toBeNull();
    expect(d.variant.phases.map((p) => p.phase)).toEqual(d.phases.map((p) => p.phase));
    for (const m of [...d.variant.metrics, ...d.variant.phases]) {
      const { perRound, median, range } = m.variantOverDefault;
      expect(perRound).toHaveLength(2);
      for (const v of perRound) expect(v).toBeGreaterThan(0);
      const [lo, hi] = range as [number, number];
      expect(median).toBeGreaterThanOrEqual(lo);
      expect(median).toBeLessThanOrEqual(hi);
    }
    expect(r.stdout).toMatch(/variant check: passed/);
  }, 120_000);

  it('layer.recompute: a second layer of the same weights, the same bits, keeping less', () => {
    const r = runBench(['--variant', 'layer.recompute=layer']);
    expect(r.status, r.stderr.slice(-2000)).toBe(0);
    const file = join(scratch, 'moe-layer-vs-recompute-layer-dryrun-test.json');
    const d = JSON.parse(readFileSync(file, 'utf8')) as Result & {
      memory: Record<'default' | 'variant', { keptBytes: number; stepPeakBytes: number }>;
      variant: { layerOptions: Record<string, string> };
    };
    expect(d.variant.layerOptions).toEqual({ recompute: 'layer' });
    expect(d.variant.switches).toEqual({});
    expect(d.variant.check.result).toMatch(/^passed/);
    for (const v of Object.values(d.variant.check.relErr)) expect(v).toBe(0);
    // The dry run's main shape, T=64 H=128 F=64 top-8: 512 routed rows whose bf16 rows, SwiGLU
    // halves and outputs (2H + 3F values each) 'layer' does not keep.
    expect(d.memory.default.keptBytes - d.memory.variant.keptBytes).toBeGreaterThanOrEqual(512 * (2 * 128 + 3 * 64) * 2);
    expect(d.memory.variant.stepPeakBytes).toBeGreaterThan(d.memory.variant.keptBytes);
  }, 120_000);

  it("layer.weightGradDtype=bf16: the experts' gradients rounded to bf16, everything else the same bits", () => {
    const r = runBench(['--variant', 'layer.weightGradDtype=bf16']);
    expect(r.status, r.stderr.slice(-2000)).toBe(0);
    const d = JSON.parse(readFileSync(join(scratch, 'moe-layer-vs-gradsBf16-dryrun-test.json'), 'utf8')) as Result & {
      variant: { layerOptions: Record<string, string> };
    };
    expect(d.variant.layerOptions).toEqual({ weightGradDtype: 'bf16' });
    expect((d.variant as unknown as { dWDtype: object }).dWDtype, 'the dW phases wrote bf16 on the variant side').toEqual({
      default: 'f32',
      variant: 'bf16',
    });
    expect((d.variant as unknown as { adamwGradDtype: object }).adamwGradDtype, 'AdamW read bf16 gradients on the variant side').toEqual({
      default: 'f32',
      variant: 'bf16',
    });
    expect(d.variant.check.result).toMatch(/^passed/);
    const { y, dx, router, ...experts } = d.variant.check.relErr;
    expect([y, dx, router]).toEqual([0, 0, 0]);
    // One rounding to bf16 (8 significant bits): a relative error in norm near 2^-9, not 0.
    for (const [name, v] of Object.entries(experts)) {
      expect(v, name).toBeGreaterThan(0);
      expect(v, name).toBeLessThan(2 ** -8);
    }
  }, 120_000);

  it.each([
    ['layer.recompute=all', /--variant: 'layer\.recompute=all': recompute is one of experts, layer/],
    ['layer.recompute=none', /recompute is one of experts, layer \(none is the default\)/],
    ['layer.weightGradDtype=f32', /--variant: 'layer\.weightGradDtype=f32': weightGradDtype is bf16 \(f32 is the default\)/],
    ['trimTails', /--variant: 'trimTails' is not group\.switch=true\|false/],
    ['groupedGemm.trimTails=no', /is not group\.switch=true\|false/],
    ['groupedGemm.bogus=false', /--variant groupedGemm\.bogus=false: .*unknown option 'bogus'/],
    ['groupedGemm.trimTails=true', /every switch is already so/],
  ])(
    'refuses --variant %s',
    (value, message) => {
      const r = runBench(['--variant', value]);
      expect(r.status).not.toBe(0);
      expect(r.stderr).toMatch(message);
    },
    60_000,
  );
});
