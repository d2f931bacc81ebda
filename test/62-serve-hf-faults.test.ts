// Bad Hugging Face checkpoint folders: every failure is a CheckpointError (or, for a bad call, an
// InvalidArgumentError) naming the folder, the file and the tensor; nothing outside the folder is
// read (index entries with paths, links leading out); files a rank does not need are never opened.
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { spawnSync } from 'node:child_process';

import { afterAll, describe, expect, it } from 'vitest';

import { CheckpointError, HfMoECheckpoint, InvalidArgumentError, MoEInference, memoryStats } from '../lib/index.js';
import { buildHfCheckpoint, readHeader, testConfigs, writeSafetensorsFile } from './hf-fixtures.mjs';

const root = fs.mkdtempSync(join(tmpdir(), 'moe-serve-faults-'));
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
let n = 0;
const cfg = testConfigs.deepseek_v3;

/** A fresh DeepSeek-V3-layout checkpoint (3 shards + index unless said otherwise). */
function fresh(options: { shards?: number; dtype?: 'bf16' | 'f32' } = {}) {
  const dir = join(root, `c${n++}`);
  const built = buildHfCheckpoint(dir, cfg, { shards: options.shards ?? 3, dtype: options.dtype ?? 'bf16', seed: n });
  const indexPath = join(dir, 'model.safetensors.index.json');
  const setIndex = (weightMap: unknown, extra: object = {}): void =>
    fs.writeFileSync(indexPath, JSON.stringify({ metadata: {}, weight_map: weightMap, ...extra }));
  return { dir, built, indexPath, setIndex };
}

/** Opens dir and reads `layer` (default 1), expecting a CheckpointError matching every pattern. */
function expectCheckpointError(dir: string, ...patterns: RegExp[]): void {
  const live = memoryStats('cpu').liveBytes;
  let err: unknown;
  try {
    using ckpt = HfMoECheckpoint.open(dir);
    ckpt.readLayer(1, { device: 'cpu' }).dispose();
  } catch (e) {
    err = e;
  }
  expect(err, patterns.join(' ')).toBeInstanceOf(CheckpointError);
  for (const p of patterns) expect((err as Error).message).toMatch(p);
  // Whatever was allocated before the failure was released.
  expect(memoryStats('cpu').liveBytes).toBe(live);
}

const expertName = (layer: number, j: number, x: string): string => `model.layers.${layer}.mlp.experts.${j}.${x}_proj.weight`;

