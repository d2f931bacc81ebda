/**
 * Hugging Face MoE configs (config.json) mapped onto the package's router and expert options.
 *
 * Families (config.json `model_type`) and what their MoE block computes, x [T,H] one token per row:
 *
 *   mixtral      logits = x·Wgᵀ; p = softmax(logits); top-k of p; weights = p_top / Σ p_top
 *                y = Σ_j weights_j · E_j(x),  E(x) = (silu(x·W1ᵀ) ⊙ (x·W3ᵀ))·W2ᵀ
 *                every layer is an MoE layer
 *   deepseek_v2  DeepSeek-V2, V2-Lite, V2.5, Coder-V2 (transformers' DeepseekV2MoE; DeepSeek's
 *                modeling_deepseek.py computes the same for the released configs): p = softmax(x·Wgᵀ)
 *                in fp32; topk_method 'greedy' (DeepSeek's own code spells it 'gready'): top-k of p;
 *                'group_limited_greedy': n_group contiguous groups, a group scores its MAXIMUM p, keep
 *                the best topk_group groups, top-k inside them; weights = p_top · routed_scaling_factor
 *                (never renormalised: norm_topk_prob true is refused, the three implementations
 *                disagree on it); y = Σ_j weights_j · E_j(x) + S(x), S the shared experts (width
 *                moe_intermediate_size · n_shared_experts), added ungated
 *                MoE layers: layer ≥ first_k_dense_replace and layer % moe_layer_freq == 0
 *   deepseek_v3  s = sigmoid(x·Wgᵀ); b = e_score_correction_bias (selection only)
 *                groups: n_group contiguous groups, a group scores the sum of its top-2 (s + b),
 *                keep the best topk_group groups, then top-k of (s + b) inside them
 *                weights = s_top (/ Σ s_top when norm_topk_prob) · routed_scaling_factor
 *                y = Σ_j weights_j · E_j(x) + S(x), S the shared experts (one MLP of width
 *                moe_intermediate_size · n_shared_experts)
 *                MoE layers: layer ≥ first_k_dense_replace and layer % moe_layer_freq == 0
 *   qwen2_moe    p = softmax(x·Wgᵀ); top-k; weights = p_top (/ Σ p_top when norm_topk_prob, default
 *                false); y = Σ_j weights_j · E_j(x) + sigmoid(x·g) · S(x), g = shared_expert_gate [1,H]
 *                MoE layers: (layer + 1) % decoder_sparse_step == 0 and layer ∉ mlp_only_layers
 *   qwen3_moe    as qwen2_moe without the shared expert
 *   granitemoe   Granite 3.x MoE (transformers' GraniteMoe, from JetMoe's gating): top-k of the logits,
 *                softmax over those k in fp32 (= softmax, top-k, renormalised); experts of
 *                intermediate_size; every layer is an MoE layer
 *   granitemoeshared, granitemoehybrid  granitemoe's block plus a shared MLP of
 *                shared_intermediate_size added ungated (granitemoeshared: none at 0, its default;
 *                granitemoehybrid, Granite 4.0, default 1024); granitemoehybrid's Mamba and attention
 *                layers all carry the block (the model's other layers are the caller's)
 *
 * The same blocks under other model_types (transformers' classes reuse them; the config classes'
 * defaults differ, DEEPSEEK_V3_BLOCKS and QWEN_MOE_BLOCKS below):
 *   kimi_k2      Kimi K2: DeepSeek-V3's architecture, run by DeepSeek's own modeling_deepseek.py
 *                (which renormalises only for top-k > 1)
 *   glm4_moe     GLM-4.5: DeepSeek-V3's router and block, without scoring_func/topk_method/moe_layer_freq
 *   dots1        dots.llm1: DeepSeek-V3's router and block (Dots1MoE is DeepseekV3MoE)
 *   qwen3_next   Qwen3-Next's MoE block: qwen2_moe's (shared expert and its gate); the model's other
 *                layers (linear attention) are the caller's
 *   olmoe        OLMoE: qwen3_moe's block, the expert width in intermediate_size, every layer MoE
 *   llama4       Llama 4 (Scout, Maverick; its language model, fields in text_config): top-k of the
 *                logits, s = sigmoid of the chosen (not renormalised), and s scales the expert's
 *                INPUT: y = Σ_j E_j(s_j·x) + S(x), S the shared expert of intermediate_size (the
 *                experts' width too), added ungated; served for top-1, as every released Llama 4 is;
 *                MoE layers: moe_layers, else every interleave_moe_layer_step-th from step − 1
 *   gpt_oss      gpt-oss: logits = x·Wgᵀ + b (a router bias, choosing and weighting); top-k of the
 *                logits, softmax over those k; experts with biases and a clamped SwiGLU:
 *                [g | u] = x·W13 + b13 (gate and up interleaved by column), h = (clamp(u, ±L) + 1) ·
 *                min(g, L)·sigmoid(1.702·min(g, L)), E(x) = h·W2 + b2, L = swiglu_limit (7);
 *                y = Σ_j weights_j · E_j(x); every layer is an MoE layer; no shared expert
 *   jamba        Jamba (v0.1, 1.5 Mini and Large; transformers' JambaSparseMoeBlock): p = softmax(x·Wgᵀ)
 *                in fp32; top-k of p, NOT renormalised; y = Σ_j weights_j · E_j(x), experts of
 *                intermediate_size, no shared expert; MoE layers: layer % expert_layer_period ==
 *                expert_layer_offset (the others are dense MLPs: the caller's, as are the Mamba and attention
 *                mixers); num_experts 1 (every layer dense) is refused
 *   dbrx         DBRX (transformers' DbrxFFN): p = softmax(x·Wgᵀ) in fp32, top-k (ffn_config.moe_top_k),
 *                divided by their p-norm, p = ffn_config.moe_normalize_expert_weights (default 1: the
 *                sum, i.e. renormalised; null: as they are; other p refused); experts of
 *                ffn_config.ffn_hidden_size, activation ffn_config.ffn_act_fn.name (silu); every block
 *                MoE, no shared expert; sizes d_model, n_layers, ffn_config.moe_num_experts
 *   deepseek     DeepSeekMoE 16B (v1; DeepSeek's modeling_deepseek.py, vLLM's deepseek.py): p = softmax(x·Wgᵀ);
 *                top-k; weights = p_top (/ (Σ p_top + 1e-20) when norm_topk_prob and k > 1); no scaling;
 *                shared experts (moe_intermediate_size · n_shared_experts) added ungated; MoE layers as
 *                deepseek_v2's; norm_topk_prob and n_shared_experts required (the config class's
 *                defaults were not confirmed; the released configs set both)
 *   bailing_moe  Ling / Ring (inclusionAI's modeling_bailing_moe*.py), the version from `architectures`:
 *                BailingMoeForCausalLM (v1, Ling-lite/plus): p = softmax(x·Wgᵀ) in fp32, top-k,
 *                renormalised when k > 1 and norm_topk_prob (default true), no scaling;
 *                BailingMoeV2ForCausalLM (Ling 2.0): s = sigmoid(x·Wgᵀ) in fp32, b = gate.expert_bias
 *                (selection only, when moe_router_enable_expert_bias, default true), groups scored by
 *                their top 2 (n_group 8, topk_group 4 by default), top-k, renormalised when k > 1, ×
 *                routed_scaling_factor (1); both: shared experts (moe_intermediate_size ·
 *                num_shared_experts; v1 default 0, v2 1) added ungated, MoE layers ≥ first_k_dense_replace
 *                (v1 0, v2 1); the multi-token-prediction layers past num_hidden_layers are the caller's
 *   qwen3_vl_moe Qwen3-VL-MoE's language model: qwen3_moe's block, always renormalised (transformers
 *                does not read norm_topk_prob), its fields in config.json's text_config; the vision
 *                tower is the caller's
 *   ernie4_5_moe p = softmax(x·Wgᵀ) (in fp32); b = moe_statics.e_score_correction_bias [1,E]
 *                (selection only: top-k of p + b); weights = p_top / max(Σ p_top, moe_norm_min);
 *                y = Σ_j weights_j · E_j(x) + S(x), S the shared experts (width
 *                moe_intermediate_size · moe_num_shared_experts), added ungated
 *                MoE layers: (layer + 1) % moe_layer_interval == 0 and moe_layer_start_index ≤ layer
 *                ≤ moe_layer_end_index (-1: the last); use_bias (biases in the experts) is refused
 *   minimax_m2   MiniMax-M2: s = sigmoid(x·Wgᵀ); b = e_score_correction_bias (selection only);
 *                top-k of s + b; weights = s_top / Σ s_top; y = Σ_j weights_j · E_j(x), Mixtral's
 *                tensor names and expert width (intermediate_size); every layer is an MoE layer
 *   hunyuan_v1_moe  Hunyuan-A13B (transformers' HunYuanMoE): p = softmax(x·Wgᵀ) (the gate `wg` in
 *                fp32); top-k (moe_topk); weights = p_top / Σ p_top when k > 1, p_top at top-1;
 *                y = Σ_j weights_j · E_j(x) + S(x), S the shared MLP, added ungated; experts and
 *                shared MLP of width intermediate_size; every layer is an MoE layer. num_experts and
 *                moe_topk may be per-layer lists (one value throughout is served). Dropless, as vLLM
 *                serves it: transformers' eager topkgating also caps each expert at max(k, ⌊k·T/E⌋)
 *                of the batch's assignments for k > 1 (top-1 choices first) and drops the rest,
 *                which the package does not reproduce
 *
 * Mapping onto the package (lib/moe/router.ts, lib/serve/inference.ts):
 *   softmax/sigmoid → scoreFunction; norm_topk_prob / Mixtral's renormalisation → normalize;
 *   routed_scaling_factor → routeScale; n_group/topk_group → groups/topkGroups, and the group score
 *   (DeepSeek-V3: the sum of a group's top 2 biased scores) → groupTop;
 *   e_score_correction_bias → the selection-only bias; shared experts → sharedFfn; Qwen2-MoE's
 *   shared_expert_gate → sharedGate (MoELayer's sharedGate trains the same gate).
 *
 * Behavioural fields missing from config.json take the transformers config class's defaults (named
 * below); the sizes (hidden_size, expert counts and widths, num_hidden_layers) are required.
 */
