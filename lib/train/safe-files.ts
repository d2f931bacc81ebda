/**
 * The one file layer every checkpoint read and write goes through (and `moe-ep train --config`):
 *
 * - names taken from a file (a manifest's `files` keys, `latest`) are plain file names: no
 *   separators, no `.`/`..`, no NUL;
 * - a file or folder found inside a folder must still lie inside it once symbolic links are resolved
 *   (realpath containment), so a planted link never leads a read outside;
 * - only regular files are opened for reading, after a stat (a FIFO would block the open, /dev/zero
 *   would never end), and files read whole are capped per kind before a byte is read;
 * - JSON read from disk is checked for nesting depth (and, for safetensors headers, array length)
 *   before JSON.parse, so a crafted header cannot take gigabytes;
 * - files are written under a fresh random name created exclusively (O_CREAT|O_EXCL|O_NOFOLLOW),
 *   fsynced and renamed into place: a planted link or file at the destination is replaced, never
 *   written through.
 *
 * Errors are CheckpointErrors unless the caller names another class; none of them reports anything
 * (size, content) about a file outside the folder.
 */
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import { basename, dirname, join, sep } from 'node:path';

import { CheckpointError } from '../errors.js';

type ErrorClass = new (message: string) => Error;

/** Caps on files read whole, in bytes (checked with a stat before reading). */
export const FILE_LIMITS = {
  /** `latest` holds one folder name. */
  latest: 4096,
  /** manifest.json: ~250 bytes per tensor; 256 MiB is a million tensors with room to spare. */
  manifest: 256 * 2 ** 20,
  /** `moe-ep train --config`. */
  config: 2 ** 20,
} as const;

/** Nesting allowed in manifest.json and config files (theirs is 3 to 5 levels). */
export const MAX_JSON_DEPTH = 64;

const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_NOFOLLOW, O_NONBLOCK } = fs.constants;

function kindOf(st: fs.Stats): string {
  if (st.isFile()) return 'a regular file';
  if (st.isDirectory()) return 'a directory';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  if (st.isSocket()) return 'a socket';
  if (st.isSymbolicLink()) return 'a symbolic link';
  return 'not a regular file';
}

/** `name` when it is a plain file name (what a manifest may list); otherwise a named error. */
export function checkPlainName(name: unknown, field: string, error: ErrorClass = CheckpointError): string {
  const bad = (why: string): never => {
    throw new error(`${field}: ${JSON.stringify(name)} is not a plain file name (${why})`);
  };
  if (typeof name !== 'string' || name === '') return bad('it must be a non-empty string');
  if (name === '.' || name === '..') return bad('it names a folder');
  if (/[/\\\0]/.test(name)) return bad('no path separators or NUL allowed');
  if (Buffer.byteLength(name) > 255) return bad('longer than 255 bytes');
  return name;
}

/** Whether the resolved path `p` lies inside the resolved folder `base` (or is base itself). */
export function isInside(base: string, p: string): boolean {
  return p === base || p.startsWith(base.endsWith(sep) ? base : base + sep);
}

/** realpath of a folder the caller pointed at; a named error when it is missing or not a folder. */
export function realFolder(path: string, what: string, error: ErrorClass = CheckpointError): string {
  let real: string;
  try {
    real = fs.realpathSync(path);
  } catch (e) {
    throw new error(`${what}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such folder' : (e as Error).message}`);
  }
  const st = fs.statSync(real);
  if (!st.isDirectory()) throw new error(`${what}: is ${kindOf(st)}, not a folder`);
  return real;
}

/**
 * The real path of entry `name` (a plain name) of the resolved folder `base`, which must lie inside
 * base after resolving links; undefined when there is no such entry (or a link to nothing).
 */
export function resolveInside(base: string, name: string, what: string, error: ErrorClass = CheckpointError): string | undefined {
  checkPlainName(name, what, error);
  let real: string;
  try {
    real = fs.realpathSync(join(base, name));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new error(`${what}: ${(e as Error).message}`);
  }
  // Nothing about the target (size, kind) is reported: it may be a file the reader must not see.
  if (!isInside(base, real) || real === base)
    throw new error(`${what}: resolves outside its folder through a symbolic link; checkpoint files must lie inside the checkpoint folder`);
  return real;
}

export interface RegularFileOptions {
  /** Names the file in errors. */
  what: string;
  /** Largest size accepted. */
  maxBytes?: number;
  error?: ErrorClass;
}

