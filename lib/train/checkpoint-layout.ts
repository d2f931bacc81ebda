/**
 * How a checkpoint lies on disk, and how the committed ones of a root are found. Folder and file
 * names, the manifest (its types, the one place it is built, and its field-by-field validation on
 * reading), the check that every file it lists is there with its recorded size, and the search of
 * a root for its newest committed checkpoint (`latest`, step-N folders, folders moved aside by an
 * interrupted re-save). The whole format and its commit protocol: lib/train/checkpoint.ts, which
 * exports the public part of this module; the rest serves checkpoint-save.ts and checkpoint-load.ts.
 */
import * as fs from 'node:fs';
import { basename, join } from 'node:path';

import { type DType, DTYPES, dtypeSize } from '../dtype.js';
import { CheckpointError, invalidArgument, shown } from '../errors.js';
import { checkNonNegativeInt } from '../validate.js';
import {
  checkJsonNesting,
  checkPlainName,
  FILE_LIMITS,
  MAX_JSON_DEPTH,
  readJson,
  readRegular,
  realFolder,
  resolveInside,
  statRegular,
} from './safe-files.js';

// ------------------------------------------------------------------------- names and manifest types

export const CHECKPOINT_FORMAT = 'moe-ep-checkpoint';
export const CHECKPOINT_FORMAT_VERSION = 1;
export const MANIFEST_FILE = 'manifest.json';
export const REPLICATED_FILE = 'replicated.safetensors';
export const LATEST_FILE = 'latest';

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

const RESERVED = new Set(['format', 'formatVersion', 'step', 'createdAt', 'world', 'files', 'tensors']);

/** Folder name of a step: step-00000042 (sorts by name). */
export function stepDirName(step: number): string {
  checkStep(step, 'stepDirName');
  return `step-${String(step).padStart(8, '0')}`;
}

/** The largest step: 15 digits, what parseStepDir reads back (and below 2^53). */
export const MAX_STEP = 10 ** 15 - 1;

/** A checkpoint's step: an integer in [0, MAX_STEP], refused naming `op`'s 'step' otherwise. */
export function checkStep(step: unknown, op: string): number {
  checkNonNegativeInt(step, op, 'step');
  if ((step as number) > MAX_STEP)
    invalidArgument(op, `'step' = ${String(step)} is above ${MAX_STEP}, the largest step a step folder's name is read back with`);
  return step as number;
}

/** A step folder's name (step-N): its step, else undefined. */
export function parseStepDir(name: string): number | undefined {
  const m = /^step-(\d{1,15})$/.exec(name);
  return m ? Number(m[1]) : undefined;
}

/** A committed folder moved aside by a re-save of its step (.old-step-N-<hex>): its step, else undefined. */
export function parseAsideDir(name: string): number | undefined {
  const m = /^\.old-step-(\d{1,15})-[0-9a-f]+$/.exec(name);
  return m ? Number(m[1]) : undefined;
}

/** Throws a CheckpointError naming the folder or file (`where`). */
export function ckptError(where: string, message: string): never {
  throw new CheckpointError(`checkpoint ${where}: ${message}`);
}

/** Whether `name` has an entry in `dir` (a link counts, even a dangling one). */
export function entryExists(dir: string, name: string): boolean {
  try {
    fs.lstatSync(join(dir, name));
    return true;
  } catch {
    return false;
  }
}

// ------------------------------------------------------------------- building and reading manifests

/** A file as written: its size and SHA-256, the rank that wrote it (sharded files) and each tensor's record. */
export interface FileRecord {
  file: string;
  bytes: number;
  sha256: string;
  rank?: number;
  tensors: Record<string, { dtype: DType; shape: number[]; sha256: string }>;
}

/** A checkpoint root or folder argument: a non-empty path string (null gave [] or a raw ENOENT). */
export function checkRootPath(root: unknown, op: string, arg = 'root'): string {
  if (typeof root !== 'string' || root === '' || root.includes('\0'))
    invalidArgument(op, `'${arg}' must be a folder path (a non-empty string); received ${shown(root)}`);
  return root;
}

