/**
 * safetensors, exactly as the format defines it (https://github.com/huggingface/safetensors):
 *
 *   [8 bytes]  N, the header length, unsigned 64-bit little-endian
 *   [N bytes]  JSON: { "<name>": { "dtype": "F32", "shape": [..], "data_offsets": [begin, end] }, ...,
 *                      "__metadata__": { "<key>": "<string>" } }   (optional metadata, strings only)
 *              padded with spaces so that 8 + N is a multiple of 8
 *   [rest]     raw little-endian tensor data; offsets are relative to the start of this part,
 *              tensors lie back to back with no gaps, the last one ends at the end of the file
 *
 * bf16/f16 are stored as their 16-bit patterns, fp8 e4m3 as bytes: exactly what Tensor.toArray()
 * gives. The host is little-endian (x64), so TypedArray bytes are the file's bytes.
 *
 * The writer hashes what it writes (SHA-256 of the whole file and of each tensor's bytes) and
 * replaces the file atomically (a fresh temporary, fsynced, renamed into place). The reader opens
 * regular files only, parses the header with bounded nesting and validates it, then reads single
 * tensors by name with positioned reads, never loading the whole file (lib/train/safe-files.ts).
 */
import { createHash, type Hash } from 'node:crypto';
import * as fs from 'node:fs';
import { basename, dirname } from 'node:path';

import { type DType, DTYPES, dtypeSize } from '../dtype.js';
import { CheckpointError, invalidArgument, shown } from '../errors.js';
import { checkBoolean, checkOptions } from '../validate.js';
import { checkJsonNesting, openRegular, readFully, writeAll, writeFileAtomic } from './safe-files.js';

/** moe-ep dtype → safetensors dtype string. */
export const SAFETENSORS_DTYPE: Record<DType, string> = {
  f32: 'F32',
  bf16: 'BF16',
  f16: 'F16',
  i32: 'I32',
  i64: 'I64',
  u8: 'U8',
  fp8e4m3: 'F8_E4M3',
};
// No prototype: a file's dtype "toString" or "__proto__" must look up nothing.
const FROM_SAFETENSORS: Record<string, DType> = Object.assign(
  Object.create(null) as Record<string, DType>,
  Object.fromEntries(Object.entries(SAFETENSORS_DTYPE).map(([k, v]) => [v, k as DType])),
);
/**
 * Safetensors dtypes moe-ep does not read but can size: a file holding one (a checkpoint's F64 or
 * BOOL buffer beside the weights) still opens, its other tensors readable; that tensor is refused
 * by name when asked for. Sub-byte and unlisted dtypes still refuse the file.
 */
const FOREIGN_ITEM_BYTES: Readonly<Record<string, number>> = {
  BOOL: 1,
  I8: 1,
  I16: 2,
  U16: 2,
  U32: 4,
  U64: 8,
  F64: 8,
  F8_E5M2: 1,
  F8_E8M0: 1,
};

/** A tensor of a dtype moe-ep does not read (FOREIGN_ITEM_BYTES): its safetensors dtype and place. */
export interface ForeignTensorInfo {
  name: string;
  dtype: string;
  shape: number[];
  dataOffsets: [number, number];
  byteLength: number;
}

/** Largest header accepted (the reference implementation's limit is 100 MB). */
export const MAX_HEADER_BYTES = 100_000_000;
/**
 * A valid header nests 3 levels (the object, an entry, its shape) and its arrays are shapes and
 * offsets; checked before parsing, so a crafted 100 MB `[[[[…` is refused at once.
 */
const HEADER_MAX_DEPTH = 3;
/** The longest array a header holds: a shape of at most this many dimensions (the writer keeps to it too). */
const HEADER_MAX_ARRAY = 64;

/**
 * The first key written twice in one object of the header, at any depth (JSON.parse keeps the last
 * one silently: a tensor named twice, or an entry with two dtypes), or undefined. `text` is valid
 * JSON: strings are skipped with their escapes, and a string followed by ':' is a key of the
 * innermost open object.
 */