import { CheckpointError } from '../errors.js';
import { type RouteWeightsOn, type ScoreFunction } from '../moe/router.js';

export const HF_MOE_FAMILIES = [
  'mixtral',
  'deepseek_v2',
  'deepseek_v3',
  'kimi_k2',
  'glm4_moe',
  'dots1',
  'qwen2_moe',
  'qwen3_moe',
  'qwen3_next',
  'olmoe',
  'ernie4_5_moe',
  'minimax_m2',
  'hunyuan_v1_moe',
  'qwen3_vl_moe',
  'granitemoe',
  'granitemoeshared',
  'granitemoehybrid',
  'llama4',
  'gpt_oss',
  'jamba',
  'dbrx',
  'deepseek',
  'bailing_moe',
] as const;
export type HfMoEFamily = (typeof HF_MOE_FAMILIES)[number];

/**
 * The families whose MoE block is DeepSeek-V3's (transformers' Glm4Moe and Dots1 classes reuse its
 * router and block; Kimi K2 is published as the DeepSeek-V3 architecture under its own model_type),
 * with their config classes' defaults for the fields config.json may leave out. `undefined`: the
 * field is required (dots1's shared-expert count defaults to None). `deepseekFields`: scoring_func,
 * topk_method and moe_layer_freq are read (DeepSeek's own code).
 */
