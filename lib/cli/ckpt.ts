/**
 * `moe-ep ckpt inspect <dir> [--json] [--no-verify]`: the tensors (name, file, dtype, shape, bytes),
 * the EP layout and each file's status (OK, BAD, MISSING, SIZE): its checksum, its header against
 * the manifest and every tensor's checksum. Exit 1 when a file is not OK or a newer checkpoint of
 * the root was passed over (listed with the reason).
 * `moe-ep ckpt reshard <dir> --ep N --out <root> [--step S]`: rewrites the expert shards for EP size
 * N (experts by global index, optimizer moments with them), copies the replicated state, and commits
 * a checkpoint under <root> (step kept unless --step). Works on raw bytes: no addon, no GPU.
 */
import { CheckpointError } from '../errors.js';
import {
  type CheckpointManifest,
  CheckpointReader,
  loadCheckpoint,
  locateCheckpoint,
  type RawTensor,
  REPLICATED_FILE,
  writeCheckpoint,
} from '../train/checkpoint.js';
import { expertIndexOf } from '../train/moe-state.js';
import { helpTable } from '../train/config.js';
import { checkFlags, takeValueFlag, underFlag, UsageError } from './flags.js';
import { fmtBytes } from './format.js';

const inspectUsage = [
  'usage: moe-ep ckpt inspect <dir> [--json] [--no-verify]',
  '',
  "A checkpoint's step, format and expert-parallel layout, each file with its writing rank, size,",
  'SHA-256 and status (OK, BAD: damaged, MISSING, SIZE: truncated or grown), and each tensor with its',
  'file, dtype, shape and size. Exits 1 unless every file is OK.',
  '',
  ...helpTable(
    [
      ['<dir>', "a step folder (…/step-00000042) or a checkpoint root (its 'latest' is used)"],
      ['--json', "the manifest and each file's status as JSON"],
      ['--no-verify', 'skip reading the files for checksums (sizes are checked; status: unchecked)'],
      ['-h, --help', 'this help'],
    ],
    11,
  ),
].join('\n');
const reshardUsage = [
  'usage: moe-ep ckpt reshard <dir> --ep N --out <root> [--step S] [--keep K]',
  '',
  "Rewrites a checkpoint's expert shards for expert-parallel size N: experts by global index, their",
  'optimizer moments with them; the replicated state is copied. Works on the raw bytes (no addon, no',
  'GPU) and commits the result under <root> as a save would.',
  '',
  ...helpTable(
    [
      ['<dir>', "a step folder or a checkpoint root (its 'latest' is used)"],
      ['--ep N', 'the new expert-parallel size (divides the experts per layer)'],
      ['--out <root>', 'the checkpoint root to write (a new step folder in it)'],
      ['--step S', "the step to record (default: the source checkpoint's)"],
      ['--keep K', 'checkpoints kept in <root> (older ones are deleted; default: all)'],
      ['-h, --help', 'this help'],
    ],
    12,
  ),
].join('\n');
const usage = [
  'usage: moe-ep ckpt <command> ...',
  '',
  ...helpTable(
    [
      ['inspect <dir>', "a checkpoint's tensors, expert-parallel layout and per-file checksum status"],
      ['reshard <dir>', 'rewrite the expert shards for another expert-parallel size (offline)'],
    ],
    13,
  ),
  '',
  '`moe-ep ckpt <command> --help` describes each.',
].join('\n');

function integerFlag(v: string | undefined, name: string, min: number): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!/^\d+$/.test(v) || !Number.isSafeInteger(n) || n < min)
    throw new Error(`${name} must be ${min > 0 ? 'a positive' : 'a non-negative'} integer; received ${v}`);
  return n;
}

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => (r[c] ?? '').length)));
  return rows
    .map((r) =>
      r
        .map((cell, c) => (c === r.length - 1 ? cell : cell.padEnd(widths[c]!)))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}

/** The number of experts per MoE layer: from the manifest's EP layout, else from the tensor names. */
function numExpertsOf(m: CheckpointManifest): number {
  if (m.ep?.numExperts) return m.ep.numExperts;
  if (m.ep?.size && m.ep.expertsPerRank) return m.ep.size * m.ep.expertsPerRank;
  let max = -1;
  for (const n of Object.keys(m.tensors)) max = Math.max(max, expertIndexOf(n) ?? -1);
  if (max < 0) throw new CheckpointError('the checkpoint has no expert tensors (layers.*.experts.<e>.*) and no EP layout to reshard');
  return max + 1;
}