function repeatedKey(text: string): string | undefined {
  const open: (Set<string> | null)[] = []; // per open container: an object's keys, null for an array
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') {
      const start = i;
      for (i++; text[i] !== '"'; i++) if (text[i] === '\\') i++;
      let j = i + 1;
      while (text[j] === ' ' || text[j] === '\n' || text[j] === '\r' || text[j] === '\t') j++;
      const keys = open[open.length - 1];
      if (text[j] !== ':' || !keys) continue;
      const key = JSON.parse(text.slice(start, i + 1)) as string;
      if (keys.has(key)) return key;
      keys.add(key);
    } else if (c === '{') open.push(new Set());
    else if (c === '[') open.push(null);
    else if (c === '}' || c === ']') open.pop();
  }
  return undefined;
}

export interface SafetensorsEntry {
  name: string;
  /** A moe-ep dtype ('f32', 'bf16', ...) or the safetensors name ('F32', 'BF16', ...). */
  dtype: DType | string;
  shape: readonly number[];
  /** The raw little-endian values (numel · itemsize bytes). */
  data: ArrayBufferView;
}

export interface WrittenFile {
  path: string;
  /** Bytes in the file. */
  bytes: number;
  /** SHA-256 of the whole file, hex. */
  sha256: string;
  /** Per tensor: SHA-256 of its data bytes, hex, and its byte range in the data part. */
  tensors: Record<string, { dtype: DType; shape: number[]; dataOffsets: [number, number]; sha256: string }>;
}

export interface TensorInfo {
  name: string;
  dtype: DType;
  shape: number[];
  /** [begin, end) relative to the data part (which starts at dataStart in the file). */
  dataOffsets: [number, number];
  byteLength: number;
}

function fail(path: string, message: string, tensor?: string): never {
  throw new CheckpointError(`safetensors ${basename(path)}${tensor === undefined ? '' : ` tensor '${tensor}'`}: ${message} (${path})`);
}

/** The moe-ep dtype for a moe-ep or safetensors dtype name, or undefined. */
export function toDType(dtype: string): DType | undefined {
  if ((DTYPES as readonly string[]).includes(dtype)) return dtype as DType;
  return FROM_SAFETENSORS[dtype];
}

function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

function bytesOf(view: ArrayBufferView): Uint8Array {
  return new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
}

/** The header bytes (length prefix included) for tensors laid out back to back in the given order. */
function encodeHeader(
  path: string,
  entries: readonly SafetensorsEntry[],
  metadata?: Record<string, string>,
): { header: Buffer; infos: TensorInfo[] } {
  const json: Record<string, unknown> = Object.create(null) as Record<string, unknown>; // no inherited names: a tensor may be called constructor or __proto__
  if (!Array.isArray(entries as unknown)) invalidArgument('writeSafetensors', `'entries' must be an array of { name, dtype, shape, data }`);
  if (metadata !== undefined) {
    if (metadata === null || typeof metadata !== 'object' || Array.isArray(metadata))
      invalidArgument('writeSafetensors', `'metadata' must be an object of strings`);
    for (const [k, v] of Object.entries(metadata))
      if (typeof v !== 'string') fail(path, `metadata '${k}' must be a string; safetensors metadata holds strings only`);
    json['__metadata__'] = metadata;
  }
  const infos: TensorInfo[] = [];
  let offset = 0;
  for (const e of entries) {
    if (e === null || typeof e !== 'object')
      invalidArgument('writeSafetensors', `each entry must be { name, dtype, shape, data }; received ${e === null ? 'null' : typeof e}`);
    const name = e.name;
    if (typeof name !== 'string' || name === '' || name === '__metadata__') fail(path, `bad tensor name ${JSON.stringify(name)}`);
    if (Object.hasOwn(json, name)) fail(path, 'the name appears twice', name);
    const dtype = toDType(String(e.dtype));
    if (!dtype) fail(path, `unknown dtype ${JSON.stringify(e.dtype)}`, name);
    if (!Array.isArray(e.shape) || !e.shape.every((d) => Number.isSafeInteger(d) && d >= 0))
      fail(path, `bad shape ${JSON.stringify(e.shape)}`, name);
    // A file the reader would refuse is never written.
    if (e.shape.length > HEADER_MAX_ARRAY)
      fail(path, `a shape of ${e.shape.length} dimensions; at most ${HEADER_MAX_ARRAY} are read back`, name);
    const byteLength = numel(e.shape) * dtypeSize[dtype];
    if (!ArrayBuffer.isView(e.data)) fail(path, 'data must be a TypedArray or DataView', name);
    if (e.data.byteLength !== byteLength)
      fail(path, `data has ${e.data.byteLength} bytes but ${dtype}[${e.shape.join(',')}] needs ${byteLength}`, name);
    const info: TensorInfo = { name, dtype, shape: [...e.shape], dataOffsets: [offset, offset + byteLength], byteLength };
    json[name] = { dtype: SAFETENSORS_DTYPE[dtype], shape: info.shape, data_offsets: info.dataOffsets };
    infos.push(info);
    offset += byteLength;
  }
  let text = JSON.stringify(json);
  const textBytes = Buffer.byteLength(text, 'utf8');
  text += ' '.repeat((8 - (textBytes % 8)) % 8);
  const body = Buffer.from(text, 'utf8');
  const header = Buffer.alloc(8 + body.length);
  header.writeBigUInt64LE(BigInt(body.length), 0);
  body.copy(header, 8);
  return { header, infos };
}

