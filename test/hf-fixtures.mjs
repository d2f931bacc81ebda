// Small Hugging Face MoE checkpoints built by the tests themselves (no model can be downloaded
// here): config.json, the weights in BF16/F16/F32 safetensors files sharded like
// save_pretrained's (files filled in order, experts of one layer may span two files) with
// model.safetensors.index.json, or one model.safetensors. Written with a safetensors writer of its
// own (not the package's), so the reader is checked against files it did not write.
// The values written are returned decoded in float64, in the layout test/hf-moe-reference.mjs takes.
import * as fs from 'node:fs';
import { join } from 'node:path';

import { moeLayersOf, moeSizes } from './hf-moe-reference.mjs';

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** float64 → bf16 bits, round to nearest even. */
export function toBf16Bits(v) {
  f32[0] = v;
  const x = u32[0];
  return ((x + 0x7fff + ((x >>> 16) & 1)) >>> 16) & 0xffff;
}
export function fromBf16Bits(b) {
  u32[0] = b << 16;
  return f32[0];
}
/** float64 → IEEE half bits, round to nearest even (finite inputs). */
export function toF16Bits(v) {
  f32[0] = v;
  const x = u32[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = ((x >>> 23) & 0xff) - 127 + 15;
  let mant = x & 0x7fffff;
  if (exp >= 31) return sign | 0x7c00;
  if (exp <= 0) {
    if (exp < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - exp;
    let half = mant >>> shift;
    const rem = mant & ((1 << shift) - 1),
      mid = 1 << (shift - 1);
    if (rem > mid || (rem === mid && half & 1)) half++;
    return sign | half;
  }
  let half = (exp << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && half & 1)) half++;
  return sign | half;
}
export function fromF16Bits(b) {
  const s = b & 0x8000 ? -1 : 1,
    e = (b >> 10) & 0x1f,
    m = b & 0x3ff;
  if (e === 0x1f) return m ? NaN : s * Infinity;
  if (e === 0) return s * m * 2 ** -24;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

const ST = { bf16: 'BF16', f16: 'F16', f32: 'F32' };

/** e4m3fn: the 127 non-negative finite values by code (0x7f is NaN), increasing with the code. */
const E4M3 = Array.from({ length: 127 }, (_, c) => (c >> 3 === 0 ? (c & 7) * 2 ** -9 : (1 + (c & 7) / 8) * 2 ** ((c >> 3) - 7)));
/** float64 → e4m3fn bits, round to nearest even, saturating at ±448. */
export function toE4m3Bits(v) {
  const a = Math.min(Math.abs(v), 448);
  let lo = 0,
    hi = 126;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (E4M3[mid] <= a) lo = mid;
    else hi = mid;
  }
  const dl = a - E4M3[lo],
    dh = E4M3[hi] - a;
  const c = dl < dh ? lo : dh < dl ? hi : lo % 2 === 0 ? lo : hi;
  return (v < 0 ? 0x80 : 0) | c;
}
export const fromE4m3Bits = (b) => (b & 0x80 ? -1 : 1) * E4M3[b & 0x7f];

/**
 * DeepSeek-V3's FP8 layout for a [R,C] weight: e4m3 values and one f32 scale per 128×128 block
 * (scale = amax/448 of the block), `<name>_scale_inv` [ceil(R/128), ceil(C/128)]. decoded holds
 * what the reader must produce: fround(e4m3 value · scale), as an f32 product.
 */
export function encodeFp8Blocks(values, R, C) {
  const rb = Math.ceil(R / 128),
    cb = Math.ceil(C / 128);
  const scales = new Float32Array(rb * cb);
  for (let r = 0; r < R; r++)
    for (let c = 0; c < C; c++) {
      const i = Math.floor(r / 128) * cb + Math.floor(c / 128);
      scales[i] = Math.max(scales[i], Math.abs(values[r * C + c]) / 448);
    }
  for (let i = 0; i < scales.length; i++) if (scales[i] === 0) scales[i] = 1;
  const q = new Uint8Array(R * C);
  const decoded = new Float64Array(R * C);
  for (let r = 0; r < R; r++)
    for (let c = 0; c < C; c++) {
      const s = scales[Math.floor(r / 128) * cb + Math.floor(c / 128)];
      q[r * C + c] = toE4m3Bits(values[r * C + c] / s);
      decoded[r * C + c] = Math.fround(fromE4m3Bits(q[r * C + c]) * s);
    }
  return { q, scales, decoded, scaleShape: [rb, cb] };
}

/** Values stored in `dtype`: { bytes, decoded } (decoded: what the file holds, in float64). */
export function encode(values, dtype) {
  const n = values.length;
  if (dtype === 'f32') {
    const a = Float32Array.from(values);
    return { bytes: new Uint8Array(a.buffer), decoded: Float64Array.from(a) };
  }
  const bits = new Uint16Array(n);
  const decoded = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    bits[i] = dtype === 'bf16' ? toBf16Bits(values[i]) : toF16Bits(values[i]);
    decoded[i] = dtype === 'bf16' ? fromBf16Bits(bits[i]) : fromF16Bits(bits[i]);
  }
  return { bytes: new Uint8Array(bits.buffer), decoded };
}

