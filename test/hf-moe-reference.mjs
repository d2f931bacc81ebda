// Plain-loop float64 references of the MoE blocks of three Hugging Face model families, written
// from the semantics of transformers' modeling_mixtral.py, modeling_deepseek_v3.py and
// modeling_qwen2_moe.py / modeling_qwen3_moe.py (and DeepSeek-V3's own inference/model.py for the
// group mask). Independent of the addon and of lib/serve: they read the config.json fields
// themselves. Shared by test/60-serve-hf.test.ts and test/mpi/serve-hf.mjs.
//
// Weights in the checkpoints' own layouts, row-major, float64:
//   gate [E·H] (row e is expert e's router vector), bias [E] or null (DeepSeek-V3's
//   e_score_correction_bias), experts[j] = { gate [F·H], up [F·H], down [H·F] } (nn.Linear weights:
//   [out, in]), shared = { gate [Fs·H], up [Fs·H], down [H·Fs] } or null, sharedGate [H] or null.
//
//   mixtral:     p = softmax(x·gateᵀ); top-k of p; w = p_top / Σ p_top; y = Σ w_j·MLP_j(x)
//   deepseek_v3: s = sigmoid(x·gateᵀ); c = s + bias (choice only); group score = sum of the top 2 c
//                of the group; keep the topk_group best groups; top-k of c among their experts;
//                w = s_top (/ (Σ s_top + 1e-20) if norm_topk_prob) · routed_scaling_factor;
//                y = Σ w_j·MLP_j(x) + MLP_shared(x)
//                (transformers fills the dropped groups' c with 0 where DeepSeek's model.py uses
//                -inf: the same choice whenever every c > 0, which `minChoice` lets callers check)
//   deepseek_v2: p = softmax(x·gateᵀ); topk_method 'group_limited_greedy': a group scores its maximum
//                p, keep the topk_group best groups, the other groups' p filled with 0, top-k of that;
//                'greedy' (or 'gready'): top-k of p; w = p_top · routed_scaling_factor (norm_topk_prob
//                false, as every released config: transformers never renormalises here);
//                y = Σ w_j·MLP_j(x) + MLP_shared(x) (transformers' DeepseekV2MoE)
//   qwen2_moe:   p = softmax; top-k; w = p_top (/ Σ p_top if norm_topk_prob); y = Σ w_j·MLP_j(x)
//                + sigmoid(x·sharedGate)·MLP_shared(x)
//   qwen3_moe:   as qwen2_moe without a shared expert
//   hunyuan_v1_moe: p = softmax; top-k (moe_topk); w = p_top / Σ p_top when k > 1, p_top at top-1;
//                y = Σ w_j·MLP_j(x) + MLP_shared(x), experts and shared MLP of intermediate_size
//                (dropless, as vLLM serves it: transformers' eager topkgating also caps each expert
//                at max(k, ⌊k·T/E⌋) assignments of the batch for k > 1, which this reference omits)
//   granitemoe:  top-k of the logits, softmax over those k (= mixtral's renormalised top-k of the
//                softmax); y = Σ w_j·MLP_j(x) (+ MLP_shared(x), ungated, for granitemoeshared and
//                granitemoehybrid with shared_intermediate_size > 0; the hybrid's default is 1024)
//   gpt_oss:     logits = x·gateᵀ + routerBias; top-k of the logits; w = softmax over those k;
//                expert: g = gate·x + gateBias, u = up·x + upBias, h = (clamp(u, ±L) + 1)·min(g, L)·
//                sigmoid(1.702·min(g, L)) (L = swiglu_limit, default 7), E(x) = down·h + downBias;
//                y = Σ w_j·E_j(x) (transformers' GptOssExperts, openai/gpt-oss's swiglu)
//   llama4:      top-k of the logits; s = sigmoid of the chosen ones (no renormalisation), scaling the
//                expert's INPUT: y = Σ_j MLP_j(s_j·x) + MLP_shared(x), experts and shared expert of
//                intermediate_size; MoE layers: moe_layers, else every interleave_moe_layer_step-th
//                (from step − 1); its fields in config.json's text_config
//   jamba:       p = softmax; top-k; w = p_top, never renormalised; y = Σ w_j·MLP_j(x) (transformers'
//                JambaSparseMoeBlock); MoE layers: layer % expert_layer_period == expert_layer_offset
//                when num_experts > 1
//   dbrx:        p = softmax; top-k (ffn_config.moe_top_k); w = p_top / ‖p_top‖_p with p =
//                ffn_config.moe_normalize_expert_weights (default 1; null: w = p_top); y = Σ w_j·MLP_j(x)
//                (transformers' DbrxRouter and DbrxExperts); sizes d_model, n_layers and ffn_config's
//   deepseek:    DeepSeekMoE v1: p = softmax; top-k; w = p_top (/ (Σ p_top + 1e-20) when norm_topk_prob and
//                k > 1); y = Σ w_j·MLP_j(x) + MLP_shared(x) (DeepSeek's modeling_deepseek.py MoEGate)
//   bailing_moe: Ling v1 (architectures BailingMoeForCausalLM): p = softmax; top-k; w = p_top / Σ p_top
//                when k > 1 and norm_topk_prob (default true); Ling 2.0 (BailingMoeV2ForCausalLM):
//                s = sigmoid; c = s + expert_bias (choice only); group score = sum of the top 2 c;
//                keep topk_group groups (others -inf); top-k of c; w = s_top / (Σ s_top + 1e-20) when
//                k > 1, × routed_scaling_factor; both + MLP_shared(x) (moe_intermediate_size ·
//                num_shared_experts); MoE layers ≥ first_k_dense_replace (v1 0, v2 1)
//   qwen3_vl_moe: qwen3_moe's block, always renormalised (norm_topk_prob is not read), its fields in
//                config.json's text_config
//   MLP(v) = down · (silu(gate·v) ⊙ (up·v))
//
// Returns { y [T·H], margin, minChoice }: margin is the smallest gap, over tokens, between the last
// chosen and the best unchosen selection score (and, for groups, between the last kept and the best
// dropped group score), so callers can require routing decisions to be far from float error;
// minChoice is the smallest selection score seen.

