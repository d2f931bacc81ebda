/**
 * Saving: every rank's file written into a temporary folder, the ranks' reports exchanged (the
 * barrier), then rank 0 commits: the manifest last, fsyncs, the renames into place, `latest`, and
 * pruning. The protocol and what a crash at each step leaves: lib/train/checkpoint.ts.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { basename, join } from 'node:path';

import { type DType } from '../dtype.js';
import { CheckpointError, InvalidArgumentError, invalidArgument } from '../errors.js';
import { type Communicator, checkOptionalCommunicator } from '../parallel/communicator.js';
import { allGatherJson } from '../parallel/gather-json.js';
import { Tensor } from '../tensor.js';
import { checkKeys, checkNonNegativeInt, checkPositiveInt, checkTensor } from '../validate.js';
import {
  buildManifest,
  candidates,
  checkManifestExtras,
  CHECKPOINT_FORMAT,
  type CheckpointManifest,
  checkManifestReadsBack,
  checkRootPath,
  checkStep,
  ckptError,
  entryExists,
  type FileRecord,
  LATEST_FILE,
  listCheckpoints,
  MANIFEST_FILE,
  type ManifestExtras,
  parseAsideDir,
  parseStepDir,
  REPLICATED_FILE,
  stepDirName,
  verifyCandidate,
} from './checkpoint-layout.js';
import { checkPlainName, fsyncDir, isTemporaryName, makeDirs, realFolder, writeFileAtomic } from './safe-files.js';
import { type SafetensorsEntry, writeSafetensors } from './safetensors.js';

/** A tensor given as raw bytes (for tools that never touch the addon). */
export interface RawTensor {
  dtype: DType;
  shape: readonly number[];
  data: ArrayBufferView;
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

/** A random suffix for folder names of one save or deletion. */
const nonce = (bytes = 4): string => randomBytes(bytes).toString('hex');

function entryOf(name: string, t: Tensor | RawTensor): SafetensorsEntry {
  if (t === null || typeof t !== 'object')
    invalidArgument(
      'saveCheckpoint',
      `tensor '${name}' must be a Tensor or { dtype, shape, data }; received ${t === null ? 'null' : typeof t}`,
    );
  if (Tensor.isTensor(t)) {
    checkTensor(t, 'saveCheckpoint', name);
    const c = t.isContiguous ? t : t.contiguous();
    try {
      return { name, dtype: t.dtype, shape: [...t.shape], data: c.toArray() };
    } finally {
      if (c !== t) c.dispose();
    }
  }
  return { name, dtype: t.dtype, shape: t.shape, data: t.data };
}

/** JSON from every rank, in rank order (a single process: its own). */
function exchange<T>(comm: Communicator | undefined, value: T): T[] {
  return comm ? allGatherJson(comm, value) : [value];
}

interface RankReport {
  ok: boolean;
  error?: string;
  files: FileRecord[];
}

/** Writes one safetensors file of a checkpoint into `dir`: its record for the manifest. */
function writeCheckpointFile(
  dir: string,
  file: string,
  tensors: Record<string, Tensor | RawTensor>,
  step: number,
  rank?: number,
): FileRecord {
  const entries = Object.entries(tensors).map(([n, t]) => entryOf(n, t));
  const w = writeSafetensors(join(dir, file), entries, {
    format: CHECKPOINT_FORMAT,
    step: String(step),
    ...(rank === undefined ? {} : { rank: String(rank) }),
  });
  const records = Object.create(null) as FileRecord['tensors']; // a tensor may be called __proto__
  for (const [n, i] of Object.entries(w.tensors)) records[n] = { dtype: i.dtype, shape: i.shape, sha256: i.sha256 };
  return { file, bytes: w.bytes, sha256: w.sha256, ...(rank === undefined ? {} : { rank }), tensors: records };
}

/** saveCheckpoint's own arguments (the step's agreement across ranks is checked after the exchange). */
function checkSaveArguments(root: string, options: SaveOptions, op: string): void {
  checkRootPath(root, op);
  checkKeys(options, op, { step: true, comm: true, replicated: true, sharded: true, manifestExtras: true, keep: true });
  // Maps of name → tensor (a number, or an array whose indices became names, saved nothing or "0").
  for (const key of ['replicated', 'sharded'] as const) {
    const m = options[key];
    if (m !== undefined && (m === null || typeof m !== 'object' || Array.isArray(m) || m instanceof Tensor))
      invalidArgument(
        op,
        `'${key}' must be an object of name → tensor; received ${m === null ? 'null' : Array.isArray(m) ? 'an array' : typeof m}`,
      );
  }
  checkStep(options.step, op);
  if (options.keep !== undefined) checkPositiveInt(options.keep, op, 'keep');
  checkManifestExtras(options.manifestExtras ?? {}, op);
}

/**
 * Saves one checkpoint (collective when `comm` has several ranks: every rank calls it with the same
 * step). Returns once the checkpoint is committed on every rank, or throws on every rank (naming the
 * rank that failed) with nothing committed.
 */
export function saveCheckpoint(root: string, options: SaveOptions): SavedCheckpoint {
  const op = 'saveCheckpoint';
  const t0 = Date.now();
  if (options === null || typeof options !== 'object') invalidArgument(op, `'options' must be an object with 'step'`);
  const { step } = options;
  // Checked before the rest: without a communicator there is no exchange to refuse the others through.
  const comm = checkOptionalCommunicator(options.comm, op);
  // Arguments are checked before the first exchange but refused after it, so that a rank given
  // bad ones fails every rank (naming it) instead of leaving its peers in a collective until the
  // timeout.
  let refused: Error | null = null;
  try {
    checkSaveArguments(root, options, op);
  } catch (e) {
    refused = e as Error;
  }
  const rank = comm?.rank ?? 0;
  const size = comm?.size ?? 1;

  // Agree on the step and on rank 0's nonce for the temporary folder.
  const hello = exchange(comm, {
    step: refused ? null : step, // (a refused step may not even be JSON: 1n)
    nonce: rank === 0 ? randomBytes(6).toString('hex') : '',
    refused: refused?.message ?? null,
  });
  if (refused) throw refused;
  const others = hello.map((h, r) => (h.refused === null ? null : `rank ${r}: ${h.refused}`)).filter((x) => x !== null);
  if (others.length) invalidArgument(op, `another rank's arguments were refused, nothing was written: ${others.join('; ')}`);
  const steps = new Set(hello.map((h) => h.step));
  if (steps.size !== 1)
    ckptError(root, `${op}: the ranks disagree on the step (${hello.map((h, r) => `rank ${r}: ${h.step}`).join(', ')})`);
  const extras = options.manifestExtras ?? {};
  const name = stepDirName(step);
  const tmp = join(root, `.tmp-${name}-${hello[0]!.nonce}`);
  const finalDir = join(root, name);

  let report: RankReport;
  let written = 0;
  try {
    makeDirs(root, op, 'root');
    try {
      fs.mkdirSync(tmp);
    } catch (e) {
      // Another rank of this save may have made it first; anything but that folder is refused.
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST' || size === 1 || !fs.lstatSync(tmp).isDirectory()) throw e;
    }
    const files: FileRecord[] = [];
    const write = (file: string, tensors: Record<string, Tensor | RawTensor>, fileRank?: number): void => {
      const f = writeCheckpointFile(tmp, file, tensors, step, fileRank);
      written += f.bytes;
      files.push(f);
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
    removeQuietly(tmp); // every rank: without a shared file system each has a folder of its own
    ckptError(finalDir, `${op} failed, nothing was committed: ${failed.join('; ')}`);
  }

  let status: { ok: boolean; error?: string; committed?: boolean } = { ok: true };
  if (rank === 0) {
    try {
      checkFilesArrived(tmp, reports);
      commitDir(
        root,
        tmp,
        finalDir,
        buildManifest(
          extras,
          step,
          size,
          reports.flatMap((r) => r.files),
        ),
      );
      const keep = options.keep;
      if (keep !== undefined) afterCommit(finalDir, `pruning to keep ${keep}`, () => pruneCheckpoints(root, keep, name));
    } catch (e) {
      status = { ok: false, error: (e as Error).message, committed: e instanceof AfterCommitError };
    }
  }
  const final = exchange(comm, status)[0]!;
  if (!final.ok) {
    removeQuietly(tmp);
    if (final.committed) throw new CheckpointError(`${op}: ${final.error}`);
    ckptError(finalDir, `${op}: rank 0 could not commit: ${final.error}`);
  }
  return { dir: finalDir, step, bytes: written, ms: Date.now() - t0 };
}

/**
 * Rank 0 commits what it sees: every rank's files must be in its temporary folder at the size the
 * rank wrote. Ranks that do not share the file system (node-local disks, a root that differs per
 * rank) would otherwise commit a checkpoint that never loads, and `keep` would prune the good ones.
 */
function checkFilesArrived(tmp: string, reports: RankReport[]): void {
  for (const [r, report] of reports.entries())
    for (const f of report.files) {
      let st: fs.Stats | undefined;
      try {
        st = fs.lstatSync(join(tmp, f.file));
      } catch {
        st = undefined;
      }
      if (!st?.isFile() || st.size !== f.bytes)
        throw new Error(
          `rank ${r}'s ${f.file} is not in ${tmp} as rank 0 sees it (${st ? `${st.size} bytes, not ${f.bytes}` : 'missing'}): every rank must see the checkpoint folder on one shared file system`,
        );
    }
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
  checkRootPath(root, 'writeCheckpoint');
  checkKeys(options, 'writeCheckpoint', { step: true, worldSize: true, files: true, manifestExtras: true, keep: true });
  const { step } = options;
  checkStep(step, 'writeCheckpoint');
  const worldSize = checkPositiveInt(options.worldSize, 'writeCheckpoint', 'worldSize');
  const extras = options.manifestExtras ?? {};
  checkManifestExtras(extras, 'writeCheckpoint');
  checkCheckpointFiles(options.files, worldSize);
  makeDirs(root, 'writeCheckpoint', 'root');
  const name = stepDirName(step);
  const tmp = join(root, `.tmp-${name}-${nonce(6)}`);
  try {
    fs.mkdirSync(tmp);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? (e as Error).message;
    throw new CheckpointError(`writeCheckpoint: 'root' ${root}: cannot write there (creating its temporary folder: ${code})`);
  }
  let bytes = 0;
  try {
    const files: FileRecord[] = [];
    for (const f of options.files) {
      const w = writeCheckpointFile(tmp, f.file, f.tensors(), step, f.rank);
      bytes += w.bytes;
      files.push(w);
    }
    fsyncDir(tmp);
    commitDir(root, tmp, join(root, name), buildManifest(extras, step, worldSize, files));
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
  const keep = options.keep;
  if (keep !== undefined) afterCommit(join(root, name), `pruning to keep ${keep}`, () => pruneCheckpoints(root, keep, name));
  return { dir: join(root, name), step, bytes, ms: Date.now() - t0 };
}

/**
 * writeCheckpoint's files, checked before anything is written (a checkpoint committed from them
 * replaces the step's old one, so one that could not load would lose it): an array of { file,
 * rank?, tensors() }, each file a distinct plain name ending in .safetensors (the manifest's own
 * name is taken), each rank an integer in [0, worldSize).
 */
function checkCheckpointFiles(files: unknown, worldSize: number): void {
  const op = 'writeCheckpoint';
  if (!Array.isArray(files)) invalidArgument(op, `'files' must be an array of { file, rank?, tensors }`);
  const seen = new Set<string>();
  for (const [i, f] of (files as unknown[]).entries()) {
    const at = `files[${i}]`;
    if (f === null || typeof f !== 'object') invalidArgument(op, `'${at}' must be an object { file, rank?, tensors }`);
    const { file, rank, tensors } = f as { file: unknown; rank?: unknown; tensors: unknown };
    checkPlainName(file as string, `${op}: ${at}.file`, InvalidArgumentError);
    if (!(file as string).endsWith('.safetensors'))
      invalidArgument(op, `'${at}.file' ${JSON.stringify(file)} must end in .safetensors (the checkpoint's tensor files)`);
    if (seen.has(file as string)) invalidArgument(op, `'${at}.file' ${JSON.stringify(file)} is given twice`);
    seen.add(file as string);
    if (rank !== undefined) checkNonNegativeInt(rank, op, `${at}.rank`, `(below worldSize ${worldSize})`);
    if (rank !== undefined && (rank as number) >= worldSize)
      invalidArgument(op, `'${at}.rank' = ${String(rank)} is not below worldSize ${worldSize}`);
    if (typeof tensors !== 'function') invalidArgument(op, `'${at}.tensors' must be a function returning the file's tensors`);
  }
}

/**
 * Rank 0's commit: manifest last, fsync, rename into place, fsync root, then `latest`. A step that
 * exists is moved aside first and discarded only once the new one is committed (see lib/train/checkpoint.ts).
 */
function commitDir(root: string, tmp: string, finalDir: string, manifest: CheckpointManifest): void {
  const text = `${JSON.stringify(manifest, null, 1)}\n`;
  checkManifestReadsBack(text, finalDir);
  writeFileAtomic(join(tmp, MANIFEST_FILE), text);
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
  afterCommit(finalDir, `updating ${LATEST_FILE} or removing the step's old copy`, () => {
    fsyncDir(root);
    writeLatest(root, name);
    // Only now is the old copy (and any an earlier crash left) garbage.
    for (const n of fs.readdirSync(root)) if (n.startsWith(`.old-${name}-`)) discard(root, n);
  });
}

/**
 * A failure once the step folder has its name: the checkpoint is committed and loads (a load finds
 * the newest step, not only `latest`), so the error says that rather than "nothing was committed".
 */
class AfterCommitError extends CheckpointError {}

function afterCommit(finalDir: string, what: string, work: () => void): void {
  try {
    work();
  } catch (e) {
    throw new AfterCommitError(
      `checkpoint ${finalDir}: committed (it loads), but ${what} failed: ${e instanceof Error ? e.message : String(e)}`,
    );
  }
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
  checkRootPath(root, 'pruneCheckpoints');
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

/**
 * Removes a failed save's temporary folder. Its own failure (root is a file: ENOTDIR) must not
 * replace the error that says why the save failed.
 */
function removeQuietly(tmp: string): void {
  try {
    fs.rmSync(tmp, { recursive: true, force: true });
  } catch {
    // nothing was made there
  }
}