describe('the folder, config.json and the index', () => {
  it('a missing folder, a file given as the folder', () => {
    expectCheckpointError(join(root, 'nowhere'), /hf checkpoint .*nowhere: no such folder/);
    const { dir } = fresh();
    expectCheckpointError(join(dir, 'config.json'), /is a regular file, not a folder/);
  });

  it('config.json missing, not JSON, nested without end, too large, or a link out of the folder', () => {
    const { dir } = fresh();
    const path = join(dir, 'config.json');
    fs.rmSync(path);
    expectCheckpointError(dir, /config.json is missing \(pass options.config/);
    fs.writeFileSync(path, '{"model_type": ');
    expectCheckpointError(dir, /config.json: not valid JSON/);
    fs.writeFileSync(path, '['.repeat(100_000));
    expectCheckpointError(dir, /config.json: JSON nested deeper than 16 levels/);
    fs.writeFileSync(path, `{"pad": "${' '.repeat(5 * 2 ** 20)}"}`);
    expectCheckpointError(dir, /config.json: has \d+ bytes, more than the 4194304 bytes allowed/);
    const outside = join(root, `outside-config-${n++}.json`);
    fs.writeFileSync(outside, JSON.stringify(cfg));
    fs.rmSync(path);
    fs.symlinkSync(outside, path);
    expectCheckpointError(dir, /config.json: resolves outside its folder through a symbolic link/);
    // options.config stands in for it.
    using ckpt = HfMoECheckpoint.open(dir, { config: cfg });
    expect(ckpt.family).toBe('deepseek_v3');
  });

  it('neither an index nor model.safetensors; an index that is not JSON or has no weight_map', () => {
    const { dir, indexPath, setIndex } = fresh();
    fs.renameSync(indexPath, `${indexPath}.bak`);
    expectCheckpointError(dir, /neither model.safetensors.index.json nor model.safetensors is there/);
    fs.renameSync(`${indexPath}.bak`, indexPath);
    fs.writeFileSync(indexPath, '{"weight_map": {');
    expectCheckpointError(dir, /model.safetensors.index.json: not valid JSON/);
    setIndex(undefined);
    expectCheckpointError(dir, /model.safetensors.index.json has no 'weight_map' object/);
    setIndex(['model-00001-of-00003.safetensors']);
    expectCheckpointError(dir, /has no 'weight_map' object/);
    setIndex({ 'model.norm.weight': 7 });
    expectCheckpointError(dir, /weight_map\['model.norm.weight'\] must be a file name; found 7/);
  });

  it('index entries that leave the folder are refused before any file is opened (../, absolute, sub/, NUL)', () => {
    const { dir, built, setIndex } = fresh();
    // A valid shard outside the folder: were it opened, the layer would load.
    const outsideDir = join(root, `outside-${n++}`);
    fs.mkdirSync(outsideDir);
    const gateFile = built.weightMap['model.layers.1.mlp.gate.weight'] as string;
    fs.copyFileSync(join(dir, gateFile), join(outsideDir, gateFile));
    for (const file of [
      `../${join('..', root.split('/').pop() as string, outsideDir.split('/').pop() as string, gateFile)}`,
      join(outsideDir, gateFile),
      `sub/${gateFile}`,
      '..',
      'a\0b',
    ]) {
      setIndex({ ...built.weightMap, 'model.layers.1.mlp.gate.weight': file });
      expectCheckpointError(
        dir,
        /model.safetensors.index.json: weight_map\['model.layers.1.mlp.gate.weight'\]: .* is not a plain file name/,
      );
    }
  });

  it('a shard that is a link leading out of the folder, a directory, or a FIFO is not read', () => {
    const { dir, built } = fresh();
    const gateFile = built.weightMap['model.layers.1.mlp.gate.weight'] as string;
    const outside = join(root, `outside-shard-${n++}.safetensors`);
    fs.renameSync(join(dir, gateFile), outside);
    fs.symlinkSync(outside, join(dir, gateFile));
    expectCheckpointError(dir, new RegExp(`${gateFile}: resolves outside its folder through a symbolic link`));
    fs.rmSync(join(dir, gateFile));
    fs.mkdirSync(join(dir, gateFile));
    expectCheckpointError(dir, new RegExp(`${gateFile}.*is a directory; only regular files are read`));
    fs.rmdirSync(join(dir, gateFile));
    if (spawnSync('mkfifo', [join(dir, gateFile)]).status === 0)
      expectCheckpointError(dir, new RegExp(`${gateFile}.*is a FIFO; only regular files are read`));
  });
});

describe('tensors', () => {
  it('a shard the index names is missing: the file and the tensor are named', () => {
    const { dir, built } = fresh();
    const file = built.weightMap[expertName(1, 3, 'up')] as string;
    fs.rmSync(join(dir, file));
    expectCheckpointError(dir, new RegExp(`${file} is missing \\(model.safetensors.index.json puts '[^']+' there\\)`));
  });

  it('a tensor missing from the weight map, or from the shard the map names', () => {
    const { dir, built, setIndex } = fresh();
    const name = expertName(1, 3, 'up');
    const { [name]: _, ...rest } = built.weightMap;
    setIndex(rest);
    expectCheckpointError(
      dir,
      new RegExp(
        `tensor '${name.replace(/\./g, '\\.')}' is not in the checkpoint \\(\\d+ tensors; similar: model\\.layers\\.\\d\\.mlp\\.experts\\.\\d+\\.up_proj\\.weight`,
      ),
    );
    const other = built.files.find((f: string) => f !== built.weightMap[name]);
    setIndex({ ...built.weightMap, [name]: other });
    expectCheckpointError(
      dir,
      new RegExp(`${other} does not hold tensor '${name.replace(/\./g, '\\.')}' although model.safetensors.index.json puts it there`),
    );
  });

  it("a shard holding a tensor of a dtype moe-ep does not read (not one of the MoE block's) still serves the block", () => {
    // A review found one such tensor anywhere in a shard made every MoE tensor in it unreadable.
    const dir = join(root, `c${n++}`);
    const built = buildHfCheckpoint(dir, cfg, { shards: 0, seed: 7 });
    const retyped = built.entries.map((e) => (e.name === 'model.layers.0.self_attn.q_proj.weight' ? { ...e, dtype: 'U16' } : e));
    writeSafetensorsFile(join(dir, 'model.safetensors'), retyped);
    using ckpt = HfMoECheckpoint.open(dir);
    expect(ckpt.weightMap.has('model.layers.0.self_attn.q_proj.weight')).toBe(true);
    expect(ckpt.inspectLayer(1).problems).toEqual([]);
    using w = ckpt.readLayer(1, { device: 'cpu' });
    expect(w.w13.shape[0]).toBe(16);
  });

  it('a tensor of the wrong shape (config and files disagree) or dtype: file, tensor, both shapes', () => {
    const { dir } = fresh();
    fs.writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...cfg, moe_intermediate_size: 10 }));
    expectCheckpointError(
      dir,
      /model-\d+-of-\d+\.safetensors: tensor 'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' is \[8,16\] but the deepseek_v3 config \(config.json\) needs \[10,16\]/,
    );
    fs.writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...cfg, n_routed_experts: 32 }));
    expectCheckpointError(
      dir,
      /tensor 'model\.layers\.1\.mlp\.gate\.weight' is \[16,16\] but the deepseek_v3 config \(config.json\) needs \[32,16\]/,
    );
    // The same config given as options.config is named as such, not as the folder's config.json.
    using given = HfMoECheckpoint.open(dir, { config: { ...cfg, n_routed_experts: 32 } });
    expect(() => given.readLayer(1, { device: 'cpu' })).toThrow(/but the deepseek_v3 config \(options\.config\) needs \[32,16\]/);
    // One expert rewritten as I32, another as FP8: the message says what is read.
    const single = join(root, `c${n++}`);
    const built = buildHfCheckpoint(single, cfg, { shards: 0, seed: 3 });
    const entries = built.entries.map((e) =>
      e.name === expertName(1, 2, 'down')
        ? { ...e, dtype: 'I16' }
        : e.name === expertName(1, 5, 'gate')
          ? { ...e, dtype: 'F8_E4M3', shape: [e.shape[0] as number, 2 * (e.shape[1] as number)] }
          : e,
    );
    writeSafetensorsFile(join(single, 'model.safetensors'), entries);
    expectCheckpointError(
      single,
      /model\.safetensors: tensor 'model\.layers\.1\.mlp\.experts\.2\.down_proj\.weight' is I16; the MoE weights are read from BF16, F16, F32, or F8_E4M3/,
    );
    writeSafetensorsFile(
      join(single, 'model.safetensors'),
      entries.map((e) => (e.dtype === 'I16' ? { ...e, dtype: 'BF16' } : e)),
    );
    expectCheckpointError(
      single,
      /model.safetensors: tensor 'model\.layers\.1\.mlp\.experts\.5\.gate_proj\.weight' is fp8e4m3; the MoE weights are read from BF16, F16, F32, or F8_E4M3 with 'model\.layers\.1\.mlp\.experts\.5\.gate_proj\.weight_scale_inv' block scales \(there is no/,
    );
  });

  it('fused experts (Granite, Qwen3-VL-MoE): a wrong shape names both; FP8 (even with scales) and other dtypes are refused; inspect agrees', () => {
    const granite = testConfigs.granitemoehybrid;
    const dir = join(root, `c${n++}`);
    const built = buildHfCheckpoint(dir, granite, { shards: 0, seed: 5 });
    const gateUp = 'model.layers.1.block_sparse_moe.input_linear.weight';
    // config.json's expert width disagrees with the fused tensor: named before anything is allocated.
    fs.writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...granite, intermediate_size: 5 }));
    expectCheckpointError(
      dir,
      /model\.safetensors: tensor 'model\.layers\.1\.block_sparse_moe\.input_linear\.weight' is \[16,8,16\] but the granitemoehybrid config \(config\.json\) needs \[16,10,16\]/,
    );
    fs.writeFileSync(join(dir, 'config.json'), JSON.stringify(granite));
    // FP8 with a scale tensor beside it: DeepSeek-V3's block layout is for 2-D weights, not fused ones.
    const fp8 = built.entries.flatMap((e) =>
      e.name === gateUp
        ? [
            { ...e, dtype: 'F8_E4M3', shape: [16, 8, 32] },
            { name: `${gateUp}_scale_inv`, dtype: 'F32', shape: [1, 1], bytes: new Uint8Array(4) },
          ]
        : [e],
    );
    writeSafetensorsFile(join(dir, 'model.safetensors'), fp8);
    const fused =
      /model\.safetensors: tensor 'model\.layers\.1\.block_sparse_moe\.input_linear\.weight' is fp8e4m3; fused expert tensors are read from BF16, F16 or F32/;
    expectCheckpointError(dir, fused);
    {
      using ckpt = HfMoECheckpoint.open(dir);
      const inspected = ckpt.inspectLayer(1);
      expect(inspected.problems).toHaveLength(1);
      expect(inspected.problems[0]).toMatch(fused);
    }
    writeSafetensorsFile(
      join(dir, 'model.safetensors'),
      built.entries.map((e) => (e.name === 'model.layers.1.block_sparse_moe.output_linear.weight' ? { ...e, dtype: 'I16' } : e)),
    );
    expectCheckpointError(dir, /tensor 'model\.layers\.1\.block_sparse_moe\.output_linear\.weight' is I16; fused expert tensors are read/);
    // Qwen3-VL-MoE's down_proj given as nn.Linear weights ([E,H,F], the transpose of its layout).
    const qvl = join(root, `c${n++}`);
    const q = buildHfCheckpoint(qvl, testConfigs.qwen3_vl_moe, { shards: 0, seed: 6 });
    const down = 'model.language_model.layers.0.mlp.experts.down_proj';
    writeSafetensorsFile(
      join(qvl, 'model.safetensors'),
      q.entries.map((e) => (e.name === down ? { ...e, shape: [8, 16, 6] } : e)),
    );
    let err: unknown;
    try {
      using ckpt = HfMoECheckpoint.open(qvl);
      ckpt.readLayer(0, { device: 'cpu' }).dispose();
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(CheckpointError);
    expect((err as Error).message).toMatch(
      /tensor 'model\.language_model\.layers\.0\.mlp\.experts\.down_proj' is \[8,16,6\] but the qwen3_vl_moe config \(config\.json\) needs \[8,6,16\]/,
    );
  });

  it("gpt-oss's MXFP4: blocks not U8, scales missing or of the wrong shape, widths that are not multiples of 32; inspect names the one problem", () => {
    const go = testConfigs.gpt_oss;
    const dir = join(root, `c${n++}`);
    const built = buildHfCheckpoint(dir, go, { shards: 0, seed: 7 });
    const blocks = 'model.layers.1.mlp.experts.gate_up_proj_blocks';
    const scales = 'model.layers.1.mlp.experts.down_proj_scales';
    const rewrite = (map: (e: (typeof built.entries)[number]) => (typeof built.entries)[number] | null): void => {
      writeSafetensorsFile(
        join(dir, 'model.safetensors'),
        built.entries.map(map).filter((e) => e !== null),
      );
    };
    rewrite((e) => (e.name === blocks ? { ...e, dtype: 'BF16', shape: [8, 64, 2, 8] } : e));
    expectCheckpointError(
      dir,
      /model\.safetensors: tensor 'model\.layers\.1\.mlp\.experts\.gate_up_proj_blocks' is bf16; MXFP4 blocks and scales are U8/,
    );
    rewrite((e) => (e.name === scales ? null : e));
    expectCheckpointError(dir, /tensor 'model\.layers\.1\.mlp\.experts\.down_proj_scales' is not in the checkpoint/);
    rewrite((e) => (e.name === scales ? { ...e, shape: [8, 32, 2] } : e));
    expectCheckpointError(
      dir,
      /tensor 'model\.layers\.1\.mlp\.experts\.down_proj_scales' is \[8,32,2\] but the gpt_oss config \(config\.json\) needs \[8,64,1\]/,
    );
    rewrite((e) => e);
    fs.writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...go, intermediate_size: 40 }));
    const width =
      /the experts are in MXFP4 \('model\.layers\.1\.mlp\.experts\.gate_up_proj_blocks'\), whose blocks hold 32 values of a row: intermediate_size 40 is not a multiple of 32/;
    expectCheckpointError(dir, width);
    using ckpt = HfMoECheckpoint.open(dir);
    // The experts' one problem is the width (not every tensor of an unpacked layout besides).
    const problems = ckpt.inspectLayer(1).problems;
    expect(problems).toHaveLength(1);
    expect(problems[0]).toMatch(width);
  });

  it('FP8 weights: a block size other than 128×128, columns not a multiple of 128, scales of the wrong shape', () => {
    const fp8cfg = {
      ...cfg,
      hidden_size: 128,
      moe_intermediate_size: 128,
      n_routed_experts: 8,
      num_experts_per_tok: 4,
      n_group: 4,
      topk_group: 2,
      n_shared_experts: 1,
      num_hidden_layers: 2,
    };
    const dir = join(root, `c${n++}`);
    const built = buildHfCheckpoint(dir, fp8cfg, { shards: 0, seed: 4, fp8: true });
    fs.writeFileSync(
      join(dir, 'config.json'),
      JSON.stringify({ ...fp8cfg, quantization_config: { quant_method: 'fp8', weight_block_size: [1, 128] } }),
    );
    expectCheckpointError(
      dir,
      /config.json: quantization_config.weight_block_size \[1,128\]: FP8 weights are read with 128×128 blocks only/,
    );
    fs.writeFileSync(join(dir, 'config.json'), JSON.stringify(fp8cfg));
    const name = expertName(1, 1, 'up');
    const entries = built.entries.map((e) => (e.name === `${name}_scale_inv` ? { ...e, shape: [1, 2], bytes: new Uint8Array(8) } : e));
    writeSafetensorsFile(join(dir, 'model.safetensors'), entries);
    expectCheckpointError(
      dir,
      new RegExp(
        `tensor '${name.replace(/\./g, '\\.')}_scale_inv' is \\[1,2\\] but the deepseek_v3 config \\(config.json\\) needs \\[1,1\\]`,
      ),
    );
    // 96 columns: H = 96 cannot be split into 128-wide blocks.
    const narrow = join(root, `c${n++}`);
    buildHfCheckpoint(narrow, { ...fp8cfg, hidden_size: 96 }, { shards: 0, seed: 4, fp8: true });
    expectCheckpointError(
      narrow,
      /model.safetensors: FP8 tensor 'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' has 96 columns, not a multiple of 128/,
    );
  });

  it('a truncated shard or one with trailing bytes: the file (and the tensor running past the end) are named', () => {
    const { dir, built } = fresh();
    const file = built.weightMap[expertName(1, 0, 'gate')] as string;
    const path = join(dir, file);
    const { tensors } = readHeader(path);
    const last = Object.entries(tensors as Record<string, { data_offsets: number[] }>).sort(
      (a, b) => (b[1].data_offsets[1] as number) - (a[1].data_offsets[1] as number),
    )[0] as [string, unknown];
    const bytes = fs.readFileSync(path);
    fs.writeFileSync(path, bytes.subarray(0, bytes.length - 10));
    expectCheckpointError(
      dir,
      new RegExp(`safetensors ${file} tensor '${last[0].replace(/\./g, '\\.')}': data_offsets .* run past the end of the data .*truncated`),
    );
    fs.writeFileSync(path, Buffer.concat([bytes, Buffer.alloc(6)]));
    expectCheckpointError(
      dir,
      new RegExp(`safetensors ${file}: the tensors end at data byte \\d+ but the file holds \\d+ data bytes \\(trailing bytes\\)`),
    );
  });
});

