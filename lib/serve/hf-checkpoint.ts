/**
 * The MoE blocks of Hugging Face safetensors checkpoints, read for serving: a folder with
 * config.json and either sharded files named by model.safetensors.index.json's weight_map or one
 * model.safetensors.
 *
 * Tensor names (L the decoder layer, J the global expert):
 *   mixtral      model.layers.L.block_sparse_moe.gate.weight           [E,H]
 *                model.layers.L.block_sparse_moe.experts.J.w1.weight   [F,H]  gate projection
 *                                                       ....J.w3.weight   [F,H]  up projection
 *                                                       ....J.w2.weight   [H,F]  down projection
 *   deepseek_v3  model.layers.L.mlp.gate.weight [E,H], model.layers.L.mlp.gate.e_score_correction_bias [E]
 *   deepseek_v2  as deepseek_v3 without the bias (experts and shared_experts alike); deepseek (DeepSeekMoE v1) too
 *   bailing_moe  as deepseek_v3, the selection bias (Ling 2.0) model.layers.L.mlp.gate.expert_bias [E]
 *   (kimi_k2, glm4_moe, dots1 as deepseek_v3)
 *   qwen2_moe    model.layers.L.mlp.experts.J.gate_proj|up_proj.weight [F,H], ...down_proj.weight [H,F]
 *   qwen3_moe    shared: deepseek_v3 model.layers.L.mlp.shared_experts.{gate,up,down}_proj.weight,
 *   (qwen3_next, qwen2_moe model.layers.L.mlp.shared_expert.{...}.weight and
 *   olmoe)       model.layers.L.mlp.shared_expert_gate.weight [1,H]
 *   ernie4_5_moe as deepseek_v3 but the bias: model.layers.L.mlp.moe_statics.e_score_correction_bias [1,E]
 *   minimax_m2   as mixtral, and model.layers.L.block_sparse_moe.e_score_correction_bias [E]
 *   jamba        model.layers.L.feed_forward.router.weight [E,H], ….feed_forward.experts.J.{gate,up,down}_proj.weight
 *   dbrx         transformer.blocks.L.ffn.router.layer.weight [E,H]; the experts stacked by rows, no
 *                '.weight': ….ffn.experts.mlp.w1 (gate) and .v1 (up) [E·F,H] (expert e's [F,H] nn.Linear
 *                rows), .w2 [E·F,H] (expert e's [F,H], used as h·w2: x·W)
 *   hunyuan_v1_moe  model.layers.L.mlp.gate.wg.weight [E,H] (F32 as published), experts as qwen2_moe,
 *                model.layers.L.mlp.shared_mlp.{gate,up,down}_proj.weight
 *
 * Experts fused, one tensor per projection for all E (the expert first; gate and up in one tensor,
 * the gate's F first, then the up's):
 *   qwen3_vl_moe model.language_model.layers.L.mlp.gate.weight [E,H]
 *                model.language_model.layers.L.mlp.experts.gate_up_proj [E,H,2F]  (x·W: columns)
 *                model.language_model.layers.L.mlp.experts.down_proj    [E,F,H]
 *   granitemoe   model.layers.L.block_sparse_moe.router.layer.weight [E,H]
 *   (granitemoe- model.layers.L.block_sparse_moe.input_linear.weight  [E,2F,H] (nn.Linear per expert: rows)
 *   shared,      model.layers.L.block_sparse_moe.output_linear.weight [E,H,F]
 *   granitemoe-  shared: model.layers.L.shared_mlp.input_linear.weight [2Fs,H], output_linear.weight [H,Fs]
 *   hybrid)
 *   llama4       language_model.model.layers.L.feed_forward.router.weight [E,H]
 *                ….feed_forward.experts.gate_up_proj [E,H,2F], ….experts.down_proj [E,F,H] (as qwen3_vl_moe)
 *                shared: ….feed_forward.shared_expert.{gate,up,down}_proj.weight
 *   gpt_oss      model.layers.L.mlp.router.weight [E,H], model.layers.L.mlp.router.bias [E]
 *                model.layers.L.mlp.experts.gate_up_proj [E,H,2F] (x·W, gate and up INTERLEAVED by
 *                column: 2i the gate's i, 2i+1 the up's, w13's own layout), ….experts.down_proj [E,F,H],
 *                ….experts.gate_up_proj_bias [E,2F] (interleaved too), ….experts.down_proj_bias [E,H];
 *                as published, the two matrices in MXFP4 (config.json's quantization_config quant_method
 *                "mxfp4"): `<name>_blocks` U8 [E,out,in/32,16] (two FP4 e2m1 codes a byte, the low
 *                nibble first) and `<name>_scales` U8 [E,out,in/32] (E8M0: 2^(s−127) for each 32
 *                values of a row), out × in the nn.Linear orientation (gate_up [E,2F,H], down [E,H,F]);
 *                decoded exactly (w = fp4(code)·2^(s−127), representable in bf16) as they are read
 *   A rank reads its experts' rows of the fused tensors alone (one positioned read per expert).
 *
 * What the layer holds (lib/moe/experts.ts): router [1,H,E] (the transpose of the gate), w13
 * [El,H,2F] with W1ᵀ and W3ᵀ interleaved by column (2i ← gate row i, 2i+1 ← up row i), w2 [El,F,H]
 * (the transpose of down_proj), the bias as f32. Files may hold BF16, F16 or F32; values are
 * converted (rounded to nearest even) to the layer's dtype as they are copied in. FP8 block-quantised
 * weights (DeepSeek-V3 as published: F8_E4M3 `<name>` with an F32 `<name>_scale_inv` holding one
 * scale per 128×128 block, config.json's quantization_config weight_block_size [128, 128]) are
 * dequantised on the way, w = q · scale_inv[row/128, col/128], in f32, then rounded into the layer's
 * dtype (the order transformers' and DeepSeek's weight_dequant use); the column count must then be a
 * multiple of 128.
 *
 * Expert parallelism: rank r of P owns the contiguous global experts r·E/P … (r+1)·E/P − 1 (as the
 * dispatcher shards them, lib/train/moe-state.ts ownedExperts). A rank reads the safetensors header
 * of each file it needs and then only the byte ranges of its own tensors (positioned reads through
 * SafetensorsFile), never whole shards: `stats` counts what was read.
 *
 * Nothing is read outside the folder the caller names: file names from the index must be plain
 * names (no separators, `.`/`..`), every file must still lie inside the folder after resolving
 * symbolic links, only regular files are opened, and the JSON files are size- and depth-capped
 * (lib/train/safe-files.ts). Every error is a CheckpointError naming the folder, the file and the
 * tensor.
 */
import { basename } from 'node:path';