function inspect(args: string[]): number {
  if (args.includes('--help') || args.includes('-h')) {
    console.log(inspectUsage);
    return 0;
  }
  checkFlags(args, ['--json', '--no-verify'], 1, inspectUsage);
  const json = args.includes('--json');
  const verify = !args.includes('--no-verify');
  const [path] = args.filter((a) => !a.startsWith('--'));
  if (!path) throw new UsageError(`inspect needs a directory\n\n${inspectUsage}`);
  // Not loadCheckpoint(): it stops at the first missing or resized file; inspect reports each file.
  const located = locateCheckpoint(path, { checkFiles: false });
  const { dir, manifest: m } = located;
  const reader = new CheckpointReader(dir, m, { verify: true }, located);
  const status: Record<string, string> = {};
  for (const file of Object.keys(m.files)) {
    try {
      // Without --verify only each file's presence and size (a stat): its bytes stay unread.
      if (verify) reader.auditFile(file);
      else reader.checkFile(file);
      status[file] = verify ? 'OK' : 'unchecked';
    } catch (e) {
      const msg = (e as Error).message;
      const detail = msg.replace(/^checkpoint [^:]+: /, '');
      status[file] = detail.startsWith(`${file} is missing (`)
        ? 'MISSING'
        : detail.startsWith(`${file} has `) && / bytes but manifest/.test(detail)
          ? `SIZE: ${detail}`
          : `BAD: ${detail}`;
    }
  }
  const ok = Object.values(status).every((s) => s === 'OK' || s === 'unchecked') && located.skipped.length === 0;
  if (json) {
    console.log(
      JSON.stringify(
        {
          dir,
          step: m.step,
          formatVersion: m.formatVersion,
          ep: m.ep ?? null,
          world: m.world,
          skipped: located.skipped,
          files: Object.fromEntries(Object.entries(m.files).map(([f, r]) => [f, { ...r, status: status[f] }])),
          tensors: m.tensors,
        },
        null,
        2,
      ),
    );
    return ok ? 0 : 1;
  }
  const lines: string[] = [];
  for (const s of located.skipped) lines.push(`passed over ${s.dir}: ${s.reason}`);
  lines.push(`checkpoint ${dir}`);
  lines.push(`step ${m.step}, format ${m.format} v${m.formatVersion}, written ${m.createdAt} by ${m.world?.size ?? '?'} rank(s)`);
  if (m.ep)
    lines.push(
      `EP layout: size ${m.ep.size}, ${m.ep.expertsPerRank} experts per rank${m.ep.numExperts ? `, ${m.ep.numExperts} experts per layer` : ''}`,
    );
  else lines.push('EP layout: not recorded');
  for (const k of ['optimizer', 'data', 'rng'] as const) if (m[k] !== undefined) lines.push(`${k}: ${JSON.stringify(m[k])}`);
  lines.push('');
  const rows = [['file', 'rank', 'bytes', 'sha256', 'status']];
  for (const [f, r] of Object.entries(m.files))
    rows.push([f, r.rank === undefined ? '-' : String(r.rank), fmtBytes(r.bytes), `${r.sha256.slice(0, 16)}…`, status[f] ?? '?']);
  lines.push(table(rows));
  lines.push('');
  const trows = [['tensor', 'file', 'dtype', 'shape', 'bytes']];
  const bytesOf: Record<string, number> = { f32: 4, bf16: 2, f16: 2, i32: 4, i64: 8, u8: 1, fp8e4m3: 1 };
  let total = 0;
  for (const [n, t] of Object.entries(m.tensors)) {
    const b = t.shape.reduce((a, x) => a * x, 1) * (bytesOf[t.dtype] ?? 0);
    total += b;
    trows.push([n, t.file, t.dtype, `[${t.shape.join(', ')}]`, fmtBytes(b)]);
  }
  lines.push(table(trows));
  const verdict = !ok ? 'NOT all OK' : verify ? 'all OK' : 'all present with their sizes (checksums not read: --no-verify)';
  lines.push(`${Object.keys(m.tensors).length} tensors, ${fmtBytes(total)}; files ${verdict}`);
  console.log(lines.join('\n'));
  return ok ? 0 : 1;
}