/** Refuses caller extras that would overwrite the manifest's own fields. */
export function checkManifestExtras(extras: ManifestExtras, op: string): void {
  // A string or an array would be spread into the manifest key by key ("0": …).
  if (extras === null || typeof extras !== 'object' || Array.isArray(extras))
    invalidArgument(
      op,
      `'manifestExtras' must be an object of JSON values; received ${Array.isArray(extras) ? 'an array' : typeof extras}`,
    );
  for (const k of Object.keys(extras)) if (RESERVED.has(k)) invalidArgument(op, `manifestExtras.${k} is reserved for the manifest itself`);
  // Before any file is written: a cycle or a BigInt would otherwise fail only at the manifest.
  try {
    JSON.stringify(extras);
  } catch (e) {
    invalidArgument(op, `'manifestExtras' must be JSON values: ${(e as Error).message}`);
  }
}

/**
 * The manifest of a checkpoint: the caller's extras, the format, the step, the world size, and
 * every file written with its tensors. The one place a manifest is built (saveCheckpoint's rank 0,
 * writeCheckpoint); a tensor name written to two files is refused.
 */
export function buildManifest(extras: ManifestExtras, step: number, worldSize: number, files: readonly FileRecord[]): CheckpointManifest {
  const manifest: CheckpointManifest = {
    ...extras,
    format: CHECKPOINT_FORMAT,
    formatVersion: CHECKPOINT_FORMAT_VERSION,
    step,
    createdAt: new Date().toISOString(),
    world: { size: worldSize },
    files: {},
    // No inherited names: a tensor may be called constructor or __proto__ (assigned into a plain
    // object, '__proto__' would set its prototype and the tensor would vanish from the manifest).
    tensors: Object.create(null) as CheckpointManifest['tensors'],
  };
  for (const f of files) {
    manifest.files[f.file] = { bytes: f.bytes, sha256: f.sha256, ...(f.rank === undefined ? {} : { rank: f.rank }) };
    for (const [n, t] of Object.entries(f.tensors)) {
      const prev = Object.hasOwn(manifest.tensors, n) ? manifest.tensors[n] : undefined;
      if (prev)
        throw new CheckpointError(
          `tensor '${n}' is written by both ${prev.file} and ${f.file}; sharded names must be distinct across ranks and from the replicated ones`,
        );
      manifest.tensors[n] = { file: f.file, dtype: t.dtype, shape: t.shape, sha256: t.sha256 };
    }
  }
  return manifest;
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
  if (!isObject(m) || m['format'] !== CHECKPOINT_FORMAT)
    ckptError(dir, `${MANIFEST_FILE} is not a moe-ep checkpoint manifest (format ${show(isObject(m) ? m['format'] : m)})`);
  const version = m['formatVersion'];
  if (version !== CHECKPOINT_FORMAT_VERSION) {
    ckptError(
      dir,
      `${MANIFEST_FILE} has format version ${show(version)}; this moe-ep reads version ${CHECKPOINT_FORMAT_VERSION}${typeof version === 'number' && version > CHECKPOINT_FORMAT_VERSION ? ' (written by a newer moe-ep: upgrade)' : ''}`,
    );
  }
  if (!nonNegativeInt(m['step'])) bad('step', 'a non-negative integer', m['step']);
  if (typeof m['createdAt'] !== 'string' || Number.isNaN(Date.parse(m['createdAt'])))
    bad('createdAt', 'an ISO date string', m['createdAt']);
  const world = m['world'];
  if (!isObject(world) || !Number.isSafeInteger(world['size']) || (world['size'] as number) < 1)
    bad('world.size', 'a positive integer', isObject(world) ? world['size'] : world);
  const worldSize = (world as { size: number }).size;
  const files = m['files'];
  if (!isObject(files)) bad('files', 'an object of file records', files);
  for (const [name, rec] of Object.entries(files as Record<string, unknown>)) {
    const f = `files[${JSON.stringify(name)}]`;
    checkPlainName(name, `checkpoint ${dir}: ${MANIFEST_FILE}: ${f}`);
    if (!isObject(rec)) bad(f, 'an object with bytes and sha256', rec);
    if (!nonNegativeInt(rec['bytes'])) bad(`${f}.bytes`, 'a non-negative integer', rec['bytes']);
    if (typeof rec['sha256'] !== 'string' || !HEX64.test(rec['sha256'])) bad(`${f}.sha256`, '64 hex digits', rec['sha256']);
    if (rec['rank'] !== undefined && !(nonNegativeInt(rec['rank']) && rec['rank'] < worldSize))
      bad(`${f}.rank`, `a rank below world.size ${worldSize}`, rec['rank']);
  }
  const tensors = m['tensors'];
  if (!isObject(tensors)) bad('tensors', 'an object of tensor records', tensors);
  for (const [name, t] of Object.entries(tensors as Record<string, unknown>)) {
    const f = `tensors[${JSON.stringify(name)}]`;
    if (name === '' || name === '__metadata__') bad(f, 'a tensor name', name);
    if (!isObject(t)) bad(f, 'an object with file, dtype, shape and sha256', t);
    const file = t['file'];
    if (typeof file !== 'string' || !Object.hasOwn(files as object, file))
      ckptError(dir, `${MANIFEST_FILE} puts tensor '${name}' in ${show(file)}, which it does not list under files`);
    if (!(DTYPES as readonly unknown[]).includes(t['dtype'])) bad(`${f}.dtype`, `one of ${DTYPES.join(', ')}`, t['dtype']);
    const shape = t['shape'];
    if (!Array.isArray(shape) || shape.length > MAX_TENSOR_RANK || !shape.every(nonNegativeInt))
      bad(`${f}.shape`, `an array of at most ${MAX_TENSOR_RANK} non-negative integers`, shape);
    const bytes = (shape as number[]).reduce((a, d) => a * d, dtypeSize[t['dtype'] as DType]);
    const fileBytes = ((files as Record<string, ManifestFile>)[file as string] as ManifestFile).bytes;
    if (bytes > fileBytes)
      ckptError(
        dir,
        `${MANIFEST_FILE}: ${f} is ${String(t['dtype'])}[${(shape as number[]).join(', ')}], ${bytes} bytes, but files[${JSON.stringify(file)}].bytes records ${fileBytes} for the whole file: one of the two is wrong`,
      );
    if (typeof t['sha256'] !== 'string' || !HEX64.test(t['sha256'])) bad(`${f}.sha256`, '64 hex digits', t['sha256']);
  }
  const ep = m['ep'];
  if (ep !== undefined) {
    if (!isObject(ep)) bad('ep', 'an object {size, expertsPerRank, numExperts}', ep);
    for (const k of ['size', 'expertsPerRank'] as const)
      if (!Number.isSafeInteger(ep[k]) || (ep[k] as number) < 1) bad(`ep.${k}`, 'a positive integer', ep[k]);
    const E = (ep['size'] as number) * (ep['expertsPerRank'] as number);
    if (ep['numExperts'] !== undefined && ep['numExperts'] !== E)
      bad('ep.numExperts', `ep.size × ep.expertsPerRank = ${E}`, ep['numExperts']);
  }
  return m as unknown as CheckpointManifest;
}