const DEEPSEEK_V3_DEFAULTS = { nGroup: 8, topkGroup: 4, norm: true, scale: 2.5, firstDense: 3, shared: 1, deepseekFields: true } as const;
const DEEPSEEK_V3_BLOCKS = {
  deepseek_v3: DEEPSEEK_V3_DEFAULTS,
  // Kimi K2 ships DeepSeek's own configuration_deepseek.py, whose defaults are these too.
  kimi_k2: DEEPSEEK_V3_DEFAULTS,
  glm4_moe: { nGroup: 1, topkGroup: 1, norm: true, scale: 1, firstDense: 1, shared: 1, deepseekFields: false },
  dots1: { nGroup: 1, topkGroup: 1, norm: false, scale: 1, firstDense: 0, shared: undefined, deepseekFields: false },
} as const;

/**
 * The families whose MoE block is Qwen2-MoE's or Qwen3-MoE's: softmax, top-k, optional
 * renormalisation; with a shared expert, gated by sigmoid(x·shared_expert_gate). `width`: the
 * field of one expert's width; `sparseLayers`: decoder_sparse_step and mlp_only_layers pick the
 * MoE layers (else every layer is one); `norm`: norm_topk_prob's default.
 */
const QWEN_MOE_BLOCKS = {
  qwen2_moe: { width: 'moe_intermediate_size', shared: true, norm: false, sparseLayers: true },
  qwen3_moe: { width: 'moe_intermediate_size', shared: false, norm: false, sparseLayers: true },
  qwen3_next: { width: 'moe_intermediate_size', shared: true, norm: true, sparseLayers: true },
  olmoe: { width: 'intermediate_size', shared: false, norm: false, sparseLayers: false },
  // Qwen3VLMoeTextSparseMoeBlock renormalises whatever norm_topk_prob says.
  qwen3_vl_moe: { width: 'moe_intermediate_size', shared: false, norm: 'always', sparseLayers: true },
} as const;

/**
 * The families whose MoE block is Granite's (GraniteMoe's, with GraniteMoeShared's shared MLP):
 * `shared`: the default of shared_intermediate_size, or null where the block has no shared MLP.
 */
const GRANITE_BLOCKS = {
  granitemoe: { shared: null },
  granitemoeshared: { shared: 0 },
  granitemoehybrid: { shared: 1024 },
} as const;

/** Whether a family's MoE block is Granite's (its tensor names: block_sparse_moe.input_linear, shared_mlp). */
export function isGraniteBlock(family: HfMoEFamily): family is keyof typeof GRANITE_BLOCKS {
  return Object.hasOwn(GRANITE_BLOCKS, family);
}

/**
 * The families whose config.json wraps the language model's in `text_config` (multimodal models:
 * the MoE block is the language model's).
 */
const TEXT_CONFIG_FAMILIES: readonly HfMoEFamily[] = ['qwen3_vl_moe', 'llama4'];

/** Whether a family's MoE block is DeepSeek-V3's (its tensor names: gate bias, shared_experts). */
export function isDeepSeekV3Block(family: HfMoEFamily): family is keyof typeof DEEPSEEK_V3_BLOCKS {
  return Object.hasOwn(DEEPSEEK_V3_BLOCKS, family);
}

/** One family's MoE block in the package's terms (the inference layer's config fields). */
export interface HfMoEBlock {
  family: HfMoEFamily;
  hidden: number;
  /** Width of one routed expert. */
  ffn: number;
  numExperts: number;
  topK: number;
  scoreFunction: ScoreFunction;
  groups: number;
  topkGroups: number;
  /** With groups: a group's score sums its top groupTop (DeepSeek-V3: 2; DeepSeek-V2: 1, the maximum). */
  groupTop?: number;
  normalize: boolean;
  routeScale: number;
  /** DeepSeek-V3's e_score_correction_bias: added to the scores for selection only. */
  selectionBias: boolean;
  /** Width of the shared expert (0: none). */
  sharedFfn: number;
  /** Qwen2-MoE: the shared expert's output is scaled by sigmoid(x·shared_expert_gate). */
  sharedGate: boolean;
  /** Where the router's weight applies: the expert's output (every family but Llama 4) or its input. */
  routeWeightsOn: RouteWeightsOn;
  /** gpt-oss: a bias [E] added to the router's logits (it chooses and weighs). */
  routerBias: boolean;
  /** gpt-oss: the experts' biases after each projection, [E,2F] and [E,H]. */
  expertBias: boolean;
  /** The experts' activation: SwiGLU, or gpt-oss's clamped SwiGLU (lib/moe/expert-bias-activation.ts). */
  activation: HfExpertActivation;
}

/** The experts' activation of a block. */
export type HfExpertActivation = { kind: 'swiglu' } | { kind: 'clamped-swiglu'; alpha: number; limit: number };

/** The fields of a block only some families set, and their values for the others. */
type BlockExtras = Pick<HfMoEBlock, 'routerBias' | 'expertBias' | 'activation'>;
const PLAIN_BLOCK: BlockExtras = { routerBias: false, expertBias: false, activation: { kind: 'swiglu' } };

/** The block's fields both layers take as they are (MoEInference adds selectionBias; MoELayer always has a bias). */
export const HF_LAYER_FIELDS = [
  'hidden',
  'ffn',
  'numExperts',
  'topK',
  'scoreFunction',
  'groups',
  'topkGroups',
  'groupTop',
  'normalize',
  'routeScale',
  'sharedFfn',
  'sharedGate',
  'routeWeightsOn',
  'routerBias',
  'expertBias',
] as const;
export type HfLayerField = (typeof HF_LAYER_FIELDS)[number];

/** The layers' activation options (`activation`, `swigluAlpha`, `swigluLimit`), fixed by a block too. */
export const HF_ACTIVATION_FIELDS = ['activation', 'swigluAlpha', 'swigluLimit'] as const;

