// Grouped GEMM (bf16 inputs, fp32 accumulate) against torch._grouped_mm, timed in interleaved
// rounds on the same inputs in the same run: per product, ours (the addon's default kernel choice)
// and torch in blocks A B A B …, so that clock drift (the H200's clock follows its power draw; one
// pass can be 10% off) moves both sides of each ratio alike.
//   node benchmarks/grouped-gemm.bench.mjs [--rounds N] [--calls N] [--quick] [--variants[=LIST]]
//        [--shapes=0,3] [--products=NN,NT,TN,TN32,SWIGLU,DH,DSWIGLU] [--inner N | --region-ms MS] [--no-peer] [--no-smi]
//        [--dry-run]
//        [--timeout-s S] [--out DIR]
// Products, per shape of grouped-gemm-shapes.mjs (M rows in groups by counts; a [M,K], b [E,K,N],
// dC [M,N], bf16, random, seeded): NN forward a·b_e [M,N]; NT dA dC·b_eᵀ [M,K]; TN dW a_eᵀ·dC_e
// [E,K,N] bf16; TN32 the same dW with fp32 results (what training computes: expertsBackward).
// 6 shapes × 4 = 24 products (the issue's 18 with bf16 results, plus the 6 training dWs).
// The fused epilogues (issue #20), on the shapes marked `fused` (the layer's: K = H, N = 2F), with w2
// [E, N/2, K] a further input: SWIGLU the up projection NN with the SwiGLU epilogue, h [M, N/2] and
// the saved g [M, N] (torch: _grouped_mm, then silu(g[:, 0::2]) · g[:, 1::2]); DH the down
// projection's plain dA, dh = a·w2_eᵀ [M, N/2] (a stands in for dOut); DSWIGLU the same with the
// dSwiGLU epilogue, dG [M, N] from dh and the saved g of SWIGLU (torch: _grouped_mm, then what its
// autograd runs for silu(g1)·g3: silu_backward(dh·g3, g1) and dh·silu(g1) into the interleaved dG,
// from its own saved g). A fused shape runs NN (the same product as SWIGLU without the epilogue),
// SWIGLU, DH, DSWIGLU unless --products says otherwise; the other shapes never run the fused ones.
// Rounds (--rounds N, default 5): per product, each round times one block of ours and one of torch
// (and of each --variants kernel, and for the DRAM-bound shapes a device copy), in the order
// A B … in even rounds and … B A in odd ones. A block is the median over `calls` timed regions
// (default 20, 10 with --quick) after 2 untimed ones, CUDA events around each region, the device
// idle at its start (--inner N: N back-to-back calls per region, time per call; --region-ms MS: per
// product as many as take ~MS ms, for kernels compared at the power limit). The peer is one
// Python process kept alive for the whole run (harness.mjs PeerSession,
// peers/grouped_gemm_torch.py) that holds the same inputs: ours makes them on the device (Philox,
// seeded), writes each once (writeInputs to /dev/shm, or the temporary folder when /dev/shm has no
// room) and the peer loads it and keeps it for as long as a later shape uses it (balanced and Zipf
// share a, b, dC; E=256 and decode share b; E=256 reuses balanced's a and dC); neither side can
// regenerate the other's random numbers. Reported per product: ours and torch ms (median of the
// round medians, range over rounds) and TFLOP/s (2·M·K·N over the median), torch/ours per round
// (median, min–max); for the DRAM-bound shapes (`dram` in the shapes file: E=256, decode) the bytes
// (each tensor once: the inputs read, the output written) and their share of the roof: bytes over
// the bandwidth of a 1 GiB device copy (read + write counted) timed in the same rounds.
// Check (once per shape, before its rounds): each product once on each side; our outputs' slices
// (the first and last non-empty groups' rows, ≤ 1024 each, of NN and NT; the first ≤ 1024 rows of
// the first and last experts' dW) against torch's, relative error in norm < 1e-2 (the two sum in
// different orders; their bf16 results usually agree exactly). The script exits 1 (after writing its
// result) when a check fails or, on a GPU, when the peer did not run (--no-peer aside).
// --variants (default off): the addon's other kernels, timed in the same rounds as more blocks:
// mmaSync = setKernelOptions({ groupedGemm: { hopper: false } }) on every product (dW with ≤ 8 rows
// per group still takes the few-rows kernel then), tensorCores = { fewRows: false } on dW where the
// few-rows kernel is the default (≤ 8 rows per group on average: decode); per round their time over
// the default's, and their results against the default's on the check slices; noDecode = { decode: false }:
// the tile kernels where the default takes the split-K decode kernel (forward NN only, where its row
// limits let it).
// noBResident = { bResident: false }: bf16 dW (TN) on hopper.cu's kernel where the default takes the
// B-resident one (32 to 128 rows per group on average: E=256).
// untrimmed = { trimTails: false } on dW (TN, TN32): every k-tile's four k16 steps, where the default
// runs only those holding rows of the group in its last k-tile (it matters where groups end
// mid-tile: --shapes=routed).
// LIST: mmaSync,tensorCores,noDecode,noBResident,untrimmed. (The variants that lost left the addon for the ladder in
// kernels/grouped_gemm/, each a program that times itself against the shipped kernel: the ping-pong
// kernel for the fp32 dW, once `pingpong`, is 08; the fused epilogues from registers, once
// `fusedRegisters` against `fusedHandoff`, are 09.)
// --shapes=mixtral-decode: Mixtral's decode forward at T = 1, 8, 64 (grouped-gemm-shapes.mjs; with
// --products=NN --variants=noDecode, the decode kernel (the default) against the tile kernels in the same rounds).
// --shapes=layer (a shape's tag, like its index, picks it): the fused products on the layer's shape.
// Clocks (a GPU with nvidia-smi, unless --no-smi): the SM clock, power and temperature sampled every
// 50 ms; each block gets the means over its span (torch's blocks too), so a ratio can be set beside
// the clocks the two sides ran at.
// --dry-run: the shapes file's tiny dryShapes on the CPU (wall clock, 3 calls a block), through the
// same calls; the peer runs on the CPU when python3 has torch (a matmul per group without
// torch._grouped_mm) and is skipped, saying so, without it. Times mean nothing there.
// Bounded: the run is a child process killed after --timeout-s (default 420, 600 with --variants);
// the peer's start 180 s, a shape's hand-over and check 300 s, a block 60 s; the peer exits when we do.
// On an H200 (estimate, not yet measured): the rounds ~13 s (24 products, ~57 ms per call of each
// side summed over them, 22 calls a block, 5 rounds, both sides), --quick ~7 s; around them ~15 GB
// of inputs written once (~10–25 s), loaded by the peer (~5–10 s), its start (~5–10 s, beside ours),
// the checks (~5 s): about 45–75 s in all, --quick 40–65 s; --variants adds ~15–25 s.
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync, statfsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const argv = process.argv.slice(2);
/** --name value or --name=value; `bare` when given alone (or followed by another flag). */
function flag(name, fallback, bare = fallback) {
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === name) return i + 1 < argv.length && !argv[i + 1].startsWith('--') ? argv[i + 1] : bare;
    if (argv[i].startsWith(`${name}=`)) return argv[i].slice(name.length + 1);
  }
  return fallback;
}