/** stat() of a regular file no larger than maxBytes; a named error otherwise. Follows links (pass a resolved path). */
export function statRegular(path: string, o: RegularFileOptions): fs.Stats {
  const error = o.error ?? CheckpointError;
  let st: fs.Stats;
  try {
    st = fs.statSync(path);
  } catch (e) {
    throw new error(`${o.what}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'is missing' : (e as Error).message}`);
  }
  if (!st.isFile()) throw new error(`${o.what}: is ${kindOf(st)}; only regular files are read`);
  if (o.maxBytes !== undefined && st.size > o.maxBytes)
    throw new error(`${o.what}: has ${st.size} bytes, more than the ${o.maxBytes} bytes allowed for this kind of file`);
  return st;
}

/**
 * Opens a regular file for reading: stat first (nothing else is opened: a FIFO would block, a
 * device might act on open), then open without following a link and without blocking, and check
 * that the open file is the one stat saw.
 */
export function openRegular(path: string, o: RegularFileOptions): { fd: number; size: number } {
  const error = o.error ?? CheckpointError;
  const st = statRegular(path, o);
  let fd: number;
  try {
    fd = fs.openSync(fs.realpathSync(path), O_RDONLY | O_NOFOLLOW | O_NONBLOCK);
  } catch (e) {
    throw new error(`${o.what}: cannot open: ${(e as Error).message}`);
  }
  const now = fs.fstatSync(fd);
  if (!now.isFile() || now.ino !== st.ino || now.dev !== st.dev || (o.maxBytes !== undefined && now.size > o.maxBytes)) {
    fs.closeSync(fd);
    throw new error(`${o.what}: changed while it was being opened`);
  }
  return { fd, size: now.size };
}

/** Reads exactly `out.length` bytes at `position`; onShort when the file ends first. */
export function readFully(fd: number, out: Uint8Array, position: number, onShort: () => never): void {
  let done = 0;
  while (done < out.length) {
    const n = fs.readSync(fd, out, done, out.length - done, position + done);
    if (n === 0) onShort();
    done += n;
  }
}

/** The whole of a regular file no larger than maxBytes (which a read file kind must set). */
export function readRegular(path: string, o: RegularFileOptions & { maxBytes: number }): Buffer {
  const { fd, size } = openRegular(path, o);
  try {
    const buf = Buffer.alloc(size);
    readFully(fd, buf, 0, () => {
      throw new (o.error ?? CheckpointError)(`${o.what}: shrank while it was being read`);
    });
    return buf;
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Checks JSON text's nesting depth (and array lengths) in one pass before JSON.parse, which would
 * otherwise build every level of a crafted `[[[[…` first. Strings are skipped, escapes included.
 */
export function checkJsonNesting(
  text: Uint8Array,
  limits: { maxDepth: number; maxArrayLength?: number },
  what: string,
  error: ErrorClass = CheckpointError,
): void {
  const OPEN_OBJ = 0x7b,
    CLOSE_OBJ = 0x7d,
    OPEN_ARR = 0x5b,
    CLOSE_ARR = 0x5d,
    QUOTE = 0x22,
    BACKSLASH = 0x5c,
    COMMA = 0x2c;
  const maxArray = limits.maxArrayLength ?? Infinity;
  // Per open container: -1 for an object, else the commas seen so far in the array.
  const stack: number[] = [];
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i] as number;
    if (inString) {
      if (c === BACKSLASH) i++;
      else if (c === QUOTE) inString = false;
      continue;
    }
    if (c === QUOTE) inString = true;
    else if (c === OPEN_OBJ || c === OPEN_ARR) {
      if (stack.length >= limits.maxDepth) throw new error(`${what}: JSON nested deeper than ${limits.maxDepth} levels`);
      stack.push(c === OPEN_OBJ ? -1 : 0);
    } else if (c === CLOSE_OBJ || c === CLOSE_ARR) stack.pop();
    else if (c === COMMA && stack.length && (stack[stack.length - 1] as number) >= 0) {
      const commas = (stack[stack.length - 1] as number) + 1;
      if (commas >= maxArray) throw new error(`${what}: a JSON array with more than ${maxArray} elements`);
      stack[stack.length - 1] = commas;
    }
  }
}