// Other model_types with these blocks, and their config classes' defaults (transformers'
// configuration_glm4_moe.py, configuration_dots1.py, configuration_qwen3_next.py,
// configuration_olmoe.py; Kimi K2 ships DeepSeek's code and sets every field):
//   kimi_k2, glm4_moe, dots1: deepseek_v3's block; qwen3_next: qwen2_moe's; olmoe: qwen3_moe's with
//   the expert width in intermediate_size and every layer MoE.
const DEEPSEEK_DEFAULTS = {
  deepseek_v3: {
    n_group: 8,
    topk_group: 4,
    norm_topk_prob: true,
    routed_scaling_factor: 2.5,
    first_k_dense_replace: 3,
    n_shared_experts: 1,
  },
  kimi_k2: {},
  glm4_moe: { n_group: 1, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 1, first_k_dense_replace: 1, n_shared_experts: 1 },
  dots1: { n_group: 1, topk_group: 1, norm_topk_prob: false, routed_scaling_factor: 1, first_k_dense_replace: 0 },
};
const QWEN_DEFAULTS = {
  qwen2_moe: { norm_topk_prob: false, gatedShared: true },
  qwen3_moe: { norm_topk_prob: false, gatedShared: false },
  qwen3_next: { norm_topk_prob: true, gatedShared: true },
  olmoe: { norm_topk_prob: false, gatedShared: false },
};
const isDeepSeekLike = (cfg) => Object.hasOwn(DEEPSEEK_DEFAULTS, cfg.model_type);
const GRANITE = ['granitemoe', 'granitemoeshared', 'granitemoehybrid'];
/** The object holding the language model's fields (a multimodal config's text_config). */
const text = (cfg) => (cfg.model_type === 'qwen3_vl_moe' || cfg.model_type === 'llama4' ? cfg.text_config : cfg);
/** config.json's field, else the family's default (a field a family requires must be given). */
function field(cfg, name) {
  if (cfg[name] !== undefined && cfg[name] !== null) return cfg[name];
  const d = (DEEPSEEK_DEFAULTS[cfg.model_type] ?? QWEN_DEFAULTS[cfg.model_type] ?? {})[name];
  if (d === undefined) throw new Error(`reference: ${cfg.model_type} config needs '${name}'`);
  return d;
}

