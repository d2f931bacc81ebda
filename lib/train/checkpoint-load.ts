/**
 * Loading: a step folder, or a root's newest committed checkpoint, opened as a CheckpointReader that
 * reads tensors by name onto any device, checking each file's SHA-256 as it first opens it. Every
 * file goes through lib/train/safe-files.ts. The format: lib/train/checkpoint.ts.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';

import { checkDeviceUsable, Device, type DeviceLike } from '../device.js';
import { type DType, storageView } from '../dtype.js';
import { CheckpointError, closestName, invalidArgument, shown } from '../errors.js';
import { type Communicator } from '../parallel/communicator.js';
import { Tensor } from '../tensor.js';
import { checkBoolean, checkDType, checkOptions, checkTensor } from '../validate.js';
import {
  checkFiles,
  checkFileSize,
  type CheckpointManifest,
  ckptError,
  entryExists,
  findLatest,
  LATEST_FILE,
  type Located,
  MANIFEST_FILE,
  type ManifestFile,
  type ManifestTensor,
  readManifestAt,
  type SkippedCheckpoint,
} from './checkpoint-layout.js';
import { openRegular, realFolder } from './safe-files.js';
import { SafetensorsFile } from './safetensors.js';

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

/**
 * Resolves a path to a checkpoint: a step folder (it has a manifest.json) as it is, a root through
 * findLatest(). `checkFiles` (default true) also checks a step folder's files and sizes.
 */
