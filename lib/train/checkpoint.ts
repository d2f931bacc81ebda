/**
 * Sharded checkpoints: one directory per step, one safetensors file per rank for its sharded state
 * (experts and their optimizer moments), one for the replicated state, and manifest.json — written
 * last — with the format version, step, layout, each file's size and SHA-256 and the file of every
 * tensor. Generic: it stores named tensors and knows nothing of a model class (lib/train/moe-state.ts
 * names the MoE layer's tensors).
 *
 *   <root>/step-00000042/  rank-0.safetensors … rank-{P-1}.safetensors, replicated.safetensors, manifest.json
 *   <root>/latest          "step-00000042\n"
 *
 * Atomic commit (save): every rank writes its file into <root>/.tmp-step-<N>-<nonce>/ and fsyncs it
 * and the folder; the ranks exchange what they wrote (a collective, which is also the barrier); rank 0
 * writes replicated.safetensors before the exchange and manifest.json after it, fsyncs, renames the
 * folder to <root>/step-<N>, fsyncs <root>, writes `latest.tmp`, fsyncs, renames it to `latest`, and
 * finally prunes old checkpoints (`keep`). A crash at any point leaves every committed checkpoint and
 * `latest` as they were: a step folder exists only once complete, and `latest` only names one.
 * All ranks must see <root> on one shared filesystem.
 *
 * Load: checks the manifest (format and version), that every file exists with its recorded size,
 * and (verify, default on) the SHA-256 of every file it opens; a mismatch names the directory, the
 * file and, by per-tensor checksums, the damaged tensor. Tensors are read by name onto any device,
 * so a different EP size reads just the experts it now owns.
 */
