// Found by probing the file-facing API (session 31), each fixed and kept here: a save that committed a
// checkpoint its loader refuses (a `keep` then deleted the good ones); a failure after the commit
// reported as "nothing committed"; integer weights cast into a layer; a failed load leaving the layer
// half overwritten; a safetensors header naming a tensor twice, or not UTF-8; moeLayerFromHf
// allocating config.json's sizes before looking at the weights; a metrics line that is not a record.
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import {
  HfMoECheckpoint,
  loadCheckpoint,
  loadMoELayer,
  MoELayer,
  moeLayerFromHf,
  moeLayerState,
  readSafetensors,
  saveCheckpoint,
  writeSafetensors,
} from '../lib/index.js';
import { MAX_STEP } from '../lib/train/checkpoint-layout.js';
import { MetricsLog, readMetrics } from '../lib/train/metrics.js';

const roots: string[] = [];
function tmp(): string {
  const d = fs.mkdtempSync(join(tmpdir(), 'moe-ep-probe-'));
  roots.push(d);
  return d;
}
afterAll(() => {
  for (const d of roots) fs.rmSync(d, { recursive: true, force: true });
});

const small = (v: number) => ({ a: { dtype: 'f32' as const, shape: [4], data: new Float32Array(4).fill(v) } });

describe('a save never commits what its loader refuses', () => {
  it('a bad ep record, nesting past the loader limit, a 65-dimension tensor: refused, and keep deletes nothing', () => {
    const root = join(tmp(), 'ckpt');
    saveCheckpoint(root, { step: 1, replicated: small(1) });
    saveCheckpoint(root, { step: 2, replicated: small(2) });
    let deep: unknown = 1;
    for (let i = 0; i < 70; i++) deep = { d: deep };
    const bad: [Record<string, unknown>, RegExp][] = [
      [{ ep: { size: 1, expertsPerRank: 4, numExperts: 8 } }, /ep\.numExperts must be ep\.size × ep\.expertsPerRank = 4; it has 8/],
      [{ ep: null }, /ep must be an object/],
      [{ ep: { size: 0, expertsPerRank: 4 } }, /ep\.size must be a positive integer/],
      [{ deep }, /JSON nested deeper than 64 levels/],
    ];
    for (const [manifestExtras, message] of bad) {
      expect(() => saveCheckpoint(root, { step: 3, replicated: small(3), keep: 1, manifestExtras })).toThrow(message);
      expect(fs.readdirSync(root).sort()).toEqual(['latest', 'step-00000001', 'step-00000002']);
      expect(loadCheckpoint(root).step).toBe(2);
    }
    const shape = new Array<number>(65).fill(1);
    expect(() => writeSafetensors(join(tmp(), 'x.safetensors'), [{ name: 'x', dtype: 'f32', shape, data: new Float32Array(1) }])).toThrow(
      /tensor 'x': a shape of 65 dimensions; at most 64 are read back/,
    );
    expect(() => saveCheckpoint(root, { step: MAX_STEP + 1, replicated: small(4) })).toThrow(
      /saveCheckpoint: 'step' = 1000000000000000 is above 999999999999999/,
    );
    expect(loadCheckpoint(root).step).toBe(2);
  });

  it('a failure after the commit says the step is committed, not "nothing was committed"', () => {
    const root = join(tmp(), 'ckpt');
    saveCheckpoint(root, { step: 1, replicated: small(1) });
    fs.rmSync(join(root, 'latest'));
    fs.mkdirSync(join(root, 'latest', 'x'), { recursive: true });
    expect(() => saveCheckpoint(root, { step: 2, replicated: small(2) })).toThrow(
      /saveCheckpoint: checkpoint .*step-00000002: committed \(it loads\), but updating latest or removing the step's old copy failed: cannot write .*latest: EISDIR/,
    );
    expect(loadCheckpoint(join(root, 'step-00000002')).step).toBe(2);
  });
});

