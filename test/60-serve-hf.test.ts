// Serving Hugging Face MoE checkpoints: small checkpoints in the Mixtral, DeepSeek-V3, Qwen2-MoE and
// Qwen3-MoE layouts are built here (test/hf-fixtures.mjs), loaded into MoEInference on the CPU and
// compared with plain-loop float64 references of each family's MoE block (test/hf-moe-reference.mjs).
// Also: config mapping, each rank reading only its experts' bytes, and the training layer built
// from the same files (moeLayerFromHf) against the same references. Seeds are in the test names and failure messages.
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { CheckpointError, HfMoECheckpoint, hfMoEModel, MoEInference, MoELayer, moeLayerFromHf, Tensor, tidy } from '../lib/index.js';
import { disposeSaved } from '../lib/moe/layer.js';
import {
  blockNames,
  buildHfCheckpoint,
  encode,
  type MoEBlockWeights,
  normals,
  poisonRows,
  poisonTensors,
  testConfigs,
} from './hf-fixtures.mjs';
import { hfMoEReference, moeLayersOf, moeSizes } from './hf-moe-reference.mjs';
import { relErr } from './helpers.js';

const root = fs.mkdtempSync(join(tmpdir(), 'moe-serve-hf-'));
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));
let n = 0;
const fresh = (): string => join(root, `ckpt-${n++}`);
type Family = keyof typeof testConfigs;
const families = Object.keys(testConfigs) as Family[];

/** Tokens x [T,H] in float64 (already representable in `dtype`) and as a tensor of `dtype`. */
function tokens(T: number, H: number, seed: number, dtype: 'bf16' | 'f32'): { x64: Float64Array; x: Tensor } {
  const { decoded } = encode(normals(seed)(T * H), dtype);
  return { x64: decoded, x: Tensor.fromArray(Float32Array.from(decoded), { shape: [T, H], dtype, device: 'cpu' }) };
}

/**
 * Builds a checkpoint, and a set of tokens whose routing is far from ties (the margin the
 * reference reports), trying successive seeds; every seed tried is in the returned description.
 */
function checkpointAndTokens(
  family: Family,
  opts: { dtype: 'bf16' | 'f16' | 'f32'; shards: number; layerDtype: 'bf16' | 'f32'; T: number; seed: number },
) {
  const dir = fresh();
  const cfg = testConfigs[family];
  const built = buildHfCheckpoint(dir, cfg, { dtype: opts.dtype, shards: opts.shards, seed: opts.seed });
  const { H } = moeSizes(cfg);
  // A bf16 layer rounds what the files hold wider (Hunyuan's F32 gate) to bf16: the reference takes
  // the same values, so that its routing margin speaks for the layer's routing.
  const asLayer = (w: MoEBlockWeights): MoEBlockWeights =>
    opts.layerDtype === 'bf16' ? { ...w, gate: encode(w.gate, 'bf16').decoded } : w;
  for (let s = opts.seed; ; s++) {
    const { x64, x } = tokens(opts.T, H, 1000 + s, opts.layerDtype);
    const refs = new Map([...built.layers].map(([l, w]) => [l, hfMoEReference(cfg, asLayer(w), x64)]));
    const ok = [...refs.values()].every((r) => r.margin > 1e-4 && r.minChoice > 0);
    if (ok || s > opts.seed + 20)
      return {
        dir,
        cfg,
        built,
        x,
        refs,
        what: `${family}, ${opts.dtype} files, ${opts.shards} shard(s), layer ${opts.layerDtype}, seed ${opts.seed}, token seed ${1000 + s}`,
      };
    x.dispose();
  }
}