export function locateCheckpoint(path: string, options: { checkFiles?: boolean } = {}): Located {
  options = checkOptions(options, 'locateCheckpoint', { checkFiles: true });
  if (typeof path !== 'string' || path === '')
    invalidArgument('loadCheckpoint', `'path' must be a checkpoint folder (a non-empty string); received ${String(path)}`);
  const real = realFolder(path, `checkpoint ${path}`);
  if (entryExists(real, MANIFEST_FILE)) {
    const manifest = readManifestAt(path, real);
    if (options.checkFiles ?? true) checkFiles(path, real, manifest);
    return { dir: path, real, manifest, skipped: [] };
  }
  const { found, skipped } = findLatest(path, real);
  if (!found) {
    const why = skipped.length ? `; passed over: ${skipped.map((s) => s.reason).join('; ')}` : '';
    ckptError(
      path,
      `no committed checkpoint here (no ${MANIFEST_FILE}, no '${LATEST_FILE}', no step-* folder with a valid manifest and all its files)${why}`,
    );
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
  constructor(
    dir: string,
    manifest: CheckpointManifest,
    options: LoadOptions,
    located?: { real: string; skipped: readonly SkippedCheckpoint[] },
  ) {
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
      const typo = near.length ? undefined : closestName(name, names); // 'haed.weight' for 'head.weight'
      ckptError(
        this.dir,
        `no tensor '${name}' (it holds ${names.length} tensors${near.length ? `; similar: ${near.join(', ')}` : typo ? `; did you mean '${typo}'?` : names.length ? `, e.g. ${names.slice(0, 3).join(', ')}` : ''})`,
      );
    }
    return t;
  }

  /** The resolved path of a listed file: inside the folder, a regular file of its recorded size. */
  private pathOf(file: string): string {
    if (typeof file !== 'string' || !Object.hasOwn(this.manifest.files, file))
      ckptError(this.dir, `${String(file)} is not listed in ${MANIFEST_FILE}`);
    return checkFileSize(this.dir, this.real, file, this.manifest.files[file] as ManifestFile, this.manifest);
  }

  /** One listed file present inside the folder as a regular file of its recorded size, without reading it. */
  checkFile(file: string): void {
    this.pathOf(file);
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
      for (let pos = 0; ;) {
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
      ckptError(
        this.dir,
        `${file} fails its SHA-256 check (manifest ${rec.sha256.slice(0, 16)}…, file ${got.slice(0, 16)}…): ${this.locateDamage(file, path)}`,
      );
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
        const other = f.foreign.get(n);
        if (other)
          problems.push(`tensor '${n}' is ${other.dtype}[${other.shape}] in its header but ${t.dtype}[${t.shape}] in ${MANIFEST_FILE}`);
        else if (!f.has(n)) problems.push(`tensor '${n}' is missing from its header`);
        else if (f.info(n).dtype !== t.dtype || f.info(n).shape.join() !== t.shape.join()) {
          problems.push(
            `tensor '${n}' is ${f.info(n).dtype}[${f.info(n).shape}] in its header but ${t.dtype}[${t.shape}] in ${MANIFEST_FILE}`,
          );
        }
      }
      const extra = f.allNames.filter((n) => !listed.some(([m]) => m === n));
      if (extra.length)
        problems.push(
          `its header holds ${extra
            .map((n) => `'${n}'`)
            .slice(0, 5)
            .join(', ')}, which ${MANIFEST_FILE} does not put there`,
        );
      // One pass: the whole file's hash, and each tensor's over its byte range.
      const fileHash = createHash('sha256');
      const ranges = [...f.tensors.values()].map((t) => ({
        name: t.name,
        begin: f.dataStart + t.dataOffsets[0],
        end: f.dataStart + t.dataOffsets[1],
        hash: createHash('sha256'),
      }));
      const chunk = Buffer.alloc(Math.min(8 << 20, Math.max(f.size, 1)));
      let next = 0;
      for (let pos = 0; pos < f.size;) {
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
      const badTensors = ranges
        .filter(
          (r) =>
            Object.hasOwn(this.manifest.tensors, r.name) &&
            this.manifest.tensors[r.name]?.file === file &&
            r.hash.digest('hex') !== this.manifest.tensors[r.name]?.sha256,
        )
        .map((r) => `'${r.name}'`);
      const got = fileHash.digest('hex');
      if (got !== rec.sha256) {
        const where = badTensors.length
          ? `damaged tensor${badTensors.length > 1 ? 's' : ''} ${badTensors.join(', ')}`
          : 'the damage is in its header (every tensor matches its checksum)';
        problems.unshift(`fails its SHA-256 check (manifest ${rec.sha256.slice(0, 16)}…, file ${got.slice(0, 16)}…): ${where}`);
      } else if (badTensors.length) {
        problems.push(
          `tensor${badTensors.length > 1 ? 's' : ''} ${badTensors.join(', ')} differ${badTensors.length > 1 ? '' : 's'} from ${badTensors.length > 1 ? 'their' : 'its'} SHA-256 in ${MANIFEST_FILE} although the file matches its own`,
        );
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
          bad.push(`${n} (${f.foreign.has(n) ? `${f.foreign.get(n)?.dtype} in the header` : 'missing from the header'})`);
          continue;
        }
        if (createHash('sha256').update(f.readBytes(n)).digest('hex') !== t.sha256) bad.push(n);
      }
      return bad.length
        ? `damaged tensor${bad.length > 1 ? 's' : ''} ${bad.map((b) => `'${b}'`).join(', ')}`
        : 'the damage is in its header (every tensor matches its checksum)';
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
      const other = f.foreign.get(name);
      if (other) ckptError(this.dir, `${t.file} holds tensor '${name}' as ${other.dtype} but ${MANIFEST_FILE} says ${t.dtype}`);
      if (!f.has(name)) ckptError(this.dir, `${t.file} does not hold tensor '${name}' although ${MANIFEST_FILE} says so`);
      r = f.read(name);
    } catch (e) {
      if (e instanceof CheckpointError && !e.message.includes(`'${name}'`))
        throw new CheckpointError(`${e.message} [while reading tensor '${name}']`);
      throw e;
    }
    if (r.dtype !== t.dtype || r.shape.join() !== t.shape.join()) {
      ckptError(this.dir, `tensor '${name}' in ${t.file} is ${r.dtype}[${r.shape}] but ${MANIFEST_FILE} records ${t.dtype}[${t.shape}]`);
    }
    return r;
  }

  /** One tensor on `device` (default: the default device), converted to `dtype` when given. */
  get(name: string, options: GetOptions = {}): Tensor {
    const op = 'CheckpointReader.get';
    options = checkOptions(options, op, { device: true, dtype: true });
    // Checked here, before the read, so the errors name this call (not the cast or fromArray inside).
    const device = options.device === undefined ? undefined : Device.parse(options.device, op);
    if (device) checkDeviceUsable(device, op);
    if (options.dtype !== undefined) {
      checkDType(options.dtype, op);
      this.checkReadableAs(name, options.dtype);
    }
    const r = this.getRaw(name);
    const base = Tensor.fromArray(storageView(r.dtype, r.data.buffer as ArrayBuffer), {
      dtype: r.dtype,
      shape: r.shape,
      ...(device === undefined ? {} : { device }),
    });
    if (options.dtype === undefined || options.dtype === r.dtype) return base;
    try {
      return base.cast(options.dtype);
    } finally {
      base.dispose();
    }
  }

  /**
   * A cast between the stored dtype and `dtype` that keeps the values' kind: integers into floats (a
   * weight stored as i32) or floats into integers would load as numbers of another meaning.
   */
  private checkReadableAs(name: string, dtype: DType): void {
    const stored = this.info(name).dtype;
    const integer = (d: DType): boolean => d === 'i32' || d === 'i64' || d === 'u8';
    if (integer(stored) !== integer(dtype))
      ckptError(
        this.dir,
        `tensor '${name}' is stored as ${stored} and cannot be read as ${dtype} (${integer(stored) ? 'integers' : 'floats'} where ${integer(dtype) ? 'integers' : 'floats'} are expected)`,
      );
  }

  /** Copies a stored tensor into `dst` (same shape; dtype and device may differ; integers stay integers, floats floats). */
  into(name: string, dst: Tensor): Tensor {
    const t = this.info(name);
    checkTensor(dst, 'CheckpointReader.into', 'dst');
    if (t.shape.join() !== dst.shape.join()) ckptError(this.dir, `tensor '${name}' is [${t.shape}] but the destination is [${dst.shape}]`);
    this.checkReadableAs(name, dst.dtype);
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

/**
 * Opens a checkpoint: `path` is a step folder or a root (its `latest`). Checks the manifest and that
 * every file exists with its recorded size; checksums are checked as files are opened (verify).
 */
export function loadCheckpoint(path: string, options: LoadOptions = {}): CheckpointReader {
  options = checkOptions(options, 'loadCheckpoint', { comm: true, verify: true });
  if (options.verify !== undefined) checkBoolean(options.verify, 'loadCheckpoint', 'verify');
  // Loading is not collective: only rank and size are read, so any { rank, size } will do.
  const comm = options.comm as unknown;
  if (comm !== undefined && comm !== null) {
    const { rank, size } = comm as { rank?: unknown; size?: unknown };
    if (
      !Number.isSafeInteger(size) ||
      (size as number) < 1 ||
      !Number.isSafeInteger(rank) ||
      (rank as number) < 0 ||
      (rank as number) >= (size as number)
    )
      invalidArgument(
        'loadCheckpoint',
        `'comm' must have an integer rank in [0, size); received rank ${shown(rank)} and size ${shown(size)}`,
      );
  }
  const located = locateCheckpoint(path);
  return new CheckpointReader(located.dir, located.manifest, options, located);
}
