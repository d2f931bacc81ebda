// Checkpoints: safetensors exactly as the format defines it (checked against a minimal reader and
// writer written here from the spec), sharded atomic save/load, corruption caught and named, a saver
// SIGKILLed at random moments never leaving anything but committed checkpoints, the MoE layer's
// experts by global index at any EP size, and the `moe-ep ckpt` commands.
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import {
  CheckpointError,
  ckptNames,
  type DType,
  DTYPES,
  dtypeSize,
  joinExperts,
  latestCheckpoint,
  listCheckpoints,
  pruneCheckpoints,
  loadCheckpoint,
  loadMoELayer,
  moeLayerState,
  disposeState,
  readSafetensors,
  saveCheckpoint,
  tidy,
  SafetensorsFile,
  splitExperts,
  Tensor,
  writeSafetensors,
} from '../lib/index.js';
import { MoELayer } from '../lib/moe/layer.js';
import { routerWeighting } from '../lib/train/moe-state.js';
import { packageRoot } from '../lib/native.js';

const root = packageRoot();
const cli = join(root, 'dist', 'lib', 'cli', 'main.js');
const tmpRoots: string[] = [];
function tmp(): string {
  const d = fs.mkdtempSync(join(tmpdir(), 'moe-ep-ckpt-'));
  tmpRoots.push(d);
  return d;
}
afterAll(() => {
  for (const d of tmpRoots) fs.rmSync(d, { recursive: true, force: true });
});

// ------------------------------------------------------------- a minimal reader/writer from the spec
const ST: Record<string, string> = { f32: 'F32', bf16: 'BF16', f16: 'F16', i32: 'I32', i64: 'I64', u8: 'U8', fp8e4m3: 'F8_E4M3' };

/** Header: u64 LE length, JSON, data back to back. No padding (the spec allows it; our reader must too). */
function miniWrite(
  path: string,
  tensors: { name: string; dtype: string; shape: number[]; bytes: Uint8Array }[],
  metadata?: Record<string, string>,
): void {
  const header: Record<string, unknown> = metadata ? { __metadata__: metadata } : {};
  let off = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [off, off + t.bytes.length] };
    off += t.bytes.length;
  }
  const json = Buffer.from(JSON.stringify(header), 'utf8');
  const len = Buffer.alloc(8);
  new DataView(len.buffer, len.byteOffset, 8).setBigUint64(0, BigInt(json.length), true);
  fs.writeFileSync(path, Buffer.concat([len, json, ...tensors.map((t) => Buffer.from(t.bytes))]));
}

function miniRead(path: string): {
  headerLen: number;
  metadata?: Record<string, string>;
  tensors: Map<string, { dtype: string; shape: number[]; bytes: Uint8Array }>;
} {
  const buf = fs.readFileSync(path);
  const n = Number(new DataView(buf.buffer, buf.byteOffset, 8).getBigUint64(0, true));
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<
    string,
    { dtype: string; shape: number[]; data_offsets: [number, number] }
  >;
  const tensors = new Map<string, { dtype: string; shape: number[]; bytes: Uint8Array }>();
  let metadata: Record<string, string> | undefined;
  for (const [name, v] of Object.entries(header)) {
    if (name === '__metadata__') {
      metadata = v as unknown as Record<string, string>;
      continue;
    }
    const [b, e] = v.data_offsets;
    tensors.set(name, { dtype: v.dtype, shape: v.shape, bytes: new Uint8Array(buf.subarray(8 + n + b, 8 + n + e)) });
  }
  return { headerLen: n, ...(metadata ? { metadata } : {}), tensors };
}

function rawOf(dtype: DType, shape: number[]): Uint8Array<ArrayBuffer> {
  const n = shape.reduce((a, b) => a * b, 1) * dtypeSize[dtype];
  return new Uint8Array(randomBytes(n));
}

const SHAPES: number[][] = [[], [0], [1], [7], [2, 3], [3, 0, 2], [4, 5, 6]];