describe('config.json → the package (hfMoEModel)', () => {
  it('maps each family onto router options, expert sizes and MoE layers', () => {
    const m = hfMoEModel(testConfigs.mixtral);
    expect(m.block).toEqual({
      family: 'mixtral',
      hidden: 16,
      ffn: 12,
      numExperts: 8,
      topK: 2,
      scoreFunction: 'softmax',
      groups: 1,
      topkGroups: 1,
      normalize: true,
      routeScale: 1,
      selectionBias: false,
      sharedFfn: 0,
      sharedGate: false,
      routeWeightsOn: 'output',
      routerBias: false,
      expertBias: false,
      activation: { kind: 'swiglu' },
    });
    expect(m.moeLayers).toEqual([0, 1]);
    const d = hfMoEModel(testConfigs.deepseek_v3);
    expect(d.block).toEqual({
      family: 'deepseek_v3',
      hidden: 16,
      ffn: 8,
      numExperts: 16,
      topK: 4,
      scoreFunction: 'sigmoid',
      groups: 4,
      topkGroups: 2,
      groupTop: 2,
      normalize: true,
      routeScale: 2.5,
      selectionBias: true,
      sharedFfn: 16,
      sharedGate: false,
      routeWeightsOn: 'output',
      routerBias: false,
      expertBias: false,
      activation: { kind: 'swiglu' },
    });
    expect(d.moeLayers).toEqual([1, 2]);
    const q = hfMoEModel(testConfigs.qwen2_moe);
    expect(q.block).toMatchObject({
      family: 'qwen2_moe',
      scoreFunction: 'softmax',
      normalize: false,
      sharedFfn: 20,
      sharedGate: true,
      groups: 1,
    });
    expect(q.moeLayers).toEqual([1, 2]);
    expect(hfMoEModel(testConfigs.qwen3_moe).block).toMatchObject({ normalize: true, sharedFfn: 0, sharedGate: false });
    // The same blocks under other model_types, with their config classes' defaults where the test
    // configs leave a field out (GLM-4.5: one group, renormalised; dots1: not renormalised;
    // Qwen3-Next: renormalised; OLMoE: not, its experts' width in intermediate_size).
    expect(hfMoEModel(testConfigs.kimi_k2).block).toMatchObject({
      scoreFunction: 'sigmoid',
      selectionBias: true,
      groups: 1,
      routeScale: 2.827,
      sharedFfn: 8,
    });
    // Kimi K2 runs DeepSeek's own code: its config class's defaults (V3's), and no renormalisation of a lone weight.
    expect(hfMoEModel({ ...testConfigs.kimi_k2, routed_scaling_factor: undefined, n_shared_experts: undefined }).block).toMatchObject({
      routeScale: 2.5,
      sharedFfn: 8,
    });
    expect(hfMoEModel({ ...testConfigs.kimi_k2, num_experts_per_tok: 1 }).block.normalize).toBe(false);
    expect(hfMoEModel({ ...testConfigs.deepseek_v3, n_group: 1, topk_group: 1, num_experts_per_tok: 1 }).block.normalize).toBe(true);
    expect(hfMoEModel(testConfigs.glm4_moe).block).toMatchObject({
      scoreFunction: 'sigmoid',
      selectionBias: true,
      groups: 1,
      normalize: true,
      routeScale: 2.5,
      sharedFfn: 8,
    });
    expect(hfMoEModel({ ...testConfigs.glm4_moe, routed_scaling_factor: undefined }).block.routeScale).toBe(1);
    expect(hfMoEModel(testConfigs.glm4_moe).moeLayers).toEqual([1, 2]);
    expect(hfMoEModel({ ...testConfigs.glm4_moe, first_k_dense_replace: undefined }).moeLayers).toEqual([1, 2]);
    expect(hfMoEModel(testConfigs.dots1).block).toMatchObject({ normalize: false, routeScale: 2.5, sharedFfn: 12, topK: 3 });
    expect(hfMoEModel(testConfigs.dots1).moeLayers).toEqual([0, 1]);
    expect(hfMoEModel(testConfigs.qwen3_next).block).toMatchObject({
      scoreFunction: 'softmax',
      normalize: true,
      sharedFfn: 8,
      sharedGate: true,
    });
    expect(hfMoEModel(testConfigs.olmoe).block).toMatchObject({
      scoreFunction: 'softmax',
      normalize: false,
      ffn: 8,
      sharedFfn: 0,
      sharedGate: false,
    });
    expect(hfMoEModel({ ...testConfigs.olmoe, decoder_sparse_step: 2 }).moeLayers).toEqual([0, 1]); // not read: every layer
    // Ernie 4.5: softmax with a selection bias, always renormalised, ungated shared experts of
    // moe_intermediate_size · moe_num_shared_experts; MoE from layer 1 (the default start) to the last.
    expect(hfMoEModel(testConfigs.ernie4_5_moe).block).toMatchObject({
      scoreFunction: 'softmax',
      selectionBias: true,
      normalize: true,
      numExperts: 8,
      topK: 3,
      sharedFfn: 12,
      sharedGate: false,
    });
    expect(hfMoEModel(testConfigs.ernie4_5_moe).moeLayers).toEqual([1, 2]);
    expect(
      hfMoEModel({
        ...testConfigs.ernie4_5_moe,
        num_hidden_layers: 8,
        moe_layer_start_index: 2,
        moe_layer_end_index: 6,
        moe_layer_interval: 2,
      }).moeLayers,
    ).toEqual([3, 5]);
    // MiniMax-M2: Mixtral's layout, DeepSeek-V3's sigmoid and selection bias, renormalised, every layer.
    expect(hfMoEModel(testConfigs.minimax_m2).block).toMatchObject({
      scoreFunction: 'sigmoid',
      selectionBias: true,
      normalize: true,
      routeScale: 1,
      groups: 1,
      ffn: 8,
      numExperts: 8,
      topK: 3,
      sharedFfn: 0,
    });
    expect(hfMoEModel(testConfigs.minimax_m2).moeLayers).toEqual([0, 1]);
    // Hunyuan: softmax, renormalised for k > 1 only, an ungated shared MLP of the experts' width
    // (intermediate_size), per-layer lists holding one value; every layer MoE.
    expect(hfMoEModel(testConfigs.hunyuan_v1_moe).block).toMatchObject({
      scoreFunction: 'softmax',
      selectionBias: false,
      normalize: true,
      ffn: 8,
      numExperts: 8,
      topK: 3,
      sharedFfn: 8,
      sharedGate: false,
    });
    expect(hfMoEModel(testConfigs.hunyuan_v1_moe).moeLayers).toEqual([0, 1]);
    expect(hfMoEModel({ ...testConfigs.hunyuan_v1_moe, moe_topk: 1, num_experts: 4 }).block).toMatchObject({
      topK: 1,
      numExperts: 4,
      normalize: false,
    });
    // Qwen3-VL-MoE: the language model's fields from text_config; renormalised although norm_topk_prob says false.
    expect(hfMoEModel(testConfigs.qwen3_vl_moe)).toMatchObject({
      block: { family: 'qwen3_vl_moe', hidden: 16, ffn: 6, numExperts: 8, topK: 3, normalize: true, sharedFfn: 0, sharedGate: false },
      numLayers: 3,
      moeLayers: [0, 2],
    });
    // Granite: softmax over the top-k logits (the renormalised top-k), every layer MoE; the shared
    // MLP's width from shared_intermediate_size, its default none (granitemoeshared) or 1024 (hybrid).
    const granite = { scoreFunction: 'softmax', normalize: true, selectionBias: false, sharedGate: false, routeScale: 1 };
    expect(hfMoEModel(testConfigs.granitemoe)).toMatchObject({
      block: { ...granite, ffn: 8, numExperts: 8, topK: 2, sharedFfn: 0 },
      moeLayers: [0, 1],
    });
    expect(hfMoEModel({ ...testConfigs.granitemoe, shared_intermediate_size: 64 }).block.sharedFfn).toBe(0); // not GraniteMoe's field
    expect(hfMoEModel(testConfigs.granitemoeshared).block).toMatchObject({ ...granite, ffn: 6, topK: 3, sharedFfn: 10 });
    expect(hfMoEModel({ ...testConfigs.granitemoeshared, shared_intermediate_size: undefined }).block.sharedFfn).toBe(0);
    expect(hfMoEModel(testConfigs.granitemoehybrid)).toMatchObject({
      block: { ...granite, ffn: 4, numExperts: 16, topK: 4, sharedFfn: 8 },
      moeLayers: [0, 1],
    });
    expect(hfMoEModel({ ...testConfigs.granitemoehybrid, shared_intermediate_size: undefined }).block.sharedFfn).toBe(1024);
    // Llama 4: top-1 sigmoid weights on the experts' input, a shared expert of the experts' width;
    // every interleave_moe_layer_step-th layer from step − 1, or moe_layers as listed.
    const l4 = testConfigs.llama4;
    const l4text = l4.text_config as Record<string, unknown>;
    expect(hfMoEModel(l4)).toMatchObject({
      block: {
        scoreFunction: 'sigmoid',
        normalize: false,
        topK: 1,
        numExperts: 8,
        ffn: 6,
        sharedFfn: 6,
        sharedGate: false,
        routeWeightsOn: 'input',
      },
      numLayers: 4,
      moeLayers: [1, 3],
    });
    expect(hfMoEModel({ ...l4, text_config: { ...l4text, interleave_moe_layer_step: undefined } }).moeLayers).toEqual([0, 1, 2, 3]);
    expect(hfMoEModel({ ...l4, text_config: { ...l4text, moe_layers: [0, 2] } }).moeLayers).toEqual([0, 2]);
    expect(hfMoEModel({ ...l4, text_config: { ...l4text, num_experts_per_tok: undefined } }).block.topK).toBe(1);
    for (const f of families) if (f !== 'llama4') expect(hfMoEModel(testConfigs[f]).block.routeWeightsOn).toBe('output');
    // gpt-oss: the router's bias on the logits, top-k then softmax over the k (renormalised), the
    // experts' biases and clamped SwiGLU with its limit from swiglu_limit; experts_per_token read too.
    expect(hfMoEModel(testConfigs.gpt_oss)).toMatchObject({
      block: {
        scoreFunction: 'softmax',
        normalize: true,
        topK: 2,
        numExperts: 8,
        ffn: 32,
        hidden: 64,
        sharedFfn: 0,
        routerBias: true,
        expertBias: true,
        activation: { kind: 'clamped-swiglu', alpha: 1.702, limit: 7 },
      },
      moeLayers: [0, 1],
    });
    expect(hfMoEModel({ ...testConfigs.gpt_oss, num_experts_per_tok: undefined, experts_per_token: 3 }).block.topK).toBe(3);
    expect(hfMoEModel({ ...testConfigs.gpt_oss, swiglu_limit: undefined }).block.activation).toEqual({
      kind: 'clamped-swiglu',
      alpha: 1.702,
      limit: 7,
    });
    for (const f of families)
      if (f !== 'gpt_oss')
        expect(hfMoEModel(testConfigs[f]).block).toMatchObject({ routerBias: false, expertBias: false, activation: { kind: 'swiglu' } });
    // The layer rules agree with the reference's own reading of the fields.
    for (const f of families) expect(hfMoEModel(testConfigs[f]).moeLayers).toEqual(moeLayersOf(testConfigs[f]));
    expect(hfMoEModel({ ...testConfigs.qwen2_moe, decoder_sparse_step: 2, mlp_only_layers: [], num_hidden_layers: 6 }).moeLayers).toEqual([
      1, 3, 5,
    ]);
    expect(hfMoEModel({ ...testConfigs.deepseek_v3, first_k_dense_replace: 3, moe_layer_freq: 2, num_hidden_layers: 9 }).moeLayers).toEqual(
      [4, 6, 8],
    );
    // DeepSeek-V3's released shape: 256 experts in 8 groups, top-4 groups, top-8 (the group score's top 2 = 8/4).
    const v3 = hfMoEModel({
      ...testConfigs.deepseek_v3,
      n_routed_experts: 256,
      num_experts_per_tok: 8,
      n_group: 8,
      topk_group: 4,
      n_shared_experts: 1,
      moe_intermediate_size: 2048,
      hidden_size: 7168,
    });
    expect(v3.block).toMatchObject({ groups: 8, topkGroups: 4, topK: 8, sharedFfn: 2048 });
    // DeepSeek-V2: group_limited_greedy scores a group by its maximum (groupTop 1), weights × routed_scaling_factor.
    expect(hfMoEModel(testConfigs.deepseek_v2)).toEqual({
      block: {
        family: 'deepseek_v2',
        hidden: 16,
        ffn: 8,
        numExperts: 16,
        topK: 5,
        scoreFunction: 'softmax',
        groups: 4,
        topkGroups: 3,
        groupTop: 1,
        normalize: false,
        routeScale: 16,
        selectionBias: false,
        sharedFfn: 16,
        sharedGate: false,
        routeWeightsOn: 'output',
        routerBias: false,
        expertBias: false,
        activation: { kind: 'swiglu' },
      },
      numLayers: 3,
      moeLayers: [1, 2],
    });
    // V2-Lite: 'greedy' (or DeepSeek's 'gready') is plain top-k whatever n_group says; the defaults: scale 1, every layer.
    expect(hfMoEModel(testConfigs.deepseek_v2_lite).block).toMatchObject({ groups: 1, topkGroups: 1, normalize: false, routeScale: 1 });
    expect(hfMoEModel(testConfigs.deepseek_v2_lite).block.groupTop).toBeUndefined();
    expect(
      hfMoEModel({
        ...testConfigs.deepseek_v2_lite,
        topk_method: undefined,
        routed_scaling_factor: undefined,
        first_k_dense_replace: undefined,
      }),
    ).toMatchObject({ block: { groups: 1, routeScale: 1 }, moeLayers: [0, 1] });
    expect(hfMoEModel({ ...testConfigs.deepseek_v2, topk_group: 4 }).block).toMatchObject({ groups: 1, topkGroups: 1 });
    // Jamba: softmax top-k as it is (never renormalised), MoE every expert_layer_period-th layer from the offset.
    expect(hfMoEModel(testConfigs.jamba)).toEqual({
      block: {
        family: 'jamba',
        hidden: 16,
        ffn: 10,
        numExperts: 8,
        topK: 2,
        scoreFunction: 'softmax',
        groups: 1,
        topkGroups: 1,
        normalize: false,
        routeScale: 1,
        selectionBias: false,
        sharedFfn: 0,
        sharedGate: false,
        routeWeightsOn: 'output',
        routerBias: false,
        expertBias: false,
        activation: { kind: 'swiglu' },
      },
      numLayers: 4,
      moeLayers: [1, 3],
    });
    expect(
      hfMoEModel({ ...testConfigs.jamba, expert_layer_period: undefined, expert_layer_offset: undefined, num_hidden_layers: 6 }).moeLayers,
    ).toEqual([1, 3, 5]);
    expect(hfMoEModel({ ...testConfigs.jamba, expert_layer_period: 4, expert_layer_offset: 0, num_hidden_layers: 8 }).moeLayers).toEqual([
      0, 4,
    ]);
    // DeepSeekMoE v1: as published (not renormalised, no scale), and renormalised only for top-k > 1.
    expect(hfMoEModel(testConfigs.deepseek)).toMatchObject({
      block: {
        family: 'deepseek',
        numExperts: 12,
        topK: 3,
        scoreFunction: 'softmax',
        groups: 1,
        normalize: false,
        routeScale: 1,
        sharedFfn: 16,
      },
      moeLayers: [1, 2],
    });
    expect(hfMoEModel({ ...testConfigs.deepseek, norm_topk_prob: true }).block.normalize).toBe(true);
    expect(hfMoEModel({ ...testConfigs.deepseek, norm_topk_prob: true, num_experts_per_tok: 1 }).block.normalize).toBe(false);
    expect(hfMoEModel({ ...testConfigs.deepseek, moe_layer_freq: 2, num_hidden_layers: 6 }).moeLayers).toEqual([2, 4]);
    // n_shared_experts null: DeepSeek's code builds none.
    expect(hfMoEModel({ ...testConfigs.deepseek, n_shared_experts: null }).block.sharedFfn).toBe(0);
    // Ling 2.0: sigmoid + expert_bias, 4 groups keep 2 by their top 2, renormalised × 2.5, one shared expert, layer 0 dense.
    expect(hfMoEModel(testConfigs.bailing_moe_v2)).toMatchObject({
      block: {
        family: 'bailing_moe',
        numExperts: 16,
        topK: 6,
        scoreFunction: 'sigmoid',
        groups: 4,
        topkGroups: 2,
        groupTop: 2,
        normalize: true,
        routeScale: 2.5,
        selectionBias: true,
        sharedFfn: 8,
      },
      moeLayers: [1, 2],
    });
    // Its class defaults: 8 groups keep 4, scale 1, one shared expert, the bias on, first layer dense.
    const lingDefaults = hfMoEModel({
      ...testConfigs.bailing_moe_v2,
      num_experts: 32,
      n_group: undefined,
      topk_group: undefined,
      routed_scaling_factor: undefined,
      num_shared_experts: undefined,
      moe_router_enable_expert_bias: undefined,
      first_k_dense_replace: undefined,
    });
    expect(lingDefaults).toMatchObject({
      block: { groups: 8, topkGroups: 4, routeScale: 1, sharedFfn: 8, selectionBias: true },
      moeLayers: [1, 2],
    });
    expect(hfMoEModel({ ...testConfigs.bailing_moe_v2, moe_router_enable_expert_bias: false }).block.selectionBias).toBe(false);
    // Ling 2.0 at top-1: nothing to renormalise, so norm_topk_prob false is no disagreement there.
    expect(hfMoEModel({ ...testConfigs.bailing_moe_v2, num_experts_per_tok: 1 }).block.normalize).toBe(false);
    expect(hfMoEModel({ ...testConfigs.bailing_moe_v2, num_experts_per_tok: 1, norm_topk_prob: false }).block.normalize).toBe(false);
    // Ling v1's class defaults: renormalised, no shared experts, every layer MoE; it reads no scale.
    expect(
      hfMoEModel({
        ...testConfigs.bailing_moe,
        norm_topk_prob: undefined,
        num_shared_experts: undefined,
        first_k_dense_replace: undefined,
        routed_scaling_factor: 2.5,
      }),
    ).toMatchObject({ block: { normalize: true, sharedFfn: 0, routeScale: 1 }, moeLayers: [0, 1] });
    // Ling v1: softmax, renormalised, no scale, no groups, every layer from first_k_dense_replace (0).
    expect(hfMoEModel(testConfigs.bailing_moe)).toMatchObject({
      block: { scoreFunction: 'softmax', groups: 1, normalize: true, routeScale: 1, selectionBias: false, sharedFfn: 12 },
      moeLayers: [0, 1],
    });
    // DBRX: softmax top-k divided by their 1-norm (renormalised) unless moe_normalize_expert_weights is null; every block MoE.
    expect(hfMoEModel(testConfigs.dbrx)).toMatchObject({
      block: { family: 'dbrx', hidden: 16, ffn: 8, numExperts: 8, topK: 3, scoreFunction: 'softmax', normalize: true, sharedFfn: 0 },
      numLayers: 2,
      moeLayers: [0, 1],
    });
    const dbrxFfnConfig = testConfigs.dbrx.ffn_config as Record<string, unknown>;
    expect(hfMoEModel({ ...testConfigs.dbrx, ffn_config: { ...dbrxFfnConfig, moe_normalize_expert_weights: null } }).block.normalize).toBe(
      false,
    );
    expect(hfMoEModel({ ...testConfigs.dbrx, ffn_config: { ...dbrxFfnConfig, moe_normalize_expert_weights: 1.0 } }).block.normalize).toBe(
      true,
    );
    // DeepSeek-V3 with top-6 from 2 groups: its group score stays the top 2 (before groupTop: refused).
    expect(hfMoEModel(testConfigs.deepseek_v3_top6).block).toMatchObject({ topK: 6, groups: 4, topkGroups: 2, groupTop: 2 });
    // Every group kept is plain top-k (Kimi-K2-like n_group = 1, or topk_group = n_group).
    expect(hfMoEModel({ ...testConfigs.deepseek_v3, n_group: 1, topk_group: 1 }).block).toMatchObject({ groups: 1, topkGroups: 1 });
    expect(hfMoEModel({ ...testConfigs.deepseek_v3, n_group: 4, topk_group: 4, num_experts_per_tok: 3 }).block).toMatchObject({
      groups: 1,
      topK: 3,
    });
  });

  it('refuses what it cannot serve, naming the field', () => {
    const bad = (cfg: object, re: RegExp): void => {
      expect(() => hfMoEModel(cfg)).toThrow(CheckpointError);
      expect(() => hfMoEModel(cfg)).toThrow(re);
    };
    bad(
      { ...testConfigs.mixtral, model_type: 'llama' },
      /'model_type' "llama" is not a supported MoE family \(mixtral, deepseek_v2, deepseek_v3, kimi_k2, glm4_moe, dots1, qwen2_moe, qwen3_moe, qwen3_next, olmoe, ernie4_5_moe, minimax_m2, hunyuan_v1_moe, qwen3_vl_moe, granitemoe, granitemoeshared, granitemoehybrid, llama4, gpt_oss, jamba, dbrx, deepseek, bailing_moe\)/,
    );
    bad({ ...testConfigs.mixtral, hidden_size: undefined }, /'hidden_size' is missing/);
    bad({ ...testConfigs.mixtral, num_local_experts: 2.5 }, /'num_local_experts' must be an integer >= 1; found 2.5/);
    bad(
      { ...testConfigs.deepseek_v3, num_experts_per_tok: 9 },
      /'num_experts_per_tok' = 9 is more than the 8 experts of the 'topk_group' = 2 groups/,
    );
    // DeepSeek-V2: softmax only, its two topk_methods, no renormalisation, its group fields and shared count required.
    bad({ ...testConfigs.deepseek_v2, scoring_func: 'sigmoid' }, /'scoring_func' "sigmoid": DeepSeek-V2 routing is 'softmax'/);
    bad(
      { ...testConfigs.deepseek_v2, topk_method: 'noaux_tc' },
      /'topk_method' "noaux_tc": DeepSeek-V2 routes by 'greedy' or 'group_limited_greedy'/,
    );
    bad({ ...testConfigs.deepseek_v2, norm_topk_prob: true }, /'norm_topk_prob' true: transformers ignores it/);
    bad({ ...testConfigs.deepseek_v2, n_group: undefined }, /'n_group' is missing/);
    bad({ ...testConfigs.deepseek_v2, topk_group: 5 }, /'topk_group' = 5 is more than 'n_group' = 4/);
    bad({ ...testConfigs.deepseek_v2, n_group: 3 }, /'n_group' = 3 does not divide 'n_routed_experts' = 16/);
    bad({ ...testConfigs.deepseek_v2, num_experts_per_tok: 13 }, /'num_experts_per_tok' = 13 is more than the 12 experts/);
    bad({ ...testConfigs.deepseek_v2, n_shared_experts: undefined }, /'n_shared_experts' is missing/);
    bad({ ...testConfigs.jamba, expert_layer_offset: 2 }, /'expert_layer_offset' = 2 is not below 'expert_layer_period' = 2/);
    bad({ ...testConfigs.jamba, num_experts: undefined }, /'num_experts' is missing/);
    bad({ ...testConfigs.jamba, num_experts: 1 }, /'num_experts' = 1: every Jamba layer is then a dense MLP/);
    // DeepSeekMoE v1: softmax only; norm_topk_prob and n_shared_experts required.
    bad({ ...testConfigs.deepseek, scoring_func: 'sigmoid' }, /'scoring_func' "sigmoid": DeepSeekMoE \(v1\) routing is 'softmax'/);
    bad({ ...testConfigs.deepseek, norm_topk_prob: undefined }, /'norm_topk_prob' is missing/);
    bad({ ...testConfigs.deepseek, n_shared_experts: undefined }, /'n_shared_experts' is missing/);
    // Ling: the architecture decides the version; v2 sigmoid only, norm_topk_prob false and unequal shared widths refused.
    bad(
      { ...testConfigs.bailing_moe_v2, architectures: undefined },
      /'architectures' undefined: Ling's config names BailingMoeForCausalLM/,
    );
    bad(
      { ...testConfigs.bailing_moe_v2, score_function: 'softmax' },
      /'score_function' "softmax": Ling 2\.0's router \(its own code\) is sigmoid/,
    );
    bad(
      { ...testConfigs.bailing_moe_v2, norm_topk_prob: false },
      /'norm_topk_prob' false: Ling 2\.0's own code renormalises whatever it says/,
    );
    bad(
      { ...testConfigs.bailing_moe_v2, moe_shared_expert_intermediate_size: 12 },
      /'moe_shared_expert_intermediate_size' = 12 is not 'moe_intermediate_size' = 8/,
    );
    bad({ ...testConfigs.bailing_moe_v2, num_experts_per_tok: 9 }, /'num_experts_per_tok' = 9 is more than the 8 experts/);
    bad(
      { ...testConfigs.bailing_moe_v2, architectures: ['BailingMoeForCausalLM', 'BailingMoeV2ForCausalLM'] },
      /'architectures' names both BailingMoeForCausalLM and BailingMoeV2ForCausalLM/,
    );
    bad({ ...testConfigs.bailing_moe_v2, architectures: 'BailingMoeV2ForCausalLM' }, /'architectures' must be a list of class names/);
    bad({ ...testConfigs.dbrx, n_layers: 100000 }, /'n_layers' = 100000: more than the/);
    const dbrxFfn = testConfigs.dbrx.ffn_config as Record<string, unknown>;
    bad(
      { ...testConfigs.dbrx, ffn_config: { ...dbrxFfn, moe_normalize_expert_weights: 2 } },
      /'moe_normalize_expert_weights' 2: .*another p-norm is not supported/,
    );
    bad({ ...testConfigs.dbrx, ffn_config: { ...dbrxFfn, moe_top_k: undefined } }, /config\.json: ffn_config: 'moe_top_k' is missing/);
    bad({ ...testConfigs.dbrx, d_model: undefined }, /'d_model' is missing/);
    bad({ ...testConfigs.dbrx, ffn_config: undefined }, /'ffn_config' must be an object \(DBRX's MoE fields\)/);
    bad({ ...testConfigs.dbrx, ffn_config: { ...dbrxFfn, moe_top_k: 9 } }, /'ffn_config\.moe_top_k' = 9 is more than the 8 experts/);
    bad(
      { ...testConfigs.dbrx, ffn_config: { ...dbrxFfn, moe_normalize_expert_weights: '1' } },
      /'moe_normalize_expert_weights' must be a number \(a p-norm's p\) or null; found "1"/,
    );
    bad({ ...testConfigs.deepseek_v3, scoring_func: 'softmax' }, /'scoring_func' "softmax"/);
    // The experts are SiLU-gated: another activation loaded and gave wrong outputs (an audit)
    for (const family of families) {
      const c: Record<string, unknown> = testConfigs[family];
      // A multimodal config's activation is its language model's (text_config's).
      const text = c['text_config'] as Record<string, unknown> | undefined;
      // DBRX's in ffn_config.ffn_act_fn.name.
      const ffn = family === 'dbrx' ? (c['ffn_config'] as Record<string, unknown>) : undefined;
      bad(
        ffn
          ? { ...c, ffn_config: { ...ffn, ffn_act_fn: { name: 'gelu' } } }
          : text
            ? { ...c, text_config: { ...text, hidden_act: 'gelu' } }
            : { ...c, hidden_act: 'gelu' },
        /'(hidden_act|ffn_config\.ffn_act_fn\.name)' "gelu": the package's experts compute SiLU-gated MLPs/,
      );
    }
    expect(hfMoEModel({ ...testConfigs.mixtral, hidden_act: 'swish' }).block.family).toBe('mixtral');
    bad({ ...testConfigs.deepseek_v3, topk_method: 'group_limited_greedy' }, /'topk_method' "group_limited_greedy"/);
    bad({ ...testConfigs.deepseek_v3, n_group: 3 }, /'n_group' = 3 does not divide 'n_routed_experts' = 16/);
    bad({ ...testConfigs.qwen2_moe, norm_topk_prob: 'yes' }, /'norm_topk_prob' must be true or false/);
    bad({ ...testConfigs.qwen2_moe, mlp_only_layers: 'all' }, /'mlp_only_layers' must be a list of layer indices/);
    bad({ ...testConfigs.qwen3_moe, num_experts_per_tok: 9 }, /'num_experts_per_tok' = 9 is more than the 8 experts/);
    bad({ ...testConfigs.olmoe, num_experts: 2 ** 20 }, /1048576 experts: more than the 65536 this loader takes/);
    bad({ ...testConfigs.dots1, n_shared_experts: undefined }, /'n_shared_experts' is missing \(the dots1 MoE block needs it\)/);
    bad({ ...testConfigs.olmoe, intermediate_size: undefined }, /'intermediate_size' is missing \(the olmoe MoE block needs it\)/);
    bad({ ...testConfigs.ernie4_5_moe, use_bias: true }, /'use_bias' true: the package's experts have no bias terms/);
    bad(
      { ...testConfigs.minimax_m2, shared_intermediate_size: 64 },
      /'shared_intermediate_size' > 0: MiniMax-M2's block \(transformers'\) has no shared expert/,
    );
    bad({ ...testConfigs.qwen3_next, shared_expert_intermediate_size: undefined }, /'shared_expert_intermediate_size' is missing/);
    bad(
      { ...testConfigs.hunyuan_v1_moe, moe_topk: [2, 3] },
      /'moe_topk' differs between layers \(2, 3\): the loader serves one MoE block shape for every layer/,
    );
    bad(
      { ...testConfigs.hunyuan_v1_moe, num_experts: [8, 8, 8] },
      /'num_experts' must be an integer >= 1 or a list of 2 of them \(one per layer\); found \[8,8,8\]/,
    );
    bad(
      { ...testConfigs.hunyuan_v1_moe, intermediate_size: undefined },
      /'intermediate_size' is missing \(the hunyuan_v1_moe MoE block needs it\)/,
    );
    bad([], /must be a JSON object/);
    // A multimodal config's language model is its text_config, named in the errors.
    bad(
      { ...testConfigs.qwen3_vl_moe, text_config: undefined },
      /^config\.json: 'text_config' must be an object \(the qwen3_vl_moe language model's config\); found null$/,
    );
    bad(
      { ...testConfigs.qwen3_vl_moe, text_config: { ...(testConfigs.qwen3_vl_moe.text_config as object), num_experts: undefined } },
      /^config\.json: text_config: 'num_experts' is missing \(the qwen3_vl_moe MoE block needs it\)$/,
    );
    bad(
      { ...testConfigs.llama4, text_config: { ...(testConfigs.llama4.text_config as object), num_experts_per_tok: 2 } },
      /text_config: 'num_experts_per_tok' = 2: Llama 4's block scales each expert's input by its router weight, which the package serves for top-1/,
    );
    bad(
      { ...testConfigs.llama4, text_config: { ...(testConfigs.llama4.text_config as object), moe_layers: [1, 3, 7] } },
      /text_config: 'moe_layers' lists 7, past the 4 layers \('num_hidden_layers'\)/,
    );
    bad({ ...testConfigs.gpt_oss, swiglu_limit: -1 }, /'swiglu_limit' must be a positive number; found -1/);
    bad({ ...testConfigs.gpt_oss, num_experts_per_tok: undefined, experts_per_token: undefined }, /'num_experts_per_tok' is missing/);
    bad({ ...testConfigs.granitemoehybrid, num_local_experts: 0 }, /'num_local_experts' must be an integer >= 1; found 0/);
  });
});

describe('HF checkpoints → MoEInference against the family references (CPU)', () => {
  // f32 layer: every file dtype converts exactly, so the layer must match float64 to f32 rounding.
  for (const family of families) {
    for (const [dtype, shards] of [
      ['bf16', 3],
      ['f16', 2],
      ['f32', 0],
    ] as const) {
      it(`${family}: ${dtype} files, ${shards ? `${shards} shards + index` : 'one model.safetensors'}, f32 layer, every MoE layer`, () => {
        const seed = 11 + families.indexOf(family) * 7 + shards;
        const c = checkpointAndTokens(family, { dtype, shards, layerDtype: 'f32', T: 9, seed });
        using ckpt = HfMoECheckpoint.open(c.dir);
        for (const [layer, ref] of c.refs) {
          using moe = MoEInference.fromHf(ckpt, layer, { dtype: 'f32', device: 'cpu' });
          const y = tidy(() => Array.from(moe.forward(c.x).toFloat32Array()));
          const err = relErr(y, ref.y);
          expect(err, `${c.what}, layer ${layer}: relErr ${err} (routing margin ${ref.margin})`).toBeLessThan(2e-6);
        }
        // No layer given: the first layer with an MoE block.
        const first = ckpt.model.moeLayers[0] as number;
        using byDefault = MoEInference.fromHf(ckpt, undefined, { dtype: 'f32', device: 'cpu' });
        const yd = tidy(() => Array.from(byDefault.forward(c.x).toFloat32Array()));
        expect(relErr(yd, (c.refs.get(first) as { y: Float64Array }).y), `${c.what}: no layer given`).toBeLessThan(2e-6);
        c.x.dispose();
      });
    }
    it(`${family}: bf16 files, bf16 layer (the serving dtype), T = 1 and T = 33`, () => {
      const seed = 101 + families.indexOf(family);
      for (const T of [1, 33]) {
        const c = checkpointAndTokens(family, { dtype: 'bf16', shards: 4, layerDtype: 'bf16', T, seed });
        using ckpt = HfMoECheckpoint.open(c.dir);
        const layer = [...c.refs.keys()].at(-1) as number;
        using moe = MoEInference.fromHf(ckpt, layer, { device: 'cpu' });
        expect(moe.config.dtype).toBe('bf16');
        const y = tidy(() => Array.from(moe.forward(c.x).toFloat32Array()));
        const err = relErr(y, (c.refs.get(layer) as { y: Float64Array }).y);
        expect(err, `${c.what}, T ${T}: relErr ${err}`).toBeLessThan(1e-2);
        c.x.dispose();
      }
    });
  }

  it('f32 file values are rounded to nearest even into a bf16 layer; the f32 bias stays f32', () => {
    const dir = fresh();
    const built = buildHfCheckpoint(dir, testConfigs.deepseek_v3, { dtype: 'f32', shards: 2, seed: 5 });
    using ckpt = HfMoECheckpoint.open(dir);
    using w = ckpt.readLayer(2, { dtype: 'bf16', device: 'cpu' });
    const ref = built.layers.get(2)!;
    const { H, F, E } = moeSizes(testConfigs.deepseek_v3);
    // router [1,H,E] holds gateᵀ; w13[e][h][2i] = gate_proj[i][h], [2i+1] = up_proj[i][h]; w2[e][i][h] = down[h][i].
    const router = w.router.toFloat32Array();
    const w13 = w.w13.toFloat32Array();
    const w2 = w.w2.toFloat32Array();
    const bf = (v: number): number => encode([v], 'bf16').decoded[0] as number;
    for (let e = 0; e < E; e++) for (let h = 0; h < H; h++) expect(router[h * E + e]).toBe(bf(ref.gate[e * H + h]!));
    for (let e = 0; e < E; e += 5)
      for (let h = 0; h < H; h++)
        for (let i = 0; i < F; i++) {
          expect(w13[(e * H + h) * 2 * F + 2 * i]).toBe(bf(ref.experts[e]!.gate[i * H + h]!));
          expect(w13[(e * H + h) * 2 * F + 2 * i + 1]).toBe(bf(ref.experts[e]!.up[i * H + h]!));
          expect(w2[(e * F + i) * H + h]).toBe(bf(ref.experts[e]!.down[h * F + i]!));
        }
    expect(w.bias?.dtype).toBe('f32');
    expect(Array.from(w.bias?.toFloat32Array() ?? [])).toEqual(Array.from(Float32Array.from(ref.bias ?? [])));
  });

  it('DeepSeek-V3 in its published FP8 layout (e4m3 experts with 128×128 block scales): dequantised exactly, f32 and bf16 layers', () => {
    const cfg = {
      ...testConfigs.deepseek_v3,
      hidden_size: 256,
      moe_intermediate_size: 128,
      n_routed_experts: 8,
      num_experts_per_tok: 4,
      n_group: 4,
      topk_group: 2,
      n_shared_experts: 1,
      num_hidden_layers: 2,
      quantization_config: { quant_method: 'fp8', fmt: 'e4m3', activation_scheme: 'dynamic', weight_block_size: [128, 128] },
    };
    const dir = fresh();
    const built = buildHfCheckpoint(dir, cfg, { dtype: 'bf16', shards: 2, seed: 17, fp8: true });
    const w = built.layers.get(1)!;
    const H = 256,
      F = 128;
    using ckpt = HfMoECheckpoint.open(dir);
    using f32 = ckpt.readLayer(1, { dtype: 'f32', device: 'cpu' });
    // The gate [F,H] spans 2 column blocks, the down projection [H,F] 2 row blocks.
    const w13 = f32.w13.toFloat32Array(),
      w2 = f32.w2.toFloat32Array();
    for (const e of [0, 5])
      for (let h = 0; h < H; h += 7)
        for (let i = 0; i < F; i += 5) {
          expect(w13[(e * H + h) * 2 * F + 2 * i]).toBe(w.experts[e]!.gate[i * H + h]);
          expect(w13[(e * H + h) * 2 * F + 2 * i + 1]).toBe(w.experts[e]!.up[i * H + h]);
          expect(w2[(e * F + i) * H + h]).toBe(w.experts[e]!.down[h * F + i]);
        }
    // Scales are read with their weights: 8 experts × 3 × 2 + the shared expert's 3 × 2 + gate + bias.
    expect(ckpt.stats.tensorsRead).toBe(8 * 3 * 2 + 3 * 2 + 2);
    const { x64, x } = tokens(9, H, 23, 'f32');
    const ref = hfMoEReference(cfg, w, x64);
    for (const dtype of ['f32', 'bf16'] as const) {
      using moe = MoEInference.fromHf(ckpt, 1, { dtype, device: 'cpu' });
      const y = tidy(() => Array.from(moe.forward(dtype === 'f32' ? x : x.cast('bf16')).toFloat32Array()));
      const err = relErr(y, ref.y);
      expect(err, `fp8, ${dtype} layer: relErr ${err} (routing margin ${ref.margin})`).toBeLessThan(dtype === 'f32' ? 2e-6 : 1e-2);
    }
    x.dispose();
  });

  // moeLayerFromHf: the checkpoint's block as a trainable layer (every family, gated shared experts included).
  for (const family of families) {
    it(`moeLayerFromHf (${family}): the training layer computes the family's block from the files' weights, and trains`, () => {
      const c = checkpointAndTokens(family, { dtype: 'f32', shards: 2, layerDtype: 'f32', T: 12, seed: 71 + families.indexOf(family) });
      using ckpt = HfMoECheckpoint.open(c.dir);
      for (const [layerIdx, ref] of c.refs) {
        using layer = moeLayerFromHf(ckpt, layerIdx, { dtype: 'f32', device: 'cpu' });
        expect(layer.config.sharedGate).toBe(ckpt.block.sharedGate);
        const { y, grads } = tidy(() => {
          const fwd = layer.forward(c.x);
          const v = Array.from(fwd.y.toFloat32Array());
          const g = layer.backward(fwd, Tensor.full(c.x.shape, 1, { device: 'cpu' }));
          return { y: v, grads: Object.entries(g).filter(([, t]) => t !== null) as [string, Tensor][] };
        });
        const err = relErr(y, ref.y);
        expect(err, `${c.what}, layer ${layerIdx}: relErr ${err} (routing margin ${ref.margin})`).toBeLessThan(2e-6);
        for (const [k, t] of grads) {
          expect(Array.from(t.toFloat32Array()).every(Number.isFinite), `${k} is finite`).toBe(true);
          t.dispose();
        }
        if (ckpt.block.sharedGate) expect(grads.map(([k]) => k)).toContain('sharedGate');
      }
      c.x.dispose();
    });
  }

  it("readLayer's into: the weights land in the caller's tensors, the same bits as new ones, which its dispose leaves; wrong ones refused by name", () => {
    const c = checkpointAndTokens('deepseek_v3', { dtype: 'bf16', shards: 2, layerDtype: 'f32', T: 4, seed: 91 });
    using ckpt = HfMoECheckpoint.open(c.dir);
    const layerIdx = ckpt.model.moeLayers[0] as number;
    using fresh = ckpt.readLayer(layerIdx, { dtype: 'f32', device: 'cpu' });
    const mine = {
      router: Tensor.full(fresh.router.shape, 7, { device: 'cpu' }),
      bias: Tensor.full(fresh.bias?.shape ?? [1], 7, { device: 'cpu' }),
      w13: Tensor.full(fresh.w13.shape, 7, { device: 'cpu' }),
      w2: Tensor.full(fresh.w2.shape, 7, { device: 'cpu' }),
      sharedW13: Tensor.full(fresh.sharedW13?.shape ?? [1], 7, { device: 'cpu' }),
      sharedW2: Tensor.full(fresh.sharedW2?.shape ?? [1], 7, { device: 'cpu' }),
    };
    const got = ckpt.readLayer(layerIdx, { dtype: 'f32', device: 'cpu', into: mine });
    for (const k of Object.keys(mine) as (keyof typeof mine)[]) {
      expect(got[k], k).toBe(mine[k]);
      expect(Array.from(mine[k].toFloat32Array()), k).toEqual(Array.from((fresh[k] as Tensor).toFloat32Array()));
    }
    got.dispose();
    expect(Object.values(mine).every((t) => !t.disposed)).toBe(true);
    const bad = (into: object, re: RegExp): void => {
      expect(() => ckpt.readLayer(layerIdx, { dtype: 'f32', device: 'cpu', into })).toThrow(re);
    };
    bad({ w2: mine.w13 }, /'into\.w2' must be a contiguous f32 \[\d+,\d+,\d+\] on cpu; received f32 \[/);
    using bf = Tensor.zeros(fresh.w13.shape, { dtype: 'bf16', device: 'cpu' });
    bad({ w13: bf }, /'into\.w13' must be a contiguous f32/);
    bad({ w31: mine.w13 }, /'into' has an unknown key 'w31'/);
    bad({ sharedGate: mine.bias }, /'into\.sharedGate' was given but the deepseek_v3 block has none/);
    for (const t of Object.values(mine)) t.dispose();
    c.x.dispose();
  });

  it('moeLayerFromHf: rank r of P holds its experts alone; what the block fixes is not an option', () => {
    const c = checkpointAndTokens('qwen2_moe', { dtype: 'bf16', shards: 3, layerDtype: 'f32', T: 4, seed: 90 });
    using ckpt = HfMoECheckpoint.open(c.dir);
    const layerIdx = ckpt.model.moeLayers[0] as number;
    using whole = moeLayerFromHf(ckpt, layerIdx, { dtype: 'f32', device: 'cpu' });
    // Rank 1 of an EP group of 2 (building and loading need no collective).
    const group = { rank: 1, size: 2, allToAll: () => undefined, allToAllV: () => undefined };
    using half = moeLayerFromHf(ckpt, undefined, { dtype: 'f32', device: 'cpu', group });
    const El = ckpt.block.numExperts / 2;
    const per = whole.master.w13.numel / ckpt.block.numExperts;
    expect(Array.from(half.master.w13.toFloat32Array())).toEqual(Array.from(whole.master.w13.toFloat32Array().subarray(El * per)));
    expect(Array.from((half.master.sharedGate as Tensor).toFloat32Array())).toEqual(
      Array.from((whole.master.sharedGate as Tensor).toFloat32Array()),
    );
    expect(() => moeLayerFromHf(ckpt, layerIdx, { topK: 1 } as never)).toThrow(/moeLayerFromHf: .*'topK'/);
    c.x.dispose();
  });

  it('gpt-oss: MXFP4 as published and the dequantised BF16 layout give the reference, served and as a training layer; the options checked', () => {
    // The BF16 layout (gate_up_proj [E,H,2F] interleaved, as dequantised copies publish it) and the
    // MXFP4 one built from the same seed hold different values: each against its own reference.
    const { quantization_config: _, ...bf16Config } = testConfigs.gpt_oss;
    for (const [what, cfg] of [
      ['MXFP4', testConfigs.gpt_oss],
      ['BF16', bf16Config],
    ] as const) {
      const dir = fresh();
      const built = buildHfCheckpoint(dir, cfg, { dtype: 'bf16', shards: 2, seed: 17 });
      using ckpt = HfMoECheckpoint.open(dir);
      const names = [...ckpt.weightMap.keys()];
      expect(names.some((n) => n.endsWith('gate_up_proj_blocks'))).toBe(what === 'MXFP4');
      for (const [layer, w] of built.layers) {
        let ref, x64;
        for (let s = 0; ; s++) {
          x64 = encode(normals(300 + s)(9 * 64), 'f32').decoded;
          ref = hfMoEReference(cfg, w, x64);
          if (ref.margin > 1e-4 || s > 20) break;
        }
        using inf = MoEInference.fromHf(ckpt, layer, { dtype: 'f32', device: 'cpu' });
        expect(inf.config).toMatchObject({
          routerBias: true,
          expertBias: true,
          activation: 'clamped-swiglu',
          swigluAlpha: 1.702,
          swigluLimit: 7,
        });
        const y = tidy(() =>
          Array.from(inf.forward(Tensor.fromArray(Float32Array.from(x64), { shape: [9, 64], device: 'cpu' })).toFloat32Array()),
        );
        const err = relErr(y, ref.y);
        expect(err, `${what} layer ${layer}: relErr ${err} (routing margin ${ref.margin})`).toBeLessThan(2e-6);
      }
      // The training layer takes the same biases and activation, and its served copy computes the same bits.
      using layer = moeLayerFromHf(ckpt, 0, { dtype: 'f32', device: 'cpu' });
      expect(layer.config).toMatchObject({
        routerBias: true,
        expertBias: true,
        activation: 'clamped-swiglu',
        swigluAlpha: 1.702,
        swigluLimit: 7,
      });
      using copy = MoEInference.fromLayer(layer);
      tidy(() => {
        const x = Tensor.randn([6, 64], { seed: 9, device: 'cpu' });
        const a = layer.forward(x);
        expect(Array.from(copy.forward(x).toFloat32Array())).toEqual(Array.from(a.y.toFloat32Array()));
        disposeSaved(a);
      });
    }
    // The options on their own.
    const cfg = { hidden: 4, ffn: 2, numExperts: 2, topK: 1, device: 'cpu', dtype: 'f32' } as const;
    const weights = (extra: object = {}) => ({
      router: Tensor.zeros([1, 4, 2], { device: 'cpu' }),
      w13: Tensor.zeros([2, 4, 4], { device: 'cpu' }),
      w2: Tensor.zeros([2, 2, 4], { device: 'cpu' }),
      ...extra,
    });
    tidy(() => {
      expect(() => new MoEInference({ ...cfg, expertBias: true }, weights())).toThrow(
        /MoEInference: 'expertBias' needs the 'clamped-swiglu' activation/,
      );
      expect(() => new MoEInference({ ...cfg, swigluLimit: 5 }, weights())).toThrow(
        /MoEInference: 'swigluAlpha' and 'swigluLimit' set the 'clamped-swiglu' activation/,
      );
      expect(() => new MoEInference({ ...cfg, activation: 'gelu' as never }, weights())).toThrow(/MoEInference: 'activation'/);
      expect(() => new MoEInference({ ...cfg, activation: 'clamped-swiglu', swigluLimit: 0 }, weights())).toThrow(
        /'swigluLimit' = 0 must be greater than 0/,
      );
      expect(() => new MoEInference(cfg, weights({ routerBias: Tensor.zeros([2], { device: 'cpu' }) }))).toThrow(
        /MoEInference: 'weights\.routerBias' is given but the config has none \('routerBias'\)/,
      );
      expect(
        () =>
          new MoEInference(
            { ...cfg, activation: 'clamped-swiglu', expertBias: true },
            weights({ w13Bias: Tensor.zeros([2, 4], { device: 'cpu' }) }),
          ),
      ).toThrow(/MoEInference: 'weights\.w2Bias'/);
    });
  });

  it("Llama 4: the router weight on the experts' input, served (MoEInference) and trained (moeLayerFromHf) alike; the option checked", () => {
    const dir = fresh();
    buildHfCheckpoint(dir, testConfigs.llama4, { dtype: 'bf16', shards: 0, seed: 3 });
    using ckpt = HfMoECheckpoint.open(dir);
    using layer = moeLayerFromHf(ckpt, 1, { dtype: 'f32', device: 'cpu' });
    expect(layer.config.routeWeightsOn).toBe('input');
    // The served copy of the training layer computes the same bits.
    using copy = MoEInference.fromLayer(layer);
    expect(copy.config.routeWeightsOn).toBe('input');
    tidy(() => {
      const x = Tensor.randn([6, 16], { seed: 5, device: 'cpu' });
      const a = layer.forward(x);
      expect(Array.from(copy.forward(x).toFloat32Array())).toEqual(Array.from(a.y.toFloat32Array()));
      disposeSaved(a);
    });
    using inf = MoEInference.fromHf(ckpt, 1, { dtype: 'f32', device: 'cpu' });
    expect(inf.config.routeWeightsOn).toBe('input');
    // The option on its own: top-1 only, one of two values.
    const cfg = { hidden: 4, ffn: 2, numExperts: 2, topK: 2, device: 'cpu', dtype: 'f32' } as const;
    const weights = () => ({
      router: Tensor.zeros([1, 4, 2], { device: 'cpu' }),
      w13: Tensor.zeros([2, 4, 4], { device: 'cpu' }),
      w2: Tensor.zeros([2, 2, 4], { device: 'cpu' }),
    });
    tidy(() => {
      expect(() => new MoEInference({ ...cfg, routeWeightsOn: 'input' }, weights())).toThrow(
        /MoEInference: 'routeWeightsOn' 'input' needs token choice with topK 1 \(Llama 4's\); received topK 2/,
      );
      expect(() => new MoEInference({ ...cfg, topK: 1, routeWeightsOn: 'both' as never }, weights())).toThrow(
        /MoEInference: 'routeWeightsOn'/,
      );
    });
    expect(() => new MoELayer({ hidden: 4, ffn: 2, numExperts: 2, topK: 2, device: 'cpu', dtype: 'f32', routeWeightsOn: 'input' })).toThrow(
      /MoELayer: 'routeWeightsOn' 'input' needs token choice with topK 1 \(Llama 4's\); received topK 2/,
    );
    expect(
      () =>
        new MoELayer({
          hidden: 4,
          ffn: 2,
          numExperts: 2,
          topK: 1,
          routing: 'expert-choice',
          device: 'cpu',
          dtype: 'f32',
          routeWeightsOn: 'input',
        }),
    ).toThrow(/MoELayer: 'routeWeightsOn' 'input' needs token choice with topK 1 \(Llama 4's\); received routing 'expert-choice'/);
  });
});

describe('expert parallelism: each rank reads only its own experts', () => {
  for (const P of [2, 4]) {
    it(`${P} ranks of DeepSeek-V3 (16 experts): the rank's slice, bit for bit; only its tensors' bytes read; other ranks' experts poisoned in the files change nothing`, () => {
      const dir = fresh();
      const cfg = testConfigs.deepseek_v3;
      const built = buildHfCheckpoint(dir, cfg, { dtype: 'bf16', shards: 3, seed: 40 + P });
      const { H, F, E, Fs } = moeSizes(cfg);
      const El = E / P;
      const layer = 1;
      const full = tidy(() => {
        using ckpt = HfMoECheckpoint.open(dir);
        using w = ckpt.readLayer(layer, { device: 'cpu' });
        return {
          w13: Array.from(w.w13.toArray() as Uint16Array),
          w2: Array.from(w.w2.toArray() as Uint16Array),
          router: Array.from(w.router.toArray() as Uint16Array),
        };
      });
      const sizeOf = (name: string): number =>
        (built.entries.find((e: { name: string }) => e.name === name) as { bytes: Uint8Array }).bytes.byteLength;
      const expertName = (j: number, x: string): string => `model.layers.${layer}.mlp.experts.${j}.${x}_proj.weight`;
      for (let r = 0; r < P; r++) {
        // Poison every expert the rank does not own (all layers' too): a read of them would show as NaN.
        const foreign: string[] = [];
        for (const l of built.layers.keys())
          for (let j = 0; j < E; j++)
            if (l !== layer || j < r * El || j >= (r + 1) * El)
              for (const x of ['gate', 'up', 'down']) foreign.push(`model.layers.${l}.mlp.experts.${j}.${x}_proj.weight`);
        const copy = `${dir}-rank${r}`;
        fs.cpSync(dir, copy, { recursive: true });
        poisonTensors(copy, built.weightMap, foreign);
        using ckpt = HfMoECheckpoint.open(copy);
        using w = ckpt.readLayer(layer, { rank: r, worldSize: P, device: 'cpu' });
        expect(w.firstExpert).toBe(r * El);
        expect(w.localExperts).toBe(El);
        expect(w.w13.shape).toEqual([El, H, 2 * F]);
        const per13 = H * 2 * F,
          per2 = F * H;
        expect(Array.from(w.w13.toArray() as Uint16Array)).toEqual(full.w13.slice(r * El * per13, (r + 1) * El * per13));
        expect(Array.from(w.w2.toArray() as Uint16Array)).toEqual(full.w2.slice(r * El * per2, (r + 1) * El * per2));
        expect(Array.from(w.router.toArray() as Uint16Array)).toEqual(full.router);
        // Bytes read: the gate, the bias, the shared expert, and the rank's own 3·El expert matrices.
        const mine = [
          `model.layers.${layer}.mlp.gate.weight`,
          `model.layers.${layer}.mlp.gate.e_score_correction_bias`,
          ...['gate', 'up', 'down'].map((x) => `model.layers.${layer}.mlp.shared_experts.${x}_proj.weight`),
        ];
        for (let j = r * El; j < (r + 1) * El; j++) for (const x of ['gate', 'up', 'down']) mine.push(expertName(j, x));
        expect(ckpt.stats.tensorsRead).toBe(mine.length);
        expect(ckpt.stats.tensorBytes).toBe(mine.reduce((s, m) => s + sizeOf(m), 0));
        // Headers of the files holding those tensors only, never whole shards.
        const touched = new Set(mine.map((m) => built.weightMap[m]));
        expect(ckpt.stats.filesOpened).toBe(touched.size);
        const shardBytes = [...touched].reduce((s: number, f) => s + fs.statSync(join(copy, f as string)).size, 0);
        expect(ckpt.stats.tensorBytes + ckpt.stats.headerBytes).toBeLessThan(shardBytes);
        expect(Fs).toBe(16);
        fs.rmSync(copy, { recursive: true, force: true });
      }
    });
  }
  it("2 and 4 ranks of gpt-oss in MXFP4: the rank's slice, bit for bit; only its experts' rows of the blocks, scales and biases read; other rows poisoned change nothing", () => {
    const dir = fresh();
    const cfg = testConfigs.gpt_oss;
    const built = buildHfCheckpoint(dir, cfg, { dtype: 'bf16', shards: 3, seed: 23 });
    const { H, F, E } = moeSizes(cfg);
    const layer = 1;
    const full = tidy(() => {
      using ckpt = HfMoECheckpoint.open(dir);
      using w = ckpt.readLayer(layer, { device: 'cpu' });
      const v = (t: Tensor | null): number[] => Array.from((t as Tensor).toArray() as Uint16Array);
      return { w13: v(w.w13), w2: v(w.w2), w13Bias: v(w.w13Bias), w2Bias: v(w.w2Bias) };
    });
    const sizeOf = (name: string): number =>
      (built.entries.find((e: { name: string }) => e.name === name) as { bytes: Uint8Array }).bytes.byteLength;
    const n = blockNames(cfg, layer);
    const fused = n.fused as { gateUp: string; down: string };
    const eb = n.expertBias as { gateUp: string; down: string };
    const perExpert = [
      `${fused.gateUp}_blocks`,
      `${fused.gateUp}_scales`,
      `${fused.down}_blocks`,
      `${fused.down}_scales`,
      eb.gateUp,
      eb.down,
    ];
    for (const P of [2, 4]) {
      const El = E / P;
      for (let r = 0; r < P; r++) {
        const copy = `${dir}-${P}-rank${r}`;
        fs.cpSync(dir, copy, { recursive: true });
        for (const l of built.layers.keys()) {
          const ln = blockNames(cfg, l);
          const lf = ln.fused as { gateUp: string; down: string };
          const lb = ln.expertBias as { gateUp: string; down: string };
          const keep = (j: number): boolean => l === layer && j >= r * El && j < (r + 1) * El;
          for (const name of [`${lf.gateUp}_blocks`, `${lf.gateUp}_scales`, `${lf.down}_blocks`, `${lf.down}_scales`, lb.gateUp, lb.down])
            poisonRows(copy, built.weightMap, name, keep);
        }
        using ckpt = HfMoECheckpoint.open(copy);
        using w = ckpt.readLayer(layer, { rank: r, worldSize: P, device: 'cpu' });
        const slice = (all: number[], per: number): number[] => all.slice(r * El * per, (r + 1) * El * per);
        const v = (t: Tensor | null): number[] => Array.from((t as Tensor).toArray() as Uint16Array);
        expect(v(w.w13)).toEqual(slice(full.w13, H * 2 * F));
        expect(v(w.w2)).toEqual(slice(full.w2, F * H));
        expect(v(w.w13Bias)).toEqual(slice(full.w13Bias, 2 * F));
        expect(v(w.w2Bias)).toEqual(slice(full.w2Bias, H));
        // The router and its bias whole; one read per expert of each of the six fused tensors.
        expect(ckpt.stats.tensorsRead).toBe(2 + perExpert.length * El);
        expect(ckpt.stats.tensorBytes).toBe(
          sizeOf(n.gate) + sizeOf(n.routerBias as string) + (perExpert.reduce((s, m) => s + sizeOf(m), 0) * El) / E,
        );
        fs.rmSync(copy, { recursive: true, force: true });
      }
    }
  });

  // Experts in [E, …] tensors (fused) or stacked by rows (DBRX's [E·F, H]): a rank reads its
  // experts' rows of them alone. Per case: the tensors holding the experts, which expert a row of
  // them belongs to, and the tensors read whole.
  type Names = ReturnType<typeof blockNames>;
  const rowsCases: {
    family: keyof typeof testConfigs;
    P: number;
    how: string;
    seed: number;
    layer: (layers: number[]) => number;
    expertTensors: (n: Names) => string[];
    expertOfRow: (row: number, F: number) => number;
    whole: (n: Names) => string[];
  }[] = [];
  for (const P of [2, 4])
    rowsCases.push({
      family: 'dbrx',
      P,
      how: 'experts stacked by rows',
      seed: 70 + P,
      layer: () => 1,
      expertTensors: (n) => {
        const st = n.stacked as { gate: string; up: string; down: string };
        return [st.gate, st.up, st.down];
      },
      expertOfRow: (row, F) => Math.floor(row / F), // row f·… of expert ⌊row / F⌋
      whole: (n) => [n.gate],
    });
  for (const [family, P] of [
    ['granitemoehybrid', 2],
    ['granitemoehybrid', 4],
    ['qwen3_vl_moe', 2],
    ['qwen3_vl_moe', 4],
  ] as const)
    rowsCases.push({
      family,
      P,
      how: 'fused experts',
      seed: 60 + P,
      layer: (layers) => layers.at(-1) as number,
      expertTensors: (n) => {
        const f = n.fused as { gateUp: string; down: string };
        return [f.gateUp, f.down];
      },
      expertOfRow: (row) => row,
      // The gate, and the shared MLP where there is one.
      whole: (n) => {
        const shared = n.shared as { gateUp: string; down: string } | null;
        return shared ? [n.gate, shared.gateUp, shared.down] : [n.gate];
      },
    });
  for (const c of rowsCases) {
    it(`${c.P} ranks of ${c.family} (${c.how}): the rank's slice, bit for bit; only its experts' rows read; other rows poisoned change nothing`, () => {
      const { family, P } = c;
      const dir = fresh();
      const cfg = testConfigs[family];
      const built = buildHfCheckpoint(dir, cfg, { dtype: 'bf16', shards: 2, seed: c.seed });
      const { H, F, E } = moeSizes(cfg);
      const El = E / P;
      const layer = c.layer([...built.layers.keys()]);
      const full = tidy(() => {
        using ckpt = HfMoECheckpoint.open(dir);
        using w = ckpt.readLayer(layer, { device: 'cpu' });
        return { w13: Array.from(w.w13.toArray() as Uint16Array), w2: Array.from(w.w2.toArray() as Uint16Array) };
      });
      const sizeOf = (name: string): number =>
        (built.entries.find((e: { name: string }) => e.name === name) as { bytes: Uint8Array }).bytes.byteLength;
      const n = blockNames(cfg, layer);
      const experts = c.expertTensors(n);
      const whole = c.whole(n);
      for (let r = 0; r < P; r++) {
        const copy = `${dir}-rank${r}`;
        fs.cpSync(dir, copy, { recursive: true });
        // Every other rank's rows, and every other layer's experts whole.
        for (const l of built.layers.keys()) {
          const keep = (row: number): boolean => {
            const j = c.expertOfRow(row, F);
            return l === layer && j >= r * El && j < (r + 1) * El;
          };
          for (const name of c.expertTensors(blockNames(cfg, l))) poisonRows(copy, built.weightMap, name, keep);
        }
        using ckpt = HfMoECheckpoint.open(copy);
        using w = ckpt.readLayer(layer, { rank: r, worldSize: P, device: 'cpu' });
        expect(w.firstExpert).toBe(r * El);
        const per13 = H * 2 * F,
          per2 = F * H;
        expect(Array.from(w.w13.toArray() as Uint16Array)).toEqual(full.w13.slice(r * El * per13, (r + 1) * El * per13));
        expect(Array.from(w.w2.toArray() as Uint16Array)).toEqual(full.w2.slice(r * El * per2, (r + 1) * El * per2));
        // The whole tensors, and El/E of each expert tensor (one read per expert and tensor).
        expect(ckpt.stats.tensorsRead).toBe(whole.length + experts.length * El);
        expect(ckpt.stats.tensorBytes).toBe(
          whole.reduce((sum, m) => sum + sizeOf(m), 0) + (experts.reduce((sum, m) => sum + sizeOf(m), 0) * El) / E,
        );
        fs.rmSync(copy, { recursive: true, force: true });
      }
    });
  }
});
