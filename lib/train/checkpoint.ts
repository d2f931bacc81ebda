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
 * folder to <root>/step-<N>, fsyncs <root>, writes `latest` through a fresh temporary (fsync, rename),
 * and finally prunes old checkpoints (`keep`). A crash at any point leaves every committed checkpoint
 * findable: a step folder exists only once complete, and `latest` only names one. Saving a step that
 * exists moves the old folder to .old-step-<N>-<hex> first; until the new one has its name, readers
 * take that folder as step N and the next prune or save renames it back, so no crash loses it. Folders
 * being deleted are renamed .del-* first and are never read. All ranks must see <root> on one shared
 * filesystem.
 *
 * Load: every file goes through lib/train/safe-files.ts (plain names, containment after resolving
 * links, regular files only, size caps, bounded JSON). The manifest is validated field by field
 * (errors name the field); every file must exist with its recorded size; verify (default on) checks
 * the SHA-256 of every file it opens — one pass over its bytes — and a mismatch names the directory,
 * the file and, by per-tensor checksums, the damaged tensor. verifyAll() (and `moe-ep ckpt inspect`)
 * also checks each header against the manifest and every tensor's own SHA-256. Tensors are read by
 * name onto any device, so a different EP size reads just the experts it now owns. A root resolves
 * to the newest committed checkpoint that passes these checks (latestCheckpoint()).
 */
import { randomBytes, createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { basename, join } from 'node:path';

import { type DeviceLike } from '../device.js';
import { type Communicator } from '../parallel/communicator.js';
import { type DType, DTYPES, dtypeSize, storageView } from '../dtype.js';
import { CheckpointError, InvalidArgumentError, invalidArgument } from '../errors.js';
import { checkKeys, checkNonNegativeInt, checkOptions, checkPositiveInt, checkTensor } from '../validate.js';
import { Tensor } from '../tensor.js';
import {
  checkPlainName,
  FILE_LIMITS,
  fsyncDir,
  isTemporaryName,
  openRegular,
  readJson,
  readRegular,
  realFolder,
  resolveInside,
  statRegular,
  writeFileAtomic,
} from './safe-files.js';
import { SafetensorsFile, type SafetensorsEntry, writeSafetensors } from './safetensors.js';

export { fsyncDir };

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
  checkNonNegativeInt(step, 'stepDirName', 'step');
  return `step-${String(step).padStart(8, '0')}`;
}

function parseStepDir(name: string): number | undefined {
  const m = /^step-(\d{1,15})$/.exec(name);
  return m ? Number(m[1]) : undefined;
}

/** A committed folder moved aside by a re-save of its step (.old-step-N-<hex>): its step, else undefined. */
function parseAsideDir(name: string): number | undefined {
  const m = /^\.old-step-(\d{1,15})-[0-9a-f]+$/.exec(name);
  return m ? Number(m[1]) : undefined;
}

/** A random suffix for folder names of one save or deletion. */
const nonce = (bytes = 4): string => randomBytes(bytes).toString('hex');

function ckptError(where: string, message: string): never {
  throw new CheckpointError(`checkpoint ${where}: ${message}`);
}