const silu = (v) => v / (1 + Math.exp(-v));
const sigmoid = (v) => 1 / (1 + Math.exp(-v));

/** The decoder layers whose MLP is an MoE block, from config.json's fields. */
export function moeLayersOf(cfg) {
  const layers = [];
  const c = text(cfg);
  for (let l = 0; l < (cfg.model_type === 'dbrx' ? cfg.n_layers : c.num_hidden_layers); l++) {
    let moe;
    if (['mixtral', 'olmoe', 'minimax_m2', 'hunyuan_v1_moe', 'gpt_oss', 'dbrx', ...GRANITE].includes(cfg.model_type)) moe = true;
    else if (cfg.model_type === 'jamba') moe = c.num_experts > 1 && l % (c.expert_layer_period ?? 2) === (c.expert_layer_offset ?? 1);
    else if (cfg.model_type === 'llama4')
      moe = c.moe_layers ? c.moe_layers.includes(l) : l % (c.interleave_moe_layer_step ?? 1) === (c.interleave_moe_layer_step ?? 1) - 1;
    else if (cfg.model_type === 'ernie4_5_moe') {
      // Ernie4_5_MoeConfig: start 1, end -1 (the last layer), interval 1.
      const end = (cfg.moe_layer_end_index ?? -1) === -1 ? cfg.num_hidden_layers - 1 : cfg.moe_layer_end_index;
      moe = (l + 1) % (cfg.moe_layer_interval ?? 1) === 0 && l >= (cfg.moe_layer_start_index ?? 1) && l <= end;
    } else if (cfg.model_type === 'bailing_moe') {
      const v2 = cfg.architectures.includes('BailingMoeV2ForCausalLM');
      moe = l >= (cfg.first_k_dense_replace ?? (v2 ? 1 : 0));
    } else if (cfg.model_type === 'deepseek_v2' || cfg.model_type === 'deepseek') {
      // DeepSeek's modeling_deepseek.py reads moe_layer_freq (transformers' port does not).
      moe = l >= (cfg.first_k_dense_replace ?? 0) && l % (cfg.moe_layer_freq ?? 1) === 0;
    } else if (isDeepSeekLike(cfg)) {
      // Only DeepSeek's own code (deepseek_v3, kimi_k2) reads moe_layer_freq.
      const freq = cfg.model_type === 'deepseek_v3' || cfg.model_type === 'kimi_k2' ? (cfg.moe_layer_freq ?? 1) : 1;
      moe = l >= field(cfg, 'first_k_dense_replace') && l % freq === 0;
    } else moe = !(c.mlp_only_layers ?? []).includes(l) && (l + 1) % (c.decoder_sparse_step ?? 1) === 0;
    if (moe) layers.push(l);
  }
  return layers;
}