describe('safetensors', () => {
  it('round trip of every dtype and shape (scalars, empty), byte exact, header padded to 8', () => {
    const dir = tmp();
    const entries = DTYPES.flatMap((dtype) =>
      SHAPES.map((shape, i) => ({ name: `t.${dtype}.${i}`, dtype, shape, data: rawOf(dtype, shape) })),
    );
    const w = writeSafetensors(join(dir, 'a.safetensors'), entries, { note: 'hello' });
    expect(w.bytes).toBe(fs.statSync(join(dir, 'a.safetensors')).size);
    const r = readSafetensors(join(dir, 'a.safetensors'));
    expect(r.metadata).toEqual({ note: 'hello' });
    expect(r.tensors.map((t) => t.name)).toEqual(entries.map((e) => e.name));
    for (const [i, t] of r.tensors.entries()) {
      expect(t.dtype).toBe(entries[i]!.dtype);
      expect(t.shape).toEqual(entries[i]!.shape);
      expect(Buffer.from(t.data).equals(Buffer.from(entries[i]!.data))).toBe(true);
    }
    // The independent reader agrees, and the header length keeps the data 8-byte aligned.
    const m = miniRead(join(dir, 'a.safetensors'));
    expect((8 + m.headerLen) % 8).toBe(0);
    expect(m.metadata).toEqual({ note: 'hello' });
    for (const e of entries) {
      const t = m.tensors.get(e.name)!;
      expect(t.dtype).toBe(ST[e.dtype]);
      expect(t.shape).toEqual(e.shape);
      expect(Buffer.from(t.bytes).equals(Buffer.from(e.data))).toBe(true);
    }
  });

  it('reads a file written by the minimal writer (unpadded header), one tensor at a time', () => {
    const dir = tmp();
    const ts = Object.entries(ST).map(([d, s], i) => ({
      name: `x${i}`,
      dtype: s,
      shape: [i + 1, 2],
      bytes: rawOf(d as DType, [i + 1, 2]),
    }));
    miniWrite(join(dir, 'b.safetensors'), ts, { who: 'mini' });
    using f = SafetensorsFile.open(join(dir, 'b.safetensors'));
    expect(f.metadata).toEqual({ who: 'mini' });
    for (const t of [...ts].reverse()) {
      const got = f.read(t.name);
      expect(ST[got.dtype]).toBe(t.dtype);
      expect(got.shape).toEqual(t.shape);
      expect(Buffer.from(got.data).equals(Buffer.from(t.bytes))).toBe(true);
    }
  });

  it('Tensor values survive a checkpoint round trip for every dtype (bf16/f16 bits, i64, fp8, scalars, empty)', () => {
    const dir = tmp();
    const src: Record<string, Tensor> = {};
    for (const dtype of DTYPES) {
      for (const [i, shape] of SHAPES.entries()) {
        const raw = rawOf(dtype, shape);
        src[`${dtype}.${i}`] = Tensor.fromArray(
          new (dtype === 'f32'
            ? Float32Array
            : dtype === 'i32'
              ? Int32Array
              : dtype === 'i64'
                ? BigInt64Array
                : dtype === 'bf16' || dtype === 'f16'
                  ? Uint16Array
                  : Uint8Array)(raw.buffer) as never,
          { dtype, shape, device: 'cpu' },
        );
      }
    }
    saveCheckpoint(dir, { step: 3, replicated: src });
    using r = loadCheckpoint(dir);
    for (const [n, t] of Object.entries(src)) {
      using g = r.get(n, { device: 'cpu' });
      expect(g.dtype).toBe(t.dtype);
      expect(g.shape).toEqual(t.shape);
      expect(Buffer.from(g.toArray().buffer).equals(Buffer.from(t.toArray().buffer))).toBe(true);
      t.dispose();
    }
    using c = r.get('f32.4', { device: 'cpu', dtype: 'bf16' });
    expect(c.dtype).toBe('bf16');
  });

  it.each([
    [
      'a header length past the end',
      (p: string) => fs.writeFileSync(p, Buffer.concat([Buffer.from([0xff, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('{}')])),
      /header length 255 is larger than the file/,
    ],
    [
      'a file shorter than 8 bytes',
      (p: string) => fs.writeFileSync(p, Buffer.from([1, 2])),
      /has 2 bytes; a safetensors file starts with an 8-byte header length/,
    ],
    [
      'an unknown dtype',
      (p: string) => miniWrite(p, [{ name: 'w', dtype: 'F4', shape: [2], bytes: new Uint8Array(1) }]),
      /tensor 'w': unknown dtype "F4"/,
    ],
    [
      'a size that is not numel·itemsize',
      (p: string) => miniWrite(p, [{ name: 'w', dtype: 'F32', shape: [3], bytes: new Uint8Array(8) }]),
      /tensor 'w': data_offsets \[0, 8\] span 8 bytes but F32\[3\] needs 12/,
    ],
    [
      'trailing bytes',
      (p: string) => {
        miniWrite(p, [{ name: 'w', dtype: 'U8', shape: [2], bytes: new Uint8Array(2) }]);
        fs.appendFileSync(p, Buffer.from([9]));
      },
      /the tensors end at data byte 2 but the file holds 3 data bytes \(trailing bytes\)/,
    ],
  ])('rejects %s, naming the file and tensor', (_what, make, pattern) => {
    const p = join(tmp(), 'bad.safetensors');
    make(p);
    expect(() => SafetensorsFile.open(p)).toThrow(CheckpointError);
    expect(() => SafetensorsFile.open(p)).toThrow(pattern);
    expect(() => SafetensorsFile.open(p)).toThrow(/safetensors bad\.safetensors/);
  });

  it('a tensor of a dtype moe-ep does not read (F64, BOOL, U32…) leaves the file open: the others read, that one refused by name', () => {
    const p = join(tmp(), 'mixed.safetensors');
    miniWrite(p, [
      { name: 'inv_freq', dtype: 'F64', shape: [2], bytes: new Uint8Array(16) },
      { name: 'w', dtype: 'F32', shape: [2], bytes: new Uint8Array(new Float32Array([1.5, -2]).buffer) },
      { name: 'mask', dtype: 'BOOL', shape: [3], bytes: new Uint8Array([1, 0, 1]) },
    ]);
    using f = SafetensorsFile.open(p);
    expect(f.names).toEqual(['w']);
    expect(f.allNames.sort()).toEqual(['inv_freq', 'mask', 'w']);
    expect(Array.from(new Float32Array(f.readBytes('w').buffer))).toEqual([1.5, -2]);
    expect(() => f.info('inv_freq')).toThrow(/tensor 'inv_freq': dtype F64, which moe-ep does not read \(it reads F32, /);
    expect(() => f.readBytes('mask')).toThrow(/tensor 'mask': dtype BOOL, which moe-ep does not read/);
    // Read whole, as readSafetensors promises, the file is refused by that tensor's name.
    expect(() => readSafetensors(p)).toThrow(/tensor 'inv_freq': dtype F64, which moe-ep does not read/);
    // Its size is still checked: a BOOL[3] over 2 bytes is a damaged file.
    const bad = join(tmp(), 'bad-bool.safetensors');
    miniWrite(bad, [{ name: 'mask', dtype: 'BOOL', shape: [3], bytes: new Uint8Array(2) }]);
    expect(() => SafetensorsFile.open(bad)).toThrow(/tensor 'mask': data_offsets \[0, 2\] span 2 bytes but BOOL\[3\] needs 3/);
  });

  it('rejects overlapping offsets', () => {
    const p = join(tmp(), 'o.safetensors');
    const json = Buffer.from(
      JSON.stringify({ a: { dtype: 'U8', shape: [4], data_offsets: [0, 4] }, b: { dtype: 'U8', shape: [2], data_offsets: [2, 4] } }),
    );
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(json.length));
    fs.writeFileSync(p, Buffer.concat([len, json, Buffer.alloc(4)]));
    expect(() => SafetensorsFile.open(p)).toThrow(/tensor 'b': data_offsets \[2, 4\] overlap the previous tensor/);
  });
});

// ---------------------------------------------------------------------------------- checkpoints
function savedTwoRanks(dir: string, step = 1): void {
  // Two "ranks" from one process: writeCheckpoint-style layout via two sharded dicts is collective,
  // so here rank files come from saveCheckpoint on one rank plus a replicated file.
  saveCheckpoint(dir, {
    step,
    replicated: { 'layers.0.router.weight': Tensor.fromArray([1, 2, 3, 4], { shape: [2, 2], device: 'cpu' }) },
    sharded: {
      'layers.0.experts.0.w1': Tensor.fromArray([5, 6], { device: 'cpu' }),
      'layers.0.experts.1.w1': Tensor.fromArray([7, 8], { device: 'cpu' }),
    },
    manifestExtras: { ep: { size: 1, expertsPerRank: 2, numExperts: 2 }, optimizer: { step }, data: { position: 17 }, rng: { seed: 1 } },
  });
}

describe('checkpoints', () => {
  it('save / load: manifest with sizes and SHA-256 of every file, tensor index, extras; latest pointer', () => {
    const dir = tmp();
    savedTwoRanks(dir, 5);
    expect(fs.readFileSync(join(dir, 'latest'), 'utf8')).toBe('step-00000005\n');
    expect(latestCheckpoint(dir)).toEqual({ dir: join(dir, 'step-00000005'), step: 5 });
    expect(fs.readdirSync(join(dir, 'step-00000005')).sort()).toEqual(['manifest.json', 'rank-0.safetensors', 'replicated.safetensors']);
    using r = loadCheckpoint(dir);
    expect(r.step).toBe(5);
    expect(r.manifest.formatVersion).toBe(1);
    expect(r.manifest.data).toEqual({ position: 17 });
    expect(r.manifest.tensors['layers.0.experts.1.w1']!.file).toBe('rank-0.safetensors');
    expect(r.manifest.files['rank-0.safetensors']!.bytes).toBe(fs.statSync(join(dir, 'step-00000005', 'rank-0.safetensors')).size);
    r.verifyAll();
    expect(r.get('layers.0.router.weight', { device: 'cpu' }).toNumbers()).toEqual([1, 2, 3, 4]);
    expect(() => r.get('layers.0.experts.2.w1')).toThrow(
      /no tensor 'layers\.0\.experts\.2\.w1' \(it holds 3 tensors; similar: layers\.0\.experts\.0\.w1/,
    );
    expect(() => r.get('layers.0.ruoter.weight')).toThrow(
      /no tensor 'layers\.0\.ruoter\.weight' \(it holds 3 tensors; did you mean 'layers\.0\.router\.weight'\?\)/,
    );
  });

  function corruptCase(mutate: (stepDir: string) => void): () => void {
    const dir = tmp();
    savedTwoRanks(dir, 2);
    mutate(join(dir, 'step-00000002'));
    return () => {
      using r = loadCheckpoint(dir);
      r.get('layers.0.experts.1.w1', { device: 'cpu' });
    };
  }

  it('a flipped data byte: SHA-256 error naming the file and the damaged tensor', () => {
    const load = corruptCase((d) => {
      const p = join(d, 'rank-0.safetensors');
      const b = fs.readFileSync(p);
      b[b.length - 1]! ^= 0x01; // last byte: experts.1.w1
      fs.writeFileSync(p, b);
    });
    expect(load).toThrow(CheckpointError);
    expect(load).toThrow(/rank-0\.safetensors fails its SHA-256 check .*damaged tensor 'layers\.0\.experts\.1\.w1'/);
  });

  it('a flipped header byte: SHA-256 error naming the file and its header', () => {
    const load = corruptCase((d) => {
      const p = join(d, 'rank-0.safetensors');
      const b = fs.readFileSync(p);
      b[12]! ^= 0x20;
      fs.writeFileSync(p, b);
    });
    expect(load).toThrow(/rank-0\.safetensors fails its SHA-256 check .*header/);
  });

  it('a truncated file: size error naming the file at load', () => {
    const load = corruptCase((d) => fs.truncateSync(join(d, 'rank-0.safetensors'), 50));
    expect(load).toThrow(
      /rank-0\.safetensors has 50 bytes but manifest\.json records \d+ \(truncated; it holds 2 tensors such as 'layers\.0\.experts\.0\.w1'\)/,
    );
  });

  it('a missing shard: error naming the file and its rank', () => {
    const load = corruptCase((d) => fs.rmSync(join(d, 'rank-0.safetensors')));
    expect(load).toThrow(/rank-0\.safetensors is missing \(manifest\.json lists it with \d+ bytes, written by rank 0; it holds 2 tensors/);
  });

  it('a manifest of another format version: a clear error', () => {
    const load = corruptCase((d) => {
      const p = join(d, 'manifest.json');
      fs.writeFileSync(p, fs.readFileSync(p, 'utf8').replace('"formatVersion": 1', '"formatVersion": 2'));
    });
    expect(load).toThrow(/manifest\.json has format version 2; this moe-ep reads version 1 \(written by a newer moe-ep: upgrade\)/);
  });

  it('verify: false skips checksums but not sizes', () => {
    const dir = tmp();
    savedTwoRanks(dir, 2);
    const p = join(dir, 'step-00000002', 'rank-0.safetensors');
    const b = fs.readFileSync(p);
    b[b.length - 1]! ^= 0x01;
    fs.writeFileSync(p, b);
    using r = loadCheckpoint(dir, { verify: false });
    expect(r.get('layers.0.experts.0.w1', { device: 'cpu' }).toNumbers()).toEqual([5, 6]);
  });

  it('a tensor whose header dtype moe-ep does not read (an I32 patched to U32) is named with both dtypes, not called missing', () => {
    const dir = tmp();
    saveCheckpoint(dir, { step: 1, replicated: { idx: Tensor.fromArray([1, 2], { dtype: 'i32', device: 'cpu' }) } });
    const p = join(dir, 'step-00000001', 'replicated.safetensors');
    const b = fs.readFileSync(p);
    const at = b.indexOf('"I32"');
    expect(at).toBeGreaterThan(0);
    b.write('"U32"', at);
    fs.writeFileSync(p, b);
    using r = loadCheckpoint(dir, { verify: false });
    expect(() => r.getRaw('idx')).toThrow(/replicated\.safetensors holds tensor 'idx' as U32 but manifest\.json says i32/);
    expect(() => r.verifyAll()).toThrow(/tensor 'idx' is U32\[2\] in its header but i32\[2\] in manifest\.json/);
  });

  it('keep-last-K pruning; leftovers of interrupted saves are never picked and are cleaned up', () => {
    const dir = tmp();
    for (let s = 1; s <= 6; s++) {
      if (s === 4) fs.mkdirSync(join(dir, '.tmp-step-00000099-deadbeef'));
      saveCheckpoint(dir, { step: s, replicated: { v: Tensor.fromArray([s], { device: 'cpu' }) }, ...(s >= 3 ? { keep: 2 } : {}) });
      if (s === 3) {
        // An interrupted save of a later step: a temporary folder holding files but no manifest.
        fs.mkdirSync(join(dir, '.tmp-step-00000099-cafe'));
        fs.writeFileSync(join(dir, '.tmp-step-00000099-cafe', 'rank-0.safetensors'), 'x');
        expect(latestCheckpoint(dir)!.step).toBe(3);
      }
    }
    expect(listCheckpoints(dir).map((c) => c.step)).toEqual([5, 6]);
    expect(fs.readdirSync(dir).sort()).toEqual(['latest', 'step-00000005', 'step-00000006']);
    // `latest` gone or dangling: the highest committed step.
    fs.rmSync(join(dir, 'latest'));
    expect(latestCheckpoint(dir)!.step).toBe(6);
    // Saving a step again replaces it.
    saveCheckpoint(dir, { step: 6, replicated: { v: Tensor.fromArray([60], { device: 'cpu' }) } });
    using r = loadCheckpoint(dir);
    expect(r.get('v', { device: 'cpu' }).toNumbers()).toEqual([60]);
  });

  it('crash test: a saver SIGKILLed at 15 or more random moments never leaves a broken or half-written latest', async () => {
    const dir = tmp();
    const fixture = join(root, 'test', 'fixtures', 'ckpt-saver.mjs');
    let prev = 0;
    let kills = 0;
    const seen = new Set<number>();
    let interrupted = 0; // kills that left a temporary folder: the kill landed mid-save
    // At least 15 kills, and more (up to 40) until several steps were committed and a kill has
    // landed mid-save: where the kills land is random, so a fixed count would make the test flaky.
    // The test's length is bounded by that count (each kill within 60 ms of the saver's 'ready'),
    // not by a clock.
    while (kills < 40 && (kills < 15 || seen.size <= 3 || interrupted === 0)) {
      const child = spawn(process.execPath, [fixture, dir, '3'], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stderr = '';
      child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
      const exited = new Promise<number | null>((res) => child.on('exit', (code) => res(code)));
      await new Promise<void>((res, rej) => {
        child.stdout.on('data', (d: Buffer) => d.toString().includes('ready') && res());
        void exited.then(() => rej(new Error(`saver exited early: ${stderr}`)));
      });
      await new Promise((res) => setTimeout(res, Math.random() * 60));
      child.kill('SIGKILL');
      kills++;
      await exited;
      if (fs.readdirSync(dir).some((n) => n.startsWith('.tmp-step-'))) interrupted++;
      const l = latestCheckpoint(dir);
      if (l === null) continue; // killed before the first commit
      expect(l.dir).toMatch(/step-\d{8}$/);
      expect(l.step).toBeGreaterThanOrEqual(prev);
      prev = l.step;
      seen.add(l.step);
      // Every committed checkpoint loads, verifies and holds its step's values.
      for (const c of listCheckpoints(dir)) {
        using r = loadCheckpoint(c.dir);
        r.verifyAll();
        expect(r.manifest.data).toEqual({ position: c.step * 10 });
        const w = r.getRaw('layers.0.experts.1.w1');
        expect(new Float32Array(w.data.buffer)[0]).toBe(-c.step);
        expect(new Float32Array(r.getRaw('layers.0.router.weight').data.buffer)[5]).toBe(c.step + 5);
      }
    }
    // A kill between a commit and its pruning leaves extra (complete, loadable) checkpoints; the next
    // save that runs to the end prunes back to `keep`, as pruneCheckpoints does here.
    pruneCheckpoints(dir, 3);
    expect(listCheckpoints(dir).length).toBeLessThanOrEqual(3);
    expect(latestCheckpoint(dir)?.step).toBe(prev);
    expect(seen.size, `steps committed over ${kills} kills`).toBeGreaterThan(3);
    expect(interrupted, `kills landing mid-save, of ${kills}`).toBeGreaterThan(0);
  });
});

// ------------------------------------------------------------------------------ the MoE layer
describe('MoE layer state', () => {
  const cfg = { hidden: 8, ffn: 6, numExperts: 4, topK: 2, dtype: 'f32' as const, device: 'cpu' as const, sharedFfn: 4 };
  const x = (): Tensor => Tensor.randn([5, 8], { seed: 99, device: 'cpu' });

  it('splitExperts de-interleaves W1/W3 as [H, F] by global index; joinExperts rebuilds w13', () => {
    const dir = tmp();
    using layer = new MoELayer(cfg);
    const parts = splitExperts(layer.master.w13, layer.master.w2, 10, (e, w) => `e.${e}.${w}`);
    expect(Object.keys(parts)).toContain('e.13.w3');
    expect(parts['e.11.w1']!.shape).toEqual([8, 6]);
    expect(parts['e.11.w2']!.shape).toEqual([6, 8]);
    // w13[1, h, 2f] is W1[h, f]; w13[1, h, 2f+1] is W3[h, f].
    const w13 = layer.master.w13.toFloat32Array();
    expect(parts['e.11.w1']!.toFloat32Array()[2 * 6 + 3]).toBe(w13[1 * 8 * 12 + 2 * 12 + 2 * 3]);
    expect(parts['e.11.w3']!.toFloat32Array()[2 * 6 + 3]).toBe(w13[1 * 8 * 12 + 2 * 12 + 2 * 3 + 1]);
    saveCheckpoint(dir, { step: 1, sharded: parts });
    using r = loadCheckpoint(dir);
    const j = joinExperts(r, 11, 2, (e, w) => `e.${e}.${w}`);
    expect(Array.from(j.w13.toFloat32Array())).toEqual(Array.from(w13.subarray(8 * 12)).slice(0, 2 * 8 * 12));
    j.w13.dispose();
    j.w2.dispose();
    for (const t of Object.values(parts)) t.dispose();
  });

  it('a saved layer loads into a fresh one (other seed) with the same outputs, moments too; EP=2 ranks read their own experts', () => {
    const dir = tmp();
    using a = new MoELayer({ ...cfg, seed: 5 });
    a.bias.copy_(Tensor.fromArray([0.1, -0.2, 0.3, 0], { device: 'cpu' }));
    const mom = (t: Tensor, s: number) => ({
      expAvg: Tensor.randn([...t.shape], { seed: s, device: 'cpu' }),
      expAvgSq: Tensor.rand([...t.shape], { seed: s + 1, device: 'cpu' }),
    });
    const moments = {
      router: mom(a.master.router, 1),
      w13: mom(a.master.w13, 3),
      w2: mom(a.master.w2, 5),
      sharedW13: mom(a.master.sharedW13!, 7),
      sharedW2: mom(a.master.sharedW2!, 9),
    };
    const state = moeLayerState(a, 0, moments);
    expect(Object.keys(state.sharded)).toContain('optim.layers.0.experts.3.w3.exp_avg_sq');
    expect(Object.keys(state.replicated)).toContain('layers.0.shared.w2');
    saveCheckpoint(dir, {
      step: 1,
      replicated: state.replicated,
      sharded: state.sharded,
      manifestExtras: { ep: { size: 1, expertsPerRank: 4 } },
    });
    disposeState(state);

    using b = new MoELayer({ ...cfg, seed: 6 });
    const zero = (t: Tensor) => ({
      expAvg: Tensor.zeros([...t.shape], { device: 'cpu' }),
      expAvgSq: Tensor.zeros([...t.shape], { device: 'cpu' }),
    });
    const mb = {
      router: zero(b.master.router),
      w13: zero(b.master.w13),
      w2: zero(b.master.w2),
      sharedW13: zero(b.master.sharedW13!),
      sharedW2: zero(b.master.sharedW2!),
    };
    using r = loadCheckpoint(dir);
    loadMoELayer(r, b, 0, mb);
    using xa = x();
    const ya = a.forward(xa);
    const yb = b.forward(xa);
    expect(Array.from(yb.y.toFloat32Array())).toEqual(Array.from(ya.y.toFloat32Array()));
    for (const k of ['router', 'w13', 'w2', 'sharedW13', 'sharedW2'] as const) {
      expect(Array.from(mb[k].expAvgSq.toFloat32Array())).toEqual(Array.from(moments[k].expAvgSq.toFloat32Array()));
    }
    // Rank 1 of an EP group of 2 (no collectives needed to build and load): experts 2 and 3.
    const group = { rank: 1, size: 2, allToAll: () => undefined, allToAllV: () => undefined };
    using c = new MoELayer({ ...cfg, seed: 7, group });
    loadMoELayer(r, c, 0);
    expect(Array.from(c.master.w13.toFloat32Array())).toEqual(Array.from(a.master.w13.toFloat32Array().subarray(2 * 8 * 12)));
    expect(Array.from(c.master.w2.toFloat32Array())).toEqual(Array.from(a.master.w2.toFloat32Array().subarray(2 * 6 * 8)));
    expect(ckptNames.optim(ckptNames.expert(0, 3, 'w1'), 'exp_avg')).toBe('optim.layers.0.experts.3.w1.exp_avg');
    // A layer without the checkpoint's shared expert would drop it silently: refused, named.
    using d = new MoELayer({ ...cfg, sharedFfn: 0, seed: 8 });
    expect(() => loadMoELayer(r, d, 0)).toThrow(/layer 0 has a shared expert \('layers\.0\.shared\.w1'\) but this layer has none/);
    // A shared expert of another width is named as the shared expert's, not the experts'.
    using e = new MoELayer({ ...cfg, sharedFfn: (cfg.sharedFfn as number) + 2, seed: 9 });
    expect(() => loadMoELayer(r, e, 0)).toThrow(/'layers\.0\.shared\.w1' is \[\d+, \d+\] but this layer's shared expert is \[hidden/);
  });

  it('a gated shared expert: the gate and its moments round trip (the same outputs); a layer gated otherwise is refused, either way', () => {
    const dir = tmp();
    using a = new MoELayer({ ...cfg, sharedGate: true, seed: 5 });
    const moments = {
      sharedGate: { expAvg: Tensor.randn([8], { seed: 1, device: 'cpu' }), expAvgSq: Tensor.rand([8], { seed: 2, device: 'cpu' }) },
    };
    const state = moeLayerState(a, 0, moments);
    expect(Object.keys(state.replicated)).toEqual(
      expect.arrayContaining(['layers.0.shared.gate', 'optim.layers.0.shared.gate.exp_avg', 'optim.layers.0.shared.gate.exp_avg_sq']),
    );
    saveCheckpoint(dir, {
      step: 1,
      replicated: state.replicated,
      sharded: state.sharded,
      manifestExtras: { ep: { size: 1, expertsPerRank: 4 } },
    });
    disposeState(state);
    using r = loadCheckpoint(dir);
    using b = new MoELayer({ ...cfg, sharedGate: true, seed: 6 });
    const mb = { sharedGate: { expAvg: Tensor.zeros([8], { device: 'cpu' }), expAvgSq: Tensor.zeros([8], { device: 'cpu' }) } };
    loadMoELayer(r, b, 0, mb);
    expect(Array.from((b.master.sharedGate as Tensor).toFloat32Array())).toEqual(
      Array.from((a.master.sharedGate as Tensor).toFloat32Array()),
    );
    expect(Array.from(mb.sharedGate.expAvgSq.toFloat32Array())).toEqual(Array.from(moments.sharedGate.expAvgSq.toFloat32Array()));
    using xa = x();
    expect(Array.from(b.forward(xa).y.toFloat32Array())).toEqual(Array.from(a.forward(xa).y.toFloat32Array()));
    using ungated = new MoELayer({ ...cfg, seed: 7 });
    expect(() => loadMoELayer(r, ungated, 0)).toThrow(
      /layer 0's shared expert is gated \('layers\.0\.shared\.gate'\) but this layer's is not; build it with sharedGate true/,
    );
    // The other way: an ungated checkpoint into a gated layer.
    const dir2 = tmp();
    const plain = moeLayerState(ungated, 0);
    saveCheckpoint(dir2, {
      step: 1,
      replicated: plain.replicated,
      sharded: plain.sharded,
      manifestExtras: { ep: { size: 1, expertsPerRank: 4 } },
    });
    disposeState(plain);
    using r2 = loadCheckpoint(dir2);
    expect(() => loadMoELayer(r2, b, 0)).toThrow(/layer 0 has no shared expert gate \('layers\.0\.shared\.gate'\) but this layer has one/);
  });

  it("gpt-oss's biases round trip (the same outputs) at EP = 2 → 1; a layer without them, or of another activation or routeWeightsOn, is refused", () => {
    const gptOss = { ...cfg, routerBias: true, expertBias: true, activation: 'clamped-swiglu', swigluLimit: 1.5 } as const;
    const dir = tmp();
    // Two ranks' halves of one layer (the same seed: the same global weights), random biases on each.
    const group = (rank: number) => ({ rank, size: 2, allToAll: () => undefined, allToAllV: () => undefined });
    using full = new MoELayer({ ...gptOss, seed: 5 });
    tidy(() => {
      const m = full.master;
      m.routerBias?.copy_(Tensor.randn([4], { std: 0.5, seed: 1, device: 'cpu' }));
      m.w13Bias?.copy_(Tensor.randn(m.w13Bias.shape, { std: 2, seed: 2, device: 'cpu' }));
      m.w2Bias?.copy_(Tensor.randn(m.w2Bias.shape, { std: 0.5, seed: 3, device: 'cpu' }));
    });
    full.refreshComputeWeights();
    const replicated: Record<string, Tensor> = {};
    const sharded: Record<string, Tensor> = {};
    const states = [0, 1].map((rank) => {
      const half = new MoELayer({ ...gptOss, seed: 5, group: group(rank) });
      tidy(() => {
        half.master.routerBias?.copy_(full.master.routerBias as Tensor);
        half.master.w13Bias?.copy_((full.master.w13Bias as Tensor).narrow(0, 2 * rank, 2));
        half.master.w2Bias?.copy_((full.master.w2Bias as Tensor).narrow(0, 2 * rank, 2));
      });
      const st = moeLayerState(half, 0);
      Object.assign(replicated, st.replicated);
      Object.assign(sharded, st.sharded);
      return { half, st };
    });
    expect(Object.keys(sharded)).toEqual(
      expect.arrayContaining(['layers.0.experts.3.b1', 'layers.0.experts.3.b3', 'layers.0.experts.3.b2']),
    );
    expect(Object.keys(replicated)).toContain('layers.0.router.bias');
    saveCheckpoint(dir, {
      step: 1,
      replicated,
      sharded,
      manifestExtras: { ep: { size: 2, expertsPerRank: 2 }, router: routerWeighting(full) },
    });
    for (const { half, st } of states) {
      disposeState(st);
      half.dispose();
    }
    using r = loadCheckpoint(dir);
    using b = new MoELayer({ ...gptOss, seed: 6 });
    loadMoELayer(r, b, 0);
    for (const k of ['routerBias', 'w13Bias', 'w2Bias', 'router', 'w13', 'w2'] as const)
      expect(Array.from((b.master[k] as Tensor).toFloat32Array()), k).toEqual(Array.from((full.master[k] as Tensor).toFloat32Array()));
    tidy(() => {
      const xa = x();
      expect(Array.from(b.forward(xa).y.toFloat32Array())).toEqual(Array.from(full.forward(xa).y.toFloat32Array()));
    });
    using plain = new MoELayer({ ...cfg, activation: 'clamped-swiglu', swigluLimit: 1.5, seed: 7 });
    expect(() => loadMoELayer(r, plain, 0)).toThrow(/layer 0 has a router bias but this layer has none; build it with routerBias true/);
    using noExpert = new MoELayer({ ...cfg, routerBias: true, activation: 'clamped-swiglu', swigluLimit: 1.5, seed: 7 });
    expect(() => loadMoELayer(r, noExpert, 0)).toThrow(/layer 0 has expert biases but this layer has none; build it with expertBias true/);
    using otherLimit = new MoELayer({ ...gptOss, swigluLimit: 7, seed: 7 });
    expect(() => loadMoELayer(r, otherLimit, 0)).toThrow(/router was trained with swigluLimit 1\.5 but this layer has swigluLimit 7/);
    // A plain SwiGLU checkpoint (an older record, without the fields) into a clamped layer, and a Llama 4 layer.
    const dir2 = tmp();
    using swiglu = new MoELayer({ ...cfg, seed: 8 });
    const st2 = moeLayerState(swiglu, 0);
    const { activation: _a, routeWeightsOn: _w, ...older } = routerWeighting(swiglu);
    saveCheckpoint(dir2, {
      step: 1,
      replicated: st2.replicated,
      sharded: st2.sharded,
      manifestExtras: { ep: { size: 1, expertsPerRank: 4 }, router: older },
    });
    disposeState(st2);
    using r2 = loadCheckpoint(dir2);
    using clampedOnly = new MoELayer({ ...cfg, activation: 'clamped-swiglu', seed: 9 });
    expect(() => loadMoELayer(r2, clampedOnly, 0)).toThrow(
      /router was trained with activation "swiglu" but this layer has activation "clamped-swiglu"/,
    );
    using llama = new MoELayer({ ...cfg, topK: 1, routeWeightsOn: 'input', seed: 9 });
    expect(() => loadMoELayer(r2, llama, 0)).toThrow(/router was trained with (topK 2|routeWeightsOn "output")/);
  });

  it('groupTop (how a group is scored) is recorded with groups, and a layer scoring groups otherwise is refused; older records read as topK/topkGroups', () => {
    const grouped = { ...cfg, numExperts: 8, topK: 3, groups: 4, topkGroups: 2 };
    const save = (layer: MoELayer, router: object): string => {
      const dir = tmp();
      const st = moeLayerState(layer, 0);
      saveCheckpoint(dir, {
        step: 1,
        replicated: st.replicated,
        sharded: st.sharded,
        manifestExtras: { ep: { size: 1, expertsPerRank: 8 }, router },
      });
      disposeState(st);
      return dir;
    };
    using max = new MoELayer({ ...grouped, groupTop: 1, seed: 3 });
    expect(routerWeighting(max)).toMatchObject({ groups: 4, topkGroups: 2, groupTop: 1 });
    // One group: nothing reads groupTop, nothing records it.
    using plain = new MoELayer({ ...cfg, seed: 3 });
    expect(routerWeighting(plain)).not.toHaveProperty('groupTop');
    using r = loadCheckpoint(save(max, routerWeighting(max)));
    using same = new MoELayer({ ...grouped, groupTop: 1, seed: 4 });
    loadMoELayer(r, same, 0);
    using top2 = new MoELayer({ ...grouped, groupTop: 2, seed: 4 });
    expect(() => loadMoELayer(r, top2, 0)).toThrow(/router was trained with groupTop 1 but this layer has groupTop 2/);
    // A record from before groupTop (a group scored its top topK/topkGroups): 4 groups keep 2, top-4 → 2.
    using four = new MoELayer({ ...grouped, topK: 4, seed: 5 });
    const { groupTop: _g, ...older } = routerWeighting(four);
    using r2 = loadCheckpoint(save(four, older));
    using four2 = new MoELayer({ ...grouped, topK: 4, groupTop: 2, seed: 6 });
    loadMoELayer(r2, four2, 0);
    using fourMax = new MoELayer({ ...grouped, topK: 4, groupTop: 1, seed: 6 });
    expect(() => loadMoELayer(r2, fourMax, 0)).toThrow(/router was trained with groupTop 2 but this layer has groupTop 1/);
  });
});

// ----------------------------------------------------------------------------------------- CLI
function runCli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('moe-ep ckpt', () => {
  it('inspect: tensors, EP layout, checksum status OK, then BAD after a flipped byte (exit 1)', () => {
    const dir = tmp();
    savedTwoRanks(dir, 4);
    let r = runCli(['ckpt', 'inspect', dir]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/step 4, format moe-ep-checkpoint v1/);
    expect(r.stdout).toMatch(/EP layout: size 1, 2 experts per rank/);
    expect(r.stdout).toMatch(/rank-0\.safetensors +0 +\d+ B +[0-9a-f]{16}… +OK/);
    expect(r.stdout).toMatch(/layers\.0\.router\.weight +replicated\.safetensors +f32 +\[2, 2\] +16 B/);
    const p = join(dir, 'step-00000004', 'replicated.safetensors');
    const b = fs.readFileSync(p);
    b[b.length - 2]! ^= 0x40;
    fs.writeFileSync(p, b);
    r = runCli(['ckpt', 'inspect', join(dir, 'step-00000004')]);
    expect(r.status).toBe(1);
    expect(r.stdout).toMatch(/replicated\.safetensors +- .* BAD: .*damaged tensor 'layers\.0\.router\.weight'/);
    expect(r.stdout).toMatch(/rank-0\.safetensors .* OK/);
  });

  it('reshard EP=1 → 2 → 1: experts move to their new owners, every tensor unchanged', () => {
    const dir = tmp();
    const E = 4;
    const sharded: Record<string, Tensor> = {};
    for (let e = 0; e < E; e++) {
      sharded[ckptNames.expert(0, e, 'w1')] = Tensor.randn([3, 2], { seed: e, device: 'cpu', dtype: 'bf16' });
      sharded[ckptNames.optim(ckptNames.expert(0, e, 'w1'), 'exp_avg')] = Tensor.randn([3, 2], { seed: 10 + e, device: 'cpu' });
    }
    saveCheckpoint(dir, {
      step: 9,
      sharded,
      replicated: { 'head.weight': Tensor.full([1], 1, { device: 'cpu' }) },
      manifestExtras: { ep: { size: 1, expertsPerRank: E }, data: { position: 3 } },
    });
    let r = runCli(['ckpt', 'reshard', dir, '--ep', '2', '--out', join(dir, 'ep2')]);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/→ .*step-00000009 \(EP 2, 2 experts per rank/);
    using r2 = loadCheckpoint(join(dir, 'ep2'));
    expect(r2.manifest.ep).toEqual({ size: 2, expertsPerRank: 2, numExperts: 4 });
    expect(r2.manifest.data).toEqual({ position: 3 });
    expect(r2.info('layers.0.experts.3.w1').file).toBe('rank-1.safetensors');
    expect(r2.info('optim.layers.0.experts.1.w1.exp_avg').file).toBe('rank-0.safetensors');
    r = runCli(['ckpt', 'reshard', join(dir, 'ep2'), '--ep', '1', '--out', join(dir, 'ep1')]);
    expect(r.status, r.stderr).toBe(0);
    using r0 = loadCheckpoint(dir);
    using r1 = loadCheckpoint(join(dir, 'ep1'));
    expect(r1.names().sort()).toEqual(r0.names().sort());
    for (const n of r0.names()) expect(Buffer.from(r1.getRaw(n).data).equals(Buffer.from(r0.getRaw(n).data)), n).toBe(true);
    r = runCli(['ckpt', 'reshard', dir, '--ep', '3', '--out', join(dir, 'ep3')]);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/--ep 3 does not divide the 4 experts/);
  });
});