/** Those fields of a block, for a layer's config (the activation's as the layers' options). */
export function layerFieldsOf(b: HfMoEBlock): Pick<HfMoEBlock, HfLayerField> & {
  activation?: 'clamped-swiglu';
  swigluAlpha?: number;
  swigluLimit?: number;
} {
  const fields = Object.fromEntries(HF_LAYER_FIELDS.map((k) => [k, b[k]])) as Pick<HfMoEBlock, HfLayerField>;
  const a = b.activation;
  return a.kind === 'swiglu' ? fields : { ...fields, activation: 'clamped-swiglu', swigluAlpha: a.alpha, swigluLimit: a.limit };
}

export interface HfMoEModel {
  block: HfMoEBlock;
  numLayers: number;
  /** The decoder layers whose MLP is an MoE block, ascending. */
  moeLayers: number[];
}

type Json = Record<string, unknown>;

/** Reads config.json's fields with errors that name the field. */
class Fields {
  constructor(
    private readonly c: Json,
    private readonly where: string,
    /** The family named in errors (the model_type of config.json, whose fields may lie in text_config). */
    private readonly familyName: string,
  ) {}
  fail(message: string): never {
    throw new CheckpointError(`${this.where}: ${message}`);
  }
  has(f: string): boolean {
    return Object.hasOwn(this.c, f) && this.c[f] !== null && this.c[f] !== undefined;
  }
  /** A field as written (null kept apart from missing: undefined). */
  value(f: string): unknown {
    return Object.hasOwn(this.c, f) ? this.c[f] : undefined;
  }
  int(f: string, dflt?: number, min = 1): number {
    if (!this.has(f)) {
      if (dflt === undefined) this.fail(`'${f}' is missing (the ${this.family()} MoE block needs it)`);
      return dflt;
    }
    const v = this.c[f];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min)
      this.fail(`'${f}' must be an integer >= ${min}; found ${JSON.stringify(v)}`);
    return v;
  }
  num(f: string, dflt: number | undefined): number {
    if (!this.has(f)) {
      if (dflt === undefined) this.fail(`'${f}' is missing (the ${this.family()} MoE block needs it)`);
      return dflt;
    }
    const v = this.c[f];
    if (typeof v !== 'number' || !Number.isFinite(v)) this.fail(`'${f}' must be a finite number; found ${JSON.stringify(v)}`);
    return v;
  }
  bool(f: string, dflt: boolean | undefined): boolean {
    if (!this.has(f)) {
      if (dflt === undefined) this.fail(`'${f}' is missing (the ${this.family()} MoE block needs it)`);
      return dflt;
    }
    const v = this.c[f];
    if (typeof v !== 'boolean') this.fail(`'${f}' must be true or false; found ${JSON.stringify(v)}`);
    return v;
  }
  str(f: string, dflt: string): string {
    if (!this.has(f)) return dflt;
    const v = this.c[f];
    if (typeof v !== 'string') this.fail(`'${f}' must be a string; found ${JSON.stringify(v)}`);
    return v;
  }
  /** One expert's width and the shared experts' count (default `count`): their total width, a size. */
  sharedWidth(widthField: string, countField: string, count: number | undefined): { width: number; total: number } {
    const width = this.int(widthField);
    const n = this.int(countField, count, 0);
    if (!Number.isSafeInteger(width * n))
      this.fail(`'${widthField}' × '${countField}' = ${width} × ${n} is beyond the integers a size can hold`);
    return { width, total: width * n };
  }
  /**
   * An integer given once or per layer (a list of `layers` values, as Hunyuan's num_experts and
   * moe_topk may be): the package serves one block shape, so a list must hold one value throughout.
   */
  intOrUniformList(f: string, dflt: number, layers: number): number {
    const v = this.has(f) ? this.c[f] : undefined;
    if (!Array.isArray(v)) return this.int(f, dflt);
    if (v.length !== layers || !v.every((x) => Number.isSafeInteger(x) && x >= 1))
      this.fail(`'${f}' must be an integer >= 1 or a list of ${layers} of them (one per layer); found ${JSON.stringify(v).slice(0, 200)}`);
    const values = v as number[];
    if (values.some((x) => x !== values[0]))
      this.fail(
        `'${f}' differs between layers (${[...new Set(values)].slice(0, 8).join(', ')}): the loader serves one MoE block shape for every layer`,
      );
    return values[0] as number;
  }
  intList(f: string): number[] {
    if (!this.has(f)) return [];
    const v = this.c[f];
    if (!Array.isArray(v) || !v.every((x) => Number.isSafeInteger(x) && x >= 0))
      this.fail(`'${f}' must be a list of layer indices; found ${JSON.stringify(v)}`);
    return v as number[];
  }
  family(): string {
    return this.familyName;
  }
  /** A nested config object (a multimodal model's text_config, DBRX's ffn_config), its fields read with errors naming it. */
  nested(f: string, what = `the ${this.familyName} language model's config`): Fields {
    const v = this.c[f];
    if (v === null || typeof v !== 'object' || Array.isArray(v))
      this.fail(`'${f}' must be an object (${what}); found ${JSON.stringify(v ?? null)}`);
    return new Fields(v as Json, `${this.where}: ${f}`, this.familyName);
  }
}

/** Layers and experts a config may declare (the largest MoE models have fewer than 200 and 512). */
const MAX_LAYERS = 65536;
const MAX_EXPERTS = 65536;

/**
 * DeepSeek-style group-limited routing from `n_group` and `topk_group` (each its default, or required
 * when undefined), checked: a group scores its top `groupTop` ('who' names that rule in the error);
 * every group kept is plain top-k.
 */