import { type DeviceLike, Device, getDefaultDevice } from '../device.js';
import { type DType, storageView } from '../dtype.js';
import { CheckpointError, invalidArgument, shown } from '../errors.js';
import { checkOptions } from '../validate.js';
import { dequantizeFp8, FP8_BLOCK } from '../moe/fp8.js';
import { Tensor, tidy } from '../tensor.js';
import { ownedExperts } from '../train/moe-state.js';
import { checkPlainName, readJson, realFolder, resolveInside } from '../train/safe-files.js';
import { SafetensorsFile, type TensorInfo } from '../train/safetensors.js';
import { type HfMoEBlock, type HfMoEFamily, type HfMoEModel, hfMoEModel, isDeepSeekV3Block, isGraniteBlock } from './hf-config.js';

export const HF_CONFIG_FILE = 'config.json';
export const HF_INDEX_FILE = 'model.safetensors.index.json';
export const HF_SINGLE_FILE = 'model.safetensors';

/** Caps on the JSON files read whole (DeepSeek-V3's index is about 9 MB for 91k tensors). */
const CONFIG_MAX_BYTES = 4 * 2 ** 20;
const INDEX_MAX_BYTES = 256 * 2 ** 20;

/** The dtypes read from the files as they are; F8_E4M3 needs its block scales (see the module doc). */
const READABLE: readonly DType[] = ['bf16', 'f16', 'f32'];
/** The suffix of an FP8 weight's block scales, and the block (rows and columns). */
export const HF_FP8_SCALE_SUFFIX = '_scale_inv';
const FP8_WEIGHT_BLOCK = FP8_BLOCK;

/** One MLP's tensors (nn.Linear weights, [out, in]). */
export type HfMlpNames =
  /** gate [F,H], up [F,H], down [H,F]. */
  | { gate: string; up: string; down: string }
  /** Granite's: gateUp [2F,H] (the gate's F rows, then the up's), down [H,F]. */
  | { gateUp: string; down: string };

/** Every routed expert in one tensor per projection, the expert first. */
export interface HfFusedExpertNames {
  gateUp: string;
  down: string;
  /** How gateUp's 2F splits: the gate's F then the up's ('halves'), or alternating gate, up ('interleaved', gpt-oss). */
  split: 'halves' | 'interleaved';
  /**
   * 'x·W': gateUp [E,H,2F] (the gate's F columns, then the up's) and down [E,F,H] (Qwen3-VL-MoE, Llama 4);
   * 'nn.Linear': gateUp [E,2F,H] (the gate's rows first) and down [E,H,F] (Granite).
   */
  layout: 'x·W' | 'nn.Linear';
}

/** The tensor names of one layer's MoE block. */
export interface HfMoENames {
  gate: string;
  bias: string | null;
  /** The bias tensor's shape in the files for E experts: [E], or Ernie 4.5's [1,E]. */
  biasShape(E: number): number[];
  /** Expert j's tensors where each expert has its own, else null (`fused`). */
  expert: ((j: number) => HfMlpNames) | null;
  /** The experts' fused tensors where they are stored so, else null (`expert`). */
  fused: HfFusedExpertNames | null;
  /**
   * DBRX: the experts stacked by rows in 2-D tensors [E·F, H] (expert e's rows e·F … e·F + F − 1):
   * gate and up as nn.Linear weights ([F,H] each), down as x·W ([F,H]: h·down). Else absent.
   */
  stacked?: { gate: string; up: string; down: string };
  shared: HfMlpNames | null;
  sharedGate: string | null;
  /** gpt-oss: the router's bias [E] (on the logits), or null. */
  routerBias: string | null;
  /** gpt-oss: the experts' fused biases, gateUp [E,2F] (gate and up interleaved, as w13) and down [E,H], or null. */
  expertBias: { gateUp: string; down: string } | null;
}

/** The two-nibble FP4 (e2m1) values by code: sign bit 3, then 0, 0.5, 1, 1.5, 2, 3, 4, 6. */
const FP4_E2M1 = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6];
/** MXFP4: values a scale covers, and the suffixes of the packed codes and the scales. */
export const MXFP4_BLOCK = 32;
export const HF_MXFP4_BLOCKS_SUFFIX = '_blocks';
export const HF_MXFP4_SCALES_SUFFIX = '_scales';

/**
 * Decodes MXFP4 rows: `blocks` [rows, in/32, 16] bytes (the low nibble first) and `scales` [rows,
 * in/32] E8M0 bytes → [rows, in] values fp4(code)·2^(scale−127), exact in f32.
 */
export function decodeMxfp4(blocks: Uint8Array, scales: Uint8Array, rows: number, inDim: number): Float32Array {
  const groups = inDim / MXFP4_BLOCK;
  const out = new Float32Array(rows * inDim);
  for (let r = 0; r < rows; r++)
    for (let g = 0; g < groups; g++) {
      const scale = 2 ** ((scales[r * groups + g] as number) - 127);
      const base = (r * groups + g) * (MXFP4_BLOCK / 2);
      const o = r * inDim + g * MXFP4_BLOCK;
      for (let b = 0; b < MXFP4_BLOCK / 2; b++) {
        const byte = blocks[base + b] as number;
        out[o + 2 * b] = (FP4_E2M1[byte & 15] as number) * scale;
        out[o + 2 * b + 1] = (FP4_E2M1[byte >> 4] as number) * scale;
      }
    }
  return out;
}

/** An MLP's tensors with their shapes in the files, for F wide and H hidden. */
function mlpTensors(m: HfMlpNames, F: number, H: number): [string, number[]][] {
  return 'gateUp' in m
    ? [
        [m.gateUp, [2 * F, H]],
        [m.down, [H, F]],
      ]
    : [
        [m.gate, [F, H]],
        [m.up, [F, H]],
        [m.down, [H, F]],
      ];
}

/** The fused experts' tensors with their shapes in the files, for E experts F wide and H hidden. */
function fusedTensors(f: HfFusedExpertNames, E: number, F: number, H: number): [gateUp: [string, number[]], down: [string, number[]]] {
  return f.layout === 'x·W'
    ? [
        [f.gateUp, [E, H, 2 * F]],
        [f.down, [E, F, H]],
      ]
    : [
        [f.gateUp, [E, 2 * F, H]],
        [f.down, [E, H, F]],
      ];
}

/**
 * What a tensor may hold: 'weight' BF16, F16, F32 or FP8 with block scales (2-D weights); 'fused'
 * BF16, F16 or F32 (the fused experts and their biases); 'packed' U8 (MXFP4 codes and scales).
 */
type Readable = 'weight' | 'fused' | 'packed';

/** A fused weight [E, out, in] in MXFP4: its blocks and scales with their shapes (in a multiple of 32). */
function mxfp4Tensors(name: string, E: number, out: number, inDim: number): [string, number[], Readable][] {
  return [
    [name + HF_MXFP4_BLOCKS_SUFFIX, [E, out, inDim / MXFP4_BLOCK, MXFP4_BLOCK / 2], 'packed'],
    [name + HF_MXFP4_SCALES_SUFFIX, [E, out, inDim / MXFP4_BLOCK], 'packed'],
  ];
}