// ------------------------------------------------------------------------- the bound on the run
if (!argv.includes('--child')) {
  // The run is a child process, killed (SIGKILL) past the bound, so that nothing (a kernel, a peer,
  // a write) can hang it; the peer notices its parent gone and exits.
  const limitS = Number(flag('--timeout-s', argv.some((a) => a.startsWith('--variants')) ? '600' : '420'));
  if (!(limitS > 0)) throw new Error(`--timeout-s must be a positive number; received ${flag('--timeout-s')}`);
  const r = spawnSync(process.execPath, [fileURLToPath(import.meta.url), ...argv, '--child'], {
    stdio: 'inherit',
    timeout: limitS * 1000,
    killSignal: 'SIGKILL',
  });
  if (r.status !== 0) {
    const killed = r.error?.code === 'ETIMEDOUT' ? `killed after the bound of ${limitS} s (--timeout-s)` : null;
    console.error(`grouped-gemm: ${killed ?? r.error?.message ?? (r.signal ? `killed by ${r.signal}` : `exit ${r.status}`)}`);
  }
  process.exit(r.status ?? 1);
}

const { ops, setKernelOptions, sumOfSquares, synchronize, Tensor, tidy } = await import('../dist/lib/index.js');
const { Epilogue, groupedGemm, groupedGemmEpilogue } = await import('../dist/lib/moe/grouped-gemm.js');
const { shapes: fullShapes, dryShapes } = await import('./grouped-gemm-shapes.mjs');
const { dryRun, median, num, PeerSession, printTable, quick, range, timeRegion, torchAvailable, writeInputs, writeResult } =
  await import('./harness.mjs');

const dev = dryRun ? 'cpu' : 'cuda:0';
const onGpu = !dryRun;
const noPeer = argv.includes('--no-peer');
const positiveInt = (name, fallback) => {
  const v = Number(flag(name, String(fallback)));
  if (!Number.isSafeInteger(v) || v < 1) throw new Error(`${name} must be a positive integer; received ${flag(name)}`);
  return v;
};
const rounds = positiveInt('--rounds', 5);
const calls = positiveInt('--calls', dryRun ? 3 : quick ? 10 : 20);
const inner = positiveInt('--inner', 1);
// --region-ms MS: per product, as many back-to-back calls a region as take about MS ms (from one
// call's time, measured before its rounds), for ours, torch and the variants alike: regions long
// enough for the power controller to settle, so an A/B compares the kernels at the power limit
// (issue 20: short blocks swung 0.76-1.19 where soaked ones agreed within 2%).
const regionMsFlag = flag('--region-ms', null);
const regionMs = regionMsFlag === null ? null : Number(regionMsFlag);
if (regionMs !== null && !(regionMs > 0)) throw new Error(`--region-ms must be a positive number; received ${regionMsFlag}`);
if (regionMs !== null && flag('--inner', null) !== null)
  throw new Error('--region-ms sets the calls per region itself: give it or --inner, not both');