/** A file path argument: a non-empty string without NUL (undefined gave a raw TypeError from node:path). */
function checkFilePath(path: unknown, op: string): string {
  if (typeof path !== 'string' || path === '' || path.includes('\0'))
    invalidArgument(op, `'path' must be a file path (a non-empty string); received ${shown(path)}`);
  return path;
}

/** The folder a file is to be written into exists, and the path is not itself a folder (raw ENOENT/EISDIR on a temporary name otherwise). */
function checkWritablePath(path: string, op: string): void {
  if (path.endsWith('/')) invalidArgument(op, `'path' ${path} ends in '/': a file path is needed`);
  const dir = dirname(path);
  let st: fs.Stats | undefined;
  try {
    st = fs.statSync(dir);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    invalidArgument(
      op,
      `'path' ${path}: its folder ${dir} ${code === 'ENOENT' ? 'does not exist' : `cannot be reached (${code ?? (e as Error).message})`}`,
    );
  }
  if (!st.isDirectory()) invalidArgument(op, `'path' ${path}: ${dir} is not a folder`);
  if (fs.lstatSync(path, { throwIfNoEntry: false })?.isDirectory()) invalidArgument(op, `'path' ${path} is a folder`);
}

/**
 * Writes a safetensors file (tensors in the order given, back to back). Returns its size and the
 * SHA-256 of the file and of every tensor. `fsync` (default true) flushes the file to disk before
 * returning. Replaces `path` atomically: a link at `path` is replaced, never written through.
 */
export function writeSafetensors(
  path: string,
  entries: readonly SafetensorsEntry[],
  metadata?: Record<string, string>,
  options: { fsync?: boolean } = {},
): WrittenFile {
  checkFilePath(path, 'writeSafetensors');
  options = checkOptions(options, 'writeSafetensors', { fsync: true });
  if (options.fsync !== undefined) checkBoolean(options.fsync, 'writeSafetensors', 'fsync');
  checkWritablePath(path, 'writeSafetensors');
  const { header, infos } = encodeHeader(path, entries, metadata);
  const fileHash = createHash('sha256');
  const tensors = Object.create(null) as WrittenFile['tensors']; // a tensor may be called __proto__
  writeFileAtomic(
    path,
    (fd) => {
      writeAll(fd, header);
      fileHash.update(header);
      entries.forEach((e, i) => {
        const info = infos[i] as TensorInfo;
        const bytes = bytesOf(e.data);
        writeAll(fd, bytes);
        fileHash.update(bytes);
        tensors[info.name] = {
          dtype: info.dtype,
          shape: info.shape,
          dataOffsets: info.dataOffsets,
          sha256: createHash('sha256').update(bytes).digest('hex'),
        };
      });
    },
    { fsync: options.fsync ?? true },
  );
  const bytes = header.length + (infos.length ? (infos[infos.length - 1] as TensorInfo).dataOffsets[1] : 0);
  return { path, bytes, sha256: fileHash.digest('hex'), tensors };
}