/**
 * The routed experts' tensors to check for expert j, with their shapes and what they may hold:
 * its own where each expert has them, else the fused ones (the same for every j; in MXFP4, their
 * blocks and scales), with the experts' biases.
 */
function expertTensors(names: HfMoENames, j: number, E: number, F: number, H: number, mxfp4: boolean): [string, number[], Readable][] {
  if (names.expert !== null) return mlpTensors(names.expert(j), F, H).map(([n, s]) => [n, s, 'weight']);
  if (names.stacked !== undefined) return [names.stacked.gate, names.stacked.up, names.stacked.down].map((n) => [n, [E * F, H], 'fused']);
  const fused = names.fused as HfFusedExpertNames;
  const list: [string, number[], Readable][] = mxfp4
    ? [...mxfp4Tensors(fused.gateUp, E, 2 * F, H), ...mxfp4Tensors(fused.down, E, H, F)]
    : fusedTensors(fused, E, F, H).map(([n, s]) => [n, s, 'fused']);
  if (names.expertBias !== null) list.push([names.expertBias.gateUp, [E, 2 * F], 'fused'], [names.expertBias.down, [E, H], 'fused']);
  return list;
}

/**
 * Copies one MLP's gate and up into `pairs` [1,H,f,2] (slot 0 ← gateᵀ, slot 1 ← upᵀ) from a CPU
 * tensor holding the gate's f first, then the up's: [1,2,f,H] as rows of nn.Linear weights
 * ('rows'), or [1,H,2,f] as columns of x·W ('columns').
 */
function copyGateUp(pairs: Tensor, gateUp: Tensor, layout: 'rows' | 'columns'): void {
  for (const half of [0, 1]) {
    const src = layout === 'rows' ? gateUp.narrow(1, half, 1).transpose(1, 3) : gateUp.narrow(2, half, 1).transpose(2, 3);
    pairs.narrow(3, half, 1).copy_(src);
  }
}

/** Names of the MoE block of decoder layer `layer` in `family`'s layout (`block` says which extras exist). */
export function hfMoENames(
  family: HfMoEFamily,
  layer: number,
  block: Pick<HfMoEBlock, 'selectionBias' | 'sharedFfn' | 'sharedGate'>,
): HfMoENames {
  /** gate_proj, up_proj, down_proj under `prefix`. */
  const projections = (prefix: string): HfMlpNames => ({
    gate: `${prefix}.gate_proj.weight`,
    up: `${prefix}.up_proj.weight`,
    down: `${prefix}.down_proj.weight`,
  });
  if (family === 'mixtral' || family === 'minimax_m2') {
    const p = `model.layers.${layer}.block_sparse_moe`;
    return {
      gate: `${p}.gate.weight`,
      bias: block.selectionBias ? `${p}.e_score_correction_bias` : null,
      biasShape: (E) => [E],
      expert: (j) => ({ gate: `${p}.experts.${j}.w1.weight`, up: `${p}.experts.${j}.w3.weight`, down: `${p}.experts.${j}.w2.weight` }),
      fused: null,
      shared: null,
      sharedGate: null,
      routerBias: null,
      expertBias: null,
    };
  }
  if (isGraniteBlock(family)) {
    const p = `model.layers.${layer}.block_sparse_moe`;
    const s = `model.layers.${layer}.shared_mlp`;
    return {
      gate: `${p}.router.layer.weight`,
      bias: null,
      biasShape: (E) => [E],
      expert: null,
      fused: { gateUp: `${p}.input_linear.weight`, down: `${p}.output_linear.weight`, layout: 'nn.Linear', split: 'halves' },
      shared: block.sharedFfn > 0 ? { gateUp: `${s}.input_linear.weight`, down: `${s}.output_linear.weight` } : null,
      sharedGate: null,
      routerBias: null,
      expertBias: null,
    };
  }
  if (family === 'gpt_oss') {
    const p = `model.layers.${layer}.mlp`;
    return {
      gate: `${p}.router.weight`,
      bias: null,
      biasShape: (E) => [E],
      expert: null,
      fused: { gateUp: `${p}.experts.gate_up_proj`, down: `${p}.experts.down_proj`, layout: 'x·W', split: 'interleaved' },
      shared: null,
      sharedGate: null,
      routerBias: `${p}.router.bias`,
      expertBias: { gateUp: `${p}.experts.gate_up_proj_bias`, down: `${p}.experts.down_proj_bias` },
    };
  }
  if (family === 'llama4') {
    const p = `language_model.model.layers.${layer}.feed_forward`;
    return {
      gate: `${p}.router.weight`,
      bias: null,
      biasShape: (E) => [E],
      expert: null,
      fused: { gateUp: `${p}.experts.gate_up_proj`, down: `${p}.experts.down_proj`, layout: 'x·W', split: 'halves' },
      shared: block.sharedFfn > 0 ? projections(`${p}.shared_expert`) : null,
      sharedGate: null,
      routerBias: null,
      expertBias: null,
    };
  }
  if (family === 'qwen3_vl_moe') {
    const p = `model.language_model.layers.${layer}.mlp`;
    return {
      gate: `${p}.gate.weight`,
      bias: null,
      biasShape: (E) => [E],
      expert: null,
      fused: { gateUp: `${p}.experts.gate_up_proj`, down: `${p}.experts.down_proj`, layout: 'x·W', split: 'halves' },
      shared: null,
      sharedGate: null,
      routerBias: null,
      expertBias: null,
    };
  }
  if (family === 'dbrx') {
    const p = `transformer.blocks.${layer}.ffn`;
    return {
      gate: `${p}.router.layer.weight`,
      bias: null,
      biasShape: (E) => [E],
      expert: null,
      fused: null,
      // As published: no '.weight' suffix.
      stacked: { gate: `${p}.experts.mlp.w1`, up: `${p}.experts.mlp.v1`, down: `${p}.experts.mlp.w2` },
      shared: null,
      sharedGate: null,
      routerBias: null,
      expertBias: null,
    };
  }
  if (family === 'jamba') {
    const p = `model.layers.${layer}.feed_forward`;
    return {
      gate: `${p}.router.weight`,
      bias: null,
      biasShape: (E) => [E],
      expert: (j) => projections(`${p}.experts.${j}`),
      fused: null,
      shared: null,
      sharedGate: null,
      routerBias: null,
      expertBias: null,
    };
  }
  const p = `model.layers.${layer}.mlp`;
  if (family === 'hunyuan_v1_moe')
    return {
      gate: `${p}.gate.wg.weight`,
      bias: null,
      biasShape: (E) => [E],
      expert: (j) => projections(`${p}.experts.${j}`),
      fused: null,
      shared: block.sharedFfn > 0 ? projections(`${p}.shared_mlp`) : null,
      sharedGate: null,
      routerBias: null,
      expertBias: null,
    };
  const ernie = family === 'ernie4_5_moe';
  const sharedExperts = isDeepSeekV3Block(family) || family === 'deepseek_v2' || family === 'deepseek' || family === 'bailing_moe' || ernie;
  const sharedPrefix = sharedExperts ? `${p}.shared_experts` : `${p}.shared_expert`;
  return {
    gate: `${p}.gate.weight`,
    bias: block.selectionBias
      ? ernie
        ? `${p}.moe_statics.e_score_correction_bias`
        : family === 'bailing_moe'
          ? `${p}.gate.expert_bias`
          : `${p}.gate.e_score_correction_bias`
      : null,
    biasShape: (E) => (ernie ? [1, E] : [E]),
    expert: (j) => projections(`${p}.experts.${j}`),
    fused: null,
    shared: block.sharedFfn > 0 ? projections(sharedPrefix) : null,
    sharedGate: block.sharedGate ? `${p}.shared_expert_gate.weight` : null,
    routerBias: null,
    expertBias: null,
  };
}