/** A capped regular file parsed as depth-bounded JSON. */
export function readJson(path: string, o: RegularFileOptions & { maxBytes: number; maxDepth?: number }): unknown {
  const error = o.error ?? CheckpointError;
  const buf = readRegular(path, o);
  checkJsonNesting(buf, { maxDepth: o.maxDepth ?? MAX_JSON_DEPTH }, o.what, error);
  try {
    return JSON.parse(buf.toString('utf8'));
  } catch (e) {
    throw new error(`${o.what}: not valid JSON (${(e as Error).message})`);
  }
}

/** A fresh name next to `path` for its temporary file: .<name>.tmp-<random>. */
export function temporaryName(path: string): string {
  return join(dirname(path), `.${basename(path)}.tmp-${randomBytes(6).toString('hex')}`);
}

/** Creates `path` for writing; fails if anything (a file, a link, a dangling link) is there. */
export function createExclusive(path: string): number {
  return fs.openSync(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, 0o644);
}

export function writeAll(fd: number, bytes: Uint8Array): void {
  let done = 0;
  while (done < bytes.length) done += fs.writeSync(fd, bytes, done, bytes.length - done);
}

/**
 * Writes `path` atomically: the content goes to a fresh temporary created exclusively next to it,
 * is fsynced (unless fsync is false) and renamed over `path` (which replaces a link there rather
 * than writing through it). `write` gets the temporary's fd; a string or bytes are written as is.
 */
export function writeFileAtomic(
  path: string,
  content: string | Uint8Array | ((fd: number) => void),
  options: { fsync?: boolean } = {},
): void {
  const tmp = temporaryName(path);
  let fd: number;
  try {
    fd = createExclusive(tmp);
  } catch (e) {
    throw restateFileError(path, e);
  }
  try {
    try {
      if (typeof content === 'function') content(fd);
      else writeAll(fd, typeof content === 'string' ? Buffer.from(content, 'utf8') : content);
      if (options.fsync ?? true) fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, path);
  } catch (e) {
    fs.rmSync(tmp, { force: true });
    throw restateFileError(path, e);
  }
}

/**
 * A file-system error (ENOSPC, EACCES, …) restated with the file the caller asked for, not the
 * temporary it failed on; the errno code stays on it. Other errors (a content callback's) pass as they are.
 */
export function restateFileError(path: string, e: unknown): unknown {
  const code = (e as NodeJS.ErrnoException).code;
  if (!(e instanceof Error) || typeof code !== 'string' || !/^E[A-Z]+$/.test(code)) return e;
  const why = code === 'ENOSPC' ? 'no space left on the device' : code === 'EACCES' || code === 'EPERM' ? 'permission denied' : code;
  return Object.assign(new Error(`cannot write ${path}: ${why} (${code})`, { cause: e }), { code });
}

/**
 * mkdir -p with a bounded walk: Node's own recursive mkdir loops forever where a missing folder's
 * parent exists but refuses children with ENOENT (/proc/x), so each missing folder is made in turn,
 * from the deepest one that exists; a path component that is not a folder, or a folder the system
 * will not create, is refused naming `arg` of `op`.
 */
export function makeDirs(path: string, op: string, arg: string, errorClass: ErrorClass = CheckpointError): void {
  const missing: string[] = [];
  let at = path;
  for (;;) {
    let st: fs.Stats | undefined;
    try {
      st = fs.statSync(at);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      // ENOTDIR: a component above is a file, named when the walk reaches it.
      if (code !== 'ENOENT' && code !== 'ENOTDIR')
        throw new errorClass(`${op}: '${arg}' ${path}: cannot reach ${at} (${code ?? (e as Error).message})`);
    }
    if (st) {
      if (!st.isDirectory()) throw new errorClass(`${op}: '${arg}' ${path}: ${at} is not a folder`);
      break;
    }
    missing.push(at);
    const up = dirname(at);
    if (up === at) break;
    at = up;
  }
  for (const dir of missing.reverse()) {
    try {
      fs.mkdirSync(dir);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EEXIST' && fs.statSync(dir, { throwIfNoEntry: false })?.isDirectory()) continue; // made meanwhile (another rank)
      throw new errorClass(`${op}: '${arg}' ${path}: cannot create the folder ${dir} (${code ?? (e as Error).message})`);
    }
  }
}

/** fsync a directory (its entries: created, renamed, removed files) through a read-only fd. */
export function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/** Whether a name is a temporary of writeFileAtomic (leftovers of a crash, safe to delete). */
export function isTemporaryName(name: string): boolean {
  return /^\..+\.tmp-[0-9a-f]{12}$/.test(name);
}