describe('loadMoELayer', () => {
  const make = (seed: number) => new MoELayer({ hidden: 16, ffn: 8, numExperts: 4, topK: 2, device: 'cpu', seed });

  it('refuses integer weights; a tensor missing from the checkpoint leaves the layer as it was', () => {
    const root = join(tmp(), 'ckpt');
    using saved = make(1);
    const st = moeLayerState(saved, 0);
    const w = st.sharded['layers.0.experts.1.w1']!;
    const ints = { ...st.sharded, 'layers.0.experts.1.w1': { dtype: 'i32' as const, shape: w.shape, data: new Int32Array(w.numel) } };
    saveCheckpoint(root, { step: 1, replicated: st.replicated, sharded: ints });
    using layer = make(7);
    const before = Array.from(layer.master.router.toArray() as Float32Array);
    {
      using reader = loadCheckpoint(root);
      expect(() => loadMoELayer(reader, layer, 0)).toThrow(
        /tensor 'layers\.0\.experts\.1\.w1' is stored as i32; a weight or optimizer moment is a float tensor/,
      );
    }
    expect(Array.from(layer.master.router.toArray() as Float32Array)).toEqual(before);
    const missing = { ...st.sharded };
    delete missing['layers.0.experts.3.w2'];
    saveCheckpoint(root, { step: 2, replicated: st.replicated, sharded: missing });
    {
      using reader = loadCheckpoint(root);
      expect(() => loadMoELayer(reader, layer, 0)).toThrow(/no tensor 'layers\.0\.experts\.3\.w2'/);
      // reader.get of an integer tensor as a float is refused too
      expect(() => reader.get('layers.0.router.weight', { dtype: 'i32' })).toThrow(/is stored as f32 and cannot be read as i32/);
    }
    expect(Array.from(layer.master.router.toArray() as Float32Array)).toEqual(before);
    // A damaged shard (its last byte flipped: an expert's tensor) is found before the router is copied.
    saveCheckpoint(root, { step: 3, replicated: st.replicated, sharded: st.sharded });
    const shard = join(root, 'step-00000003', 'rank-0.safetensors');
    const bytes = fs.readFileSync(shard);
    bytes[bytes.length - 1] = (bytes[bytes.length - 1] as number) ^ 0xff;
    fs.writeFileSync(shard, bytes);
    {
      using reader = loadCheckpoint(join(root, 'step-00000003'));
      expect(() => loadMoELayer(reader, layer, 0)).toThrow(/rank-0\.safetensors fails its SHA-256 check/);
    }
    expect(Array.from(layer.master.router.toArray() as Float32Array)).toEqual(before);
    for (const t of [...Object.values(st.replicated), ...Object.values(st.sharded)]) (t as { dispose?: () => void }).dispose?.();
  });
});

describe('safetensors headers', () => {
  const write = (path: string, header: Buffer, data: Buffer): void => {
    const h = Buffer.concat([header, Buffer.alloc((8 - (header.length % 8)) % 8, 32)]);
    const n = Buffer.alloc(8);
    n.writeBigUInt64LE(BigInt(h.length));
    fs.writeFileSync(path, Buffer.concat([n, h, data]));
  };
  it('a tensor named twice, or a header that is not UTF-8, is refused', () => {
    const dir = tmp();
    const dup = join(dir, 'dup.safetensors');
    write(
      dup,
      Buffer.from('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}, "a" :{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}'),
      Buffer.from(new Float32Array([1.5, 2.5]).buffer),
    );
    expect(() => readSafetensors(dup)).toThrow(/the header writes 'a' twice in one object/);
    // Keys inside an entry, and an escaped quote in a name, are not top-level names.
    const ok = join(dir, 'ok.safetensors');
    write(
      ok,
      Buffer.from(
        '{"__metadata__":{"a":"b"},"a\\"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}}',
      ),
      Buffer.from(new Float32Array([1.5, 2.5]).buffer),
    );
    expect(readSafetensors(ok).tensors.map((t) => t.name)).toEqual(['a"x', 'b']);
    const twoDtypes = join(dir, 'two-dtypes.safetensors');
    write(twoDtypes, Buffer.from('{"a":{"dtype":"F32","dtype":"I32","shape":[2],"data_offsets":[0,8]}}'), Buffer.alloc(8));
    expect(() => readSafetensors(twoDtypes)).toThrow(/the header writes 'dtype' twice in one object/);
    const bom = join(dir, 'bom.safetensors');
    write(
      bom,
      Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}')]),
      Buffer.alloc(8),
    );
    expect(() => readSafetensors(bom)).toThrow(/the header is not valid JSON/);
    const utf8 = join(dir, 'utf8.safetensors');
    const entry = '":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}';
    write(
      utf8,
      Buffer.concat([Buffer.from('{"a'), Buffer.from([0xff]), Buffer.from(entry + ',"a'), Buffer.from([0xfe]), Buffer.from(entry + '}')]),
      Buffer.alloc(0),
    );
    expect(() => readSafetensors(utf8)).toThrow(/the header is not valid UTF-8/);
  });
});