/** One layer's MoE weights in the layer's layout (see the module doc), this rank's experts only. */
export interface HfMoEWeights extends Disposable {
  /** [1,H,E] in the layer dtype. */
  router: Tensor;
  /** [E] f32 (DeepSeek-V3), else null. */
  bias: Tensor | null;
  /** [El,H,2F], [El,F,H]. */
  w13: Tensor;
  w2: Tensor;
  /** [1,H,2Fs], [1,Fs,H], or null. */
  sharedW13: Tensor | null;
  sharedW2: Tensor | null;
  /** Qwen2-MoE's shared_expert_gate as [1,H,1], or null. */
  sharedGate: Tensor | null;
  /** gpt-oss: the router's bias [E] f32, the experts' biases [El,2F] (interleaved as w13) and [El,H]; or null. */
  routerBias: Tensor | null;
  w13Bias: Tensor | null;
  w2Bias: Tensor | null;
  /** Global index of the first local expert, and how many there are. */
  firstExpert: number;
  localExperts: number;
  dispose(): void;
}

export interface HfReadOptions {
  /** This process's place in the expert-parallel group (default rank 0 of 1). */
  rank?: number;
  worldSize?: number;
  /** The layer's dtype: bf16 (default) or f32 (CPU tests). */
  dtype?: 'bf16' | 'f32';
  device?: DeviceLike;
  /**
   * Read into these tensors instead of new ones (each contiguous, of its result's shape, `dtype`,
   * the bias f32, on `device`): a training layer's masters, with no second copy. They stay the
   * caller's (the result's dispose leaves them); a failed read may leave them partly written.
   */
  into?: Partial<Record<HfWeightName, Tensor>>;
}

/** The tensors of one layer's MoE weights. */
export type HfWeightName = 'router' | 'bias' | 'w13' | 'w2' | 'sharedW13' | 'sharedW2' | 'sharedGate' | 'routerBias' | 'w13Bias' | 'w2Bias';
const WEIGHT_NAMES: readonly HfWeightName[] = [
  'router',
  'bias',
  'w13',
  'w2',
  'sharedW13',
  'sharedW2',
  'sharedGate',
  'routerBias',
  'w13Bias',
  'w2Bias',
];

/** HfMoECheckpoint.inspectLayer's answer. */
export interface HfLayerInspection {
  layer: number;
  /** Tensors found as the config needs them, and their data bytes; of those, the routed experts' bytes. */
  tensors: number;
  bytes: number;
  expertBytes: number;
  /** What readLayer would refuse, one message per tensor, the first INSPECT_PROBLEMS_KEPT (empty: the layer loads). */
  problems: string[];
  /** Problems found past those. */
  moreProblems: number;
}

/** Problems inspectLayer keeps in full per layer. */
export const INSPECT_PROBLEMS_KEPT = 32;

export interface HfOpenOptions {
  /** Use this object instead of the folder's config.json. */
  config?: Record<string, unknown>;
}

/** What a checkpoint has read so far. */
export interface HfReadStats {
  /** Files whose header was read. */
  filesOpened: number;
  /** Header bytes read (8-byte length + JSON), over all files opened. */
  headerBytes: number;
  /** Tensors read, and their data bytes. */
  tensorsRead: number;
  tensorBytes: number;
}

function fail(dir: string, message: string): never {
  throw new CheckpointError(`hf checkpoint ${dir}: ${message}`);
}

/**
 * A Hugging Face MoE checkpoint folder, opened: its config mapped onto the package (`model`) and
 * its weight map validated; tensors are read on demand with readLayer(). close() (or `using`)
 * releases the open files.
 */
export class HfMoECheckpoint implements Disposable {
  readonly dir: string;
  readonly config: Readonly<Record<string, unknown>>;
  readonly model: HfMoEModel;
  /** Tensor name → the plain file name holding it. */
  readonly weightMap: ReadonlyMap<string, string>;
  readonly stats: HfReadStats = { filesOpened: 0, headerBytes: 0, tensorsRead: 0, tensorBytes: 0 };
  /** Real path of the folder: every file read lies inside it. */
  readonly #real: string;
  readonly #open = new Map<string, SafetensorsFile>();
  /** Where the config came from, for errors: the folder's config.json or options.config. */
  readonly #configSource: string;
  /** Weight-map names by their pattern (digits as #), for the hint of a missing tensor. */
  #patterns: Map<string, string[]> | undefined;

  private constructor(
    dir: string,
    real: string,
    config: Record<string, unknown>,
    model: HfMoEModel,
    weightMap: Map<string, string>,
    configSource: string,
  ) {
    this.dir = dir;
    this.#real = real;
    this.config = config;
    this.model = model;
    this.weightMap = weightMap;
    this.#configSource = configSource;
  }