/** Sizes of the MoE block from config.json: { H, F, E, k, Fs }. */
export function moeSizes(cfg) {
  const H = cfg.hidden_size;
  switch (cfg.model_type) {
    case 'mixtral':
    case 'minimax_m2':
      return { H, F: cfg.intermediate_size, E: cfg.num_local_experts, k: cfg.num_experts_per_tok, Fs: 0 };
    case 'bailing_moe': {
      const n = cfg.num_shared_experts ?? (cfg.architectures.includes('BailingMoeV2ForCausalLM') ? 1 : 0);
      return { H, F: cfg.moe_intermediate_size, E: cfg.num_experts, k: cfg.num_experts_per_tok, Fs: cfg.moe_intermediate_size * n };
    }
    case 'deepseek':
    case 'deepseek_v2':
    case 'deepseek_v3':
    case 'kimi_k2':
    case 'glm4_moe':
    case 'dots1':
      return {
        H,
        F: cfg.moe_intermediate_size,
        E: cfg.n_routed_experts,
        k: cfg.num_experts_per_tok,
        Fs: cfg.moe_intermediate_size * field(cfg, 'n_shared_experts'),
      };
    case 'qwen2_moe':
    case 'qwen3_next':
      return { H, F: cfg.moe_intermediate_size, E: cfg.num_experts, k: cfg.num_experts_per_tok, Fs: cfg.shared_expert_intermediate_size };
    case 'qwen3_moe':
      return { H, F: cfg.moe_intermediate_size, E: cfg.num_experts, k: cfg.num_experts_per_tok, Fs: 0 };
    case 'dbrx': {
      const f = cfg.ffn_config;
      return { H: cfg.d_model, F: f.ffn_hidden_size, E: f.moe_num_experts, k: f.moe_top_k, Fs: 0 };
    }
    case 'olmoe':
    case 'jamba':
      return { H, F: cfg.intermediate_size, E: cfg.num_experts, k: cfg.num_experts_per_tok, Fs: 0 };
    case 'gpt_oss':
      return { H, F: cfg.intermediate_size, E: cfg.num_local_experts, k: cfg.num_experts_per_tok ?? cfg.experts_per_token, Fs: 0 };
    case 'llama4': {
      const t = cfg.text_config;
      return { H: t.hidden_size, F: t.intermediate_size, E: t.num_local_experts, k: t.num_experts_per_tok ?? 1, Fs: t.intermediate_size };
    }
    case 'qwen3_vl_moe': {
      const t = cfg.text_config;
      return { H: t.hidden_size, F: t.moe_intermediate_size, E: t.num_experts, k: t.num_experts_per_tok, Fs: 0 };
    }
    case 'granitemoe':
    case 'granitemoeshared':
    case 'granitemoehybrid': {
      // GraniteMoeShared's shared_intermediate_size defaults to 0 (none), GraniteMoeHybrid's to 1024.
      const Fs = cfg.model_type === 'granitemoe' ? 0 : (cfg.shared_intermediate_size ?? (cfg.model_type === 'granitemoehybrid' ? 1024 : 0));
      return { H, F: cfg.intermediate_size, E: cfg.num_local_experts, k: cfg.num_experts_per_tok, Fs };
    }
    case 'hunyuan_v1_moe': {
      // num_experts and moe_topk: an integer, or one per layer (HunYuanMoE reads [layer_idx]; the
      // test configs hold one value throughout, so layer 0's stands for every layer).
      const first = (v) => (Array.isArray(v) ? v[0] : v);
      return { H, F: cfg.intermediate_size, E: first(cfg.num_experts), k: first(cfg.moe_topk), Fs: cfg.intermediate_size };
    }
    case 'ernie4_5_moe':
      return {
        H,
        F: cfg.moe_intermediate_size,
        E: cfg.moe_num_experts,
        k: cfg.moe_k,
        Fs: cfg.moe_intermediate_size * (cfg.moe_num_shared_experts ?? 2),
      };
    default:
      throw new Error(`reference: unknown model_type ${cfg.model_type}`);
  }
}

/** gpt-oss's expert: biases after both projections, the clamped SwiGLU between. */
function gptOssMlp(xr, m, H, F, limit) {
  const alpha = 1.702;
  const h = new Float64Array(F);
  for (let i = 0; i < F; i++) {
    let g = m.gateBias[i],
      u = m.upBias[i];
    for (let j = 0; j < H; j++) {
      g += m.gate[i * H + j] * xr[j];
      u += m.up[i * H + j] * xr[j];
    }
    g = Math.min(g, limit);
    u = Math.max(-limit, Math.min(u, limit));
    h[i] = (u + 1) * g * sigmoid(alpha * g);
  }
  const out = new Float64Array(H);
  for (let o = 0; o < H; o++) {
    let a = m.downBias[o];
    for (let i = 0; i < F; i++) a += m.down[o * F + i] * h[i];
    out[o] = a;
  }
  return out;
}