function groupLimited(
  c: Fields,
  E: { field: string; value: number },
  k: number,
  defaults: { nGroup?: number; topkGroup?: number },
  groupTop: number,
  who: string,
): Pick<HfMoEBlock, 'groups' | 'topkGroups' | 'groupTop'> {
  const nGroup = c.int('n_group', defaults.nGroup);
  const topkGroup = c.int('topk_group', defaults.topkGroup);
  if (E.value % nGroup !== 0) c.fail(`'n_group' = ${nGroup} does not divide '${E.field}' = ${E.value}`);
  if (topkGroup > nGroup) c.fail(`'topk_group' = ${topkGroup} is more than 'n_group' = ${nGroup}`);
  const perGroup = E.value / nGroup;
  if (topkGroup < nGroup && groupTop > perGroup)
    c.fail(`'n_group' = ${nGroup} leaves ${perGroup} expert(s) per group; ${who} scores a group by its top ${groupTop}`);
  if (k > topkGroup * perGroup)
    c.fail(
      `'num_experts_per_tok' = ${k} is more than the ${topkGroup * perGroup} experts of the 'topk_group' = ${topkGroup} groups a token keeps`,
    );
  return topkGroup < nGroup ? { groups: nGroup, topkGroups: topkGroup, groupTop } : { groups: 1, topkGroups: 1 };
}

/** DeepSeek's MoE layers: from first_k_dense_replace on, every moe_layer_freq-th (when `freq` is read). */
function deepseekMoELayers(c: Fields, firstDenseDefault: number | undefined, readFreq: boolean): (layer: number) => boolean {
  const firstDense = c.int('first_k_dense_replace', firstDenseDefault, 0);
  const freq = readFreq ? c.int('moe_layer_freq', 1) : 1;
  return (l) => l >= firstDense && l % freq === 0;
}

/**
 * The MoE block and layers of a Hugging Face config (config.json's object). `where` prefixes errors
 * (e.g. the file). Throws a CheckpointError naming the field for anything missing, malformed or not
 * supported.
 */