describe('calls', () => {
  it('a layer without an MoE block, an EP size that does not divide the experts', () => {
    const { dir } = fresh();
    using ckpt = HfMoECheckpoint.open(dir);
    expect(() => ckpt.readLayer(0, { device: 'cpu' })).toThrow(InvalidArgumentError);
    expect(() => ckpt.readLayer(0, { device: 'cpu' })).toThrow(/layer 0 has no MoE block \(the MoE layers are 1, 2 of 3\)/);
    expect(() => ckpt.readLayer(1, { worldSize: 3, device: 'cpu' })).toThrow(/'numExperts' 16 must be a multiple of the EP size 3/);
    expect(() => ckpt.readLayer(1, { rank: 2, worldSize: 2, device: 'cpu' })).toThrow(/'rank' 2 is not in \[0, 2\)/);
    expect(() => ckpt.readLayer(1, { dtype: 'f16' as never, device: 'cpu' })).toThrow(/'dtype' must be 'bf16' or 'f32'/);
    expect(() => MoEInference.fromHf(ckpt, 1, { device: 'cpu', hidden: 3 } as never)).toThrow(/hidden/);
    expect(() => HfMoECheckpoint.open(dir, { bogus: 1 } as never)).toThrow(/bogus/);
  });

  it("files a rank does not need are never opened: a garbage shard holding only other ranks' experts does not stop it", () => {
    const { dir, built } = fresh({ shards: 4 });
    const layer = 2,
      P = 2,
      E = cfg.n_routed_experts as number;
    for (let r = 0; r < P; r++) {
      const needed = new Set<string>(
        [
          `model.layers.${layer}.mlp.gate.weight`,
          `model.layers.${layer}.mlp.gate.e_score_correction_bias`,
          ...['gate', 'up', 'down'].map((x) => `model.layers.${layer}.mlp.shared_experts.${x}_proj.weight`),
        ].map((t) => built.weightMap[t] as string),
      );
      for (let j = r * (E / P); j < (r + 1) * (E / P); j++)
        for (const x of ['gate', 'up', 'down']) needed.add(built.weightMap[expertName(layer, j, x)] as string);
      const unneeded = built.files.filter((f: string) => !needed.has(f));
      expect(unneeded.length, `rank ${r}: some shard holds none of its tensors`).toBeGreaterThan(0);
      const copy = `${dir}-r${r}`;
      fs.cpSync(dir, copy, { recursive: true });
      for (const f of unneeded) fs.writeFileSync(join(copy, f), 'not a safetensors file');
      using ckpt = HfMoECheckpoint.open(copy);
      using w = ckpt.readLayer(layer, { rank: r, worldSize: P, device: 'cpu' });
      expect(w.localExperts).toBe(E / P);
      expect(ckpt.stats.filesOpened).toBe(needed.size);
      // And a rank that needs it fails naming it.
      if (r === 0) {
        const other = `${dir}-bad`;
        fs.cpSync(dir, other, { recursive: true });
        const f = [...needed][0] as string;
        fs.writeFileSync(join(other, f), 'not a safetensors file');
        expectCheckpointError(other, new RegExp(`safetensors ${f}: the header length \\d+ is larger than the file`));
      }
    }
  });
});