/**
 * An open safetensors file: the validated header, and single tensors read on demand by name.
 * close() (or `using`) releases the file descriptor.
 */
export class SafetensorsFile implements Disposable {
  readonly path: string;
  /** Bytes in the file. */
  readonly size: number;
  /** Where the data part starts (8 + header length). */
  readonly dataStart: number;
  readonly metadata: Record<string, string>;
  /** Tensors in file order. */
  readonly tensors: ReadonlyMap<string, TensorInfo>;
  /** Tensors of dtypes moe-ep does not read (FOREIGN_ITEM_BYTES), in file order. */
  readonly foreign: ReadonlyMap<string, ForeignTensorInfo>;
  #fd: number | null;

  private constructor(
    path: string,
    fd: number,
    size: number,
    dataStart: number,
    metadata: Record<string, string>,
    tensors: Map<string, TensorInfo>,
    foreign: Map<string, ForeignTensorInfo>,
  ) {
    this.foreign = foreign;
    this.path = path;
    this.#fd = fd;
    this.size = size;
    this.dataStart = dataStart;
    this.metadata = metadata;
    this.tensors = tensors;
  }

  /** Opens and validates the header (offsets in range, contiguous, sizes = numel·itemsize, known dtypes). */
  static open(path: string): SafetensorsFile {
    checkFilePath(path, 'SafetensorsFile.open');
    // Regular files only, stat before open: a FIFO would block the open, a device never end.
    const { fd, size } = openRegular(path, { what: `safetensors ${basename(path)} (${path})` });
    try {
      if (size < 8) fail(path, `the file has ${size} bytes; a safetensors file starts with an 8-byte header length`);
      const lenBuf = Buffer.alloc(8);
      fs.readSync(fd, lenBuf, 0, 8, 0);
      const n64 = lenBuf.readBigUInt64LE(0);
      if (n64 > BigInt(Math.min(MAX_HEADER_BYTES, size - 8))) {
        fail(
          path,
          `the header length ${n64} is larger than the file (${size} bytes) allows${n64 > BigInt(MAX_HEADER_BYTES) ? ` or the ${MAX_HEADER_BYTES}-byte limit` : ''}; truncated or not a safetensors file`,
        );
      }
      const n = Number(n64);
      const hbuf = Buffer.alloc(n);
      readFully(fd, hbuf, 8, () => fail(path, 'the file ended inside its header (truncated after it was opened?)'));
      checkJsonNesting(
        hbuf,
        { maxDepth: HEADER_MAX_DEPTH, maxArrayLength: HEADER_MAX_ARRAY },
        `safetensors ${basename(path)}: the header (${path})`,
      );
      let text: string;
      try {
        // Fatal: lenient decoding turns every invalid byte into U+FFFD, so two names could become one.
        text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(hbuf); // a BOM stays, and JSON.parse refuses it
      } catch {
        fail(path, 'the header is not valid UTF-8');
      }
      let json: unknown;
      try {
        json = JSON.parse(text);
      } catch (e) {
        fail(path, `the header is not valid JSON (${(e as Error).message})`);
      }
      if (json === null || typeof json !== 'object' || Array.isArray(json)) fail(path, 'the header is not a JSON object');
      const twice = repeatedKey(text);
      if (twice !== undefined) fail(path, `the header writes '${twice}' twice in one object (a reader would take either)`);
      const dataStart = 8 + n;
      const dataBytes = size - dataStart;
      let metadata: Record<string, string> = {};
      const list: TensorInfo[] = [];
      const foreign: ForeignTensorInfo[] = [];
      for (const [name, raw] of Object.entries(json as Record<string, unknown>)) {
        if (name === '__metadata__') {
          if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) fail(path, '__metadata__ must be an object of strings');
          for (const [k, v] of Object.entries(raw as Record<string, unknown>))
            if (typeof v !== 'string') fail(path, `__metadata__ '${k}' is not a string`);
          metadata = raw as Record<string, string>;
          continue;
        }
        const r = raw as { dtype?: unknown; shape?: unknown; data_offsets?: unknown } | null;
        if (r === null || typeof r !== 'object') fail(path, 'the header entry is not an object', name);
        const dtype = typeof r.dtype === 'string' ? FROM_SAFETENSORS[r.dtype] : undefined;
        const foreignBytes =
          typeof r.dtype === 'string' && Object.hasOwn(FOREIGN_ITEM_BYTES, r.dtype) ? FOREIGN_ITEM_BYTES[r.dtype] : undefined;
        if (!dtype && foreignBytes === undefined)
          fail(path, `unknown dtype ${JSON.stringify(r.dtype)} (moe-ep reads ${Object.values(SAFETENSORS_DTYPE).join(', ')})`, name);
        const shape = r.shape;
        if (!Array.isArray(shape) || !shape.every((d) => Number.isSafeInteger(d) && d >= 0))
          fail(path, `bad shape ${JSON.stringify(shape)}`, name);
        const off = r.data_offsets;
        if (!Array.isArray(off) || off.length !== 2 || !off.every((d) => Number.isSafeInteger(d) && d >= 0) || off[0] > off[1]) {
          fail(path, `bad data_offsets ${JSON.stringify(off)}`, name);
        }
        const [begin, end] = off as [number, number];
        const stDtype = dtype ? SAFETENSORS_DTYPE[dtype] : (r.dtype as string);
        const byteLength = numel(shape as number[]) * (dtype ? dtypeSize[dtype] : (foreignBytes as number));
        if (end - begin !== byteLength)
          fail(
            path,
            `data_offsets [${begin}, ${end}] span ${end - begin} bytes but ${stDtype}[${(shape as number[]).join(',')}] needs ${byteLength}`,
            name,
          );
        if (end > dataBytes)
          fail(path, `data_offsets [${begin}, ${end}] run past the end of the data (${dataBytes} bytes); the file is truncated`, name);
        if (dtype) list.push({ name, dtype, shape: shape as number[], dataOffsets: [begin, end], byteLength });
        else foreign.push({ name, dtype: stDtype, shape: shape as number[], dataOffsets: [begin, end], byteLength });
      }
      // Back to back in offset order: no overlap, no gap, and the last one ends at the end of the file.
      const byOffset = (a: { dataOffsets: [number, number] }, b: { dataOffsets: [number, number] }): number =>
        a.dataOffsets[0] - b.dataOffsets[0] || a.dataOffsets[1] - b.dataOffsets[1];
      const sorted = [...list, ...foreign].sort(byOffset);
      let at = 0;
      for (const t of sorted) {
        if (t.dataOffsets[0] < at)
          fail(path, `data_offsets [${t.dataOffsets.join(', ')}] overlap the previous tensor (which ends at ${at})`, t.name);
        if (t.dataOffsets[0] > at) fail(path, `data_offsets [${t.dataOffsets.join(', ')}] leave a gap after byte ${at}`, t.name);
        at = t.dataOffsets[1];
      }
      if (at !== dataBytes)
        fail(
          path,
          `the tensors end at data byte ${at} but the file holds ${dataBytes} data bytes (${at > dataBytes ? 'truncated' : 'trailing bytes'})`,
        );
      const readable = list.sort(byOffset);
      return new SafetensorsFile(
        path,
        fd,
        size,
        dataStart,
        metadata,
        new Map(readable.map((t) => [t.name, t])),
        new Map(foreign.sort(byOffset).map((t) => [t.name, t])),
      );
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
  }