const warmup = dryRun ? 1 : 2;
const PLAIN = ['NN', 'NT', 'TN', 'TN32'];
const FUSED = ['SWIGLU', 'DH', 'DSWIGLU']; // on the shapes marked `fused` only
const PRODUCTS = [...PLAIN, ...FUSED];
const productArg = flag('--products', '');
const products = productArg ? productArg.split(',') : PRODUCTS;
for (const p of products) if (!PRODUCTS.includes(p)) throw new Error(`--products: unknown product ${p} (${PRODUCTS.join(', ')})`);
/** The products run on a shape: the plain ones everywhere, the fused ones on fused shapes (there NN, SWIGLU, DH, DSWIGLU by default). */
const productsOf = (s) => products.filter((p) => (FUSED.includes(p) ? s.fused : productArg || !s.fused || p === 'NN'));
const KERNELS = {
  mmaSync: { hopper: false },
  tensorCores: { fewRows: false },
  noDecode: { decode: false },
  noBResident: { bResident: false },
  untrimmed: { trimTails: false },
};
const variantList = flag('--variants', '', Object.keys(KERNELS).join(','));
const variants = variantList ? variantList.split(',') : [];
for (const v of variants)
  if (!Object.hasOwn(KERNELS, v)) throw new Error(`--variants: unknown variant ${v} (${Object.keys(KERNELS).join(', ')})`);
const shapeList = dryRun ? dryShapes : fullShapes;
const shapeArg = flag('--shapes', process.env.MOE_EP_GG_SHAPES ?? '');
// Named sets (a shape's `set`) expand to their indices; shapes in a set run only when asked for.
const chosen = shapeArg
  ? shapeArg
      .split(',')
      .flatMap((x) => (/^\d+$/.test(x) ? [Number(x)] : shapeList.flatMap((s, i) => (s.set === x || s.tag === x ? [i] : []))))
  : shapeList.flatMap((s, i) => (s.set ? [] : [i]));
if (!chosen.length) throw new Error(`--shapes: no shape in ${shapeArg}`);
for (const i of chosen) if (!Number.isInteger(i) || !shapeList[i]) throw new Error(`--shapes: no shape ${i} (0–${shapeList.length - 1})`);
/** Relative error in norm allowed between ours and torch on the check slices. */
const TOLERANCE = 1e-2;
const CHECK_ROWS = 1024;
const PRODUCT_NAMES = {
  NN: 'forward NN',
  NT: 'dA NT',
  TN: 'dW TN',
  TN32: 'dW TN, fp32 out',
  SWIGLU: 'up NN+SwiGLU',
  DH: 'down dA NT (dh)',
  DSWIGLU: 'down dA NT+dSwiGLU',
};
const ROW_PRODUCTS = ['NN', 'NT', 'SWIGLU', 'DH', 'DSWIGLU']; // outputs [M, …]: checked by rows

const tStart = performance.now();
const elapsed = () => (performance.now() - tStart) / 1e3;
const log = (...m) => console.error(`[grouped-gemm ${elapsed().toFixed(1)} s]`, ...m);
const sync = () => {
  if (onGpu) synchronize(dev);
};
const fmtRange = ([lo, hi], d = 3) => (Number.isFinite(lo) ? `${num(lo, d)}–${num(hi, d)}` : null);
log(
  `${chosen.length} shape(s), products ${products.join(' ')}, ${rounds} round(s) of ${calls} calls a block (${regionMs === null ? `inner ${inner}` : `regions of ~${regionMs} ms`}), ` +
    `variants ${variants.length ? variants.join(' ') : 'off'}, device ${dev}`,
);

// ------------------------------------------------------------------------------ nvidia-smi clocks
let smi = null;
let smiFile = null;
let smiState = dryRun ? 'not on the CPU' : argv.includes('--no-smi') ? 'off (--no-smi)' : null;
if (smiState === null) {
  const dir = mkdtempSync(join(tmpdir(), 'moe-gg-smi-'));
  smiFile = join(dir, 'smi.csv');
  smi = spawn(
    'nvidia-smi',
    [
      '--query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active',
      '--format=csv,noheader,nounits',
      '-lms',
      '50',
      '-i',
      process.env.CUDA_VISIBLE_DEVICES?.split(',')[0] || '0',
    ],
    { stdio: ['ignore', openSync(smiFile, 'w'), 'ignore'] },
  );
  smi.on('error', (e) => {
    smiState = `not sampled: ${e.message}`;
    smi = null;
  });
  process.once('exit', () => smi?.kill('SIGKILL'));
}

// ------------------------------------------------------------------------------------ the peer
let peer = null;
let peerReady = null;
let peerState = noPeer ? 'skipped (--no-peer)' : null;
if (!noPeer && !torchAvailable()) peerState = 'skipped: torch is not installed for python3';
if (peerState === null) {
  peer = new PeerSession('grouped_gemm_torch.py', [dryRun ? 'cpu' : 'cuda']);
} else log(`torch peer ${peerState}${dryRun ? ' (dry run: going on without it)' : ''}`);
/** Gives up on the peer for the rest of the run. */
async function dropPeer(why) {
  peerState = `failed: ${why}`;
  log(`torch peer ${peerState}; the rest runs without it`);
  await peer?.close(5_000);
  peer = null;
}
const peerHeld = new Set(); // the input keys the peer holds

// The roof's copy: 1 GiB of f32, device to device (16 MiB on the CPU).
const copyBytes = dryRun ? 16 << 20 : 1 << 30;
const copySrc = Tensor.zeros([copyBytes / 4], { device: dev });
const copyDst = Tensor.empty([copyBytes / 4], { device: dev });