  /** Opens `dir`: config.json (or options.config), then the index's weight map or model.safetensors's header. */
  static open(dir: string, options: HfOpenOptions = {}): HfMoECheckpoint {
    options = checkOptions(options, 'HfMoECheckpoint.open', { config: true });
    if (typeof dir !== 'string' || dir === '')
      invalidArgument('HfMoECheckpoint.open', `'dir' must be a folder path; received ${String(dir)}`);
    const real = realFolder(dir, `hf checkpoint ${dir}`);
    const inside = (name: string): string | undefined => resolveInside(real, name, `hf checkpoint ${dir}: ${name}`);
    let config = options.config;
    if (config === undefined) {
      const path = inside(HF_CONFIG_FILE);
      if (path === undefined) fail(dir, `${HF_CONFIG_FILE} is missing (pass options.config to give the model's config another way)`);
      config = readJson(path, { what: `hf checkpoint ${dir}: ${HF_CONFIG_FILE}`, maxBytes: CONFIG_MAX_BYTES, maxDepth: 16 }) as Record<
        string,
        unknown
      >;
    }
    const configSource = options.config === undefined ? HF_CONFIG_FILE : 'options.config';
    const model = hfMoEModel(config, `hf checkpoint ${dir}: ${configSource}`);
    const weightMap = new Map<string, string>();
    const index = inside(HF_INDEX_FILE);
    if (index !== undefined) {
      const what = `hf checkpoint ${dir}: ${HF_INDEX_FILE}`;
      const json = readJson(index, { what, maxBytes: INDEX_MAX_BYTES, maxDepth: 8 }) as { weight_map?: unknown } | null;
      const map = json !== null && typeof json === 'object' && !Array.isArray(json) ? json.weight_map : undefined;
      if (map === null || typeof map !== 'object' || Array.isArray(map)) fail(dir, `${HF_INDEX_FILE} has no 'weight_map' object`);
      const checked = new Set<string>();
      for (const [name, file] of Object.entries(map as Record<string, unknown>)) {
        if (typeof file !== 'string')
          fail(dir, `${HF_INDEX_FILE}: weight_map['${name}'] must be a file name; found ${JSON.stringify(file)}`);
        if (!checked.has(file)) {
          // Plain names only: '../x', '/etc/x', 'sub/x' are refused before any path is built.
          checkPlainName(file, `hf checkpoint ${dir}: ${HF_INDEX_FILE}: weight_map['${name}']`, CheckpointError);
          checked.add(file);
        }
        weightMap.set(name, file);
      }
    } else {
      const single = inside(HF_SINGLE_FILE);
      if (single === undefined) fail(dir, `neither ${HF_INDEX_FILE} nor ${HF_SINGLE_FILE} is there`);
      const f = SafetensorsFile.open(single);
      const ckpt = new HfMoECheckpoint(dir, real, config, model, weightMap, configSource);
      ckpt.#open.set(HF_SINGLE_FILE, f);
      ckpt.stats.filesOpened++;
      ckpt.stats.headerBytes += f.dataStart;
      for (const name of f.allNames) weightMap.set(name, HF_SINGLE_FILE);
      return ckpt;
    }
    return new HfMoECheckpoint(dir, real, config, model, weightMap, configSource);
  }

  get family(): HfMoEFamily {
    return this.model.block.family;
  }
  get block(): HfMoEBlock {
    return this.model.block;
  }

  /** The tensor names of a layer's MoE block (the layer must be one of model.moeLayers). */
  names(layer: number): HfMoENames {
    if (!Number.isSafeInteger(layer)) invalidArgument('HfMoECheckpoint', `'layer' must be an integer; received ${shown(layer)}`);
    if (!this.model.moeLayers.includes(layer)) {
      const l = this.model.moeLayers;
      invalidArgument(
        'HfMoECheckpoint',
        `layer ${String(layer)} has no MoE block (the MoE layers are ${l.length > 8 ? `${l.slice(0, 8).join(', ')}, …` : l.join(', ')} of ${this.model.numLayers})`,
      );
    }
    return hfMoENames(this.family, layer, this.block);
  }

  /** Up to 3 names of the weight map that differ from `name` in their numbers only (built once: inspect asks for many). */
  private similarNames(name: string): string[] {
    const pattern = (n: string): string => n.replace(/\d+/g, '#');
    if (this.#patterns === undefined) {
      this.#patterns = new Map();
      for (const n of this.weightMap.keys()) {
        const list = this.#patterns.get(pattern(n));
        if (list === undefined) this.#patterns.set(pattern(n), [n]);
        else if (list.length < 3) list.push(n);
      }
    }
    return this.#patterns.get(pattern(name)) ?? [];
  }