// Found by an audit (session 20).
describe('config.json sizes that disagree with the files, and bad layer indices', () => {
  it('a huge size in config.json is refused naming the tensor before anything that size is allocated', () => {
    const { dir } = fresh();
    const path = join(dir, 'config.json');
    const config = JSON.parse(fs.readFileSync(path, 'utf8')) as Record<string, unknown>;
    for (const [field, value] of [
      ['hidden_size', 2 ** 40],
      ['moe_intermediate_size', 2 ** 36],
    ] as const) {
      fs.writeFileSync(path, JSON.stringify({ ...config, [field]: value }));
      expectCheckpointError(dir, /tensor 'model\.layers\.1\.mlp\.\S+' is \[\d+,\d+\] but the deepseek_v3 config \(config\.json\) needs \[/);
    }
    fs.writeFileSync(path, JSON.stringify({ ...config, moe_intermediate_size: 2 ** 30, n_shared_experts: 2 ** 30 }));
    expect(() => HfMoECheckpoint.open(dir)).toThrow(/'moe_intermediate_size' × 'n_shared_experts' = 1073741824 × 1073741824 is beyond/);
  });

  it("a layer given as a string is refused as such (it said 'layer 1 has no MoE block (the MoE layers are … 1 …)')", () => {
    const { dir } = fresh();
    using ckpt = HfMoECheckpoint.open(dir);
    expect(() => ckpt.readLayer('1' as never, { device: 'cpu' })).toThrow(/'layer' must be an integer; received "1"/);
  });
});