/**
 * The manifest text a save is about to commit, checked as readManifestAt() will read it back (size,
 * nesting, every field): a save must never commit a checkpoint its loader refuses, and a `keep`
 * that follows would then delete the good ones before it.
 */
export function checkManifestReadsBack(text: string, dir: string): void {
  const buf = Buffer.from(text, 'utf8');
  if (buf.length > FILE_LIMITS.manifest)
    ckptError(dir, `the manifest would be ${buf.length} bytes, above the ${FILE_LIMITS.manifest} a load reads (manifestExtras too large?)`);
  checkJsonNesting(buf, { maxDepth: MAX_JSON_DEPTH }, `checkpoint ${dir}: ${MANIFEST_FILE}`, CheckpointError);
  validateManifest(JSON.parse(text), dir);
}

/**
 * manifest.json of the step folder `dir` (real path `real`), read through the safe file layer and
 * validated; the step must agree with the folder's name (each of `names` that names a step).
 */
export function readManifestAt(dir: string, real: string, names: string[] = []): CheckpointManifest {
  const path = resolveInside(real, MANIFEST_FILE, `checkpoint ${dir}: ${MANIFEST_FILE}`);
  if (path === undefined)
    ckptError(dir, `cannot read ${MANIFEST_FILE}: it is missing (an interrupted save never has one; is this a step folder?)`);
  const m = validateManifest(readJson(path, { what: `checkpoint ${dir}: ${MANIFEST_FILE}`, maxBytes: FILE_LIMITS.manifest }), dir);
  for (const n of [...names, basename(dir), basename(real)]) {
    const named = parseStepDir(n) ?? parseAsideDir(n);
    if (named !== undefined && named !== m.step) ckptError(dir, `${MANIFEST_FILE} says step ${m.step} but its folder is named ${n}`);
  }
  return m;
}