  /** The open file holding `name`, and its header entry, checked against `shape` and what it may hold (Readable). */
  private locate(
    name: string,
    shape: readonly number[],
    readable: Readable = 'weight',
  ): { file: string; f: SafetensorsFile; info: TensorInfo } {
    const file = this.weightMap.get(name);
    if (file === undefined) {
      const like = this.similarNames(name);
      fail(
        this.dir,
        `tensor '${name}' is not in the checkpoint (${this.weightMap.size} tensors${like.length ? `; similar: ${like.join(', ')}` : ''})`,
      );
    }
    let f = this.#open.get(file);
    if (f === undefined) {
      const path = resolveInside(this.#real, file, `hf checkpoint ${this.dir}: ${file}`);
      if (path === undefined) fail(this.dir, `${file} is missing (${HF_INDEX_FILE} puts '${name}' there)`);
      f = SafetensorsFile.open(path);
      this.#open.set(file, f);
      this.stats.filesOpened++;
      this.stats.headerBytes += f.dataStart;
    }
    // A dtype moe-ep does not read at all (f.foreign), or one the MoE weights are not read from.
    const foreign = f.foreign.get(name)?.dtype;
    if (foreign === undefined && !f.has(name))
      fail(this.dir, `${file} does not hold tensor '${name}' although ${HF_INDEX_FILE} puts it there`);
    const info = foreign === undefined ? f.info(name) : null;
    const fp8 = readable === 'weight' && info?.dtype === 'fp8e4m3' && this.weightMap.has(name + HF_FP8_SCALE_SUFFIX);
    const ok = info !== null && (readable === 'packed' ? info.dtype === 'u8' : READABLE.includes(info.dtype) || fp8);
    if (!ok) {
      const is = `${file}: tensor '${name}' is ${foreign ?? info?.dtype}`;
      fail(
        this.dir,
        readable === 'weight'
          ? `${is}; the MoE weights are read from BF16, F16, F32, or F8_E4M3 with '${name}${HF_FP8_SCALE_SUFFIX}' block scales${info?.dtype === 'fp8e4m3' ? ` (there is no '${name}${HF_FP8_SCALE_SUFFIX}')` : ''}`
          : readable === 'fused'
            ? `${is}; fused expert tensors are read from BF16, F16 or F32`
            : `${is}; MXFP4 blocks and scales are U8`,
      );
    }
    if (info === null) throw new Error('unreachable');
    if (info.shape.join() !== shape.join()) {
      fail(
        this.dir,
        `${file}: tensor '${name}' is [${info.shape.join(',')}] but the ${this.family} config (${this.#configSource}) needs [${shape.join(',')}]`,
      );
    }
    return { file, f, info };
  }

  /**
   * Reads one tensor (after checking its shape) as a CPU tensor of the file's dtype and passes it to
   * `use`, which copies it where it belongs; the host copy is freed afterwards.
   */
  private read(name: string, shape: readonly number[], use: (src: Tensor) => void): void {
    const { f, info } = this.locate(name, shape);
    const bytes = f.readBytes(name); // positioned reads of this tensor's bytes alone
    this.stats.tensorsRead++;
    this.stats.tensorBytes += bytes.byteLength;
    if (info.dtype === 'fp8e4m3') {
      this.readFp8(name, info.shape as [number, number], bytes, use);
      return;
    }
    tidy(() => {
      const src = Tensor.fromArray(storageView(info.dtype, bytes.buffer as ArrayBuffer), {
        dtype: info.dtype,
        shape: info.shape,
        device: 'cpu',
      });
      use(src);
    });
  }

  /**
   * Expert j's rows of a fused [E, …] tensor (after checking its shape) as a CPU tensor [1, …] of
   * the file's dtype, passed to `use`; only those rows' bytes are read.
   */
  private readExpertRows(name: string, shape: readonly number[], j: number, use: (src: Tensor) => void): void {
    const { f, info } = this.locate(name, shape, 'fused');
    const bytes = f.readRows(name, j, 1);
    this.stats.tensorsRead++;
    this.stats.tensorBytes += bytes.byteLength;
    tidy(() =>
      use(
        Tensor.fromArray(storageView(info.dtype, bytes.buffer as ArrayBuffer), {
          dtype: info.dtype,
          shape: [1, ...info.shape.slice(1)],
          device: 'cpu',
        }),
      ),
    );
  }

  /**
   * Expert j's F rows of a stacked [E·F, H] tensor (DBRX) as a CPU tensor [1, F, H] of the file's
   * dtype, passed to `use`; only those rows' bytes are read.
   */
  private readStackedRows(name: string, E: number, F: number, H: number, j: number, use: (src: Tensor) => void): void {
    const { f, info } = this.locate(name, [E * F, H], 'fused');
    const bytes = f.readRows(name, j * F, F);
    this.stats.tensorsRead++;
    this.stats.tensorBytes += bytes.byteLength;
    tidy(() =>
      use(Tensor.fromArray(storageView(info.dtype, bytes.buffer as ArrayBuffer), { dtype: info.dtype, shape: [1, F, H], device: 'cpu' })),
    );
  }

  /**
   * Expert j's rows of a fused MXFP4 weight [E, out, in] (`<name>_blocks` and `<name>_scales`),
   * decoded, as a CPU f32 tensor [1, out, in] passed to `use`; only those rows' bytes are read.
   */
  private readMxfp4Rows(name: string, E: number, out: number, inDim: number, j: number, use: (src: Tensor) => void): void {
    const [[blocksName, blocksShape], [scalesName, scalesShape]] = mxfp4Tensors(name, E, out, inDim) as [
      [string, number[], Readable],
      [string, number[], Readable],
    ];
    const b = this.locate(blocksName, blocksShape, 'packed');
    const sc = this.locate(scalesName, scalesShape, 'packed');
    const blocks = b.f.readRows(blocksName, j, 1);
    const scales = sc.f.readRows(scalesName, j, 1);
    this.stats.tensorsRead += 2;
    this.stats.tensorBytes += blocks.byteLength + scales.byteLength;
    tidy(() => use(Tensor.fromArray(decodeMxfp4(blocks, scales, out, inDim), { shape: [1, out, inDim], device: 'cpu' })));
  }

  /**
   * Whether the fused experts are stored in MXFP4 (their `_blocks` in the weight map); then the
   * widths they pack (H and F) must be multiples of 32, else the layer is refused by name.
   */
  private isMxfp4(names: HfMoENames, F: number, H: number): boolean {
    const fused = names.fused;
    if (fused === null || !this.weightMap.has(fused.gateUp + HF_MXFP4_BLOCKS_SUFFIX)) return false;
    for (const [what, n] of [
      ['hidden_size', H],
      ['intermediate_size', F],
    ] as const)
      if (n % MXFP4_BLOCK !== 0)
        fail(
          this.dir,
          `the experts are in MXFP4 ('${fused.gateUp}${HF_MXFP4_BLOCKS_SUFFIX}'), whose blocks hold ${MXFP4_BLOCK} values of a row: ${what} ${n} is not a multiple of ${MXFP4_BLOCK}`,
        );
    return true;
  }

  /** Why an FP8 weight of C columns cannot be read (the config's block size, the columns), or null. */
  private fp8Problem(name: string, C: number): string | null {
    const block = this.config['quantization_config'] as { weight_block_size?: unknown } | undefined;
    const size = block?.weight_block_size;
    if (size !== undefined && !(Array.isArray(size) && size.length === 2 && size[0] === FP8_WEIGHT_BLOCK && size[1] === FP8_WEIGHT_BLOCK))
      return `${this.#configSource}: quantization_config.weight_block_size ${JSON.stringify(size)}: FP8 weights are read with 128×128 blocks only`;
    if (C % FP8_WEIGHT_BLOCK !== 0)
      return `${this.weightMap.get(name)}: FP8 tensor '${name}' has ${C} columns, not a multiple of ${FP8_WEIGHT_BLOCK}`;
    return null;
  }

  /** An FP8 weight [R,C] and its block scales [ceil(R/128), C/128], dequantised to f32 (module doc). */
  private readFp8(name: string, [R, C]: [number, number], bytes: Uint8Array, use: (src: Tensor) => void): void {
    const problem = this.fp8Problem(name, C);
    if (problem !== null) fail(this.dir, problem);
    const scaleName = name + HF_FP8_SCALE_SUFFIX;
    const rowBlocks = Math.ceil(R / FP8_WEIGHT_BLOCK),
      colBlocks = C / FP8_WEIGHT_BLOCK;
    const s = this.locate(scaleName, [rowBlocks, colBlocks]);
    const scaleBytes = s.f.readBytes(scaleName);
    this.stats.tensorsRead++;
    this.stats.tensorBytes += scaleBytes.byteLength;
    tidy(() => {
      const scales = Tensor.fromArray(storageView(s.info.dtype, scaleBytes.buffer as ArrayBuffer), {
        dtype: s.info.dtype,
        shape: s.info.shape,
        device: 'cpu',
      }).cast('f32');
      // Block rows → one scale row per weight row (the native dequantisation takes [R, C/128]).
      const perBlock = scales.toArray() as Float32Array;
      const perRow = new Float32Array(R * colBlocks);
      for (let r = 0; r < R; r++)
        perRow.set(
          perBlock.subarray(Math.floor(r / FP8_WEIGHT_BLOCK) * colBlocks, (Math.floor(r / FP8_WEIGHT_BLOCK) + 1) * colBlocks),
          r * colBlocks,
        );
      const q = Tensor.fromArray(bytes, { dtype: 'fp8e4m3', shape: [R, C], device: 'cpu' });
      use(dequantizeFp8({ q, scales: Tensor.fromArray(perRow, { shape: [R, colBlocks], device: 'cpu' }) }, 'f32'));
    });
  }

  /**
   * Layer `layer`'s MoE weights for rank `rank` of `worldSize` (its experts only), in the layer's
   * layout and dtype, on `device`. Dispose the result (or hand it to an MoEInference, which takes it).
   */
  readLayer(layer: number, options: HfReadOptions = {}): HfMoEWeights {
    const op = 'HfMoECheckpoint.readLayer';
    options = checkOptions(options, op, { rank: true, worldSize: true, dtype: true, device: true, into: true });
    const names = this.names(layer);
    const { hidden: H, ffn: F, numExperts: E, sharedFfn: Fs } = this.block;
    const { first, count: El } = ownedExperts(E, options.worldSize ?? 1, options.rank ?? 0);
    const dtype = options.dtype ?? 'bf16';
    if (dtype !== 'bf16' && dtype !== 'f32') invalidArgument(op, `'dtype' must be 'bf16' or 'f32'; received ${String(dtype)}`);
    const device = Device.parse(options.device ?? getDefaultDevice(), op);
    const into = options.into ?? {};
    if (into === null || typeof into !== 'object') invalidArgument(op, `'into' must be an object of tensors`);
    for (const k of Object.keys(into))
      if (!(WEIGHT_NAMES as readonly string[]).includes(k))
        invalidArgument(op, `'into' has an unknown key '${k}' (it takes ${WEIGHT_NAMES.join(', ')})`);
    const absent: Partial<Record<HfWeightName, boolean>> = {
      bias: names.bias === null,
      sharedW13: names.shared === null,
      sharedW2: names.shared === null,
      sharedGate: names.sharedGate === null,
      routerBias: names.routerBias === null,
      w13Bias: names.expertBias === null,
      w2Bias: names.expertBias === null,
    };
    for (const k of Object.keys(into) as HfWeightName[])
      if (absent[k] && into[k] !== undefined) invalidArgument(op, `'into.${k}' was given but the ${this.family} block has none`);
    const made: Tensor[] = [];
    const alloc = (name: HfWeightName, shape: number[], dt: DType = dtype): Tensor => {
      const given = into[name];
      if (given !== undefined) {
        if (!(given instanceof Tensor)) invalidArgument(op, `'into.${name}' must be a Tensor`);
        if (given.shape.join() !== shape.join() || given.dtype !== dt || !given.device.equals(device) || !given.isContiguous)
          invalidArgument(
            op,
            `'into.${name}' must be a contiguous ${dt} [${shape.join(',')}] on ${device.toString()}; received ${given.dtype} [${given.shape.join(',')}] on ${given.device.toString()}`,
          );
        return given;
      }
      const t = Tensor.empty(shape, { dtype: dt, device });
      made.push(t);
      return t;
    };
    try {
      // The files' shapes first (headers only): a config.json whose sizes disagree with the tensors
      // must be refused by name, not allocate what it asks for.
      this.locate(names.gate, [E, H]);
      const mxfp4 = this.isMxfp4(names, F, H);
      if (El > 0) for (const [name, shape, readable] of expertTensors(names, first, E, F, H, mxfp4)) this.locate(name, shape, readable);
      if (names.shared !== null) for (const [name, shape] of mlpTensors(names.shared, Fs, H)) this.locate(name, shape);
      // The gate [E,H] → router [1,H,E].
      const router = alloc('router', [1, H, E]);
      this.read(names.gate, [E, H], (src) => router.copy_(src.view(1, E, H).transpose(1, 2)));
      let bias: Tensor | null = null;
      if (names.bias !== null) {
        const b = alloc('bias', [E], 'f32');
        this.read(names.bias, names.biasShape(E), (src) => b.copy_(src.view(E)));
        bias = b;
      }
      let routerBias: Tensor | null = null;
      if (names.routerBias !== null) {
        const b = alloc('routerBias', [E], 'f32');
        this.read(names.routerBias, [E], (src) => b.copy_(src));
        routerBias = b;
      }
      const w13 = alloc('w13', [El, H, 2 * F]);
      const w2 = alloc('w2', [El, F, H]);
      /** w13[i] of `into13` viewed as [1,H,f,2]: slot 0 takes the gateᵀ, slot 1 the upᵀ. */
      const pairsOf = (into13: Tensor, i: number, f: number): Tensor => into13.view(into13.shape[0] as number, H, f, 2).narrow(0, i, 1);
      /** One MLP stored as nn.Linear weights ([out, in]) into row i of into13 and into2. */
      const fill = (i: number, m: HfMlpNames, f: number, into13: Tensor, into2: Tensor): void => {
        const pairs = pairsOf(into13, i, f);
        if ('gateUp' in m) this.read(m.gateUp, [2 * f, H], (src) => copyGateUp(pairs, src.view(1, 2, f, H), 'rows'));
        else {
          this.read(m.gate, [f, H], (src) => pairs.narrow(3, 0, 1).copy_(src.view(1, f, H, 1).transpose(1, 2)));
          this.read(m.up, [f, H], (src) => pairs.narrow(3, 1, 1).copy_(src.view(1, f, H, 1).transpose(1, 2)));
        }
        this.read(m.down, [H, f], (src) => into2.narrow(0, i, 1).copy_(src.view(1, H, f).transpose(1, 2)));
      };
      /**
       * Expert first + i's rows of the fused tensors into row i of w13 and w2: [1,H,2F] and [1,F,H]
       * ('columns', x·W) or [1,2F,H] and [1,H,F] ('rows', nn.Linear; MXFP4 is stored so).
       */
      const fillFused = (i: number, fused: HfFusedExpertNames): void => {
        const [[gateUp, gateUpShape], [down, downShape]] = fusedTensors(fused, E, F, H);
        const orientation = !mxfp4 && fused.layout === 'x·W' ? 'columns' : 'rows';
        const intoGateUp = (src: Tensor): void => {
          if (fused.split === 'interleaved') w13.narrow(0, i, 1).copy_(orientation === 'columns' ? src : src.transpose(1, 2));
          else copyGateUp(pairsOf(w13, i, F), orientation === 'columns' ? src.view(1, H, 2, F) : src.view(1, 2, F, H), orientation);
        };
        const intoDown = (src: Tensor): void => void w2.narrow(0, i, 1).copy_(orientation === 'columns' ? src : src.transpose(1, 2));
        if (mxfp4) {
          this.readMxfp4Rows(gateUp, E, 2 * F, H, first + i, intoGateUp);
          this.readMxfp4Rows(down, E, H, F, first + i, intoDown);
        } else {
          this.readExpertRows(gateUp, gateUpShape, first + i, intoGateUp);
          this.readExpertRows(down, downShape, first + i, intoDown);
        }
      };
      /** Expert first + i's rows of the stacked tensors (DBRX): gate and up [1,F,H] rows, down [1,F,H] as w2. */
      const fillStacked = (i: number, s: { gate: string; up: string; down: string }): void => {
        const pairs = pairsOf(w13, i, F);
        this.readStackedRows(s.gate, E, F, H, first + i, (src) => pairs.narrow(3, 0, 1).copy_(src.view(1, F, H, 1).transpose(1, 2)));
        this.readStackedRows(s.up, E, F, H, first + i, (src) => pairs.narrow(3, 1, 1).copy_(src.view(1, F, H, 1).transpose(1, 2)));
        this.readStackedRows(s.down, E, F, H, first + i, (src) => void w2.narrow(0, i, 1).copy_(src));
      };
      tidy(() => {
        for (let i = 0; i < El; i++) {
          if (names.expert !== null) fill(i, names.expert(first + i), F, w13, w2);
          else if (names.stacked !== undefined) fillStacked(i, names.stacked);
          else fillFused(i, names.fused as HfFusedExpertNames);
        }
      });
      // The experts' biases (gpt-oss): rows of [E,2F] (split as the fused weight) and [E,H].
      let w13Bias: Tensor | null = null;
      let w2Bias: Tensor | null = null;
      if (names.expertBias !== null) {
        const eb = names.expertBias;
        const b13 = alloc('w13Bias', [El, 2 * F]);
        const b2 = alloc('w2Bias', [El, H]);
        tidy(() => {
          for (let i = 0; i < El; i++) {
            // Interleaved as w13's columns (gpt-oss's layout, the one family with expert biases).
            this.readExpertRows(eb.gateUp, [E, 2 * F], first + i, (src) => b13.narrow(0, i, 1).copy_(src));
            this.readExpertRows(eb.down, [E, H], first + i, (src) => b2.narrow(0, i, 1).copy_(src));
          }
        });
        w13Bias = b13;
        w2Bias = b2;
      }
      let sharedW13: Tensor | null = null;
      let sharedW2: Tensor | null = null;
      if (names.shared !== null) {
        const s13 = alloc('sharedW13', [1, H, 2 * Fs]);
        const s2 = alloc('sharedW2', [1, Fs, H]);
        const sh = names.shared;
        tidy(() => fill(0, sh, Fs, s13, s2));
        sharedW13 = s13;
        sharedW2 = s2;
      }
      let sharedGate: Tensor | null = null;
      if (names.sharedGate !== null) {
        const g = alloc('sharedGate', [1, H, 1]);
        this.read(names.sharedGate, [1, H], (src) => g.copy_(src.view(1, H, 1)));
        sharedGate = g;
      }
      return {
        router,
        bias,
        w13,
        w2,
        sharedW13,
        sharedW2,
        sharedGate,
        routerBias,
        w13Bias,
        w2Bias,
        firstExpert: first,
        localExperts: El,
        dispose() {
          for (const t of made) t.dispose();
        },
        [Symbol.dispose]() {
          this.dispose();
        },
      };
    } catch (e) {
      for (const t of made) t.dispose();
      throw e;
    }
  }

  /**
   * Checks, from the files' headers alone (no weight bytes read), every tensor that readLayer(layer)
   * would read for any rank: present where the weight map says, a readable dtype, the config's shape,
   * FP8 weights with block scales of the right shape. Returns the tensors' count and data bytes (FP8
   * scales included), and each problem found as the message readLayer would throw.
   */
  inspectLayer(layer: number): HfLayerInspection {
    const names = this.names(layer);
    const { hidden: H, ffn: F, numExperts: E, sharedFfn: Fs } = this.block;
    const result: HfLayerInspection = { layer, tensors: 0, bytes: 0, expertBytes: 0, problems: [], moreProblems: 0 };
    // The first problems are kept whole; a checkpoint of another layout fails every tensor.
    const problem = (message: string): void => {
      if (result.problems.length < INSPECT_PROBLEMS_KEPT) result.problems.push(message);
      else result.moreProblems++;
    };
    // [name, shape, a routed expert's, what it may hold]
    const wanted: [string, number[], boolean, Readable][] = [[names.gate, [E, H], false, 'weight']];
    if (names.bias !== null) wanted.push([names.bias, names.biasShape(E), false, 'weight']);
    if (names.routerBias !== null) wanted.push([names.routerBias, [E], false, 'weight']);
    // Every expert's tensors (the fused ones once; MXFP4's blocks and scales where the files hold them).
    let mxfp4 = false;
    let expertsReadable = true;
    try {
      mxfp4 = this.isMxfp4(names, F, H);
    } catch (e) {
      if (!(e instanceof CheckpointError)) throw e;
      // MXFP4 of widths it cannot pack: that one problem, not every tensor of another layout.
      problem(e.message);
      expertsReadable = false;
    }
    for (let j = 0; expertsReadable && j < (names.expert === null ? 1 : E); j++)
      for (const [name, shape, readable] of expertTensors(names, j, E, F, H, mxfp4)) wanted.push([name, shape, true, readable]);
    if (names.shared !== null) for (const [name, shape] of mlpTensors(names.shared, Fs, H)) wanted.push([name, shape, false, 'weight']);
    if (names.sharedGate !== null) wanted.push([names.sharedGate, [1, H], false, 'weight']);
    const check = (name: string, shape: readonly number[], expert: boolean, readable: Readable = 'weight'): TensorInfo | null => {
      try {
        const { info } = this.locate(name, shape, readable);
        result.tensors++;
        result.bytes += info.byteLength;
        if (expert) result.expertBytes += info.byteLength;
        return info;
      } catch (e) {
        if (!(e instanceof CheckpointError)) throw e;
        problem(e.message);
        return null;
      }
    };
    for (const [name, shape, expert, readable] of wanted) {
      const info = check(name, shape, expert, readable);
      if (info?.dtype !== 'fp8e4m3') continue;
      const [R, C] = shape as [number, number];
      const fp8 = this.fp8Problem(name, C);
      if (fp8 !== null) problem(`hf checkpoint ${this.dir}: ${fp8}`);
      else check(name + HF_FP8_SCALE_SUFFIX, [Math.ceil(R / FP8_WEIGHT_BLOCK), C / FP8_WEIGHT_BLOCK], expert);
    }
    return result;
  }

  /** The file names this checkpoint's weight map refers to. */
  get files(): string[] {
    return [...new Set(this.weightMap.values())].sort();
  }

  close(): void {
    for (const f of this.#open.values()) f.close();
    this.#open.clear();
  }
  [Symbol.dispose](): void {
    this.close();
  }

  toString(): string {
    return `HfMoECheckpoint(${this.family}, ${basename(this.dir)}, ${this.model.moeLayers.length} MoE layers)`;
  }
}