/** A seeded normal stream (mulberry32 + Box-Muller). */
export function normals(seed) {
  let a = seed >>> 0;
  const uniform = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return (n, std = 1) => {
    const out = new Float64Array(n);
    for (let i = 0; i < n; i++) {
      const u = Math.max(uniform(), 1e-12),
        v = uniform();
      out[i] = std * Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * v);
    }
    return out;
  };
}

/**
 * Writes a safetensors file: entries [{ name, dtype ('BF16', 'F32', ...), shape, bytes }] back to
 * back in order; the header padded with spaces to a multiple of 8. Returns the header length.
 */
export function writeSafetensorsFile(path, entries, metadata = { format: 'pt' }) {
  const header = { __metadata__: metadata };
  let offset = 0;
  for (const e of entries) {
    header[e.name] = { dtype: e.dtype, shape: e.shape, data_offsets: [offset, offset + e.bytes.byteLength] };
    offset += e.bytes.byteLength;
  }
  let text = JSON.stringify(header);
  text += ' '.repeat((8 - (Buffer.byteLength(text) % 8)) % 8);
  const body = Buffer.from(text, 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(body.length));
  fs.writeFileSync(
    path,
    Buffer.concat([len, body, ...entries.map((e) => Buffer.from(e.bytes.buffer, e.bytes.byteOffset, e.bytes.byteLength))]),
  );
  return 8 + body.length;
}

/** A safetensors file's header: { dataStart, tensors: { name: { dtype, shape, data_offsets } } }. */
export function readHeader(path) {
  const fd = fs.openSync(path, 'r');
  try {
    const len = Buffer.alloc(8);
    fs.readSync(fd, len, 0, 8, 0);
    const n = Number(len.readBigUInt64LE(0));
    const body = Buffer.alloc(n);
    fs.readSync(fd, body, 0, n, 8);
    const json = JSON.parse(body.toString('utf8'));
    delete json.__metadata__;
    return { dataStart: 8 + n, tensors: json };
  } finally {
    fs.closeSync(fd);
  }
}

/** Overwrites the named tensors' bytes in place with 0xff (NaN in BF16, F16 and F32). */
export function poisonTensors(dir, weightMap, names) {
  for (const name of names) {
    const path = join(dir, weightMap[name]);
    const { dataStart, tensors } = readHeader(path);
    const [b, e] = tensors[name].data_offsets;
    const fd = fs.openSync(path, 'r+');
    try {
      fs.writeSync(fd, Buffer.alloc(e - b, 0xff), 0, e - b, dataStart + b);
    } finally {
      fs.closeSync(fd);
    }
  }
}

const GRANITE = ['granitemoe', 'granitemoeshared', 'granitemoehybrid'];

/** FP4 e2m1 by code (bit 3 the sign), written here independently of lib/serve. */
const FP4 = [0, 0.5, 1, 1.5, 2, 3, 4, 6];
const fp4Value = (code) => (code & 8 ? -1 : 1) * FP4[code & 7];

/**
 * Random MXFP4 weights [rows, cols] (nn.Linear orientation, cols a multiple of 32): a code per value
 * and an E8M0 scale per 32 values of a row, scales 2^(s−127) with s in [minExp, minExp + 2] + 127.
 * Returns { blocks [rows, cols/32, 16] (two codes a byte, the first value in the low nibble),
 * scales [rows, cols/32], values (float64, exact) }.
 */
export function randomMxfp4(rows, cols, seed, minExp = -5) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
  const groups = cols / 32;
  const blocks = new Uint8Array(rows * groups * 16);
  const scales = new Uint8Array(rows * groups);
  const values = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++)
    for (let g = 0; g < groups; g++) {
      const s = 127 + minExp + (next() % 3);
      scales[r * groups + g] = s;
      for (let i = 0; i < 32; i++) {
        const code = next() & 15;
        const byte = (r * groups + g) * 16 + (i >> 1);
        blocks[byte] |= i % 2 === 0 ? code : code << 4;
        values[r * cols + g * 32 + i] = fp4Value(code) * 2 ** (s - 127);
      }
    }
  return { blocks, scales, values };
}

/**
 * Overwrites rows of one tensor (along its first dimension: experts of a fused [E, …] tensor) in
 * place with 0xff; `keep(row)` says which rows stay.
 */