/** Runs fn with some grouped-GEMM kernel switches, then puts them back. */
function withKernels(groupedGemmOptions, fn) {
  const before = setKernelOptions({ groupedGemm: groupedGemmOptions });
  try {
    return fn();
  } finally {
    setKernelOptions(before);
  }
}

/** ‖out − ref‖ / ‖ref‖ on the device, in fp32; its temporaries freed before it returns. */
function relErrInNorm(out, ref) {
  return tidy(() => {
    const refF32 = ref.dtype === 'f32' ? ref : ref.cast('f32');
    const diff = ops.add(out.dtype === 'f32' ? out : out.cast('f32'), refF32, { alpha: -1 });
    return Math.sqrt(sumOfSquares(diff).item() / Math.max(sumOfSquares(refF32).item(), 1e-30));
  });
}

/** A folder for the peer's inputs: /dev/shm when it has room for `bytes`, else the temporary folder. */
function inputsDir(bytes) {
  let base = tmpdir();
  try {
    const st = statfsSync('/dev/shm');
    if (existsSync('/dev/shm') && st.bavail * st.bsize > 1.25 * bytes + (64 << 20)) base = '/dev/shm';
  } catch {
    // no /dev/shm: the temporary folder
  }
  return mkdtempSync(join(base, 'moe-gg-'));
}

// The inputs of each shape, by key: a tensor made with the same shape and seed is the same tensor,
// so the peer keeps what a later shape uses again.
const SEEDS = { a: { seed: 1, std: 1 }, b: { seed: 2, std: 0.02 }, dC: { seed: 3, std: 1 }, w2: { seed: 4, std: 0.02 } };
const dimsOf = (s) => ({
  a: [s.M, s.K],
  b: [s.counts.length, s.K, s.N],
  dC: [s.M, s.N],
  ...(s.fused ? { w2: [s.counts.length, s.N / 2, s.K] } : {}),
});
const keysOf = (s) => Object.fromEntries(Object.entries(dimsOf(s)).map(([n, d]) => [n, `${n}_${d.join('x')}_s${SEEDS[n].seed}`]));

/** Bytes each product moves at least: its inputs read once, its output written once (offsets too). */
function productBytes(s, p) {
  const E = s.counts.length;
  // The forward and dA read only the experts that have rows (all of them but in the decode sets).
  const touched = s.counts.filter((c) => c > 0).length;
  const [a, b, dC, offs] = [s.M * s.K * 2, touched * s.K * s.N * 2, s.M * s.N * 2, (E + 1) * 4];
  if (p === 'NN') return a + b + s.M * s.N * 2 + offs;
  if (p === 'NT') return dC + b + s.M * s.K * 2 + offs;
  const w2 = E * (s.N / 2) * s.K * 2;
  if (p === 'SWIGLU') return a + b + s.M * (s.N / 2) * 2 + s.M * s.N * 2 + offs; // h and g written
  if (p === 'DH') return a + w2 + s.M * (s.N / 2) * 2 + offs;
  if (p === 'DSWIGLU') return a + w2 + 2 * s.M * s.N * 2 + offs; // g read, dG written
  return a + dC + E * s.K * s.N * (p === 'TN32' ? 4 : 2) + offs;
}

// ------------------------------------------------------------------------------------ the shapes
const results = []; // per product: the rounds' raw figures
const checks = []; // per shape: the check's errors
const blocks = []; // every timed block's span, for the clocks
/** Waits for the peer's start (once; it loads torch while ours makes the first shape's inputs). */
async function peerStarted() {
  if (!peer || peerReady) return;
  try {
    peerReady = await peer.ready(180_000);
    log(`torch peer ready: torch ${peerReady.torch} on ${peerReady.device}, ${peerReady.grouped_mm}`);
  } catch (e) {
    await dropPeer(String(e.message ?? e));
  }
}