import { randomBytes, createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { basename, join } from 'node:path';

import { type DeviceLike } from '../device.js';
import { type Communicator } from '../dist/communicator.js';
import { type DType, storageView } from '../dtype.js';
import { checkOptions, CheckpointError, invalidArgument, checkKeys } from '../errors.js';
import { Tensor } from '../tensor.js';
import { SafetensorsFile, type SafetensorsEntry, toDType, writeSafetensors } from './safetensors.js';

export const CHECKPOINT_FORMAT = 'moe-ep-checkpoint';
export const CHECKPOINT_FORMAT_VERSION = 1;
export const MANIFEST_FILE = 'manifest.json';
export const REPLICATED_FILE = 'replicated.safetensors';
export const LATEST_FILE = 'latest';

/** A tensor given as raw bytes (for tools that never touch the addon). */
export interface RawTensor {
  dtype: DType;
  shape: readonly number[];
  data: ArrayBufferView;
}

export interface EpLayout {
  /** Expert-parallel size the sharded files were written at (one file per rank). */
  size: number;
  expertsPerRank: number;
  /** size · expertsPerRank, per MoE layer. */
  numExperts?: number;
}

/** What the caller adds to the manifest (JSON values). */
export interface ManifestExtras {
  /** Model / training configuration. */
  config?: unknown;
  /** EP layout of the sharded state (needed by `moe-ep ckpt reshard`). */
  ep?: EpLayout;
  /** RNG states (seeds, Philox offsets, per rank if they differ). */
  rng?: unknown;
  /** Data position (epoch, sample index, shuffle seed...). */
  data?: unknown;
  /** Optimizer scalars, e.g. { step: 1200, lr: 3e-4 }; its tensors are stored under optim.* names. */
  optimizer?: unknown;
  [key: string]: unknown;
}

export interface ManifestFile {
  bytes: number;
  sha256: string;
  /** The rank that wrote it (sharded files). */
  rank?: number;
}

export interface ManifestTensor {
  file: string;
  dtype: DType;
  shape: number[];
  /** SHA-256 of the tensor's data bytes (locates damage inside a file). */
  sha256: string;
}

export interface CheckpointManifest extends ManifestExtras {
  format: typeof CHECKPOINT_FORMAT;
  formatVersion: number;
  step: number;
  createdAt: string;
  /** Ranks that saved it. */
  world: { size: number };
  files: Record<string, ManifestFile>;
  tensors: Record<string, ManifestTensor>;
}

export interface SaveOptions {
  step: number;
  /** All ranks of the job call saveCheckpoint together (collective); omitted: a single process. */
  comm?: Communicator;
  /** The same on every rank; rank 0 writes it. */
  replicated?: Record<string, Tensor | RawTensor>;
  /** This rank's own tensors (names distinct across ranks, e.g. by global expert index). */
  sharded?: Record<string, Tensor | RawTensor>;
  manifestExtras?: ManifestExtras;
  /** Keep the newest `keep` checkpoints, delete older ones (default: keep all). */
  keep?: number;
}

export interface SavedCheckpoint {
  dir: string;
  step: number;
  /** Bytes this rank wrote. */
  bytes: number;
  ms: number;
}

const RESERVED = new Set(['format', 'formatVersion', 'step', 'createdAt', 'world', 'files', 'tensors']);

/** Folder name of a step: step-00000042 (sorts by name). */
export function stepDirName(step: number): string {
  if (!Number.isSafeInteger(step) || step < 0) invalidArgument('stepDirName', `'step' must be a non-negative integer; received ${String(step)}`);
  return `step-${String(step).padStart(8, '0')}`;
}

function parseStepDir(name: string): number | undefined {
  const m = /^step-(\d+)$/.exec(name);
  return m ? Number(m[1]) : undefined;
}

function ckptError(where: string, message: string): never {
  throw new CheckpointError(`checkpoint ${where}: ${message}`);
}

/** fsync a directory (its entries: created, renamed, removed files) through a read-only fd. */
export function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function entryOf(name: string, t: Tensor | RawTensor): SafetensorsEntry {
  if (t instanceof Tensor) {
    const c = t.isContiguous ? t : t.contiguous();
    try {
      return { name, dtype: t.dtype, shape: [...t.shape], data: c.toArray() };
    } finally {
      if (c !== t) c.dispose();
    }
  }
  return { name, dtype: t.dtype, shape: t.shape, data: t.data };
}

/** JSON from every rank, in rank order (allGather of lengths, then of the padded bytes). */
function exchange<T>(comm: Communicator | undefined, value: T): T[] {
  if (!comm || comm.size === 1) return [value];
  const bytes = Buffer.from(JSON.stringify(value), 'utf8');
  using len = Tensor.fromArray([bytes.length], { dtype: 'i32' });
  using lens = comm.allGather(len);
  const lengths = lens.toNumbers();
  const max = Math.max(1, ...lengths);
  const padded = new Uint8Array(max);
  padded.set(bytes);
  using mine = Tensor.fromArray(padded, { dtype: 'u8' });
  using all = comm.allGather(mine);
  const buf = Buffer.from((all.toArray() as Uint8Array).buffer);
  return lengths.map((n, r) => JSON.parse(buf.subarray(r * max, r * max + n).toString('utf8')) as T);
}

interface RankReport {
  ok: boolean;
  error?: string;
  files: { file: string; bytes: number; sha256: string; rank?: number; tensors: Record<string, { dtype: DType; shape: number[]; sha256: string }> }[];
}

/** A manifest with no files yet: the extras, the format, the step and the world size. */
function emptyManifest(extras: ManifestExtras, step: number, size: number): CheckpointManifest {
  return {
    ...extras,
    format: CHECKPOINT_FORMAT,
    formatVersion: CHECKPOINT_FORMAT_VERSION,
    step,
    createdAt: new Date().toISOString(),
    world: { size },
    files: {},
    tensors: {},
  };
}

/**
 * Saves one checkpoint (collective when `comm` has several ranks: every rank calls it with the same
 * step). Returns once the checkpoint is committed on every rank, or throws on every rank (naming the
 * rank that failed) with nothing committed.
 */
export function saveCheckpoint(root: string, options: SaveOptions): SavedCheckpoint {
  const op = 'saveCheckpoint';
  const t0 = Date.now();
  if (typeof root !== 'string' || root === '') invalidArgument(op, `'root' must be a folder path (a non-empty string); received ${String(root)}`);
  if (options === null || typeof options !== 'object') invalidArgument(op, `'options' must be an object with 'step'`);
  checkKeys(options, op, { step: true, comm: true, replicated: true, sharded: true, manifestExtras: true, keep: true });
  const { step, comm } = options;
  if (!Number.isSafeInteger(step) || step < 0) invalidArgument(op, `'step' must be a non-negative integer; received ${String(step)}`);
  if (options.keep !== undefined && !(Number.isSafeInteger(options.keep) && options.keep >= 1)) invalidArgument(op, `'keep' must be a positive integer; received ${String(options.keep)}`);
  const extras = options.manifestExtras ?? {};
  for (const k of Object.keys(extras)) if (RESERVED.has(k)) invalidArgument(op, `manifestExtras.${k} is reserved for the manifest itself`);
  const rank = comm?.rank ?? 0;
  const size = comm?.size ?? 1;

  // Agree on the step and on rank 0's nonce for the temporary folder.
  const hello = exchange(comm, { step, nonce: rank === 0 ? randomBytes(6).toString('hex') : '' });
  const steps = new Set(hello.map((h) => h.step));
  if (steps.size !== 1) ckptError(root, `${op}: the ranks disagree on the step (${hello.map((h, r) => `rank ${r}: ${h.step}`).join(', ')})`);
  const name = stepDirName(step);
  const tmp = join(root, `.tmp-${name}-${hello[0]!.nonce}`);
  const finalDir = join(root, name);

  let report: RankReport;
  let written = 0;
  try {
    fs.mkdirSync(tmp, { recursive: true });
    const files: RankReport['files'] = [];
    const write = (file: string, tensors: Record<string, Tensor | RawTensor>, fileRank?: number): void => {
      const entries = Object.entries(tensors).map(([n, t]) => entryOf(n, t));
      const w = writeSafetensors(join(tmp, file), entries, { format: CHECKPOINT_FORMAT, step: String(step), ...(fileRank === undefined ? {} : { rank: String(fileRank) }) });
      written += w.bytes;
      const tensorsOut: RankReport['files'][number]['tensors'] = {};
      for (const [n, i] of Object.entries(w.tensors)) tensorsOut[n] = { dtype: i.dtype, shape: i.shape, sha256: i.sha256 };
      files.push({ file, bytes: w.bytes, sha256: w.sha256, ...(fileRank === undefined ? {} : { rank: fileRank }), tensors: tensorsOut });
    };
    const sharded = options.sharded ?? {};
    if (Object.keys(sharded).length > 0 || size > 1) write(`rank-${rank}.safetensors`, sharded, rank);
    if (rank === 0) write(REPLICATED_FILE, options.replicated ?? {});
    fsyncDir(tmp);
    report = { ok: true, files };
  } catch (e) {
    report = { ok: false, error: (e as Error).message, files: [] };
  }

  // Every rank's files are on disk (the exchange is the barrier).
  const reports = exchange(comm, report);
  const failed = reports.map((r, i) => (r.ok ? null : `rank ${i}: ${r.error}`)).filter((x) => x !== null);
  if (failed.length) {
    if (rank === 0) fs.rmSync(tmp, { recursive: true, force: true });
    ckptError(finalDir, `${op} failed, nothing was committed: ${failed.join('; ')}`);
  }

  let status: { ok: boolean; error?: string } = { ok: true };
  if (rank === 0) {
    try {
      const manifest = emptyManifest(extras, step, size);
      for (const r of reports) {
        for (const f of r.files) {
          manifest.files[f.file] = { bytes: f.bytes, sha256: f.sha256, ...(f.rank === undefined ? {} : { rank: f.rank }) };
          for (const [n, t] of Object.entries(f.tensors)) {
            const prev = manifest.tensors[n];
            if (prev) throw new CheckpointError(`tensor '${n}' is written by both ${prev.file} and ${f.file}; sharded names must be distinct across ranks and from the replicated ones`);
            manifest.tensors[n] = { file: f.file, dtype: t.dtype, shape: t.shape, sha256: t.sha256 };
          }
        }
      }
      commitDir(root, tmp, finalDir, manifest);
      if (options.keep !== undefined) pruneCheckpoints(root, options.keep, name);
    } catch (e) {
      status = { ok: false, error: (e as Error).message };
    }
  }
  const final = exchange(comm, status)[0]!;
  if (!final.ok) {
    if (rank === 0) fs.rmSync(tmp, { recursive: true, force: true });
    ckptError(finalDir, `${op}: rank 0 could not commit: ${final.error}`);
  }
  return { dir: finalDir, step, bytes: written, ms: Date.now() - t0 };
}

/**
 * Writes a whole checkpoint from one process (offline tools such as `moe-ep ckpt reshard`): the
 * files are produced one at a time (`tensors()` is called when that file is written, so only one
 * file's tensors are in memory), then committed exactly as saveCheckpoint() does.
 */
export function writeCheckpoint(
  root: string,
  options: {
    step: number;
    worldSize: number;
    files: { file: string; rank?: number; tensors: () => Record<string, Tensor | RawTensor> }[];
    manifestExtras?: ManifestExtras;
    keep?: number;
  },
): SavedCheckpoint {
  const t0 = Date.now();
  checkKeys(options, 'writeCheckpoint', { step: true, worldSize: true, files: true, manifestExtras: true, keep: true });
  const { step } = options;
  if (!Number.isSafeInteger(step) || step < 0) invalidArgument('writeCheckpoint', `'step' must be a non-negative integer; received ${String(step)}`);
  const extras = options.manifestExtras ?? {};
  for (const k of Object.keys(extras)) if (RESERVED.has(k)) invalidArgument('writeCheckpoint', `manifestExtras.${k} is reserved for the manifest itself`);
  fs.mkdirSync(root, { recursive: true });
  const name = stepDirName(step);
  const tmp = join(root, `.tmp-${name}-${randomBytes(6).toString('hex')}`);
  fs.mkdirSync(tmp);
  let bytes = 0;
  try {
    const manifest = emptyManifest(extras, step, options.worldSize);
    for (const f of options.files) {
      const entries = Object.entries(f.tensors()).map(([n, t]) => entryOf(n, t));
      const w = writeSafetensors(join(tmp, f.file), entries, { format: CHECKPOINT_FORMAT, step: String(step), ...(f.rank === undefined ? {} : { rank: String(f.rank) }) });
      bytes += w.bytes;
      manifest.files[f.file] = { bytes: w.bytes, sha256: w.sha256, ...(f.rank === undefined ? {} : { rank: f.rank }) };
      for (const [n, t] of Object.entries(w.tensors)) {
        const prev = manifest.tensors[n];
        if (prev) throw new CheckpointError(`checkpoint ${tmp}: tensor '${n}' is written by both ${prev.file} and ${f.file}`);
        manifest.tensors[n] = { file: f.file, dtype: t.dtype, shape: t.shape, sha256: t.sha256 };
      }
    }
    fsyncDir(tmp);
    commitDir(root, tmp, join(root, name), manifest);
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
  if (options.keep !== undefined) pruneCheckpoints(root, options.keep, name);
  return { dir: join(root, name), step, bytes, ms: Date.now() - t0 };
}

/** Rank 0's commit: manifest last, fsync, rename into place, fsync root, then `latest`. */
function commitDir(root: string, tmp: string, finalDir: string, manifest: CheckpointManifest): void {
  const mpath = join(tmp, MANIFEST_FILE);
  const fd = fs.openSync(mpath, 'w');
  try {
    fs.writeSync(fd, `${JSON.stringify(manifest, null, 1)}\n`);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fsyncDir(tmp);
  // Saving a step that exists (a run resumed from an earlier one): move the old one aside first.
  let aside: string | null = null;
  if (fs.existsSync(finalDir)) {
    aside = join(root, `.old-${basename(finalDir)}-${randomBytes(4).toString('hex')}`);
    fs.renameSync(finalDir, aside);
  }
  fs.renameSync(tmp, finalDir);
  fsyncDir(root);
  writeLatest(root, basename(finalDir));
  if (aside) fs.rmSync(aside, { recursive: true, force: true });
}

function writeLatest(root: string, name: string): void {
  const tmpPath = join(root, `${LATEST_FILE}.tmp`);
  const fd = fs.openSync(tmpPath, 'w');
  try {
    fs.writeSync(fd, `${name}\n`);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  fs.renameSync(tmpPath, join(root, LATEST_FILE));
  fsyncDir(root);
}

/** Committed checkpoints under root (folders step-N holding a manifest), oldest first. */
export function listCheckpoints(root: string): { dir: string; step: number }[] {
  let names: string[];
  try {
    names = fs.readdirSync(root);
  } catch {
    return [];
  }
  const out: { dir: string; step: number }[] = [];
  for (const n of names) {
    const step = parseStepDir(n);
    if (step !== undefined && fs.existsSync(join(root, n, MANIFEST_FILE))) out.push({ dir: join(root, n), step });
  }
  return out.sort((a, b) => a.step - b.step);
}

/**
 * The checkpoint `latest` names, or (when `latest` is missing or names a folder that is gone) the
 * committed checkpoint with the highest step; null when there is none. Temporary folders are never
 * candidates.
 */
export function latestCheckpoint(root: string): { dir: string; step: number } | null {
  try {
    const name = fs.readFileSync(join(root, LATEST_FILE), 'utf8').trim();
    const step = parseStepDir(name);
    if (step !== undefined && fs.existsSync(join(root, name, MANIFEST_FILE))) return { dir: join(root, name), step };
  } catch {
    // no pointer: scan
  }
  const all = listCheckpoints(root);
  return all[all.length - 1] ?? null;
}

/**
 * Deletes all but the newest `keep` checkpoints (never `protect`), and leftovers of interrupted
 * saves (.tmp-*, .old-*). Called by rank 0 after a commit; assumes no other save is running.
 */
export function pruneCheckpoints(root: string, keep: number, protect?: string): string[] {
  // keep < 1 (or NaN, which slice() reads as 0) would delete every checkpoint.
  if (!Number.isSafeInteger(keep) || keep < 1) invalidArgument('pruneCheckpoints', `'keep' must be a positive integer; received ${String(keep)}`);
  const removed: string[] = [];
  const all = listCheckpoints(root);
  for (const c of all.slice(0, Math.max(0, all.length - keep))) {
    if (basename(c.dir) === protect) continue;
    // Rename first so a crash mid-delete never leaves a step folder that looks committed but is not.
    const doomed = join(root, `.old-${basename(c.dir)}-${randomBytes(4).toString('hex')}`);
    fs.renameSync(c.dir, doomed);
    fs.rmSync(doomed, { recursive: true, force: true });
    removed.push(c.dir);
  }
  for (const n of fs.readdirSync(root)) {
    if ((n.startsWith('.tmp-step-') || n.startsWith('.old-step-')) && !n.includes(protect ?? '\0')) {
      fs.rmSync(join(root, n), { recursive: true, force: true });
    }
  }
  fsyncDir(root);
  return removed;
}

// ------------------------------------------------------------------------------------- loading

export interface LoadOptions {
  /** Only for rank/size bookkeeping (each rank reads what it asks for; loading is not collective). */
  comm?: Communicator;
  /** Check each file's SHA-256 the first time it is opened (default true). Sizes are always checked. */
  verify?: boolean;
}

export interface GetOptions {
  device?: DeviceLike;
  /** Convert to this dtype (default: as stored). */
  dtype?: DType;
}

/** Reads and checks manifest.json of a step folder (format, version, internal consistency). */
export function readManifest(dir: string): CheckpointManifest {
  const path = join(dir, MANIFEST_FILE);
  let text: string;
  try {
    text = fs.readFileSync(path, 'utf8');
  } catch (e) {
    ckptError(dir, `cannot read ${MANIFEST_FILE}: ${(e as Error).message} (an interrupted save never has one; is this a step folder?)`);
  }
  let m: CheckpointManifest;
  try {
    m = JSON.parse(text) as CheckpointManifest;
  } catch (e) {
    ckptError(dir, `${MANIFEST_FILE} is not valid JSON: ${(e as Error).message}`);
  }
  if (m === null || typeof m !== 'object' || m.format !== CHECKPOINT_FORMAT) ckptError(dir, `${MANIFEST_FILE} is not a moe-ep checkpoint manifest (format ${JSON.stringify((m as { format?: unknown } | null)?.format)})`);
  if (m.formatVersion !== CHECKPOINT_FORMAT_VERSION) {
    ckptError(dir, `${MANIFEST_FILE} has format version ${JSON.stringify(m.formatVersion)}; this moe-ep reads version ${CHECKPOINT_FORMAT_VERSION}${typeof m.formatVersion === 'number' && m.formatVersion > CHECKPOINT_FORMAT_VERSION ? ' (written by a newer moe-ep: upgrade)' : ''}`);
  }
  const isObject = (v: unknown): boolean => v !== null && typeof v === 'object' && !Array.isArray(v);
  if (!Number.isSafeInteger(m.step) || !isObject(m.files) || !isObject(m.tensors)) ckptError(dir, `${MANIFEST_FILE} lacks step, files or tensors`);
  if (!isObject(m.world) || !Number.isSafeInteger(m.world.size) || m.world.size < 1) ckptError(dir, `${MANIFEST_FILE}: world.size must be a positive integer; it has ${JSON.stringify(m.world)}`);
  for (const [n, t] of Object.entries(m.tensors)) {
    if (!isObject(t) || typeof t.file !== 'string' || !Array.isArray(t.shape) || !t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      ckptError(dir, `${MANIFEST_FILE}: tensor '${n}' needs a file, a dtype and a shape of non-negative integers; it has ${JSON.stringify(t)}`);
    }
    if (!m.files[t.file]) ckptError(dir, `${MANIFEST_FILE} puts tensor '${n}' in ${t.file}, which it does not list`);
    if (!toDType(t.dtype)) ckptError(dir, `${MANIFEST_FILE}: tensor '${n}' has unknown dtype ${JSON.stringify(t.dtype)}`);
  }
  return m;
}

/** Resolves a root (via `latest`) or a step folder to a step folder. */
export function resolveCheckpointDir(path: string): string {
  if (typeof path !== 'string' || path === '') invalidArgument('loadCheckpoint', `'path' must be a checkpoint folder (a non-empty string); received ${String(path)}`);
  if (fs.existsSync(join(path, MANIFEST_FILE))) return path;
  const l = latestCheckpoint(path);
  if (!l) ckptError(path, `no committed checkpoint here (no ${MANIFEST_FILE}, no '${LATEST_FILE}', no step-* folder with a manifest)`);
  return l.dir;
}

export class CheckpointReader implements Disposable {
  readonly dir: string;
  readonly manifest: CheckpointManifest;
  readonly verify: boolean;
  readonly rank: number;
  readonly size: number;
  private readonly open = new Map<string, SafetensorsFile>();
  private readonly verified = new Set<string>();

  /** @internal use loadCheckpoint() */
  constructor(dir: string, manifest: CheckpointManifest, options: LoadOptions) {
    this.dir = dir;
    this.manifest = manifest;
    this.verify = options.verify ?? true;
    this.rank = options.comm?.rank ?? 0;
    this.size = options.comm?.size ?? 1;
  }

  get step(): number {
    return this.manifest.step;
  }

  names(): string[] {
    return Object.keys(this.manifest.tensors);
  }

  has(name: string): boolean {
    return Object.hasOwn(this.manifest.tensors, name);
  }

  info(name: string): ManifestTensor {
    if (typeof name !== 'string') invalidArgument('CheckpointReader', `'name' must be a string; received ${String(name)}`);
    const t = this.manifest.tensors[name];
    if (!t || !Object.hasOwn(this.manifest.tensors, name)) {
      const names = this.names();
      const shape = (n: string): string => n.replace(/\d+/g, '#'); // layers.#.experts.#.w1
      const near = names.filter((n) => shape(n) === shape(name)).slice(0, 4);
      ckptError(this.dir, `no tensor '${name}' (it holds ${names.length} tensors${near.length ? `; similar: ${near.join(', ')}` : names.length ? `, e.g. ${names.slice(0, 3).join(', ')}` : ''})`);
    }
    return t;
  }

  /** The SHA-256 check of one file (once per reader); throws naming the file and the damaged tensors. */
  verifyFile(file: string): void {
    if (this.verified.has(file)) return;
    const rec = this.manifest.files[file];
    if (!rec) ckptError(this.dir, `${file} is not listed in ${MANIFEST_FILE}`);
    const path = join(this.dir, file);
    checkFileSize(this.dir, file, rec, this.manifest);
    const fd = fs.openSync(path, 'r');
    const hash = createHash('sha256');
    try {
      const chunk = Buffer.alloc(Math.min(8 << 20, Math.max(rec.bytes, 1)));
      for (let pos = 0; ; ) {
        const n = fs.readSync(fd, chunk, 0, chunk.length, pos);
        if (n === 0) break;
        hash.update(chunk.subarray(0, n));
        pos += n;
      }
    } finally {
      fs.closeSync(fd);
    }
    const got = hash.digest('hex');
    if (got !== rec.sha256) {
      ckptError(this.dir, `${file} fails its SHA-256 check (manifest ${rec.sha256.slice(0, 16)}…, file ${got.slice(0, 16)}…): ${this.locateDamage(file)}`);
    }
    this.verified.add(file);
  }

  /** Verifies every file of the checkpoint. */
  verifyAll(): void {
    for (const f of Object.keys(this.manifest.files)) this.verifyFile(f);
  }

  /** Which tensors of a file no longer match their checksums (or that its header is damaged). */
  private locateDamage(file: string): string {
    let f: SafetensorsFile;
    try {
      f = SafetensorsFile.open(join(this.dir, file));
    } catch (e) {
      return `its header is damaged (${(e as Error).message})`;
    }
    try {
      const bad: string[] = [];
      for (const [n, t] of Object.entries(this.manifest.tensors)) {
        if (t.file !== file) continue;
        if (!f.has(n)) {
          bad.push(`${n} (missing from the header)`);
          continue;
        }
        if (createHash('sha256').update(f.readBytes(n)).digest('hex') !== t.sha256) bad.push(n);
      }
      return bad.length ? `damaged tensor${bad.length > 1 ? 's' : ''} ${bad.map((b) => `'${b}'`).join(', ')}` : 'the damage is in its header (every tensor matches its checksum)';
    } finally {
      f.close();
    }
  }

  private file(file: string): SafetensorsFile {
    let f = this.open.get(file);
    if (!f) {
      const rec = this.manifest.files[file];
      if (!rec) ckptError(this.dir, `${file} is not listed in ${MANIFEST_FILE}`);
      checkFileSize(this.dir, file, rec, this.manifest);
      if (this.verify) this.verifyFile(file);
      f = SafetensorsFile.open(join(this.dir, file));
      this.open.set(file, f);
    }
    return f;
  }

  /** One tensor's dtype, shape and raw bytes (no addon needed). */
  getRaw(name: string): { dtype: DType; shape: number[]; data: Uint8Array } {
    const t = this.info(name);
    let r: { dtype: DType; shape: number[]; data: Uint8Array };
    try {
      const f = this.file(t.file);
      if (!f.has(name)) ckptError(this.dir, `${t.file} does not hold tensor '${name}' although ${MANIFEST_FILE} says so`);
      r = f.read(name);
    } catch (e) {
      if (e instanceof CheckpointError && !e.message.includes(`'${name}'`)) throw new CheckpointError(`${e.message} [while reading tensor '${name}']`);
      throw e;
    }
    if (r.dtype !== t.dtype || r.shape.join() !== t.shape.join()) {
      ckptError(this.dir, `tensor '${name}' in ${t.file} is ${r.dtype}[${r.shape}] but ${MANIFEST_FILE} records ${t.dtype}[${t.shape}]`);
    }
    return r;
  }

  /** One tensor on `device` (default: the default device), converted to `dtype` when given. */
  get(name: string, options: GetOptions = {}): Tensor {
    options = checkOptions(options, 'CheckpointReader.get', { device: true, dtype: true });
    const r = this.getRaw(name);
    const base = Tensor.fromArray(storageView(r.dtype, r.data.buffer as ArrayBuffer), {
      dtype: r.dtype,
      shape: r.shape,
      ...(options.device === undefined ? {} : { device: options.device }),
    });
    if (options.dtype === undefined || options.dtype === r.dtype) return base;
    try {
      return base.cast(options.dtype);
    } finally {
      base.dispose();
    }
  }

  /** Copies a stored tensor into `dst` (same shape; dtype and device may differ). */
  into(name: string, dst: Tensor): Tensor {
    const t = this.info(name);
    if (!(dst instanceof Tensor)) invalidArgument('CheckpointReader.into', `'dst' must be a Tensor; received ${dst === null ? 'null' : typeof dst}`);
    if (t.shape.join() !== dst.shape.join()) ckptError(this.dir, `tensor '${name}' is [${t.shape}] but the destination is [${dst.shape}]`);
    using src = this.get(name, { device: 'cpu' });
    return dst.copy_(src);
  }

  close(): void {
    for (const f of this.open.values()) f.close();
    this.open.clear();
  }
  [Symbol.dispose](): void {
    this.close();
  }
}

function checkFileSize(dir: string, file: string, rec: ManifestFile, manifest: CheckpointManifest): void {
  const held = (): string => {
    const names = Object.entries(manifest.tensors).filter(([, t]) => t.file === file).map(([n]) => n);
    return names.length ? `; it holds ${names.length} tensor${names.length > 1 ? 's' : ''} such as '${names[0]}'` : '';
  };
  let size: number;
  try {
    size = fs.statSync(join(dir, file)).size;
  } catch {
    ckptError(dir, `${file} is missing (${MANIFEST_FILE} lists it with ${rec.bytes} bytes${rec.rank === undefined ? '' : `, written by rank ${rec.rank}`}${held()})`);
  }
  if (size !== rec.bytes) ckptError(dir, `${file} has ${size} bytes but ${MANIFEST_FILE} records ${rec.bytes} (${size < rec.bytes ? 'truncated' : 'grown'}${held()})`);
}

/**
 * Opens a checkpoint: `path` is a step folder or a root (its `latest`). Checks the manifest and that
 * every file exists with its recorded size; checksums are checked as files are opened (verify).
 */
export function loadCheckpoint(path: string, options: LoadOptions = {}): CheckpointReader {
  options = checkOptions(options, 'loadCheckpoint', { comm: true, verify: true });
  const dir = resolveCheckpointDir(path);
  const manifest = readManifest(dir);
  for (const [file, rec] of Object.entries(manifest.files)) checkFileSize(dir, file, rec, manifest);
  return new CheckpointReader(dir, manifest, options);
}