function reshard(args: string[]): number {
  if (args.includes('--help') || args.includes('-h')) {
    console.log(reshardUsage);
    return 0;
  }
  const flag = (name: string): string | undefined => takeValueFlag(args, name, reshardUsage);
  const ep = integerFlag(flag('--ep'), '--ep', 1);
  const out = flag('--out');
  const stepArg = integerFlag(flag('--step'), '--step', 0);
  const keep = integerFlag(flag('--keep'), '--keep', 1);
  checkFlags(args, [], 1, reshardUsage); // what the flags above did not take
  const [path] = args.filter((a) => !a.startsWith('--'));
  if (!path || ep === undefined || out === undefined) {
    const missing = [!path && '<dir>', ep === undefined && '--ep N', out === undefined && '--out <root>'].filter(Boolean).join(', ');
    throw new UsageError(`reshard needs <dir>, --ep N and --out <root>; missing: ${missing}\n\n${reshardUsage}`);
  }
  const reader = loadCheckpoint(path, { verify: true });
  try {
    reader.verifyAll();
    const m = reader.manifest;
    const E = numExpertsOf(m);
    if (E % ep !== 0) throw new Error(`--ep ${ep} does not divide the ${E} experts per layer`);
    const per = E / ep;
    // The layout must describe the experts that are there: every index below E, none above.
    const held = new Set<number>();
    for (const [n, t] of Object.entries(m.tensors))
      if (m.files[t.file]?.rank !== undefined && expertIndexOf(n) !== undefined) held.add(expertIndexOf(n) as number);
    if (held.size !== E || Math.max(...held) !== E - 1) {
      throw new CheckpointError(
        `cannot reshard: the layout has ${E} experts per layer but the shards hold ${held.size} distinct expert indices (${held.size ? `${Math.min(...held)}…${Math.max(...held)}` : 'none'})`,
      );
    }
    const replicatedNames: string[] = [];
    const byRank: string[][] = Array.from({ length: ep }, () => []);
    for (const [n, t] of Object.entries(m.tensors)) {
      const sharded = m.files[t.file]?.rank !== undefined;
      if (!sharded) {
        replicatedNames.push(n);
        continue;
      }
      const e = expertIndexOf(n);
      if (e === undefined)
        throw new CheckpointError(
          `cannot reshard: sharded tensor '${n}' (in ${t.file}) has no global expert index in its name (layers.<i>.experts.<e>.…)`,
        );
      if (e >= E) throw new CheckpointError(`cannot reshard: tensor '${n}' has expert index ${e} but the layout has ${E} experts`);
      byRank[Math.floor(e / per)]!.push(n);
    }
    const raw = (names: string[]) => (): Record<string, RawTensor> => Object.fromEntries(names.map((n) => [n, reader.getRaw(n)]));
    const step = stepArg ?? m.step;
    const { format: _f, formatVersion: _v, step: _s, createdAt: _c, world: _w, files: _fi, tensors: _t, ...extras } = m;
    const saved = underFlag('--out', out, /^writeCheckpoint: 'root' /, () =>
      writeCheckpoint(out, {
        step,
        worldSize: ep,
        files: [
          ...byRank.map((names, r) => ({ file: `rank-${r}.safetensors`, rank: r, tensors: raw(names) })),
          { file: REPLICATED_FILE, tensors: raw(replicatedNames) },
        ],
        manifestExtras: {
          ...extras,
          ep: { size: ep, expertsPerRank: per, numExperts: E },
          reshardedFrom: { dir: reader.dir, ep: m.ep ?? null },
        },
        ...(keep === undefined ? {} : { keep }),
      }),
    );
    console.log(
      `resharded ${reader.dir} (EP ${m.ep?.size ?? m.world.size}) → ${saved.dir} (EP ${ep}, ${per} experts per rank, ${Object.keys(m.tensors).length} tensors, ${fmtBytes(saved.bytes)})`,
    );
    return 0;
  } finally {
    reader.close();
  }
}

export function runCkpt(args: string[]): number {
  const [sub, ...rest] = args;
  switch (sub) {
    case 'inspect':
      return inspect(rest);
    case 'reshard':
      return reshard(rest);
    case undefined:
      console.error(usage);
      return 2;
    case '-h':
    case '--help':
      console.log(usage);
      return 0;
    default:
      console.error(`moe-ep ckpt: unknown subcommand '${sub}'\n\n${usage}`);
      return 2;
  }
}
