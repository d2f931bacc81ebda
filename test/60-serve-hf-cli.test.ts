// `moe-ep hf inspect`: a Hugging Face MoE checkpoint checked from its headers, as the serving loader
// reads it: the block in the package's terms, the MoE layers, each rank's share; a tensor missing,
// of the wrong shape, or FP8 without usable scales is named with its layer and the exit status is 1.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { packageRoot } from '../lib/native.js';
import { buildHfCheckpoint, testConfigs } from './hf-fixtures.mjs';

const root = fs.mkdtempSync(join(tmpdir(), 'moe-hf-cli-'));
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
const cli = join(packageRoot(), 'dist', 'lib', 'cli', 'main.js');
const run = (...args: string[]) => spawnSync(process.execPath, [cli, 'hf', ...args], { encoding: 'utf8', timeout: 60_000 });

describe('moe-ep hf inspect', () => {
  it('a whole checkpoint: the block, the MoE layers, each rank’s experts; exit 0; --json the same facts', () => {
    const dir = join(root, 'v3');
    buildHfCheckpoint(dir, testConfigs.deepseek_v3, { dtype: 'bf16', shards: 3, seed: 1 });
    const r = run('inspect', dir, '--ranks', '4');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain(`hf checkpoint ${dir}: deepseek_v3, 3 layers, 2 with an MoE block (1, 2)`);
    expect(r.stdout).toContain(
      'block: hidden 16, 16 experts of width 8; sigmoid, selection bias, 4 groups keep 2 (a group scored by its top 2), top-4, weights renormalised, × 2.5; shared expert of width 16',
    );
    // 16 experts × 3 bf16 matrices of 8·16 values = 12 KiB a layer; a quarter per rank.
    expect(r.stdout).toContain('per MoE layer and rank at 4 ranks: 4 experts, 3.00 KiB as stored');
    expect(r.stdout).toMatch(/ok: every MoE layer loads\n$/);
    const j = run('inspect', dir, '--json');
    expect(j.status).toBe(0);
    const d = JSON.parse(j.stdout) as {
      ok: boolean;
      moeLayers: number[];
      layers: { tensors: number; expertBytes: number; problems: string[] }[];
      stats: { tensorBytes: number };
    };
    expect(d.ok).toBe(true);
    expect(d.moeLayers).toEqual([1, 2]);
    // gate, bias, 48 expert matrices, 3 shared: 53 a layer; only headers were read.
    expect(d.layers.map((l) => [l.tensors, l.expertBytes, l.problems.length])).toEqual([
      [53, 12288, 0],
      [53, 12288, 0],
    ]);
    expect(d.stats.tensorBytes).toBe(0);
  });

  it('fused experts: gpt-oss in MXFP4 (blocks, scales, biases), Llama 4 (weights on the input), Granite 4.0 (shared MLP); a packed width not a multiple of 32 named', () => {
    const go = join(root, 'gpt-oss');
    buildHfCheckpoint(go, testConfigs.gpt_oss, { dtype: 'bf16', shards: 2, seed: 2 });
    const r = run('inspect', go, '--ranks', '2');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain(
      'block: hidden 64, 8 experts of width 32; softmax, router bias, top-2, weights renormalised; clamped SwiGLU (alpha 1.702, limit 7) with expert biases; no shared expert',
    );
    // Per expert: gate_up [2F=64, H=64] as 4-bit codes (2048 bytes) and 64·2 scales, down [H=64, F=32]
    // (1024 bytes) and 64 scales, biases of 64 and 64 bf16 values (256 bytes): 3520 bytes; 4 a rank.
    expect(r.stdout).toContain('per MoE layer and rank at 2 ranks: 4 experts, 13.8 KiB as stored');
    const j = JSON.parse(run('inspect', go, '--json').stdout) as { layers: { tensors: number; expertBytes: number }[] };
    // router, its bias, 4 MXFP4 tensors, 2 biases.
    expect(j.layers[0]).toMatchObject({ tensors: 8, expertBytes: 8 * 3520 });
    const l4 = join(root, 'llama4');
    buildHfCheckpoint(l4, testConfigs.llama4, { dtype: 'bf16', shards: 0, seed: 3 });
    expect(run('inspect', l4).stdout).toContain(
      "block: hidden 16, 8 experts of width 6; sigmoid, top-1, weights as scored, weights scale the experts' input; shared expert of width 6",
    );
    const gr = join(root, 'granite');
    buildHfCheckpoint(gr, testConfigs.granitemoehybrid, { dtype: 'bf16', shards: 0, seed: 4 });
    expect(run('inspect', gr).stdout).toContain(
      'block: hidden 16, 16 experts of width 4; softmax, top-4, weights renormalised; shared expert of width 8',
    );
    // DBRX: three stacked [E·F,H] tensors a layer (once, not per expert); a rank reads E/P of each.
    const db = join(root, 'dbrx');
    buildHfCheckpoint(db, testConfigs.dbrx, { dtype: 'bf16', shards: 2, seed: 5 });
    const dr = run('inspect', db, '--ranks', '2');
    expect(dr.status, dr.stderr).toBe(0);
    expect(dr.stdout).toContain('block: hidden 16, 8 experts of width 8; softmax, top-3, weights renormalised; no shared expert');
    // Per expert: gate, up and down rows [F=8, H=16] in bf16, 768 bytes; 4 a rank.
    expect(dr.stdout).toContain('per MoE layer and rank at 2 ranks: 4 experts, 3.00 KiB as stored');
    const dj = JSON.parse(run('inspect', db, '--json').stdout) as { layers: { tensors: number; expertBytes: number }[] };
    // router and the 3 stacked tensors.
    expect(dj.layers[0]).toMatchObject({ tensors: 4, expertBytes: 8 * 768 });
    // MXFP4 packs 32 values a block: an expert width of 40 cannot be read as published.
    fs.writeFileSync(join(go, 'config.json'), JSON.stringify({ ...testConfigs.gpt_oss, intermediate_size: 40 }));
    const bad = run('inspect', go);
    expect(bad.status).toBe(1);
    expect(bad.stdout + bad.stderr).toMatch(/the experts are in MXFP4 .*intermediate_size 40 is not a multiple of 32/);
  });

  it('names what would not load: a tensor missing from the index, one of the wrong shape, FP8 weights too narrow for 128-blocks', () => {
    const dir = join(root, 'broken');
    const built = buildHfCheckpoint(dir, testConfigs.qwen3_next, { dtype: 'bf16', shards: 2, seed: 2 });
    const indexPath = join(dir, 'model.safetensors.index.json');
    const index = JSON.parse(fs.readFileSync(indexPath, 'utf8')) as { weight_map: Record<string, string> };
    delete index.weight_map['model.layers.1.mlp.experts.5.up_proj.weight'];
    fs.writeFileSync(indexPath, JSON.stringify(index));
    fs.writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...built.cfg, moe_intermediate_size: 6 }));
    const r = run('inspect', dir);
    expect(r.status).toBe(1);
    expect(r.stdout).toMatch(
      /layer 0: .*tensor 'model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight' is \[4,16\] but the qwen3_next config \(config\.json\) needs \[6,16\]/,
    );
    expect(r.stdout).toMatch(/… and \d+ more problems \(--json lists the first 32 of each layer\)/);
    expect(r.stdout).toMatch(/FAILED: 2 of 2 MoE layers would not load\n$/);
    fs.writeFileSync(join(dir, 'config.json'), JSON.stringify(built.cfg));
    const missing = run('inspect', dir);
    expect(missing.status).toBe(1);
    expect(missing.stdout).toContain("layer 1: tensor 'model.layers.1.mlp.experts.5.up_proj.weight' is not in the checkpoint");
    expect(missing.stdout).toContain('FAILED: 1 of 2 MoE layers would not load');
    const fp8 = join(root, 'fp8');
    buildHfCheckpoint(fp8, testConfigs.glm4_moe, { dtype: 'bf16', shards: 0, seed: 3, fp8: true });
    const f = run('inspect', fp8);
    expect(f.status).toBe(1);
    expect(f.stdout).toContain("FP8 tensor 'model.layers.1.mlp.experts.0.gate_proj.weight' has 16 columns, not a multiple of 128");
    // FP8 in other blocks than 128×128, as the loader refuses them (a review found inspect passing them).
    const blocks = join(root, 'fp8-blocks');
    const wide = {
      ...testConfigs.glm4_moe,
      hidden_size: 128,
      moe_intermediate_size: 128,
      quantization_config: { weight_block_size: [64, 64] },
    };
    buildHfCheckpoint(blocks, wide, { dtype: 'bf16', shards: 0, seed: 4, fp8: true });
    const b = run('inspect', blocks);
    expect(b.status).toBe(1);
    expect(b.stdout).toContain('quantization_config.weight_block_size [64,64]: FP8 weights are read with 128×128 blocks only');
    // No MoE layer at all is nothing to serve (MoEInference.fromHf refuses it too).
    const dense = join(root, 'dense');
    buildHfCheckpoint(dense, { ...testConfigs.glm4_moe, first_k_dense_replace: 5 }, { dtype: 'bf16', shards: 0, seed: 5 });
    const d = run('inspect', dense);
    expect(d.status).toBe(1);
    expect(d.stdout).toMatch(/0 with an MoE block \(\)\n[\s\S]*FAILED: the config declares no layer with an MoE block\n$/);
  });

  it('a config that disagrees with the files everywhere is reported in seconds, the problems past the first of each layer counted', () => {
    const dir = join(root, 'other-layout');
    buildHfCheckpoint(dir, testConfigs.olmoe, { dtype: 'bf16', shards: 0, seed: 6 });
    // 60 layers of 4096 experts declared; the files hold 2 layers of 8 (a review's hour-long case
    // was a checkpoint whose every expert tensor had other names: each miss scanned the weight map).
    fs.writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...testConfigs.olmoe, num_experts: 4096, num_hidden_layers: 60 }));
    const t0 = Date.now();
    const r = run('inspect', dir, '--json');
    expect(r.status).toBe(1);
    const d = JSON.parse(r.stdout) as { layers: { problems: string[]; moreProblems: number }[] };
    expect(d.layers).toHaveLength(60);
    // The gate's shape, and every expert the files lack (layers 0 and 1 hold experts 0-7).
    d.layers.forEach((l, i) => expect(l.problems.length + l.moreProblems, `layer ${i}`).toBe(1 + 3 * (4096 - (i < 2 ? 8 : 0))));
    expect(d.layers[0]?.problems).toHaveLength(32);
    expect(Date.now() - t0, 'seconds, not minutes').toBeLessThan(30_000);
  });

  it('usage errors exit 2, bad values 1, each said', () => {
    const dir = join(root, 'v3');
    expect(run().status).toBe(2);
    expect(run('inspect').stderr).toMatch(/hf inspect needs the checkpoint folder/);
    expect(run('inspect', dir, '--jsn').stderr).toMatch(/unknown option --jsn \(did you mean --json\?\)/);
    expect(run('check', dir).stderr).toMatch(/unknown hf command 'check'/);
    const r = run('inspect', dir, '--ranks', '3');
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/--ranks 3 does not divide the 16 experts/);
    expect(run('inspect', join(root, 'nothing')).stderr).toMatch(/no such folder/);
    expect(run('inspect', '--help').stdout).toMatch(/^usage: moe-ep hf inspect <dir> \[--json\] \[--ranks P\]/);
  });
});