/** Whether `name` has an entry in `dir` (a link counts, even a dangling one). */
function entryExists(dir: string, name: string): boolean {
  try {
    fs.lstatSync(join(dir, name));
    return true;
  } catch {
    return false;
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
  checkNonNegativeInt(step, op, 'step');
  if (options.keep !== undefined) checkPositiveInt(options.keep, op, 'keep');
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
    fs.mkdirSync(root, { recursive: true });
    try {
      fs.mkdirSync(tmp);
    } catch (e) {
      // Another rank of this save may have made it first; anything but that folder is refused.
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST' || size === 1 || !fs.lstatSync(tmp).isDirectory()) throw e;
    }
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
  checkNonNegativeInt(step, 'writeCheckpoint', 'step');
  const extras = options.manifestExtras ?? {};
  for (const k of Object.keys(extras)) if (RESERVED.has(k)) invalidArgument('writeCheckpoint', `manifestExtras.${k} is reserved for the manifest itself`);
  for (const [i, f] of options.files.entries()) checkPlainName(f.file, `writeCheckpoint: files[${i}].file`, InvalidArgumentError);
  fs.mkdirSync(root, { recursive: true });
  const name = stepDirName(step);
  const tmp = join(root, `.tmp-${name}-${nonce(6)}`);
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

/**
 * Rank 0's commit: manifest last, fsync, rename into place, fsync root, then `latest`. A step that
 * exists is moved aside first and discarded only once the new one is committed (see the module doc).
 */
function commitDir(root: string, tmp: string, finalDir: string, manifest: CheckpointManifest): void {
  writeFileAtomic(join(tmp, MANIFEST_FILE), `${JSON.stringify(manifest, null, 1)}\n`);
  fsyncDir(tmp);
  const name = basename(finalDir);
  if (entryExists(root, name)) {
    // Asides of this step left by an earlier crash are stale while step-N exists; gone first, so that
    // a crash below leaves exactly one aside, the folder committed last.
    for (const n of fs.readdirSync(root)) if (n.startsWith(`.old-${name}-`)) discard(root, n);
    fs.renameSync(finalDir, join(root, `.old-${name}-${nonce()}`));
    // Durable before the new folder takes the name: a crash now leaves the old one findable as step N.
    fsyncDir(root);
  }
  fs.renameSync(tmp, finalDir);
  fsyncDir(root);
  writeLatest(root, name);
  // Only now is the old copy (and any an earlier crash left) garbage.
  for (const n of fs.readdirSync(root)) if (n.startsWith(`.old-${name}-`)) discard(root, n);
}

/** `latest` through a fresh temporary, created exclusively: a planted link there is replaced, never followed. */
function writeLatest(root: string, name: string): void {
  writeFileAtomic(join(root, LATEST_FILE), `${name}\n`);
  fsyncDir(root);
}

/** Deletes an entry of root: renamed .del-* first, so a crash mid-delete never leaves a folder that looks committed. */
function discard(root: string, name: string): void {
  const doomed = join(root, `.del-${nonce()}-${name.replace(/^\.+/, '')}`);
  fs.renameSync(join(root, name), doomed);
  fs.rmSync(doomed, { recursive: true, force: true }); // a link is removed, never followed
}

export interface SkippedCheckpoint {
  /** The folder (or `latest`) passed over. */
  dir: string;
  /** Why: the CheckpointError it gave. */
  reason: string;
}

interface Candidate {
  /** Its entry in root: step-N, or .old-step-N-<hex> standing in for a missing step-N. */
  name: string;
  dir: string;
  step: number;
}

/** Entries of root that may hold committed checkpoints, newest step first (an aside after its step-N). */
function candidates(root: string, rootReal: string): Candidate[] {
  const names = fs.readdirSync(rootReal);
  const steps = new Set(names.filter((n) => parseStepDir(n) !== undefined));
  const out: Candidate[] = [];
  for (const n of names) {
    const step = parseStepDir(n);
    const aside = step === undefined ? parseAsideDir(n) : undefined;
    // An aside counts only while its step has no folder (a crash between the two renames of a re-save).
    if (step !== undefined) out.push({ name: n, dir: join(root, n), step });
    else if (aside !== undefined && !steps.has(stepDirName(aside))) out.push({ name: n, dir: join(root, n), step: aside });
  }
  return out.sort((a, b) => b.step - a.step || Number(a.name.startsWith('.')) - Number(b.name.startsWith('.')) || (a.name < b.name ? -1 : 1));
}

interface Located {
  /** The folder as the caller named it (root joined with the step folder's name). */
  dir: string;
  /** Its real path: every file read must lie inside. */
  real: string;
  manifest: CheckpointManifest;
  skipped: SkippedCheckpoint[];
}

/** A candidate checked as committed: inside root, a folder, a valid manifest of its step, every file there with its size. */
function verifyCandidate(rootReal: string, c: Candidate): Located {
  const real = resolveInside(rootReal, c.name, `checkpoint ${c.dir}`);
  if (real === undefined || !fs.statSync(real).isDirectory()) ckptError(c.dir, 'is not a folder');
  const manifest = readManifestAt(c.dir, real, [c.name]);
  checkFiles(c.dir, real, manifest);
  return { dir: c.dir, real, manifest, skipped: [] };
}

/**
 * The newest committed checkpoint of a root that passes verifyCandidate(): the one `latest` names,
 * unless a higher step was committed after it (a save that died before moving `latest`); when that
 * one fails, the next older. What was passed over, and why, is in `skipped`.
 */
function findLatest(root: string, rootReal: string): { found: Located | null; skipped: SkippedCheckpoint[] } {
  const skipped: SkippedCheckpoint[] = [];
  const tryOne = (c: Candidate): Located | null => {
    try {
      return verifyCandidate(rootReal, c);
    } catch (e) {
      if (!(e instanceof CheckpointError)) throw e;
      skipped.push({ dir: c.dir, reason: e.message });
      return null;
    }
  };
  let pointer: number | undefined;
  if (entryExists(rootReal, LATEST_FILE)) {
    const where = join(root, LATEST_FILE);
    try {
      const path = resolveInside(rootReal, LATEST_FILE, `checkpoint ${where}`);
      if (path === undefined) ckptError(where, 'is a link to nothing');
      const text = readRegular(path, { what: `checkpoint ${where}`, maxBytes: FILE_LIMITS.latest }).toString('utf8').trim();
      pointer = parseStepDir(text);
      if (pointer === undefined) ckptError(where, `names ${JSON.stringify(text.slice(0, 80))}, not a step folder`);
    } catch (e) {
      if (!(e instanceof CheckpointError)) throw e;
      skipped.push({ dir: where, reason: e.message });
    }
  }
  const all = candidates(root, rootReal);
  // The newest (by createdAt) of the candidates of one step that verify: normally there is one; an
  // aside stands in for a missing step-N, and should several be left, the one committed last wins.
  const bestOf = (step: number): Located | null => {
    let best: Located | null = null;
    for (const c of all.filter((x) => x.step === step)) {
      const v = tryOne(c);
      if (v && (!best || Date.parse(v.manifest.createdAt) > Date.parse(best.manifest.createdAt))) best = v;
    }
    return best;
  };
  const steps = [...new Set(all.map((c) => c.step))]; // newest first
  if (pointer !== undefined) {
    const base = bestOf(pointer);
    if (base) {
      // Committed after `latest` was written: a higher step with a later date (an abandoned run's
      // higher steps, from before a resume at an earlier step, are older and stay passed over).
      const since = Date.parse(base.manifest.createdAt);
      for (const step of steps.filter((x) => x > (pointer as number))) {
        const v = bestOf(step);
        if (v && Date.parse(v.manifest.createdAt) >= since) return { found: { ...v, skipped }, skipped };
      }
      return { found: { ...base, skipped }, skipped };
    }
    if (!steps.includes(pointer)) skipped.push({ dir: join(root, LATEST_FILE), reason: `checkpoint ${join(root, LATEST_FILE)}: names ${stepDirName(pointer)}, which is not there` });
  }
  for (const step of steps) {
    if (step === pointer) continue; // tried above
    const v = bestOf(step);
    if (v) return { found: { ...v, skipped }, skipped };
  }
  return { found: null, skipped };
}

/**
 * Committed checkpoints under root (folders step-N inside root holding a manifest; a folder moved
 * aside by an interrupted re-save stands in for its missing step), oldest first. Cheap: manifests
 * are not read (latestCheckpoint() verifies).
 */
export function listCheckpoints(root: string): { dir: string; step: number }[] {
  let rootReal: string;
  try {
    rootReal = realFolder(root, `checkpoint ${root}`);
  } catch {
    return [];
  }
  const out: { dir: string; step: number }[] = [];
  const seen = new Set<number>();
  for (const c of candidates(root, rootReal)) {
    if (seen.has(c.step)) continue;
    try {
      const real = resolveInside(rootReal, c.name, c.dir);
      if (real === undefined || !fs.statSync(real).isDirectory() || !entryExists(real, MANIFEST_FILE)) continue;
    } catch {
      continue; // outside root: never a checkpoint of this root
    }
    seen.add(c.step);
    out.push({ dir: c.dir, step: c.step });
  }
  return out.reverse();
}

/**
 * The newest committed checkpoint under root that verifies (manifest valid, every file present with
 * its size; checksums are checked as files are read): normally the one `latest` names; a higher
 * step committed after it when a save died before moving `latest`; the next older when the newest
 * fails. null when there is none. `skipped` lists what was passed over and why. Temporary folders
 * are never candidates.
 */
export function latestCheckpoint(root: string): { dir: string; step: number; skipped?: SkippedCheckpoint[] } | null {
  let rootReal: string;
  try {
    rootReal = realFolder(root, `checkpoint ${root}`);
  } catch {
    return null;
  }
  const { found, skipped } = findLatest(root, rootReal);
  if (!found) return null;
  return { dir: found.dir, step: found.manifest.step, ...(skipped.length ? { skipped } : {}) };
}

/** Renames the newest verified aside of each step that has no folder back to step-N (a writer's repair after a crash mid re-save). */
function recoverAsides(root: string, rootReal: string): void {
  const newest = new Map<number, { name: string; at: number }>();
  for (const c of candidates(root, rootReal)) {
    if (!c.name.startsWith('.old-') || entryExists(rootReal, stepDirName(c.step))) continue;
    let at: number;
    try {
      at = Date.parse(verifyCandidate(rootReal, c).manifest.createdAt);
    } catch (e) {
      if (e instanceof CheckpointError) continue; // left in place: latestCheckpoint() reports it
      throw e;
    }
    if (!newest.has(c.step) || at > (newest.get(c.step) as { at: number }).at) newest.set(c.step, { name: c.name, at });
  }
  for (const [step, { name }] of newest) fs.renameSync(join(root, name), join(root, stepDirName(step)));
  if (newest.size) fsyncDir(root);
}

/**
 * Deletes all but the newest `keep` checkpoints (never `protect`), and leftovers of interrupted
 * saves (.tmp-*, .del-*, temporaries, folders moved aside whose step has been saved again); the
 * newest aside of a step that has no folder is renamed back first. Called by rank 0 after a commit; assumes
 * no other save is running. Nothing outside root is touched (links are removed, not followed).
 */
export function pruneCheckpoints(root: string, keep: number, protect?: string): string[] {
  // keep < 1 (or NaN, which slice() reads as 0) would delete every checkpoint.
  checkPositiveInt(keep, 'pruneCheckpoints', 'keep');
  const rootReal = realFolder(root, `checkpoint ${root}`);
  recoverAsides(root, rootReal);
  const removed: string[] = [];
  const all = listCheckpoints(root);
  for (const c of all.slice(0, Math.max(0, all.length - keep))) {
    const name = basename(c.dir);
    if (name === protect || parseStepDir(name) === undefined) continue;
    discard(root, name);
    removed.push(c.dir);
  }
  const names = fs.readdirSync(rootReal);
  for (const n of names) {
    const aside = parseAsideDir(n);
    const stale = aside !== undefined && names.includes(stepDirName(aside));
    // No save is running (see above): every .tmp-step-* is a leftover, the protected step's too.
    if (stale || n.startsWith('.tmp-step-')) discard(root, n);
    else if (n.startsWith('.del-') || isTemporaryName(n)) fs.rmSync(join(root, n), { recursive: true, force: true });
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

const HEX64 = /^[0-9a-f]{64}$/;
/** Dimensions a stored tensor may have. */
const MAX_TENSOR_RANK = 64;

const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);
const show = (v: unknown): string => {
  const t = v === undefined ? 'nothing' : JSON.stringify(v);
  return t.length > 80 ? `${t.slice(0, 77)}...` : t;
};
const nonNegativeInt = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0;

/**
 * Checks a parsed manifest field by field before anything uses it, so a malformed one gives a
 * CheckpointError naming the field ("manifest.json: files["rank-0.safetensors"].bytes must be …")
 * rather than a TypeError deep inside a load.
 */
function validateManifest(m: unknown, dir: string): CheckpointManifest {
  function bad(field: string, want: string, got: unknown): never {
    ckptError(dir, `${MANIFEST_FILE}: ${field} must be ${want}; it has ${show(got)}`);
  }
  if (!isObject(m) || m['format'] !== CHECKPOINT_FORMAT) ckptError(dir, `${MANIFEST_FILE} is not a moe-ep checkpoint manifest (format ${show(isObject(m) ? m['format'] : m)})`);
  const version = m['formatVersion'];
  if (version !== CHECKPOINT_FORMAT_VERSION) {
    ckptError(dir, `${MANIFEST_FILE} has format version ${show(version)}; this moe-ep reads version ${CHECKPOINT_FORMAT_VERSION}${typeof version === 'number' && version > CHECKPOINT_FORMAT_VERSION ? ' (written by a newer moe-ep: upgrade)' : ''}`);
  }
  if (!nonNegativeInt(m['step'])) bad('step', 'a non-negative integer', m['step']);
  if (typeof m['createdAt'] !== 'string' || Number.isNaN(Date.parse(m['createdAt']))) bad('createdAt', 'an ISO date string', m['createdAt']);
  const world = m['world'];
  if (!isObject(world) || !Number.isSafeInteger(world['size']) || (world['size'] as number) < 1) bad('world.size', 'a positive integer', isObject(world) ? world['size'] : world);
  const worldSize = (world as { size: number }).size;
  const files = m['files'];
  if (!isObject(files)) bad('files', 'an object of file records', files);
  for (const [name, rec] of Object.entries(files as Record<string, unknown>)) {
    const f = `files[${JSON.stringify(name)}]`;
    checkPlainName(name, `checkpoint ${dir}: ${MANIFEST_FILE}: ${f}`);
    if (!isObject(rec)) bad(f, 'an object with bytes and sha256', rec);
    if (!nonNegativeInt(rec['bytes'])) bad(`${f}.bytes`, 'a non-negative integer', rec['bytes']);
    if (typeof rec['sha256'] !== 'string' || !HEX64.test(rec['sha256'])) bad(`${f}.sha256`, '64 hex digits', rec['sha256']);
    if (rec['rank'] !== undefined && !(nonNegativeInt(rec['rank']) && rec['rank'] < worldSize)) bad(`${f}.rank`, `a rank below world.size ${worldSize}`, rec['rank']);
  }
  const tensors = m['tensors'];
  if (!isObject(tensors)) bad('tensors', 'an object of tensor records', tensors);
  for (const [name, t] of Object.entries(tensors as Record<string, unknown>)) {
    const f = `tensors[${JSON.stringify(name)}]`;
    if (name === '' || name === '__metadata__') bad(f, 'a tensor name', name);
    if (!isObject(t)) bad(f, 'an object with file, dtype, shape and sha256', t);
    const file = t['file'];
    if (typeof file !== 'string' || !Object.hasOwn(files as object, file)) ckptError(dir, `${MANIFEST_FILE} puts tensor '${name}' in ${show(file)}, which it does not list under files`);
    if (!(DTYPES as readonly unknown[]).includes(t['dtype'])) bad(`${f}.dtype`, `one of ${DTYPES.join(', ')}`, t['dtype']);
    const shape = t['shape'];
    if (!Array.isArray(shape) || shape.length > MAX_TENSOR_RANK || !shape.every(nonNegativeInt)) bad(`${f}.shape`, `an array of at most ${MAX_TENSOR_RANK} non-negative integers`, shape);
    const bytes = (shape as number[]).reduce((a, d) => a * d, dtypeSize[t['dtype'] as DType]);
    const fileBytes = ((files as Record<string, ManifestFile>)[file as string] as ManifestFile).bytes;
    if (bytes > fileBytes) bad(`${f}.shape`, `a tensor that fits its file (${fileBytes} bytes)`, shape);
    if (typeof t['sha256'] !== 'string' || !HEX64.test(t['sha256'])) bad(`${f}.sha256`, '64 hex digits', t['sha256']);
  }
  const ep = m['ep'];
  if (ep !== undefined) {
    if (!isObject(ep)) bad('ep', 'an object {size, expertsPerRank, numExperts}', ep);
    for (const k of ['size', 'expertsPerRank'] as const) if (!Number.isSafeInteger(ep[k]) || (ep[k] as number) < 1) bad(`ep.${k}`, 'a positive integer', ep[k]);
    const E = (ep['size'] as number) * (ep['expertsPerRank'] as number);
    if (ep['numExperts'] !== undefined && ep['numExperts'] !== E) bad('ep.numExperts', `ep.size × ep.expertsPerRank = ${E}`, ep['numExperts']);
  }
  return m as unknown as CheckpointManifest;
}

/**
 * manifest.json of the step folder `dir` (real path `real`), read through the safe file layer and
 * validated; the step must agree with the folder's name (each of `names` that names a step).
 */
function readManifestAt(dir: string, real: string, names: string[] = []): CheckpointManifest {
  const path = resolveInside(real, MANIFEST_FILE, `checkpoint ${dir}: ${MANIFEST_FILE}`);
  if (path === undefined) ckptError(dir, `cannot read ${MANIFEST_FILE}: it is missing (an interrupted save never has one; is this a step folder?)`);
  const m = validateManifest(readJson(path, { what: `checkpoint ${dir}: ${MANIFEST_FILE}`, maxBytes: FILE_LIMITS.manifest }), dir);
  for (const n of [...names, basename(dir), basename(real)]) {
    const named = parseStepDir(n) ?? parseAsideDir(n);
    if (named !== undefined && named !== m.step) ckptError(dir, `${MANIFEST_FILE} says step ${m.step} but its folder is named ${n}`);
  }
  return m;
}

/** Reads and checks manifest.json of a step folder (format, version, every field, the step against the folder name). */
export function readManifest(dir: string): CheckpointManifest {
  if (typeof dir !== 'string' || dir === '') invalidArgument('readManifest', `'dir' must be a step folder (a non-empty string); received ${String(dir)}`);
  return readManifestAt(dir, realFolder(dir, `checkpoint ${dir}`));
}

/** Every file of the manifest inside the folder, a regular file with its recorded size. */
function checkFiles(dir: string, real: string, manifest: CheckpointManifest): void {
  for (const [file, rec] of Object.entries(manifest.files)) checkFileSize(dir, real, file, rec, manifest);
}

/**
 * Resolves a path to a checkpoint: a step folder (it has a manifest.json) as it is, a root through
 * findLatest(). `checkFiles` (default true) also checks a step folder's files and sizes.
 */
export function locateCheckpoint(path: string, options: { checkFiles?: boolean } = {}): Located {
  options = checkOptions(options, 'locateCheckpoint', { checkFiles: true });
  if (typeof path !== 'string' || path === '') invalidArgument('loadCheckpoint', `'path' must be a checkpoint folder (a non-empty string); received ${String(path)}`);
  const real = realFolder(path, `checkpoint ${path}`);
  if (entryExists(real, MANIFEST_FILE)) {
    const manifest = readManifestAt(path, real);
    if (options.checkFiles ?? true) checkFiles(path, real, manifest);
    return { dir: path, real, manifest, skipped: [] };
  }
  const { found, skipped } = findLatest(path, real);
  if (!found) {
    const why = skipped.length ? `; passed over: ${skipped.map((s) => s.reason).join('; ')}` : '';
    ckptError(path, `no committed checkpoint here (no ${MANIFEST_FILE}, no '${LATEST_FILE}', no step-* folder with a valid manifest and all its files)${why}`);
  }
  return found;
}

/** Resolves a root (via `latest`) or a step folder to a step folder. */
export function resolveCheckpointDir(path: string): string {
  return locateCheckpoint(path).dir;
}

export class CheckpointReader implements Disposable {
  readonly dir: string;
  readonly manifest: CheckpointManifest;
  readonly verify: boolean;
  readonly rank: number;
  readonly size: number;
  /** Newer checkpoints of the root passed over because they failed verification (empty for a step folder). */
  readonly skipped: readonly SkippedCheckpoint[];
  /** The folder's real path: every file read lies inside it. */
  private readonly real: string;
  private readonly open = new Map<string, SafetensorsFile>();
  private readonly verified = new Set<string>();

  /** @internal use loadCheckpoint() */
  constructor(dir: string, manifest: CheckpointManifest, options: LoadOptions, located?: { real: string; skipped: readonly SkippedCheckpoint[] }) {
    this.dir = dir;
    this.manifest = manifest;
    this.verify = options.verify ?? true;
    this.rank = options.comm?.rank ?? 0;
    this.size = options.comm?.size ?? 1;
    this.real = located?.real ?? realFolder(dir, `checkpoint ${dir}`);
    this.skipped = located?.skipped ?? [];
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

  /** The resolved path of a listed file: inside the folder, a regular file of its recorded size. */
  private pathOf(file: string): string {
    if (typeof file !== 'string' || !Object.hasOwn(this.manifest.files, file)) ckptError(this.dir, `${String(file)} is not listed in ${MANIFEST_FILE}`);
    return checkFileSize(this.dir, this.real, file, this.manifest.files[file] as ManifestFile, this.manifest);
  }

  /**
   * The SHA-256 check of one file (once per reader): one pass over its bytes, as loading does when
   * verify is on. Throws naming the file and the damaged tensors.
   */
  verifyFile(file: string): void {
    if (this.verified.has(file)) return;
    const path = this.pathOf(file);
    const rec = this.manifest.files[file] as ManifestFile;
    const { fd } = openRegular(path, { what: `checkpoint ${this.dir}: ${file}` });
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
      ckptError(this.dir, `${file} fails its SHA-256 check (manifest ${rec.sha256.slice(0, 16)}…, file ${got.slice(0, 16)}…): ${this.locateDamage(file, path)}`);
    }
    this.verified.add(file);
  }

  /**
   * Everything about one file: its SHA-256, its header (readable, holding exactly the tensors the
   * manifest puts there, with their dtypes and shapes) and every tensor's own SHA-256, in one read
   * (two hashes per byte: about twice the CPU of verifyFile()).
   */
  auditFile(file: string): void {
    const path = this.pathOf(file);
    const rec = this.manifest.files[file] as ManifestFile;
    let f: SafetensorsFile;
    try {
      f = SafetensorsFile.open(path);
    } catch (e) {
      ckptError(this.dir, `${file}: its header cannot be read (${(e as Error).message})`);
    }
    try {
      const problems: string[] = [];
      const listed = Object.entries(this.manifest.tensors).filter(([, t]) => t.file === file);
      for (const [n, t] of listed) {
        if (!f.has(n)) problems.push(`tensor '${n}' is missing from its header`);
        else if (f.info(n).dtype !== t.dtype || f.info(n).shape.join() !== t.shape.join()) {
          problems.push(`tensor '${n}' is ${f.info(n).dtype}[${f.info(n).shape}] in its header but ${t.dtype}[${t.shape}] in ${MANIFEST_FILE}`);
        }
      }
      const extra = f.names.filter((n) => !listed.some(([m]) => m === n));
      if (extra.length) problems.push(`its header holds ${extra.map((n) => `'${n}'`).slice(0, 5).join(', ')}, which ${MANIFEST_FILE} does not put there`);
      // One pass: the whole file's hash, and each tensor's over its byte range.
      const fileHash = createHash('sha256');
      const ranges = [...f.tensors.values()].map((t) => ({ name: t.name, begin: f.dataStart + t.dataOffsets[0], end: f.dataStart + t.dataOffsets[1], hash: createHash('sha256') }));
      const chunk = Buffer.alloc(Math.min(8 << 20, Math.max(f.size, 1)));
      let next = 0;
      for (let pos = 0; pos < f.size; ) {
        const n = f.readAt(chunk, pos);
        const part = chunk.subarray(0, n);
        fileHash.update(part);
        for (let i = next; i < ranges.length; i++) {
          const r = ranges[i] as (typeof ranges)[number];
          if (r.begin >= pos + n) break;
          r.hash.update(part.subarray(Math.max(r.begin - pos, 0), Math.min(r.end - pos, n)));
          if (r.end <= pos + n) next = i + 1;
        }
        pos += n;
      }
      const badTensors = ranges.filter((r) => Object.hasOwn(this.manifest.tensors, r.name) && this.manifest.tensors[r.name]?.file === file && r.hash.digest('hex') !== this.manifest.tensors[r.name]?.sha256).map((r) => `'${r.name}'`);
      const got = fileHash.digest('hex');
      if (got !== rec.sha256) {
        const where = badTensors.length ? `damaged tensor${badTensors.length > 1 ? 's' : ''} ${badTensors.join(', ')}` : 'the damage is in its header (every tensor matches its checksum)';
        problems.unshift(`fails its SHA-256 check (manifest ${rec.sha256.slice(0, 16)}…, file ${got.slice(0, 16)}…): ${where}`);
      } else if (badTensors.length) {
        problems.push(`tensor${badTensors.length > 1 ? 's' : ''} ${badTensors.join(', ')} differ${badTensors.length > 1 ? '' : 's'} from ${badTensors.length > 1 ? 'their' : 'its'} SHA-256 in ${MANIFEST_FILE} although the file matches its own`);
      }
      if (problems.length) ckptError(this.dir, `${file} ${problems.join('; ')}`);
      this.verified.add(file);
    } finally {
      f.close();
    }
  }

  /** Audits every file of the checkpoint (auditFile(): checksums of files and tensors, headers). */
  verifyAll(): void {
    for (const f of Object.keys(this.manifest.files)) this.auditFile(f);
  }

  /** Which tensors of a file no longer match their checksums (or that its header is damaged). */
  private locateDamage(file: string, path: string): string {
    let f: SafetensorsFile;
    try {
      f = SafetensorsFile.open(path);
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
      const path = this.pathOf(file);
      if (this.verify) this.verifyFile(file);
      f = SafetensorsFile.open(path);
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
    checkTensor(dst, 'CheckpointReader.into', 'dst');
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

/** A listed file resolved inside the folder, a regular file of its recorded size: its real path. */
function checkFileSize(dir: string, real: string, file: string, rec: ManifestFile, manifest: CheckpointManifest): string {
  const held = (): string => {
    const names = Object.entries(manifest.tensors).filter(([, t]) => t.file === file).map(([n]) => n);
    return names.length ? `; it holds ${names.length} tensor${names.length > 1 ? 's' : ''} such as '${names[0]}'` : '';
  };
  const path = resolveInside(real, file, `checkpoint ${dir}: ${file}`);
  if (path === undefined) ckptError(dir, `${file} is missing (${MANIFEST_FILE} lists it with ${rec.bytes} bytes${rec.rank === undefined ? '' : `, written by rank ${rec.rank}`}${held()})`);
  const { size } = statRegular(path, { what: `checkpoint ${dir}: ${file}` });
  if (size !== rec.bytes) ckptError(dir, `${file} has ${size} bytes but ${MANIFEST_FILE} records ${rec.bytes} (${size < rec.bytes ? 'truncated' : 'grown'}${held()})`);
  return path;
}

/**
 * Opens a checkpoint: `path` is a step folder or a root (its `latest`). Checks the manifest and that
 * every file exists with its recorded size; checksums are checked as files are opened (verify).
 */
export function loadCheckpoint(path: string, options: LoadOptions = {}): CheckpointReader {
  options = checkOptions(options, 'loadCheckpoint', { comm: true, verify: true });
  const located = locateCheckpoint(path);
  return new CheckpointReader(located.dir, located.manifest, options, located);
}