  /** The tensors moe-ep reads; `allNames` adds those of foreign dtypes. */
  get names(): string[] {
    return [...this.tensors.keys()];
  }
  get allNames(): string[] {
    return [...this.tensors.keys(), ...this.foreign.keys()];
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    const other = this.foreign.get(name);
    if (other)
      fail(this.path, `dtype ${other.dtype}, which moe-ep does not read (it reads ${Object.values(SAFETENSORS_DTYPE).join(', ')})`, name);
    if (!t)
      fail(
        this.path,
        `no such tensor (the file holds ${this.tensors.size}: ${[...this.tensors.keys()].slice(0, 5).join(', ')}${this.tensors.size > 5 ? ', …' : ''})`,
        name,
      );
    return t;
  }

  /** One tensor's raw bytes, read from the file alone. */
  readBytes(name: string): Uint8Array {
    const t = this.info(name);
    const out = new Uint8Array(t.byteLength);
    readFully(this.fd, out, this.dataStart + t.dataOffsets[0], () =>
      fail(this.path, 'the file ended while reading (truncated after it was opened?)', name),
    );
    return out;
  }

  /**
   * Rows [first, first + count) of one tensor along its first dimension (a contiguous byte range,
   * e.g. some experts of a fused [E, …] tensor), read from the file alone.
   */
  readRows(name: string, first: number, count: number): Uint8Array {
    const t = this.info(name);
    const rows = t.shape[0];
    if (rows === undefined) invalidArgument('SafetensorsFile.readRows', `tensor '${name}' is a scalar: it has no rows`);
    if (!Number.isSafeInteger(first) || !Number.isSafeInteger(count) || first < 0 || count < 0 || first + count > rows)
      invalidArgument(
        'SafetensorsFile.readRows',
        `rows [${String(first)}, ${String(first)} + ${String(count)}) are not among the ${rows} rows of tensor '${name}'`,
      );
    const rowBytes = rows === 0 ? 0 : t.byteLength / rows;
    const out = new Uint8Array(rowBytes * count);
    readFully(this.fd, out, this.dataStart + t.dataOffsets[0] + first * rowBytes, () =>
      fail(this.path, 'the file ended while reading (truncated after it was opened?)', name),
    );
    return out;
  }