export function hfMoEModel(config: unknown, where = 'config.json'): HfMoEModel {
  if (config === null || typeof config !== 'object' || Array.isArray(config)) throw new CheckpointError(`${where}: must be a JSON object`);
  const top = new Fields(config as Json, where, String((config as Json)['model_type']));
  const type = top.str('model_type', '');
  if (!(HF_MOE_FAMILIES as readonly string[]).includes(type)) {
    top.fail(`'model_type' ${JSON.stringify(type)} is not a supported MoE family (${HF_MOE_FAMILIES.join(', ')})`);
  }
  const family = type as HfMoEFamily;
  const c = TEXT_CONFIG_FAMILIES.includes(family) ? top.nested('text_config') : top;
  // DBRX names its sizes otherwise and nests its MoE fields in ffn_config.
  const dbrx = family === 'dbrx';
  const ffn = dbrx ? c.nested('ffn_config', "DBRX's MoE fields") : c;
  // The experts (and shared expert) are SwiGLU: act(gate)·up with act = SiLU. Another activation
  // would load and give wrong outputs, so it is refused (the families' configs default to silu).
  const act = dbrx
    ? ffn.has('ffn_act_fn')
      ? ffn.nested('ffn_act_fn', "the experts' activation").str('name', 'silu')
      : 'silu'
    : c.str('hidden_act', 'silu');
  if (act !== 'silu' && act !== 'swish')
    c.fail(
      `'${dbrx ? 'ffn_config.ffn_act_fn.name' : 'hidden_act'}' ${JSON.stringify(act)}: the package's experts compute SiLU-gated MLPs ('silu' or 'swish') only`,
    );
  const hidden = c.int(dbrx ? 'd_model' : 'hidden_size');
  const numLayers = c.int(dbrx ? 'n_layers' : 'num_hidden_layers');
  // The MoE layers are listed one by one below: a crafted count must not take the heap.
  if (numLayers > MAX_LAYERS)
    c.fail(`'${dbrx ? 'n_layers' : 'num_hidden_layers'}' = ${numLayers}: more than the ${MAX_LAYERS} layers this loader takes`);
  let block: Omit<HfMoEBlock, keyof BlockExtras> & Partial<BlockExtras>;
  let isMoE: (layer: number) => boolean;
  if (family === 'mixtral' || family === 'minimax_m2') {
    // MixtralSparseMoeBlock: softmax over all experts, top-k, renormalised over the k. MiniMax-M2's
    // (transformers') is the same block with DeepSeek-V3's sigmoid and selection bias, no shared expert.
    const minimax = family === 'minimax_m2';
    if (minimax && c.int('shared_intermediate_size', 0, 0) > 0)
      c.fail(`'shared_intermediate_size' > 0: MiniMax-M2's block (transformers') has no shared expert`);
    block = {
      family,
      hidden,
      ffn: c.int('intermediate_size'),
      numExperts: c.int('num_local_experts'),
      topK: c.int('num_experts_per_tok'),
      scoreFunction: minimax ? 'sigmoid' : 'softmax',
      groups: 1,
      topkGroups: 1,
      normalize: true,
      routeScale: 1,
      selectionBias: minimax,
      sharedFfn: 0,
      sharedGate: false,
      routeWeightsOn: 'output',
    };
    isMoE = () => true;
  } else if (isDeepSeekV3Block(family)) {
    const d = DEEPSEEK_V3_BLOCKS[family];
    if (d.deepseekFields) {
      const scoring = c.str('scoring_func', 'sigmoid');
      if (scoring !== 'sigmoid')
        c.fail(
          `'scoring_func' ${JSON.stringify(scoring)}: DeepSeek-V3 routing is 'sigmoid' (DeepSeek-V2's softmax with group maxima is not supported)`,
        );
      const method = c.str('topk_method', 'noaux_tc');
      if (method !== 'noaux_tc')
        c.fail(`'topk_method' ${JSON.stringify(method)}: only DeepSeek-V3's 'noaux_tc' (bias-corrected, top-2 group scores) is supported`);
    }
    const E = c.int('n_routed_experts');
    const k = c.int('num_experts_per_tok');
    // transformers and DeepSeek's code score a group by the sum of its top 2 biased scores.
    const grouping = groupLimited(c, { field: 'n_routed_experts', value: E }, k, d, 2, 'DeepSeek-V3');
    const { width: F, total: sharedFfn } = c.sharedWidth('moe_intermediate_size', 'n_shared_experts', d.shared);
    block = {
      family,
      hidden,
      ffn: F,
      numExperts: E,
      topK: k,
      scoreFunction: 'sigmoid',
      ...grouping,
      // DeepSeek's own code (Kimi K2's) renormalises only when k > 1; transformers' port always.
      normalize: c.bool('norm_topk_prob', d.norm) && (family !== 'kimi_k2' || k > 1),
      routeScale: c.num('routed_scaling_factor', d.scale),
      selectionBias: true,
      sharedFfn,
      sharedGate: false,
      routeWeightsOn: 'output',
    };
    // DeepSeek's own modeling code (modeling_deepseek.py) reads moe_layer_freq; transformers' port
    // does not (every layer past first_k_dense_replace). Published V3 configs set 1: both agree.
    isMoE = deepseekMoELayers(c, d.firstDense, d.deepseekFields);
  } else if (family === 'deepseek') {
    const scoring = c.str('scoring_func', 'softmax');
    if (scoring !== 'softmax')
      c.fail(`'scoring_func' ${JSON.stringify(scoring)}: DeepSeekMoE (v1) routing is 'softmax' (its code refuses others)`);
    const k = c.int('num_experts_per_tok');
    // n_shared_experts null: DeepSeek's code builds no shared experts.
    const { width: F, total: sharedFfn } = c.sharedWidth(
      'moe_intermediate_size',
      'n_shared_experts',
      c.value('n_shared_experts') === null ? 0 : undefined,
    );
    block = {
      family,
      hidden,
      ffn: F,
      numExperts: c.int('n_routed_experts'),
      topK: k,
      scoreFunction: 'softmax',
      groups: 1,
      topkGroups: 1,
      // MoEGate renormalises only for top_k > 1.
      normalize: c.bool('norm_topk_prob', undefined) && k > 1,
      routeScale: 1,
      selectionBias: false,
      sharedFfn,
      sharedGate: false,
      routeWeightsOn: 'output',
    };
    isMoE = deepseekMoELayers(c, 0, true);
  } else if (family === 'bailing_moe') {
    // One model_type for both versions: the architecture says which.
    const archs = c.value('architectures');
    if (archs !== undefined && !Array.isArray(archs))
      c.fail(`'architectures' must be a list of class names; found ${JSON.stringify(archs)}`);
    const names: unknown[] = Array.isArray(archs) ? archs : [];
    const v2 = names.includes('BailingMoeV2ForCausalLM');
    if (v2 && names.includes('BailingMoeForCausalLM'))
      c.fail(
        `'architectures' names both BailingMoeForCausalLM and BailingMoeV2ForCausalLM: which router (v1's softmax or v2's sigmoid) is meant is ambiguous`,
      );
    if (!v2 && !names.includes('BailingMoeForCausalLM'))
      c.fail(
        `'architectures' ${JSON.stringify(archs)}: Ling's config names BailingMoeForCausalLM (v1) or BailingMoeV2ForCausalLM (v2), which decides its router`,
      );
    const k = c.int('num_experts_per_tok');
    const E = c.int('num_experts');
    // Renormalising: v1 when k > 1 and norm_topk_prob; v2's own code always for k > 1 (it does not read
    // the field) while vLLM and SGLang honour it: a v2 config saying false is refused rather than guessed.
    const norm = c.bool('norm_topk_prob', true);
    if (v2 && !norm && k > 1)
      c.fail(
        `'norm_topk_prob' false: Ling 2.0's own code renormalises whatever it says, vLLM and SGLang do not; refused rather than guessed (its released configs set true)`,
      );
    const F = c.int('moe_intermediate_size');
    const nShared = c.int('num_shared_experts', v2 ? 1 : 0, 0);
    // The shared experts' width: v2's own code moe_intermediate_size, vLLM's and SGLang's
    // moe_shared_expert_intermediate_size (each times the count): they must agree.
    if (c.has('moe_shared_expert_intermediate_size') && c.int('moe_shared_expert_intermediate_size') !== F && nShared > 0)
      c.fail(
        `'moe_shared_expert_intermediate_size' = ${c.int('moe_shared_expert_intermediate_size')} is not 'moe_intermediate_size' = ${F}: Ling's own code sizes the shared experts by the latter, vLLM by the former`,
      );
    let grouping: Pick<HfMoEBlock, 'groups' | 'topkGroups' | 'groupTop'> = { groups: 1, topkGroups: 1 };
    let scoreFunction: ScoreFunction = 'softmax';
    let selectionBias = false;
    if (v2) {
      const score = c.str('score_function', 'sigmoid');
      if (score !== 'sigmoid') c.fail(`'score_function' ${JSON.stringify(score)}: Ling 2.0's router (its own code) is sigmoid`);
      scoreFunction = 'sigmoid';
      selectionBias = c.bool('moe_router_enable_expert_bias', true);
      // Ling 2.0 scores a group by the sum of its top 2 biased scores; its config class's defaults 8 and 4.
      grouping = groupLimited(c, { field: 'num_experts', value: E }, k, { nGroup: 8, topkGroup: 4 }, 2, 'Ling 2.0');
    }
    block = {
      family,
      hidden,
      ffn: F,
      numExperts: E,
      topK: k,
      scoreFunction,
      ...grouping,
      normalize: norm && k > 1,
      routeScale: v2 ? c.num('routed_scaling_factor', 1) : 1,
      selectionBias,
      sharedFfn: F * nShared,
      sharedGate: false,
      routeWeightsOn: 'output',
    };
    // Ling's code has no moe_layer_freq.
    isMoE = deepseekMoELayers(c, v2 ? 1 : 0, false);
  } else if (family === 'deepseek_v2') {
    // transformers hard-codes softmax; DeepSeek's code reads scoring_func and refuses anything else.
    const scoring = c.str('scoring_func', 'softmax');
    if (scoring !== 'softmax')
      c.fail(`'scoring_func' ${JSON.stringify(scoring)}: DeepSeek-V2 routing is 'softmax' (model_type deepseek_v3 is the sigmoid one)`);
    const method = c.str('topk_method', 'greedy');
    if (method !== 'greedy' && method !== 'gready' && method !== 'group_limited_greedy')
      c.fail(
        `'topk_method' ${JSON.stringify(method)}: DeepSeek-V2 routes by 'greedy' or 'group_limited_greedy' (transformers' DeepseekV2MoE has no other)`,
      );
    // Renormalising: transformers never does (it scales), DeepSeek's code does instead of scaling,
    // vLLM does and then scales. Every released DeepSeek-V2 config sets false, where all three agree.
    if (c.bool('norm_topk_prob', false))
      c.fail(
        `'norm_topk_prob' true: transformers ignores it for DeepSeek-V2 (weights × routed_scaling_factor), DeepSeek's modeling_deepseek.py renormalises instead of scaling, and vLLM does both; no released DeepSeek-V2 sets it, so it is refused rather than guessed`,
      );
    const E = c.int('n_routed_experts');
    const k = c.int('num_experts_per_tok');
    // group_limited_greedy scores a group by its maximum; transformers' config class defaults n_group
    // and topk_group to None: required here.
    const grouping =
      method === 'group_limited_greedy'
        ? groupLimited(c, { field: 'n_routed_experts', value: E }, k, {}, 1, 'DeepSeek-V2')
        : { groups: 1, topkGroups: 1 };
    // n_shared_experts: transformers' default 2, DeepSeek's None (no shared experts): required here.
    const { width: F, total: sharedFfn } = c.sharedWidth('moe_intermediate_size', 'n_shared_experts', undefined);
    block = {
      family,
      hidden,
      ffn: F,
      numExperts: E,
      topK: k,
      scoreFunction: 'softmax',
      ...grouping,
      normalize: false,
      routeScale: c.num('routed_scaling_factor', 1),
      selectionBias: false,
      sharedFfn,
      sharedGate: false,
      routeWeightsOn: 'output',
    };
    // DeepSeek's code and vLLM read moe_layer_freq, transformers does not; released configs set 1.
    isMoE = deepseekMoELayers(c, 0, true);
  } else if (family === 'jamba') {
    const E = c.int('num_experts');
    // One expert: every layer is JambaMLP (dense), no MoE block to serve.
    if (E === 1) c.fail(`'num_experts' = 1: every Jamba layer is then a dense MLP (JambaMLP); there is no MoE block`);
    // JambaConfig's defaults: every second layer from layer 1.
    const period = c.int('expert_layer_period', 2);
    const offset = c.int('expert_layer_offset', 1, 0);
    if (offset >= period) c.fail(`'expert_layer_offset' = ${offset} is not below 'expert_layer_period' = ${period}: no layer would be MoE`);
    block = {
      family,
      hidden,
      ffn: c.int('intermediate_size'),
      numExperts: E,
      topK: c.int('num_experts_per_tok'),
      scoreFunction: 'softmax',
      groups: 1,
      topkGroups: 1,
      // transformers and vLLM alike: the top-k probabilities as they are (vLLM: renormalize=False).
      normalize: false,
      routeScale: 1,
      selectionBias: false,
      sharedFfn: 0,
      sharedGate: false,
      routeWeightsOn: 'output',
    };
    isMoE = (l) => l % period === offset;
  } else if (family === 'dbrx') {
    // DbrxRouter: softmax over all experts, top-k, the top-k divided by their p-norm (p =
    // moe_normalize_expert_weights, default 1: for probabilities the sum). vLLM always renormalises.
    const written = ffn.value('moe_normalize_expert_weights');
    const p = written === undefined ? 1 : written;
    if (p !== null && typeof p !== 'number')
      ffn.fail(`'moe_normalize_expert_weights' must be a number (a p-norm's p) or null; found ${JSON.stringify(p)}`);
    if (p !== null && p !== 1)
      ffn.fail(
        `'moe_normalize_expert_weights' ${JSON.stringify(p)}: the package renormalises the chosen weights to sum to 1 (p = 1, the default) or leaves them (null); another p-norm is not supported`,
      );
    block = {
      family,
      hidden,
      ffn: ffn.int('ffn_hidden_size'),
      numExperts: ffn.int('moe_num_experts'),
      topK: ffn.int('moe_top_k'),
      scoreFunction: 'softmax',
      groups: 1,
      topkGroups: 1,
      normalize: p === 1,
      routeScale: 1,
      selectionBias: false,
      sharedFfn: 0,
      sharedGate: false,
      routeWeightsOn: 'output',
    };
    isMoE = () => true;
  } else if (family === 'hunyuan_v1_moe') {
    // HunYuanMoE: the shared MLP always (transformers builds it whatever num_shared_expert says),
    // experts and shared MLP both of intermediate_size; top-1 keeps its probability unscaled.
    const F = c.int('intermediate_size');
    const k = c.intOrUniformList('moe_topk', 1, numLayers);
    block = {
      family,
      hidden,
      ffn: F,
      numExperts: c.intOrUniformList('num_experts', 1, numLayers),
      topK: k,
      scoreFunction: 'softmax',
      groups: 1,
      topkGroups: 1,
      normalize: k > 1,
      routeScale: 1,
      selectionBias: false,
      sharedFfn: F,
      sharedGate: false,
      routeWeightsOn: 'output',
    };
    isMoE = () => true;
  } else if (family === 'ernie4_5_moe') {
    if (c.bool('use_bias', false)) c.fail(`'use_bias' true: the package's experts have no bias terms`);
    const { width: F, total: sharedFfn } = c.sharedWidth('moe_intermediate_size', 'moe_num_shared_experts', 2);
    // Ernie divides by max(Σ p_top, moe_norm_min = 1e-12): the sum of k softmax probabilities is
    // below that only for logits some 27 apart, where the package's plain sum differs.
    block = {
      family,
      hidden,
      ffn: F,
      numExperts: c.int('moe_num_experts'),
      topK: c.int('moe_k'),
      scoreFunction: 'softmax',
      groups: 1,
      topkGroups: 1,
      normalize: true,
      routeScale: 1,
      selectionBias: true,
      sharedFfn,
      sharedGate: false,
      routeWeightsOn: 'output',
    };
    const interval = c.int('moe_layer_interval', 1);
    const start = c.int('moe_layer_start_index', 1, 0);
    const endField = c.int('moe_layer_end_index', -1, -1);
    const end = endField === -1 ? numLayers - 1 : endField;
    isMoE = (l) => (l + 1) % interval === 0 && l >= start && l <= end;
  } else if (family === 'llama4') {
    // Llama4TextMoe: top-k of the logits, sigmoid of the chosen ones, which scale the expert's input;
    // the shared expert (of the experts' width) always, added.
    const F = c.int('intermediate_size');
    const k = c.int('num_experts_per_tok', 1);
    if (k !== 1)
      c.fail(
        `'num_experts_per_tok' = ${k}: Llama 4's block scales each expert's input by its router weight, which the package serves for top-1 (every released Llama 4)`,
      );
    block = {
      family,
      hidden,
      ffn: F,
      numExperts: c.int('num_local_experts'),
      topK: k,
      scoreFunction: 'sigmoid',
      groups: 1,
      topkGroups: 1,
      normalize: false,
      routeScale: 1,
      selectionBias: false,
      sharedFfn: F,
      sharedGate: false,
      routeWeightsOn: 'input',
    };
    const listed = c.has('moe_layers') ? new Set(c.intList('moe_layers')) : null;
    const outside = [...(listed ?? [])].filter((l) => l >= numLayers);
    if (outside.length > 0) c.fail(`'moe_layers' lists ${outside.join(', ')}, past the ${numLayers} layers ('num_hidden_layers')`);
    const step = c.int('interleave_moe_layer_step', 1);
    isMoE = (l) => (listed ? listed.has(l) : (l + 1) % step === 0);
  } else if (family === 'gpt_oss') {
    // GptOssTopKRouter: logits with the router's bias, top-k, softmax over the k; GptOssExperts:
    // biases and the clamped SwiGLU (alpha 1.702 in every implementation; the limit from the config).
    const E = c.int('num_local_experts');
    const limit = c.num('swiglu_limit', 7);
    if (!(limit > 0)) c.fail(`'swiglu_limit' must be a positive number; found ${limit}`);
    block = {
      family,
      hidden,
      ffn: c.int('intermediate_size'),
      numExperts: E,
      topK: c.int('num_experts_per_tok', c.has('experts_per_token') ? c.int('experts_per_token') : undefined),
      scoreFunction: 'softmax',
      groups: 1,
      topkGroups: 1,
      normalize: true,
      routeScale: 1,
      selectionBias: false,
      sharedFfn: 0,
      sharedGate: false,
      routeWeightsOn: 'output',
      routerBias: true,
      expertBias: true,
      activation: { kind: 'clamped-swiglu', alpha: 1.702, limit },
    };
    isMoE = () => true;
  } else if (isGraniteBlock(family)) {
    // GraniteMoeTopKGating: top-k of the logits, then softmax over those k (in fp32): the
    // renormalised top-k of the softmax. The shared MLP is added ungated.
    const sharedDefault = GRANITE_BLOCKS[family].shared;
    block = {
      family,
      hidden,
      ffn: c.int('intermediate_size'),
      numExperts: c.int('num_local_experts'),
      topK: c.int('num_experts_per_tok'),
      scoreFunction: 'softmax',
      groups: 1,
      topkGroups: 1,
      normalize: true,
      routeScale: 1,
      selectionBias: false,
      sharedFfn: sharedDefault === null ? 0 : c.int('shared_intermediate_size', sharedDefault, 0),
      sharedGate: false,
      routeWeightsOn: 'output',
    };
    isMoE = () => true;
  } else {
    const q = QWEN_MOE_BLOCKS[family];
    const E = c.int('num_experts');
    const sparseStep = q.sparseLayers ? c.int('decoder_sparse_step', 1) : 1;
    const mlpOnly = new Set(q.sparseLayers ? c.intList('mlp_only_layers') : []);
    const sharedFfn = q.shared ? c.int('shared_expert_intermediate_size', undefined, 0) : 0;
    block = {
      family,
      hidden,
      ffn: c.int(q.width),
      numExperts: E,
      topK: c.int('num_experts_per_tok'),
      scoreFunction: 'softmax',
      groups: 1,
      topkGroups: 1,
      normalize: q.norm === 'always' ? true : c.bool('norm_topk_prob', q.norm),
      routeScale: 1,
      selectionBias: false,
      sharedFfn,
      sharedGate: sharedFfn > 0,
      routeWeightsOn: 'output',
    };
    isMoE = (l) => !mlpOnly.has(l) && (l + 1) % sparseStep === 0;
  }
  // Every expert's tensor names are listed when a layer is read or inspected: a crafted count must not take the heap.
  if (block.numExperts > MAX_EXPERTS) c.fail(`${block.numExperts} experts: more than the ${MAX_EXPERTS} this loader takes`);
  // The top-k's own field name in each family's config.
  const topKField =
    { dbrx: 'ffn_config.moe_top_k', hunyuan_v1_moe: 'moe_topk', ernie4_5_moe: 'moe_k' }[family as string] ?? 'num_experts_per_tok';
  if (block.topK > block.numExperts) c.fail(`'${topKField}' = ${block.topK} is more than the ${block.numExperts} experts`);
  if (block.groups > 32) c.fail(`'n_group' = ${block.groups}: the package's router takes at most 32 groups`);
  const moeLayers = Array.from({ length: numLayers }, (_, l) => l).filter(isMoE);
  return { block: { ...PLAIN_BLOCK, ...block }, numLayers, moeLayers };
}