function mlp(xr, m, H, F) {
  const h = new Float64Array(F);
  for (let i = 0; i < F; i++) {
    let g = 0,
      u = 0;
    for (let j = 0; j < H; j++) {
      g += m.gate[i * H + j] * xr[j];
      u += m.up[i * H + j] * xr[j];
    }
    h[i] = silu(g) * u;
  }
  const out = new Float64Array(H);
  for (let o = 0; o < H; o++) {
    let a = 0;
    for (let i = 0; i < F; i++) a += m.down[o * F + i] * h[i];
    out[o] = a;
  }
  return out;
}

/** Indices of the n largest v[i] with allowed[i], descending; ties: the lower index. */
function topN(v, n, allowed) {
  const idx = [];
  for (let i = 0; i < v.length; i++) if (!allowed || allowed[i]) idx.push(i);
  idx.sort((a, b) => v[b] - v[a] || a - b);
  return { chosen: idx.slice(0, n), next: idx.length > n ? v[idx[n]] : -Infinity };
}

/** Softmax over all of v. */
function softmax(v) {
  const mx = Math.max(...v);
  const ex = v.map((a) => Math.exp(a - mx));
  const sum = ex.reduce((a, b) => a + b, 0);
  return ex.map((a) => a / sum);
}

/**
 * DeepSeek-V3's (and Ling 2.0's) choice: E experts in G contiguous groups, a group scored by the sum
 * of its top 2 of c, the best kg groups kept, top-k of c among their experts. Returns the chosen and
 * the smallest margin of the two decisions.
 */
function topTwoGroupChoice(c, E, k, G, kg) {
  const gs = E / G;
  const groupScore = new Float64Array(G);
  for (let g = 0; g < G; g++) {
    const inGroup = Array.from(c.subarray(g * gs, (g + 1) * gs)).sort((a, b) => b - a);
    groupScore[g] = inGroup[0] + (gs > 1 ? inGroup[1] : 0);
  }
  const groups = topN(groupScore, kg);
  let margin = kg < G ? groupScore[groups.chosen[kg - 1]] - groups.next : Infinity;
  const allowed = new Uint8Array(E);
  for (const g of groups.chosen) for (let e = g * gs; e < (g + 1) * gs; e++) allowed[e] = 1;
  const top = topN(c, k, allowed);
  margin = Math.min(margin, c[top.chosen[k - 1]] - top.next);
  return { chosen: top.chosen, margin };
}