for (const [pos, i] of chosen.entries()) {
  const s = shapeList[i];
  const E = s.counts.length;
  const off = [0];
  for (const c of s.counts) off.push(off[off.length - 1] + c);
  const flopsOf = (p) => 2 * s.M * s.K * (p === 'DH' || p === 'DSWIGLU' ? s.N / 2 : s.N);
  const shapeProducts = productsOf(s);
  const dims = dimsOf(s);
  const keys = keysOf(s);
  log(`shape ${i}: ${s.name} (M=${s.M} K=${s.K} N=${s.N} E=${E})`);

  const a = Tensor.randn(dims.a, { dtype: 'bf16', device: dev, ...SEEDS.a });
  const b = Tensor.randn(dims.b, { dtype: 'bf16', device: dev, ...SEEDS.b });
  const dC = Tensor.randn(dims.dC, { dtype: 'bf16', device: dev, ...SEEDS.dC });
  const w2 = dims.w2 ? Tensor.randn(dims.w2, { dtype: 'bf16', device: dev, ...SEEDS.w2 }) : null;
  const offsets = Tensor.fromArray(off, { dtype: 'i32', device: dev });
  const outShapes = {
    NN: [[s.M, s.N], 'bf16'],
    NT: [[s.M, s.K], 'bf16'],
    TN: [[E, s.K, s.N], 'bf16'],
    TN32: [[E, s.K, s.N], 'f32'],
    SWIGLU: [[s.M, s.N / 2], 'bf16'],
    DH: [[s.M, s.N / 2], 'bf16'],
    DSWIGLU: [[s.M, s.N], 'bf16'],
  };
  const outs = Object.fromEntries(shapeProducts.map((p) => [p, Tensor.empty(outShapes[p][0], { dtype: outShapes[p][1], device: dev })]));
  // SWIGLU's saved g, which DSWIGLU reads: made once here, so DSWIGLU can run alone.
  const gSaved = shapeProducts.some((p) => p === 'SWIGLU' || p === 'DSWIGLU')
    ? Tensor.empty([s.M, s.N], { dtype: 'bf16', device: dev })
    : null;
  const run = {
    NN: () => groupedGemm('NN', a, b, offsets, { out: outs.NN }),
    NT: () => groupedGemm('NT', dC, b, offsets, { out: outs.NT }),
    TN: () => groupedGemm('TN', a, dC, offsets, { out: outs.TN }),
    TN32: () => groupedGemm('TN', a, dC, offsets, { out: outs.TN32 }),
    SWIGLU: () => groupedGemmEpilogue('NN', Epilogue.SwiGLU, a, b, offsets, outs.SWIGLU, gSaved),
    DH: () => groupedGemm('NT', a, w2, offsets, { out: outs.DH }),
    DSWIGLU: () => groupedGemmEpilogue('NT', Epilogue.DSwiGLU, a, w2, offsets, outs.DSWIGLU, gSaved),
  };
  if (gSaved) {
    const h = Tensor.empty(outShapes.SWIGLU[0], { dtype: 'bf16', device: dev });
    groupedGemmEpilogue('NN', Epilogue.SwiGLU, a, b, offsets, h, gSaved);
    h.dispose();
  }
  const fewRows = s.M <= 8 * E; // where dW takes the few-rows kernel by default
  const bResident = s.M >= 32 * E && s.M <= 128 * E; // where bf16 dW takes the B-resident kernel by default
  // noDecode changes only the forward (NN), noBResident only the bf16 dW (TN).
  const variantsFor = (p) =>
    variants.filter((v) =>
      v === 'tensorCores'
        ? (p === 'TN' || p === 'TN32') && fewRows
        : v === 'noDecode'
          ? p === 'NN'
          : v === 'noBResident'
            ? p === 'TN' && bResident
            : v === 'untrimmed'
              ? p === 'TN' || p === 'TN32'
              : true,
    );

  // The check slices: rows of the first and last non-empty groups (NN, NT), the first rows of the
  // first and last experts' dW (TN, TN32); views of our outputs.
  const nonEmpty = s.counts.map((c, g) => (c > 0 ? g : -1)).filter((g) => g >= 0);
  const ends = [...new Set([nonEmpty[0], nonEmpty.at(-1)])].filter((g) => g !== undefined);
  const slices = (p) =>
    ROW_PRODUCTS.includes(p)
      ? ends.map((g) => ({ rows: [off[g], Math.min(s.counts[g], CHECK_ROWS)] }))
      : [...new Set([0, E - 1])].map((e) => ({ expert: e, krows: Math.min(s.K, CHECK_ROWS) }));
  const view = (p, c) =>
    c.rows ? outs[p].narrow(0, c.rows[0], c.rows[1]) : outs[p].narrow(0, c.expert, 1).view(s.K, s.N).narrow(0, 0, c.krows);

  // Each product once with the default kernels; our check slices copied out; the variants' results
  // against them.
  const checkFiles = {};
  const checkList = [];
  const variantErr = {};
  for (const p of shapeProducts) {
    run[p]();
    const own = [];
    for (const [j, c] of slices(p).entries()) {
      const file = `chk_${p}_${j}`;
      const v = view(p, c);
      checkFiles[file] = v.clone();
      v.dispose();
      own.push(checkFiles[file]);
      checkList.push({ product: p, file, ...(c.rows ? { rows: c.rows } : { expert: c.expert, krows: c.krows }) });
    }
    for (const v of variantsFor(p)) {
      withKernels(KERNELS[v], run[p]);
      const errs = slices(p).map((c, j) => {
        const w = view(p, c);
        const sq = relErrInNorm(w, own[j]) ** 2;
        w.dispose();
        return sq;
      });
      (variantErr[p] ??= {})[v] = Math.sqrt(errs.reduce((x, y) => x + y, 0) / errs.length); // mean square over the slices
    }
  }
  sync();

  // The peer: the inputs it lacks, the offsets and our slices, handed over once; then its check.
  let peerCheck = null;
  await peerStarted();
  if (peer) {
    const later = new Set(chosen.slice(pos + 1).flatMap((j) => Object.values(keysOf(shapeList[j]))));
    const give = { offsets };
    for (const [n, k] of Object.entries(keys)) if (!peerHeld.has(k)) give[k] = { a, b, dC, w2 }[n];
    Object.assign(give, checkFiles);
    const bytes = Object.values(give).reduce((x, t) => x + t.numel * (t.dtype === 'f32' || t.dtype === 'i32' ? 4 : 2), 0);
    const dir = inputsDir(bytes);
    try {
      const t0 = performance.now();
      writeInputs(dir, give);
      const writeS = (performance.now() - t0) / 1e3;
      peerCheck = await peer.request({ cmd: 'shape', dir, inputs: keys, keep: [...later], checks: checkList }, 300_000);
      if (peerCheck.error) throw new Error(peerCheck.error);
      peerHeld.clear();
      for (const k of peerCheck.held) peerHeld.add(k);
      peerCheck.write_s = writeS;
      peerCheck.written_gb = bytes / 1e9;
      peerCheck.inputs_given = Object.keys(give).filter((n) => Object.values(keys).includes(n));
      log(
        `  handed over ${(bytes / 1e9).toFixed(2)} GB in ${writeS.toFixed(1)} s; the peer loaded in ${peerCheck.load_s.toFixed(1)} s ` +
          `(holds ${peerCheck.held_gb.toFixed(2)} GB), checked in ${peerCheck.check_s.toFixed(1)} s`,
      );
    } catch (e) {
      await dropPeer(`shape ${i}: ${String(e.message ?? e)}`);
      peerCheck = null;
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }
  for (const t of Object.values(checkFiles)) t.dispose();
  checks.push({
    shape: s.name,
    relErrVsTorch: peerCheck?.relErr ?? null,
    torchErrors: peerCheck?.errors ?? null,
    torchTN32: peerCheck?.tn32 ?? null,
    variantsVsDefault: Object.keys(variantErr).length ? variantErr : null,
    handOver: peerCheck
      ? {
          inputs: peerCheck.inputs_given, // the others the peer held from an earlier shape
          writtenGB: num(peerCheck.written_gb, 3),
          writeS: num(peerCheck.write_s, 2),
          loadS: num(peerCheck.load_s, 2),
          peerHolds: peerCheck.held,
        }
      : null,
  });

  // The rounds, product by product.
  for (const p of shapeProducts) {
    const torchHas = peer && peerCheck && !(peerCheck.errors ?? {})[p];
    const entries = ['ours', ...(torchHas ? ['torch'] : []), ...variantsFor(p), ...(s.dram ? ['copy'] : [])];
    // Calls per region: --inner, or with --region-ms from one call's time (ours, default kernels).
    const innerP =
      regionMs === null ? inner : Math.max(1, Math.ceil(regionMs / timeRegion(run[p], { device: dev, warmup: 1, repeats: 3 })));
    const perRound = [];
    for (let r = 0; r < rounds; r++) {
      const order = r % 2 ? [...entries].reverse() : entries;
      const rec = { t: num(elapsed(), 2), order, ms: {} };
      for (const what of order) {
        const t0 = Date.now();
        let ms = null;
        if (what === 'ours') ms = timeRegion(run[p], { device: dev, warmup, repeats: calls, inner: innerP });
        else if (what === 'copy') ms = timeRegion(() => copyDst.copy_(copySrc), { device: dev, warmup, repeats: calls });
        else if (what === 'torch') {
          if (!peer) continue;
          try {
            const ans = await peer.request({ cmd: 'time', product: p, warmup, calls, inner: innerP }, 60_000);
            if (ans.error) rec.torchError = ans.error;
            else ms = ans.ms;
          } catch (e) {
            await dropPeer(`shape ${i} ${p} round ${r + 1}: ${String(e.message ?? e)}`);
          }
        } else ms = withKernels(KERNELS[what], () => timeRegion(run[p], { device: dev, warmup, repeats: calls, inner: innerP }));
        rec.ms[what] = ms;
        blocks.push({ rec, what, t0, t1: Date.now() });
      }
      perRound.push(rec);
    }
    const line = perRound.map((r) => `${num(r.ms.ours, 3)}${r.ms.torch ? `/${num(r.ms.torch, 3)}` : ''}`).join(' ');
    const variantLines = variantsFor(p).map((v) => `; ${v} ${perRound.map((r) => num(r.ms[v], 3)).join(' ')}`);
    log(`  ${PRODUCT_NAMES[p]}: ours${peer ? '/torch' : ''} ms per round ${line}${variantLines.join('')}`);
    results.push({
      shapeIndex: i,
      s,
      p,
      flops: flopsOf(p),
      bytes: productBytes(s, p),
      perRound,
      callsPerRegion: innerP,
      torchVariant: p === 'TN32' ? (peerCheck?.tn32 ?? null) : null,
    });
  }

  for (const t of [a, b, dC, w2, gSaved, offsets, ...Object.values(outs)]) t?.dispose();
}
if (peer) await peer.close();
copySrc.dispose();
copyDst.dispose();

// -------------------------------------------------------------------------- clocks per block
if (smi) {
  smi.kill('SIGTERM');
  await new Promise((resolve) => setTimeout(resolve, 200));
  // nvidia-smi's timestamps are local time ("2026/11/29 05:22:43.642"), as Date parses them.
  const samples = readFileSync(smiFile, 'utf8')
    .trim()
    .split('\n')
    .map((l) => l.split(',').map((x) => x.trim()))
    .filter((f) => f.length >= 5)
    .map(([ts, sm, mem, pw, temp, reasons]) => ({ t: new Date(ts).getTime(), sm: +sm, mem: +mem, pw: +pw, temp: +temp, reasons }));
  for (const bl of blocks) {
    const inside = samples.filter((x) => x.t >= bl.t0 && x.t <= bl.t1);
    if (!inside.length) continue;
    const mean = (k) => +(inside.reduce((z, x) => z + x[k], 0) / inside.length).toFixed(0);
    (bl.rec.smMHz ??= {})[bl.what] = mean('sm');
    (bl.rec.watts ??= {})[bl.what] = mean('pw');
    (bl.rec.tempC ??= {})[bl.what] = mean('temp');
    const reasons = [...new Set(inside.map((x) => x.reasons))].join(' ');
    if (reasons) (bl.rec.clockReasons ??= {})[bl.what] = reasons;
  }
  smiState = `${samples.length} samples every 50 ms`;
}
if (smiFile) rmSync(join(smiFile, '..'), { recursive: true, force: true });

// ------------------------------------------------------------------------------------- report
const tf = (flops, ms) => (ms > 0 ? flops / (ms * 1e-3) / 1e12 : NaN);
const rows = [];
const productsOut = [];
for (const x of results) {
  const col = (what) => x.perRound.map((r) => (typeof r.ms[what] === 'number' ? r.ms[what] : NaN));
  const ours = col('ours');
  const torch = col('torch');
  const ratio = torch.map((t, r) => t / ours[r]);
  const okRatios = ratio.filter(Number.isFinite);
  const row = {
    shape: x.s.tag,
    product: x.p,
    'ours ms': num(median(ours)),
    range: fmtRange(range(ours)),
    TFLOPs: num(tf(x.flops, median(ours)), 1),
    'torch ms': num(median(torch)),
    'torch range': fmtRange(range(torch)),
    'torch TFLOPs': num(tf(x.flops, median(torch)), 1),
    'torch/ours': okRatios.length ? num(median(okRatios), 3) : null,
    'ratio min–max': okRatios.length ? fmtRange(range(okRatios), 3) : null,
  };
  const record = {
    shape: x.s.name,
    shapeIndex: x.shapeIndex,
    product: PRODUCT_NAMES[x.p],
    key: x.p,
    M: x.s.M,
    K: x.s.K,
    N: x.s.N,
    E: x.s.counts.length,
    flops: x.flops,
    bytes: x.bytes,
    callsPerRegion: x.callsPerRegion,
    ours: { msMedian: num(median(ours), 4), msRange: range(ours).map((v) => num(v, 4)), tflops: num(tf(x.flops, median(ours)), 1) },
    torch: {
      msMedian: num(median(torch), 4),
      msRange: range(torch).map((v) => num(v, 4)),
      tflops: num(tf(x.flops, median(torch)), 1),
      ...(x.torchVariant ? { call: x.torchVariant } : {}),
    },
    ratio: {
      median: okRatios.length ? num(median(okRatios), 4) : null,
      range: range(okRatios).map((v) => num(v, 4)),
      perRound: ratio.map((v) => num(v, 4)),
    },
  };
  if (x.s.dram) {
    const copyGBs = col('copy').map((ms) => (2 * copyBytes) / (ms * 1e6));
    const roofMs = copyGBs.map((g) => (x.bytes / (g * 1e9)) * 1e3);
    const oursShare = roofMs.map((m, r) => m / ours[r]);
    const torchShare = roofMs.map((m, r) => m / torch[r]);
    row.GB = +(x.bytes / 1e9).toPrecision(3);
    row['%roof'] = num(100 * median(oursShare), 1);
    row['torch %roof'] = num(100 * median(torchShare), 1);
    record.dram = {
      copyGBs: { median: num(median(copyGBs), 1), perRound: copyGBs.map((v) => num(v, 1)) },
      roofMs: num(median(roofMs), 4),
      oursShareOfRoof: { median: num(median(oursShare), 4), range: range(oursShare).map((v) => num(v, 4)) },
      torchShareOfRoof: { median: num(median(torchShare), 4), range: range(torchShare).map((v) => num(v, 4)) },
    };
  }
  for (const v of variants) {
    const vm = col(v);
    if (!vm.some(Number.isFinite)) continue;
    const rel = vm.map((m, r) => m / ours[r]); // > 1: the default faster
    row[`${v} TFLOPs`] = num(tf(x.flops, median(vm)), 1);
    row[`${v}/ours`] = num(median(rel), 3);
    (record.variants ??= {})[v] = {
      msMedian: num(median(vm), 4),
      msRange: range(vm).map((q) => num(q, 4)),
      tflops: num(tf(x.flops, median(vm)), 1),
      timeOverDefault: { median: num(median(rel), 4), range: range(rel).map((q) => num(q, 4)), perRound: rel.map((q) => num(q, 4)) },
    };
  }
  const mhz = (what) => median(x.perRound.map((r) => r.smMHz?.[what] ?? NaN));
  if (Number.isFinite(mhz('ours'))) {
    row['MHz ours'] = num(mhz('ours'), 0);
    row['MHz torch'] = num(mhz('torch'), 0);
  }
  record.rounds = x.perRound.map((r) => ({
    ...r,
    ms: Object.fromEntries(Object.entries(r.ms).map(([k, v]) => [k, num(v, 4)])),
  }));
  rows.push(row);
  productsOut.push(record);
}

// The check: every product's slices within TOLERANCE of torch's (none compared: skipped or failed).
const judged = checks.flatMap((c) => Object.entries(c.relErrVsTorch ?? {}).map(([p, v]) => ({ shape: c.shape, p, v })));
const failed = judged.filter((j) => !(typeof j.v === 'number' && j.v < TOLERANCE));
const torchErrors = checks.flatMap((c) => Object.entries(c.torchErrors ?? {}).map(([p, m]) => `${c.shape} ${p}: ${m}`));
const checkResult = failed.length
  ? `FAILED: ${failed.map((f) => `${f.shape} ${f.p} ${num(f.v, 5)}`).join('; ')} ≥ ${TOLERANCE}`
  : judged.length
    ? `passed: ${judged.length} products within ${TOLERANCE} of torch${torchErrors.length ? ` (torch refused ${torchErrors.length})` : ''}${peerState ? `; torch peer ${peerState}` : ''}`
    : noPeer
      ? 'skipped (--no-peer)'
      : `not run: ${peerState ?? 'no answer'}`;

const area = `grouped-gemm${shapeArg ? `-shapes${chosen.join('_')}` : ''}${variants.length ? '-variants' : ''}${dryRun ? '-dryrun' : ''}`;
const peerNote = peerReady
  ? `torch ${peerReady.torch} on ${peerReady.device}, ${peerReady.grouped_mm}: NN torch._grouped_mm(a, b, offs); NT (dC, b.transpose(-2,-1), offs); TN (a.t(), dC, offs); TN32 per row ('torch.call'); SWIGLU g = _grouped_mm(a, b, offs), h = silu(g[:, 0::2])·g[:, 1::2]; DH _grouped_mm(a, w2.transpose(-2,-1), offs); DSWIGLU dh as DH, then dG[:, 0::2] = silu_backward(dh·g3, g1), dG[:, 1::2] = dh·silu(g1) from its own saved g; offs = the cumulative ends (int32). One process for the run (peers/grouped_gemm_torch.py), inputs handed over once each${peerState ? `; ${peerState}` : ''}`
  : peerState;
// Columns empty in every row (no peer, no clocks) left out of the table.
const cols = [...new Set(rows.flatMap((r) => Object.keys(r)))].filter((c) => rows.some((r) => r[c] !== null && r[c] !== undefined));
const tableRows = rows.map((r) => Object.fromEntries(cols.map((c) => [c, r[c] ?? null])));
writeResult(
  area,
  tableRows,
  {
    config: { shapes: chosen, products, rounds, calls, warmup, inner, regionMs, variants, device: dev, dryRun },
    flops: '2·M·K·N per product (DH, DSWIGLU: 2·M·K·N/2, the product dh = a·w2_eᵀ); M rows in total split into groups by counts',
    timing: `${rounds} round(s) per product; a round times one block of ours (the default kernel choice) and one of torch (and of each variant; a device copy on the DRAM-bound shapes), in the order given by 'order' (reversed every other round); a block = median of ${calls} regions after ${warmup} untimed, ${regionMs === null ? `${inner} call(s) per region` : `per product as many calls a region as take ~${regionMs} ms (callsPerRegion)`}, CUDA events, the device idle at the start of each region. 'ours ms', 'torch ms': median of the round medians (an even count: the mean of the middle two), ranges over rounds; TFLOP/s from the medians; torch/ours = per round the ratio of the two blocks, its median and min–max (≥ 1: ours faster)`,
    dram: `shapes marked dram (E=256, decode): bytes = the inputs read once and the output written once (a M·K, b E·K·N, dC M·N at 2 bytes; outputs M·N, M·K, E·K·N at 2, or 4 for TN32; offsets); roof = bytes / the bandwidth of a ${copyBytes / 2 ** 20} MiB f32 device-to-device Tensor.copy_ (read + write counted) timed in the same rounds; '%roof' = per round roof / measured, median`,
    check: `${checkResult}. Each product once per side before the rounds; our outputs' slices (rows of the first and last non-empty groups, at most ${CHECK_ROWS} each, for NN and NT; the first ${CHECK_ROWS} rows of the first and last experts' [K, N] for TN, TN32) against torch's, relative error in norm over the slices, tolerance ${TOLERANCE}`,
    variants: variants.length
      ? `timed in the same rounds as further blocks: mmaSync = setKernelOptions({ groupedGemm: { hopper: false } }) (the mma.sync kernel; dW at <= 8 rows per group takes the few-rows kernel under either switch), tensorCores = { fewRows: false } on dW where the few-rows kernel is the default (<= 8 rows per group on average), noDecode = { decode: false } on the forward (NN; the tile kernels where the default takes the split-K decode kernel, native/ops/moe/grouped_gemm/decode.cu), noBResident = { bResident: false } on bf16 dW (TN) where the default takes the B-resident kernel (32 to 128 rows per group on average; hopper_b_resident.cu), untrimmed = { trimTails: false } on dW (every k-tile's four k16 steps on the Hopper kernel, where the default runs only those holding rows of the group); timeOverDefault per round (> 1: the default faster); variantsVsDefault in checks: relative error in norm (RMS over the slices) of a variant's results against the default's`
      : 'off (--variants to time the addon’s other kernels in the same rounds)',
    clocks: smiState ?? 'not sampled',
    peer: peerNote,
  },
  { checks, products: productsOut },
  { print: 'compact' },
);
printTable(
  'check (once per shape, before its rounds): relative error in norm of our slices against torch',
  checks.map((c) => ({
    shape: c.shape,
    ...Object.fromEntries(
      products.map((p) => [p, c.relErrVsTorch?.[p] !== undefined ? num(c.relErrVsTorch[p], 5) : (c.torchErrors?.[p] ?? null)]),
    ),
  })),
);
console.log(`check: ${checkResult}`);
if (checkResult.startsWith('FAILED') || (!dryRun && !noPeer && (peerState !== null || !judged.length))) process.exitCode = 1;