export function poisonRows(dir, weightMap, name, keep) {
  const path = join(dir, weightMap[name]);
  const { dataStart, tensors } = readHeader(path);
  const [b, e] = tensors[name].data_offsets;
  const rows = tensors[name].shape[0];
  const rowBytes = (e - b) / rows;
  const fd = fs.openSync(path, 'r+');
  try {
    for (let r = 0; r < rows; r++) if (!keep(r)) fs.writeSync(fd, Buffer.alloc(rowBytes, 0xff), 0, rowBytes, dataStart + b + r * rowBytes);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Tensor names of one MoE block in a family's layout (written independently of lib/serve). Fused
 * families: `fused` = { gateUp, down, layout } instead of `expert`, layout 'xW' (gate_up [E,H,2F],
 * down [E,F,H]) or 'linear' ([E,2F,H], [E,H,F]); Granite's shared MLP is { gateUp [2S,H], down [H,S] }.
 */
export function blockNames(cfg, layer) {
  if (cfg.model_type === 'gpt_oss') {
    const p = `model.layers.${layer}.mlp`;
    return {
      gate: `${p}.router.weight`,
      bias: null,
      routerBias: `${p}.router.bias`,
      fused: { gateUp: `${p}.experts.gate_up_proj`, down: `${p}.experts.down_proj`, layout: 'xW', split: 'interleaved' },
      expertBias: { gateUp: `${p}.experts.gate_up_proj_bias`, down: `${p}.experts.down_proj_bias` },
      shared: null,
      sharedGate: null,
    };
  }
  if (GRANITE.includes(cfg.model_type)) {
    const p = `model.layers.${layer}.block_sparse_moe`;
    const s = `model.layers.${layer}.shared_mlp`;
    const hasShared =
      cfg.model_type !== 'granitemoe' && (cfg.shared_intermediate_size ?? (cfg.model_type === 'granitemoehybrid' ? 1024 : 0)) > 0;
    return {
      gate: `${p}.router.layer.weight`,
      bias: null,
      fused: { gateUp: `${p}.input_linear.weight`, down: `${p}.output_linear.weight`, layout: 'linear' },
      shared: hasShared ? { gateUp: `${s}.input_linear.weight`, down: `${s}.output_linear.weight` } : null,
      sharedGate: null,
    };
  }
  if (cfg.model_type === 'dbrx') {
    const p = `transformer.blocks.${layer}.ffn`;
    return {
      gate: `${p}.router.layer.weight`,
      bias: null,
      stacked: { gate: `${p}.experts.mlp.w1`, up: `${p}.experts.mlp.v1`, down: `${p}.experts.mlp.w2` },
      shared: null,
      sharedGate: null,
    };
  }
  if (cfg.model_type === 'jamba') {
    const p = `model.layers.${layer}.feed_forward`;
    return {
      gate: `${p}.router.weight`,
      bias: null,
      expert: (j, x) => `${p}.experts.${j}.${x}_proj.weight`,
      shared: null,
      sharedGate: null,
    };
  }
  if (cfg.model_type === 'llama4') {
    const p = `language_model.model.layers.${layer}.feed_forward`;
    return {
      gate: `${p}.router.weight`,
      bias: null,
      fused: { gateUp: `${p}.experts.gate_up_proj`, down: `${p}.experts.down_proj`, layout: 'xW' },
      shared: (x) => `${p}.shared_expert.${x}_proj.weight`,
      sharedGate: null,
    };
  }
  if (cfg.model_type === 'qwen3_vl_moe') {
    const p = `model.language_model.layers.${layer}.mlp`;
    return {
      gate: `${p}.gate.weight`,
      bias: null,
      fused: { gateUp: `${p}.experts.gate_up_proj`, down: `${p}.experts.down_proj`, layout: 'xW' },
      shared: null,
      sharedGate: null,
    };
  }
  if (cfg.model_type === 'mixtral' || cfg.model_type === 'minimax_m2') {
    const p = `model.layers.${layer}.block_sparse_moe`;
    const m = { gate: 'w1', up: 'w3', down: 'w2' };
    const bias = cfg.model_type === 'minimax_m2' ? `${p}.e_score_correction_bias` : null;
    return { gate: `${p}.gate.weight`, bias, expert: (j, x) => `${p}.experts.${j}.${m[x]}.weight`, shared: null, sharedGate: null };
  }
  const p = `model.layers.${layer}.mlp`;
  if (cfg.model_type === 'hunyuan_v1_moe')
    return {
      gate: `${p}.gate.wg.weight`,
      bias: null,
      expert: (j, x) => `${p}.experts.${j}.${x}_proj.weight`,
      shared: (x) => `${p}.shared_mlp.${x}_proj.weight`,
      sharedGate: null,
    };
  const ds = ['deepseek_v3', 'kimi_k2', 'glm4_moe', 'dots1'].includes(cfg.model_type);
  const ernie = cfg.model_type === 'ernie4_5_moe';
  const v2 = cfg.model_type === 'deepseek_v2' || cfg.model_type === 'deepseek';
  const ling = cfg.model_type === 'bailing_moe';
  const lingBias = ling && cfg.architectures.includes('BailingMoeV2ForCausalLM') && cfg.moe_router_enable_expert_bias !== false;
  const qwen2 = cfg.model_type === 'qwen2_moe' || cfg.model_type === 'qwen3_next';
  return {
    gate: `${p}.gate.weight`,
    bias: ds
      ? `${p}.gate.e_score_correction_bias`
      : ernie
        ? `${p}.moe_statics.e_score_correction_bias`
        : lingBias
          ? `${p}.gate.expert_bias`
          : null,
    expert: (j, x) => `${p}.experts.${j}.${x}_proj.weight`,
    shared:
      ds || ernie || v2 || ling
        ? (x) => `${p}.shared_experts.${x}_proj.weight`
        : qwen2
          ? (x) => `${p}.shared_expert.${x}_proj.weight`
          : null,
    sharedGate: qwen2 ? `${p}.shared_expert_gate.weight` : null,
  };
}

/**
 * Builds a checkpoint in `dir` (created) for config `cfg`.
 * options: dtype ('bf16' | 'f16' | 'f32') of the weights, shards (files; 0: one model.safetensors),
 * seed, biasScale (DeepSeek-V3's correction bias is tanh-shaped in ±biasScale), biasDtype (default f32),
 * write (false: only return the values, e.g. to rebuild a reference beside a checkpoint written elsewhere),
 * fp8 (experts and shared experts in DeepSeek-V3's FP8 layout: e4m3 with 128×128 block scales).
 * Returns { cfg, layers: Map(layer → weights as the reference takes them), weightMap, files, entries }.
 */
export function buildHfCheckpoint(
  dir,
  cfg,
  { dtype = 'bf16', shards = 3, seed = 1, biasScale = 0.05, biasDtype = 'f32', writeConfig = true, write = true, fp8 = false } = {},
) {
  if (write) fs.mkdirSync(dir, { recursive: true });
  const rand = normals(seed);
  const { H, F, E, Fs } = moeSizes(cfg);
  const moe = new Set(moeLayersOf(cfg));
  const entries = [];
  const add = (name, shape, values, dt = dtype) => {
    const { bytes, decoded } = encode(values, dt);
    entries.push({ name, dtype: ST[dt], shape, bytes });
    return decoded;
  };
  const layers = new Map();
  // Qwen3-VL-MoE's language model lies under model.language_model (its vision tower under model.visual).
  // Llama 4's under language_model.model.
  const model = cfg.model_type === 'qwen3_vl_moe' ? 'model.language_model' : cfg.model_type === 'llama4' ? 'language_model.model' : 'model';
  if (cfg.model_type === 'qwen3_vl_moe') add('model.visual.patch_embed.proj.weight', [H, 3, 2, 2], rand(12 * H));
  add(`${model}.embed_tokens.weight`, [32, H], rand(32 * H));
  for (let l = 0; l < (cfg.model_type === 'dbrx' ? cfg.n_layers : (cfg.text_config ?? cfg).num_hidden_layers); l++) {
    add(`${model}.layers.${l}.input_layernorm.weight`, [H], rand(H));
    add(`${model}.layers.${l}.self_attn.q_proj.weight`, [H, H], rand(H * H, 1 / Math.sqrt(H)));
    if (!moe.has(l)) {
      const Fd = 2 * F;
      for (const x of ['gate', 'up']) add(`${model}.layers.${l}.mlp.${x}_proj.weight`, [Fd, H], rand(Fd * H, 1 / Math.sqrt(H)));
      add(`${model}.layers.${l}.mlp.down_proj.weight`, [H, Fd], rand(H * Fd, 1 / Math.sqrt(Fd)));
      continue;
    }
    const n = blockNames(cfg, l);
    // Hunyuan publishes its gate (wg) in F32 whatever the other weights' dtype.
    const gateDtype = cfg.model_type === 'hunyuan_v1_moe' ? 'f32' : dtype;
    const w = {
      gate: add(n.gate, [E, H], rand(E * H, 1 / Math.sqrt(H)), gateDtype),
      bias: null,
      experts: [],
      shared: null,
      sharedGate: null,
    };
    // gpt-oss: the router's bias on the logits.
    if (n.routerBias) w.routerBias = add(n.routerBias, [E], rand(E, 0.5));
    if (n.bias) {
      const b = rand(E).map((v) => biasScale * Math.tanh(v));
      // Ernie 4.5 stores its bias as [1,E] (one group of experts).
      w.bias = add(n.bias, cfg.model_type === 'ernie4_5_moe' ? [1, E] : [E], b, biasDtype);
    }
    // With fp8, the expert matrices are stored as DeepSeek-V3 publishes them (the gate stays as it is).
    const weight = (name, R, C, std) => {
      if (!fp8) return add(name, [R, C], rand(R * C, std));
      const { q, scales, decoded, scaleShape } = encodeFp8Blocks(rand(R * C, std), R, C);
      entries.push({ name, dtype: 'F8_E4M3', shape: [R, C], bytes: q });
      entries.push({ name: `${name}_scale_inv`, dtype: 'F32', shape: scaleShape, bytes: new Uint8Array(scales.buffer) });
      return decoded;
    };
    const mlp = (name, f) => ({
      gate: weight(name('gate'), f, H, 1 / Math.sqrt(H)),
      up: weight(name('up'), f, H, 1 / Math.sqrt(H)),
      down: weight(name('down'), H, f, 1 / Math.sqrt(f)),
    });
    // An MLP's values as the file will hold them (rounded to `dtype`), written by the caller.
    const values = (f) => ({
      gate: encode(rand(f * H, 1 / Math.sqrt(H)), dtype).decoded,
      up: encode(rand(f * H, 1 / Math.sqrt(H)), dtype).decoded,
      down: encode(rand(H * f, 1 / Math.sqrt(f)), dtype).decoded,
    });
    if (n.fused && n.fused.split === 'interleaved') {
      // gpt-oss: gate and up interleaved (column/row 2i the gate's i); MXFP4 where config.json says so
      // (as published: blocks and scales, [E, out, in]), else gate_up_proj [E,H,2F], down_proj [E,F,H].
      if (fp8) throw new Error(`fixtures: ${cfg.model_type}'s experts are not written in FP8`);
      const mxfp4 = cfg.quantization_config?.quant_method === 'mxfp4';
      const gateUpLinear = new Float64Array(E * 2 * F * H); // [E, 2F, H]
      const downLinear = new Float64Array(E * H * F); // [E, H, F]
      if (mxfp4) {
        const gu = randomMxfp4(E * 2 * F, H, seed * 7919 + l);
        const dn = randomMxfp4(E * H, F, seed * 7919 + l + 1000);
        gateUpLinear.set(gu.values);
        downLinear.set(dn.values);
        const raw = (name, shape, bytes) => entries.push({ name, dtype: 'U8', shape, bytes });
        raw(`${n.fused.gateUp}_blocks`, [E, 2 * F, H / 32, 16], gu.blocks);
        raw(`${n.fused.gateUp}_scales`, [E, 2 * F, H / 32], gu.scales);
        raw(`${n.fused.down}_blocks`, [E, H, F / 32, 16], dn.blocks);
        raw(`${n.fused.down}_scales`, [E, H, F / 32], dn.scales);
      } else {
        gateUpLinear.set(encode(rand(E * 2 * F * H, 1 / Math.sqrt(H)), dtype).decoded);
        downLinear.set(encode(rand(E * H * F, 1 / Math.sqrt(F)), dtype).decoded);
        // x·W: gate_up [E,H,2F] = the transpose of each expert's [2F,H]; down [E,F,H].
        const gu = new Float64Array(E * H * 2 * F);
        const dn = new Float64Array(E * F * H);
        for (let e = 0; e < E; e++) {
          for (let r = 0; r < 2 * F; r++) for (let h = 0; h < H; h++) gu[(e * H + h) * 2 * F + r] = gateUpLinear[(e * 2 * F + r) * H + h];
          for (let h = 0; h < H; h++) for (let f = 0; f < F; f++) dn[(e * F + f) * H + h] = downLinear[(e * H + h) * F + f];
        }
        add(n.fused.gateUp, [E, H, 2 * F], gu);
        add(n.fused.down, [E, F, H], dn);
      }
      // Biases large enough that some pre-activations pass the clamp (±7).
      const gateUpBias = add(n.expertBias.gateUp, [E, 2 * F], rand(E * 2 * F, 3));
      const downBias = add(n.expertBias.down, [E, H], rand(E * H, 0.5));
      for (let e = 0; e < E; e++) {
        const m = { gate: new Float64Array(F * H), up: new Float64Array(F * H), down: new Float64Array(H * F) };
        for (let i = 0; i < F; i++)
          for (let h = 0; h < H; h++) {
            m.gate[i * H + h] = gateUpLinear[(e * 2 * F + 2 * i) * H + h];
            m.up[i * H + h] = gateUpLinear[(e * 2 * F + 2 * i + 1) * H + h];
          }
        m.down.set(downLinear.subarray(e * H * F, (e + 1) * H * F));
        m.gateBias = Float64Array.from({ length: F }, (_, i) => gateUpBias[e * 2 * F + 2 * i]);
        m.upBias = Float64Array.from({ length: F }, (_, i) => gateUpBias[e * 2 * F + 2 * i + 1]);
        m.downBias = downBias.slice(e * H, (e + 1) * H);
        w.experts.push(m);
      }
    } else if (n.fused) {
      if (fp8) throw new Error(`fixtures: ${cfg.model_type}'s fused experts are not written in FP8`);
      for (let j = 0; j < E; j++) w.experts.push(values(F));
      // Element by element from the per-expert nn.Linear weights (gate/up [F,H], down [H,F]).
      const gateUp = new Float64Array(E * 2 * F * H);
      const down = new Float64Array(E * F * H);
      w.experts.forEach((m, e) => {
        for (let r = 0; r < 2 * F; r++)
          for (let h = 0; h < H; h++) {
            const v = r < F ? m.gate[r * H + h] : m.up[(r - F) * H + h];
            // xW: [e][h][r]; linear: [e][r][h].
            gateUp[n.fused.layout === 'xW' ? (e * H + h) * 2 * F + r : (e * 2 * F + r) * H + h] = v;
          }
        for (let h = 0; h < H; h++)
          for (let f = 0; f < F; f++) down[n.fused.layout === 'xW' ? (e * F + f) * H + h : (e * H + h) * F + f] = m.down[h * F + f];
      });
      add(n.fused.gateUp, n.fused.layout === 'xW' ? [E, H, 2 * F] : [E, 2 * F, H], gateUp);
      add(n.fused.down, n.fused.layout === 'xW' ? [E, F, H] : [E, H, F], down);
    } else if (n.stacked) {
      // DBRX: w1 (gate) and v1 (up) [E·F,H], each expert's nn.Linear rows; w2 [E·F,H], each expert's [F,H] used as h·w2.
      if (fp8) throw new Error(`fixtures: ${cfg.model_type}'s experts are not written in FP8`);
      for (let j = 0; j < E; j++) w.experts.push(values(F));
      const gate = new Float64Array(E * F * H);
      const up = new Float64Array(E * F * H);
      const down = new Float64Array(E * F * H);
      w.experts.forEach((m, e) => {
        for (let f = 0; f < F; f++)
          for (let h = 0; h < H; h++) {
            gate[(e * F + f) * H + h] = m.gate[f * H + h];
            up[(e * F + f) * H + h] = m.up[f * H + h];
            down[(e * F + f) * H + h] = m.down[h * F + f];
          }
      });
      add(n.stacked.gate, [E * F, H], gate);
      add(n.stacked.up, [E * F, H], up);
      add(n.stacked.down, [E * F, H], down);
    } else for (let j = 0; j < E; j++) w.experts.push(mlp((x) => n.expert(j, x), F));
    if (n.shared && 'gateUp' in n.shared) {
      // Granite's shared MLP: input_linear [2S,H] = gate rows, then up rows.
      if (fp8) throw new Error(`fixtures: ${cfg.model_type}'s shared MLP is not written in FP8`);
      w.shared = values(Fs);
      const gateUp = new Float64Array(2 * Fs * H);
      gateUp.set(w.shared.gate, 0);
      gateUp.set(w.shared.up, Fs * H);
      add(n.shared.gateUp, [2 * Fs, H], gateUp);
      add(n.shared.down, [H, Fs], w.shared.down);
    } else if (n.shared && Fs > 0) w.shared = mlp(n.shared, Fs);
    if (n.sharedGate) w.sharedGate = add(n.sharedGate, [1, H], rand(H, 1 / Math.sqrt(H)));
    layers.set(l, w);
  }
  add(`${model}.norm.weight`, [H], rand(H));
  if (!write) return { cfg, layers, weightMap: {}, files: [], entries };
  if (writeConfig) fs.writeFileSync(join(dir, 'config.json'), JSON.stringify(cfg, null, 2));
  const weightMap = {};
  const files = [];
  if (shards === 0) {
    writeSafetensorsFile(join(dir, 'model.safetensors'), entries);
    for (const e of entries) weightMap[e.name] = 'model.safetensors';
    files.push('model.safetensors');
  } else {
    // Filled in order up to an even share of the bytes each, as save_pretrained's max_shard_size does.
    const total = entries.reduce((s, e) => s + e.bytes.byteLength, 0);
    const per = Math.ceil(total / shards);
    const groups = [[]];
    let size = 0;
    for (const e of entries) {
      if (size + e.bytes.byteLength > per && groups[groups.length - 1].length && groups.length < shards) {
        groups.push([]);
        size = 0;
      }
      groups[groups.length - 1].push(e);
      size += e.bytes.byteLength;
    }
    const pad = (i) => String(i).padStart(5, '0');
    groups.forEach((g, i) => {
      const file = `model-${pad(i + 1)}-of-${pad(groups.length)}.safetensors`;
      writeSafetensorsFile(join(dir, file), g);
      for (const e of g) weightMap[e.name] = file;
      files.push(file);
    });
    fs.writeFileSync(
      join(dir, 'model.safetensors.index.json'),
      JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2),
    );
  }
  return { cfg, layers, weightMap, files, entries };
}

/** Configs of the families at test size (the fields left out take each config class's default). */
export const testConfigs = {
  mixtral: {
    model_type: 'mixtral',
    hidden_size: 16,
    intermediate_size: 12,
    num_local_experts: 8,
    num_experts_per_tok: 2,
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
  deepseek_v3: {
    model_type: 'deepseek_v3',
    hidden_size: 16,
    moe_intermediate_size: 8,
    n_routed_experts: 16,
    num_experts_per_tok: 4,
    n_group: 4,
    topk_group: 2,
    n_shared_experts: 2,
    routed_scaling_factor: 2.5,
    norm_topk_prob: true,
    scoring_func: 'sigmoid',
    topk_method: 'noaux_tc',
    first_k_dense_replace: 1,
    moe_layer_freq: 1,
    num_hidden_layers: 3,
    hidden_act: 'silu',
  },
  qwen2_moe: {
    model_type: 'qwen2_moe',
    hidden_size: 16,
    moe_intermediate_size: 8,
    num_experts: 8,
    num_experts_per_tok: 2,
    shared_expert_intermediate_size: 20,
    norm_topk_prob: false,
    decoder_sparse_step: 1,
    mlp_only_layers: [0],
    num_hidden_layers: 3,
    hidden_act: 'silu',
  },
  qwen3_moe: {
    model_type: 'qwen3_moe',
    hidden_size: 16,
    moe_intermediate_size: 8,
    num_experts: 8,
    num_experts_per_tok: 2,
    norm_topk_prob: true,
    decoder_sparse_step: 1,
    mlp_only_layers: [],
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
  // Kimi K2 as published (DeepSeek-V3's fields, one group, its own scaling), at test size.
  kimi_k2: {
    model_type: 'kimi_k2',
    hidden_size: 16,
    moe_intermediate_size: 8,
    n_routed_experts: 12,
    num_experts_per_tok: 4,
    n_group: 1,
    topk_group: 1,
    n_shared_experts: 1,
    routed_scaling_factor: 2.827,
    norm_topk_prob: true,
    scoring_func: 'sigmoid',
    topk_method: 'noaux_tc',
    first_k_dense_replace: 1,
    moe_layer_freq: 1,
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
  // GLM-4.5 leaves n_group, topk_group and norm_topk_prob to Glm4MoeConfig's defaults (1, 1, true).
  glm4_moe: {
    model_type: 'glm4_moe',
    hidden_size: 16,
    moe_intermediate_size: 8,
    n_routed_experts: 8,
    num_experts_per_tok: 2,
    n_shared_experts: 1,
    routed_scaling_factor: 2.5,
    first_k_dense_replace: 1,
    num_hidden_layers: 3,
    hidden_act: 'silu',
  },
  // dots1: norm_topk_prob left out (Dots1Config: false), two shared experts.
  dots1: {
    model_type: 'dots1',
    hidden_size: 16,
    moe_intermediate_size: 6,
    n_routed_experts: 8,
    num_experts_per_tok: 3,
    n_shared_experts: 2,
    routed_scaling_factor: 2.5,
    first_k_dense_replace: 0,
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
  // Qwen3-Next's block: a gated shared expert, norm_topk_prob left out (Qwen3NextConfig: true).
  qwen3_next: {
    model_type: 'qwen3_next',
    hidden_size: 16,
    moe_intermediate_size: 4,
    num_experts: 16,
    num_experts_per_tok: 4,
    shared_expert_intermediate_size: 8,
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
  // Ernie 4.5: softmax with a selection bias, always renormalised, two ungated shared experts;
  // MoE from moe_layer_start_index 1 (left out) to the last layer.
  ernie4_5_moe: {
    model_type: 'ernie4_5_moe',
    hidden_size: 16,
    moe_intermediate_size: 6,
    moe_num_experts: 8,
    moe_k: 3,
    moe_num_shared_experts: 2,
    num_hidden_layers: 3,
    hidden_act: 'silu',
  },
  // MiniMax-M2: Mixtral's layout with a sigmoid router and a selection bias, always renormalised.
  minimax_m2: {
    model_type: 'minimax_m2',
    hidden_size: 16,
    intermediate_size: 8,
    num_local_experts: 8,
    num_experts_per_tok: 3,
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
  // Hunyuan-A13B: per-layer lists for the expert count and top-k (as published), a shared MLP of
  // the experts' width, every layer MoE.
  hunyuan_v1_moe: {
    model_type: 'hunyuan_v1_moe',
    hidden_size: 16,
    intermediate_size: 8,
    num_experts: [8, 8],
    moe_topk: [3, 3],
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
  // Qwen3-VL-MoE: the language model's fields in text_config; fused experts; norm_topk_prob false
  // here to show it is not read (transformers always renormalises); layer 1 dense (mlp_only_layers).
  qwen3_vl_moe: {
    model_type: 'qwen3_vl_moe',
    text_config: {
      model_type: 'qwen3_vl_moe_text',
      hidden_size: 16,
      moe_intermediate_size: 6,
      num_experts: 8,
      num_experts_per_tok: 3,
      norm_topk_prob: false,
      decoder_sparse_step: 1,
      mlp_only_layers: [1],
      num_hidden_layers: 3,
      hidden_act: 'silu',
    },
    vision_config: { model_type: 'qwen3_vl_moe', depth: 2 },
  },
  // gpt-oss as published: MXFP4 experts (H and F multiples of 32), a router bias, expert biases,
  // the clamped SwiGLU (swiglu_limit), every layer MoE.
  gpt_oss: {
    model_type: 'gpt_oss',
    hidden_size: 64,
    intermediate_size: 32,
    num_local_experts: 8,
    num_experts_per_tok: 2,
    experts_per_token: 2,
    swiglu_limit: 7.0,
    num_hidden_layers: 2,
    hidden_act: 'silu',
    quantization_config: {
      quant_method: 'mxfp4',
      modules_to_not_convert: ['model.layers.*.self_attn', 'model.layers.*.mlp.router', 'model.embed_tokens', 'lm_head'],
    },
  },
  // Llama 4 (its language model in text_config): top-1, sigmoid of the chosen logit scaling the
  // expert's input; fused experts; a shared expert of intermediate_size; every second layer MoE.
  llama4: {
    model_type: 'llama4',
    text_config: {
      model_type: 'llama4_text',
      hidden_size: 16,
      intermediate_size: 6,
      intermediate_size_mlp: 12,
      num_local_experts: 8,
      num_experts_per_tok: 1,
      interleave_moe_layer_step: 2,
      num_hidden_layers: 4,
      hidden_act: 'silu',
    },
    vision_config: { model_type: 'llama4_vision_model' },
  },
  // Granite 3.x MoE: top-k of the logits, softmax over them; fused experts; no shared MLP.
  granitemoe: {
    model_type: 'granitemoe',
    hidden_size: 16,
    intermediate_size: 8,
    num_local_experts: 8,
    num_experts_per_tok: 2,
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
  // GraniteMoeShared: granitemoe's block and a shared MLP (input_linear [2S,H], output_linear [H,S]).
  granitemoeshared: {
    model_type: 'granitemoeshared',
    hidden_size: 16,
    intermediate_size: 6,
    num_local_experts: 8,
    num_experts_per_tok: 3,
    shared_intermediate_size: 10,
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
  // Granite 4.0 (granitemoehybrid): Mamba and attention layers alike carry the MoE block and the
  // shared MLP (shared_intermediate_size's default, 1024, is too wide for a test: given).
  granitemoehybrid: {
    model_type: 'granitemoehybrid',
    hidden_size: 16,
    intermediate_size: 4,
    num_local_experts: 16,
    num_experts_per_tok: 4,
    shared_intermediate_size: 8,
    layer_types: ['mamba', 'attention'],
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
  // OLMoE: the experts' width in intermediate_size, every layer MoE, norm_topk_prob left out (false).
  olmoe: {
    model_type: 'olmoe',
    hidden_size: 16,
    intermediate_size: 8,
    num_experts: 8,
    num_experts_per_tok: 2,
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
  // DeepSeek-V2 (236B) at test size: group_limited_greedy (a group scores its maximum), top-5 from 3
  // of 4 groups (5 is not a multiple of 3), routed_scaling_factor 16, two shared experts.
  deepseek_v2: {
    model_type: 'deepseek_v2',
    hidden_size: 16,
    moe_intermediate_size: 8,
    n_routed_experts: 16,
    num_experts_per_tok: 5,
    n_group: 4,
    topk_group: 3,
    n_shared_experts: 2,
    routed_scaling_factor: 16,
    norm_topk_prob: false,
    scoring_func: 'softmax',
    topk_method: 'group_limited_greedy',
    first_k_dense_replace: 1,
    moe_layer_freq: 1,
    num_hidden_layers: 3,
    hidden_act: 'silu',
  },
  // DeepSeek-V2-Lite: plain top-k ('greedy', as DeepSeek's own code spells it: 'gready'), scale 1.
  deepseek_v2_lite: {
    model_type: 'deepseek_v2',
    hidden_size: 16,
    moe_intermediate_size: 6,
    n_routed_experts: 12,
    num_experts_per_tok: 4,
    n_group: 1,
    topk_group: 1,
    n_shared_experts: 2,
    routed_scaling_factor: 1,
    norm_topk_prob: false,
    scoring_func: 'softmax',
    topk_method: 'gready',
    first_k_dense_replace: 1,
    moe_layer_freq: 1,
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
  // Jamba: softmax top-2 not renormalised, MoE on layers 1, 3 (expert_layer_period 2, offset 1).
  jamba: {
    model_type: 'jamba',
    hidden_size: 16,
    intermediate_size: 10,
    num_experts: 8,
    num_experts_per_tok: 2,
    expert_layer_period: 2,
    expert_layer_offset: 1,
    num_hidden_layers: 4,
    hidden_act: 'silu',
  },
  // DBRX at test size: its own field names, the MoE fields in ffn_config (moe_normalize_expert_weights
  // left out: 1, the top-k renormalised), experts stacked by rows.
  dbrx: {
    model_type: 'dbrx',
    d_model: 16,
    n_layers: 2,
    n_heads: 4,
    ffn_config: { ffn_hidden_size: 8, moe_num_experts: 8, moe_top_k: 3, moe_jitter_eps: 0 },
  },
  // DeepSeekMoE 16B (v1) at test size: softmax top-3, not renormalised, two shared experts, layer 0 dense.
  deepseek: {
    model_type: 'deepseek',
    hidden_size: 16,
    moe_intermediate_size: 8,
    n_routed_experts: 12,
    num_experts_per_tok: 3,
    n_shared_experts: 2,
    norm_topk_prob: false,
    scoring_func: 'softmax',
    first_k_dense_replace: 1,
    moe_layer_freq: 1,
    num_hidden_layers: 3,
    hidden_act: 'silu',
  },
  // Ling 2.0 (v2, BailingMoeV2ForCausalLM) at test size: sigmoid with expert_bias for selection, groups by
  // their top 2 (top-6 of 2 groups: not 6/2), renormalised, × 2.5, one shared expert, layer 0 dense.
  bailing_moe_v2: {
    model_type: 'bailing_moe',
    architectures: ['BailingMoeV2ForCausalLM'],
    hidden_size: 16,
    moe_intermediate_size: 8,
    moe_shared_expert_intermediate_size: 8,
    num_experts: 16,
    num_experts_per_tok: 6,
    n_group: 4,
    topk_group: 2,
    num_shared_experts: 1,
    routed_scaling_factor: 2.5,
    score_function: 'sigmoid',
    norm_topk_prob: true,
    moe_router_enable_expert_bias: true,
    first_k_dense_replace: 1,
    num_hidden_layers: 3,
    hidden_act: 'silu',
  },
  // Ling-lite (v1, BailingMoeForCausalLM): softmax top-3 renormalised, two shared experts, every layer MoE.
  bailing_moe: {
    model_type: 'bailing_moe',
    architectures: ['BailingMoeForCausalLM'],
    hidden_size: 16,
    moe_intermediate_size: 6,
    num_experts: 8,
    num_experts_per_tok: 3,
    num_shared_experts: 2,
    norm_topk_prob: true,
    first_k_dense_replace: 0,
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
  // DeepSeek-V3's block with top-6 from 2 of 4 groups: the group score is still the top 2, not 6/2 = 3.
  deepseek_v3_top6: {
    model_type: 'deepseek_v3',
    hidden_size: 16,
    moe_intermediate_size: 8,
    n_routed_experts: 16,
    num_experts_per_tok: 6,
    n_group: 4,
    topk_group: 2,
    n_shared_experts: 1,
    routed_scaling_factor: 2.5,
    norm_topk_prob: true,
    scoring_func: 'sigmoid',
    topk_method: 'noaux_tc',
    first_k_dense_replace: 0,
    num_hidden_layers: 2,
    hidden_act: 'silu',
  },
};