export function hfMoEReference(cfg, w, x) {
  const { H, F, E, k, Fs } = moeSizes(cfg);
  const T = x.length / H;
  const y = new Float64Array(T * H);
  let margin = Infinity;
  let minChoice = Infinity;
  for (let t = 0; t < T; t++) {
    const xr = x.subarray(t * H, (t + 1) * H);
    const logits = new Float64Array(E);
    for (let e = 0; e < E; e++) {
      let a = 0;
      for (let j = 0; j < H; j++) a += w.gate[e * H + j] * xr[j];
      logits[e] = a;
    }
    let chosen, weights;
    // Llama 4: the weights scale the expert's input (below).
    const onInput = cfg.model_type === 'llama4';
    if (cfg.model_type === 'gpt_oss') {
      // GptOssTopKRouter: the bias on the logits, top-k of them, softmax over the k.
      const l = logits.map((v, e) => v + w.routerBias[e]);
      const top = topN(l, k);
      chosen = top.chosen;
      margin = Math.min(margin, l[chosen[k - 1]] - top.next);
      const m = l[chosen[0]];
      const ex = chosen.map((e) => Math.exp(l[e] - m));
      const z = ex.reduce((a, b) => a + b, 0);
      weights = ex.map((v) => v / z);
      for (const v of weights) minChoice = Math.min(minChoice, v);
    } else if (onInput) {
      const top = topN(logits, k);
      chosen = top.chosen;
      margin = Math.min(margin, logits[chosen[k - 1]] - top.next);
      weights = chosen.map((e) => sigmoid(logits[e]));
      for (const v of weights) minChoice = Math.min(minChoice, v);
    } else if (cfg.model_type === 'minimax_m2') {
      // MiniMaxM2TopKRouter: sigmoid, top-k of s + bias, the chosen s divided by their sum.
      const s = logits.map(sigmoid);
      const c = s.map((v, e) => v + (w.bias ? w.bias[e] : 0));
      for (const v of s) minChoice = Math.min(minChoice, v);
      const top = topN(c, k);
      chosen = top.chosen;
      margin = Math.min(margin, c[chosen[k - 1]] - top.next);
      const z = chosen.reduce((a, e) => a + s[e], 0);
      weights = chosen.map((e) => s[e] / z);
    } else if (cfg.model_type === 'bailing_moe' && cfg.architectures.includes('BailingMoeV2ForCausalLM')) {
      // Ling 2.0's gate, literally: sigmoid, + expert_bias to choose, groups by their top 2 (others -inf).
      const s = logits.map(sigmoid);
      const c = s.map((v, e) => v + (w.bias ? w.bias[e] : 0));
      for (const v of c) minChoice = Math.min(minChoice, v);
      const choice = topTwoGroupChoice(c, E, k, cfg.n_group ?? 8, cfg.topk_group ?? 4);
      chosen = choice.chosen;
      margin = Math.min(margin, choice.margin);
      weights = chosen.map((e) => s[e]);
      if (k > 1) {
        const z = weights.reduce((a, b) => a + b, 0) + 1e-20;
        weights = weights.map((v) => v / z);
      }
      weights = weights.map((v) => v * (cfg.routed_scaling_factor ?? 1));
    } else if (cfg.model_type === 'deepseek' || cfg.model_type === 'bailing_moe') {
      // DeepSeekMoE v1's and Ling v1's MoEGate: softmax, top-k, renormalised when k > 1 and norm_topk_prob (Ling: default true).
      const p = softmax(logits);
      for (const v of p) minChoice = Math.min(minChoice, v);
      const top = topN(p, k);
      chosen = top.chosen;
      margin = Math.min(margin, p[chosen[k - 1]] - top.next);
      weights = chosen.map((e) => p[e]);
      const norm = cfg.norm_topk_prob ?? cfg.model_type === 'bailing_moe';
      if (k > 1 && norm) {
        const z = weights.reduce((a, b) => a + b, 0) + (cfg.model_type === 'deepseek' ? 1e-20 : 0);
        weights = weights.map((v) => v / z);
      }
    } else if (cfg.model_type === 'deepseek_v2') {
      if (cfg.norm_topk_prob) throw new Error('reference: deepseek_v2 with norm_topk_prob is not modelled');
      const p = softmax(logits);
      let c = p;
      if (cfg.topk_method === 'group_limited_greedy') {
        const G = cfg.n_group,
          kg = cfg.topk_group,
          gs = E / G;
        const groupScore = new Float64Array(G);
        for (let g = 0; g < G; g++) groupScore[g] = Math.max(...p.subarray(g * gs, (g + 1) * gs));
        const groups = topN(groupScore, kg);
        if (kg < G) margin = Math.min(margin, groupScore[groups.chosen[kg - 1]] - groups.next);
        // As transformers: the dropped groups' scores filled with 0 (p > 0 keeps them out of the top-k).
        c = p.map((v, e) => (groups.chosen.includes(Math.floor(e / gs)) ? v : 0));
      }
      for (const v of p) minChoice = Math.min(minChoice, v);
      const top = topN(c, k);
      chosen = top.chosen;
      margin = Math.min(margin, c[chosen[k - 1]] - top.next);
      weights = chosen.map((e) => p[e] * (cfg.routed_scaling_factor ?? 1));
    } else if (isDeepSeekLike(cfg)) {
      const s = logits.map(sigmoid);
      const c = s.map((v, e) => v + (w.bias ? w.bias[e] : 0));
      for (const v of c) minChoice = Math.min(minChoice, v);
      const choice = topTwoGroupChoice(c, E, k, field(cfg, 'n_group'), field(cfg, 'topk_group'));
      chosen = choice.chosen;
      margin = Math.min(margin, choice.margin);
      weights = chosen.map((e) => s[e]);
      if (field(cfg, 'norm_topk_prob')) {
        const z = weights.reduce((a, b) => a + b, 0) + 1e-20;
        weights = weights.map((v) => v / z);
      }
      const rsf = field(cfg, 'routed_scaling_factor');
      weights = weights.map((v) => v * rsf);
    } else {
      const p = softmax(logits);
      // Ernie 4.5 chooses by p + bias and divides by max(Σ p_top, moe_norm_min); the others by p alone.
      const ernie = cfg.model_type === 'ernie4_5_moe';
      const c = ernie && w.bias ? p.map((v, e) => v + w.bias[e]) : p;
      // minChoice matters where dropped groups are filled (DeepSeek-V3's path): here it is p's.
      for (const v of p) minChoice = Math.min(minChoice, v);
      const top = topN(c, k);
      chosen = top.chosen;
      margin = Math.min(margin, c[chosen[k - 1]] - top.next);
      weights = chosen.map((e) => p[e]);
      // Hunyuan's topkgating renormalises for k > 1; its top-1 path keeps the probability.
      // Granite's softmax over the top-k logits is the renormalised top-k; Qwen3-VL-MoE always renormalises.
      const always = ['mixtral', 'qwen3_vl_moe', ...GRANITE].includes(cfg.model_type) || ernie;
      const renorm =
        cfg.model_type === 'hunyuan_v1_moe'
          ? k > 1
          : cfg.model_type === 'jamba' || cfg.model_type === 'dbrx'
            ? false
            : always
              ? true
              : field(cfg, 'norm_topk_prob');
      if (renorm) {
        const z = weights.reduce((a, b) => a + b, 0);
        weights = weights.map((v) => v / (ernie ? Math.max(z, cfg.moe_norm_min ?? 1e-12) : z));
      }
      if (cfg.model_type === 'dbrx') {
        // DbrxRouter: top_weights / torch.norm(top_weights, p), p = moe_normalize_expert_weights (default 1; None: none).
        const p = cfg.ffn_config.moe_normalize_expert_weights === undefined ? 1 : cfg.ffn_config.moe_normalize_expert_weights;
        if (p !== null) {
          const norm = weights.reduce((a, v) => a + Math.abs(v) ** p, 0) ** (1 / p);
          weights = weights.map((v) => v / norm);
        }
      }
      if (GRANITE.includes(cfg.model_type)) {
        // Literally as GraniteMoeTopKGating: softmax over the chosen logits (the same choice: p is monotone in them).
        const m = Math.max(...chosen.map((e) => logits[e]));
        const ex = chosen.map((e) => Math.exp(logits[e] - m));
        const z = ex.reduce((a, b) => a + b, 0);
        weights = ex.map((v) => v / z);
      }
    }
    const yr = y.subarray(t * H, (t + 1) * H);
    chosen.forEach((e, j) => {
      if (onInput) {
        const o = mlp(
          xr.map((v) => weights[j] * v),
          w.experts[e],
          H,
          F,
        );
        for (let h = 0; h < H; h++) yr[h] += o[h];
        return;
      }
      const o = cfg.model_type === 'gpt_oss' ? gptOssMlp(xr, w.experts[e], H, F, cfg.swiglu_limit ?? 7) : mlp(xr, w.experts[e], H, F);
      for (let h = 0; h < H; h++) yr[h] += weights[j] * o[h];
    });
    if (Fs > 0) {
      const o = mlp(xr, w.shared, H, Fs);
      let scale = 1;
      if (QWEN_DEFAULTS[cfg.model_type]?.gatedShared) {
        let a = 0;
        for (let j = 0; j < H; j++) a += w.sharedGate[j] * xr[j];
        scale = sigmoid(a);
      }
      for (let h = 0; h < H; h++) yr[h] += scale * o[h];
    }
  }
  return { y, margin, minChoice };
}