describe('moeLayerFromHf', () => {
  it("checks the weights' headers against config.json before building the layer (absurd sizes are not allocated)", () => {
    const dir = tmp();
    const [E, H, F] = [4, 16, 8];
    const p = 'model.layers.0.block_sparse_moe';
    const z = (n: number) => new Float32Array(n);
    const entries = [{ name: `${p}.gate.weight`, dtype: 'f32' as const, shape: [E, H], data: z(E * H) }];
    for (let j = 0; j < E; j++)
      entries.push(
        { name: `${p}.experts.${j}.w1.weight`, dtype: 'f32', shape: [F, H], data: z(F * H) },
        { name: `${p}.experts.${j}.w3.weight`, dtype: 'f32', shape: [F, H], data: z(F * H) },
        { name: `${p}.experts.${j}.w2.weight`, dtype: 'f32', shape: [H, F], data: z(F * H) },
      );
    writeSafetensors(join(dir, 'model.safetensors'), entries);
    const config = { model_type: 'mixtral', num_local_experts: E, num_experts_per_tok: 2, num_hidden_layers: 1 };
    fs.writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...config, hidden_size: 1e9, intermediate_size: F }));
    const t0 = Date.now();
    {
      using ckpt = HfMoECheckpoint.open(dir);
      expect(() => moeLayerFromHf(ckpt, 0, { device: 'cpu' })).toThrow(
        /moeLayerFromHf: layer 0 cannot be read: .*tensor 'model\.layers\.0\.block_sparse_moe\.gate\.weight' is \[4,16\] but the mixtral config/,
      );
    }
    expect(Date.now() - t0).toBeLessThan(5000);
    fs.writeFileSync(join(dir, 'config.json'), JSON.stringify({ ...config, hidden_size: H, intermediate_size: F }));
    using ckpt = HfMoECheckpoint.open(dir);
    using layer = moeLayerFromHf(ckpt, 0, { device: 'cpu' });
    expect(layer.master.w13.shape).toEqual([E, H, 2 * F]);
  });
});

describe('metrics.jsonl', () => {
  it('a line that parses but is not a step record is skipped on resume and by readMetrics, as a torn line is', () => {
    const path = join(tmp(), 'metrics.jsonl');
    const line = (step: number) => JSON.stringify({ step, loss: 1, auxLoss: 0, lr: 0, gradNorm: 0, tokensPerSecond: 0, layers: [] });
    fs.writeFileSync(path, [line(0), 'null', '5', '"x"', '{"loss":1}', line(1), line(2)].join('\n') + '\n');
    expect(readMetrics(path).map((m) => m.step)).toEqual([0, 1, 2]);
    new MetricsLog(path, { resumeAt: 2 });
    expect(readMetrics(path).map((m) => m.step)).toEqual([0, 1]);
  });
});