/** Reads and checks manifest.json of a step folder (format, version, every field, the step against the folder name). */
export function readManifest(dir: string): CheckpointManifest {
  if (typeof dir !== 'string' || dir === '')
    invalidArgument('readManifest', `'dir' must be a step folder (a non-empty string); received ${String(dir)}`);
  return readManifestAt(dir, realFolder(dir, `checkpoint ${dir}`));
}

/** Every file of the manifest inside the folder, a regular file with its recorded size. */
export function checkFiles(dir: string, real: string, manifest: CheckpointManifest): void {
  for (const [file, rec] of Object.entries(manifest.files)) checkFileSize(dir, real, file, rec, manifest);
}

/** A listed file resolved inside the folder, a regular file of its recorded size: its real path. */
export function checkFileSize(dir: string, real: string, file: string, rec: ManifestFile, manifest: CheckpointManifest): string {
  const held = (): string => {
    const names = Object.entries(manifest.tensors)
      .filter(([, t]) => t.file === file)
      .map(([n]) => n);
    return names.length ? `; it holds ${names.length} tensor${names.length > 1 ? 's' : ''} such as '${names[0]}'` : '';
  };
  const path = resolveInside(real, file, `checkpoint ${dir}: ${file}`);
  if (path === undefined)
    ckptError(
      dir,
      `${file} is missing (${MANIFEST_FILE} lists it with ${rec.bytes} bytes${rec.rank === undefined ? '' : `, written by rank ${rec.rank}`}${held()})`,
    );
  const { size } = statRegular(path, { what: `checkpoint ${dir}: ${file}` });
  if (size !== rec.bytes)
    ckptError(
      dir,
      `${file} has ${size} bytes but ${MANIFEST_FILE} records ${rec.bytes} (${size < rec.bytes ? 'truncated' : 'grown'}${held()})`,
    );
  return path;
}

// ------------------------------------------------------------------ committed checkpoints of a root

export interface SkippedCheckpoint {
  /** The folder (or `latest`) passed over. */
  dir: string;
  /** Why: the CheckpointError it gave. */
  reason: string;
}

export interface Candidate {
  /** Its entry in root: step-N, or .old-step-N-<hex> standing in for a missing step-N. */
  name: string;
  dir: string;
  step: number;
}

/** Entries of root that may hold committed checkpoints, newest step first (an aside after its step-N). */
export function candidates(root: string, rootReal: string): Candidate[] {
  let names: string[];
  try {
    names = fs.readdirSync(rootReal);
  } catch (e) {
    ckptError(root, `cannot list the checkpoint folder (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
  }
  const steps = new Set(names.filter((n) => parseStepDir(n) !== undefined));
  const out: Candidate[] = [];
  for (const n of names) {
    const step = parseStepDir(n);
    const aside = step === undefined ? parseAsideDir(n) : undefined;
    // An aside counts only while its step has no folder (a crash between the two renames of a re-save).
    if (step !== undefined) out.push({ name: n, dir: join(root, n), step });
    else if (aside !== undefined && !steps.has(stepDirName(aside))) out.push({ name: n, dir: join(root, n), step: aside });
  }
  return out.sort(
    (a, b) => b.step - a.step || Number(a.name.startsWith('.')) - Number(b.name.startsWith('.')) || (a.name < b.name ? -1 : 1),
  );
}

export interface Located {
  /** The folder as the caller named it (root joined with the step folder's name). */
  dir: string;
  /** Its real path: every file read must lie inside. */
  real: string;
  manifest: CheckpointManifest;
  skipped: SkippedCheckpoint[];
}

/** A candidate checked as committed: inside root, a folder, a valid manifest of its step, every file there with its size. */
export function verifyCandidate(rootReal: string, c: Candidate): Located {
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
export function findLatest(root: string, rootReal: string): { found: Located | null; skipped: SkippedCheckpoint[] } {
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
      const text = readRegular(path, { what: `checkpoint ${where}`, maxBytes: FILE_LIMITS.latest })
        .toString('utf8')
        .trim();
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
    if (!steps.includes(pointer))
      skipped.push({
        dir: join(root, LATEST_FILE),
        reason: `checkpoint ${join(root, LATEST_FILE)}: names ${stepDirName(pointer)}, which is not there`,
      });
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
  checkRootPath(root, 'listCheckpoints');
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
  checkRootPath(root, 'latestCheckpoint');
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