  /** One tensor: dtype, shape and raw bytes (the dtype's TypedArray over them via `storageView`). */
  read(name: string): { dtype: DType; shape: number[]; data: Uint8Array } {
    const t = this.info(name);
    return { dtype: t.dtype, shape: [...t.shape], data: this.readBytes(name) };
  }

  /** Reads up to `out.length` bytes (never past the end) at file offset `position`; the count read. */
  readAt(out: Uint8Array, position: number): number {
    if (!(out instanceof Uint8Array)) invalidArgument('SafetensorsFile.readAt', `'out' must be a Uint8Array`);
    if (!Number.isSafeInteger(position) || position < 0 || position > this.size)
      invalidArgument(
        'SafetensorsFile.readAt',
        `'position' must be an integer in [0, ${this.size}] (the file's size); received ${String(position)}`,
      );
    const n = fs.readSync(this.fd, out, 0, Math.min(out.length, this.size - position), position);
    if (n === 0 && position < this.size) fail(this.path, 'the file ended early (truncated after it was opened?)');
    return n;
  }

  /** Feeds the whole file through `hash` in chunks (for checksums). */
  hashInto(hash: Hash): Hash {
    const chunk = Buffer.alloc(Math.min(8 << 20, Math.max(this.size, 1)));
    for (let pos = 0; pos < this.size;) {
      const n = fs.readSync(this.fd, chunk, 0, Math.min(chunk.length, this.size - pos), pos);
      if (n === 0) fail(this.path, 'the file ended while hashing');
      hash.update(chunk.subarray(0, n));
      pos += n;
    }
    return hash;
  }

  private get fd(): number {
    if (this.#fd === null) fail(this.path, 'the file was closed');
    return this.#fd;
  }

  close(): void {
    if (this.#fd !== null) fs.closeSync(this.#fd);
    this.#fd = null;
  }
  [Symbol.dispose](): void {
    this.close();
  }
}

/** Reads every tensor of a file (in file order) and its metadata. */
export function readSafetensors(path: string): {
  metadata: Record<string, string>;
  tensors: { name: string; dtype: DType; shape: number[]; data: Uint8Array }[];
} {
  using f = SafetensorsFile.open(path);
  // The whole file, as promised: a tensor of a dtype moe-ep does not read is refused by name.
  for (const name of f.foreign.keys()) f.info(name);
  return { metadata: { ...f.metadata }, tensors: f.names.map((name) => ({ name, ...f.read(name) })) };
}
