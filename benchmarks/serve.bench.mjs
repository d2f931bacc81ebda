// Serving (issue #19's serve-bench): one MoE layer's decode forward on one GPU at T = 1, 8, 64, 128
// and 256 tokens, ours eager (MoEInference.forward) and ours replayed from a CUDA graph
// (captureDecode(T), then forward), beside the same layer in PyTorch eager and in PyTorch captured
// in a torch.cuda.CUDAGraph, on the SAME weights and inputs in the same run, alternating in rounds;
// against the weight-bandwidth roof: the bytes of the experts the routing of that T touches (plus
// the router) over the device-copy bandwidth measured in the same run.
//   node benchmarks/serve.bench.mjs [--shape deepseek|mixtral|both] [--rounds N] [--out DIR] [--quick]
//                                   [--no-peer] [--no-tile] [--no-phases] [--dry-run]
//   mpirun --oversubscribe -np P node benchmarks/serve.bench.mjs --ranks P [--experts E] [--quick] [--out DIR] [--dry-run]
//     across P ranks (sharing one GPU, or one GPU each): eager against graph-replayed decode steps
//     of the expert-parallel layer (the low-latency path) and its dispatch and combine alone
//     (benchmarks/serve-ranks.mjs).
// Shapes (bf16 weights, dropless, one rank holding every expert, no shared expert):
//   deepseek  DeepSeek-V3's routed experts: H=7168 F=2048 E=256 top-8, sigmoid scores, selection
//             bias, 8 groups keep 4, renormalised, route scale 2.5 (22.5 GB of expert weights)
//   mixtral   Mixtral-8x7B's: H=4096 F=14336 E=8 top-2, softmax, renormalised (2.8 GB)
//   both      (default) deepseek, then mixtral, each in its own process (bounded in time):
//             serve-deepseek-<commit>.json and serve-mixtral-<commit>.json.
// DeepSeek-V3's shared expert is left out (the issue's table is the routed experts alone; it would
// add one dense 3·H·2048 product, 88 MB of weights read per step, to both sides alike).
// Rounds (--rounds N, default 3): each round times, per T, ours eager and ours graph, then asks the
// torch peer for its eager and graph steps per T (one Python process kept alive for the run, on
// inputs written once and loaded once), so clock drift hits both alike. Per variant and T: the
// median of the round medians and the range over rounds; torch/ours per round (graph against graph,
// eager against eager), its median and range.
// Timing: CUDA events around one call, the GPU idle before each (a decode step's latency, host
// launch work included); median of `repeats` after warm-up per round. Graph steps on both sides: a
// device copy of x into the captured input, one replay, a copy of the captured output out.
// Host: per T, the wall time of one forward() call with no synchronisation after it (the GPU idle
// before): the host's cost per step; and cuda.hostWaitCounts() over 10 steps (device-to-host copies
// and synchronisations): must be 0 for the graph path. The peer reports its host ms per call too.
// Check (once per shape, before timing): ours eager against torch eager at every T (relative error
// in norm below 2e-2; tokens the fp32 near-ties route differently are counted, left out of the
// judged error, and may be at most 2% of T), ours graph == ours eager bit for bit, torch graph
// against torch eager (reported).
// The decode kernel (groupedGemm.decode, native/ops/moe/grouped_gemm/decode.cu, on by default and
// taken where grouped_gemm.cc's decode_rows says): unless --no-tile, a third layer on the same
// weights captures its steps with the switch off (the tile kernels for every group; a graph keeps
// the kernels chosen at capture), timed in the same rounds as ours graph, alternating which goes
// first ('ours tile graph', 'tile/graph' = ours tile graph / ours graph per round: above 1 where
// the decode kernel wins, 'tgraph/tile'); checked against ours eager (relative error in norm, the
// same tolerance as against torch).
// Phases (unless --no-phases; T = 1 and 64): the expert GEMMs of the step alone, each captured in
// its own graph on our routing's group sizes (random rows), with the tile kernels and with the
// decode kernel, timed in the same rounds: 'up' (SwiGLU, [T·k, H]·W13_e), 'down' ([T·k, F]·W2_e) and
// 'rest' = ours graph − up − down of the kernels ours graph runs (router, permute, combine, copies
// and the graph launch).
// The script exits 1 when a check fails, a graph step waits on the host, or the peer failed
// (after writing its result).
// --dry-run: tiny shapes on the CPU (wall-clock timing), through the same calls; CUDA graphs are
// skipped there (captureDecode refuses on the CPU; the peer skips torch.cuda.CUDAGraph), and the
// peer is skipped when python3 has no torch.
// Inputs for the peer (harness writeInputs, /dev/shm when it has room, else the temporary folder,
// deleted once loaded): deepseek ~22.6 GB (w13 15.0 GB, w2 7.5 GB), mixtral ~2.8 GB. Neither side
// can regenerate the other's random weights, so they travel once.
// On an H200 (estimate, not yet measured), --quick: deepseek ~45–90 s (writing the 22.6 GB ~10–25 s,
// the peer's start, load ~5–10 s, its 5 captures and check ~5 s, the 3 rounds ~1.5 s each, host
// figures ~6 s), mixtral ~20–30 s; both ~1–2 min, under 3. Without --quick the rounds take about
// twice as long (20 repeats instead of 10): ~5 s more per shape. Bounded: deepseek's process 240 s,
// mixtral's 150 s; the peer's load and check 150 s, a round 60 s (the peer exits when we do).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statfsSync } from 'node:fs';
import { freemem, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

// ------------------------------------------------------------------------------------- shapes
const SHAPES = {
  deepseek: {
    area: 'serve-deepseek',
    full: { H: 7168, F: 2048, E: 256, k: 8 },
    dry: { H: 128, F: 64, E: 32, k: 8 },
    router: { scoreFunction: 'sigmoid', groups: 8, topkGroups: 4, normalize: true, routeScale: 2.5, selectionBias: true },
    timeoutMs: 240_000,
  },
  mixtral: {
    area: 'serve-mixtral',
    full: { H: 4096, F: 14336, E: 8, k: 2 },
    dry: { H: 128, F: 192, E: 8, k: 2 },
    router: { scoreFunction: 'softmax', groups: 1, topkGroups: 1, normalize: true, routeScale: 1, selectionBias: false },
    timeoutMs: 150_000,
  },
};
const TS = [1, 8, 64, 128, 256];
const argv = process.argv.slice(2);
if (argv.includes('--ranks')) {
  const { runRanks } = await import('./serve-ranks.mjs');
  await runRanks();
  process.exit(process.exitCode ?? 0);
}
const shapeAt = argv.indexOf('--shape');
const shapeName = shapeAt >= 0 ? argv[shapeAt + 1] : 'both';
if (shapeName === 'both' || shapeName === 'all') {
  // One process per shape: a shape's GPU memory (and a failure) stays its own; this one loads nothing.
  const rest = shapeAt < 0 ? argv : argv.filter((_, i) => i !== shapeAt && i !== shapeAt + 1);
  let status = 0;
  for (const [name, s] of Object.entries(SHAPES)) {
    // Bounded, so a hung shape cannot take the next one's time; killed, it leaves no peer behind
    // (the peer exits when its parent is gone).
    const r = spawnSync(process.execPath, [fileURLToPath(import.meta.url), ...rest, '--shape', name], {
      stdio: 'inherit',
      timeout: s.timeoutMs,
      killSignal: 'SIGKILL',
    });
    if (r.status !== 0) {
      console.error(`serve --shape ${name}: ${r.error?.message ?? (r.signal ? `killed by ${r.signal}` : `exit ${r.status}`)}`);
      status = 1;
    }
  }
  process.exit(status);
}
if (!Object.hasOwn(SHAPES, shapeName)) {
  console.error(`--shape must be deepseek, mixtral or both; received ${shapeName}`);
  process.exit(2);
}
const shape = SHAPES[shapeName];

const {
  cuda,
  CudaGraph,
  groupedGemm,
  kernelOptions,
  MoEInference,
  routerForward,
  setKernelOptions,
  Stream,
  synchronize,
  Tensor,
  UnavailableError,
} = await import('../dist/lib/index.js');
const { Epilogue, groupedGemmEpilogue } = await import('../dist/lib/moe/grouped-gemm.js');
const {
  args,
  dryRun,
  flag,
  median,
  num,
  PeerSession,
  printTable,
  quick,
  range,
  relErrInNorm,
  timeRegion,
  torchAvailable,
  writeInputs,
  writeResult,
} = await import('./harness.mjs');

const noPeer = args.includes('--no-peer');
const withTile = !args.includes('--no-tile');
/** The kernels ours eager and ours graph run: the decode kernel where it is taken, unless switched off. */
const decodeDefault = kernelOptions().groupedGemm.decode;
const withPhases = !args.includes('--no-phases');
const PHASE_TS = [1, 64];
const dev = dryRun ? 'cpu' : 'cuda:0';
const onGpu = !dryRun;
const cfg = dryRun ? shape.dry : shape.full;
const { H, F, E, k } = cfg;
const Tmax = Math.max(...TS);
const rounds = Number(flag('--rounds', '3'));
if (!Number.isSafeInteger(rounds) || rounds < 1) throw new Error(`--rounds must be a positive integer; received ${flag('--rounds')}`);
const warmup = dryRun ? 1 : 3;
const repeats = dryRun ? 3 : quick ? 10 : 20; // per variant, T and round
const hostRepeats = dryRun ? 3 : 20;
const waitSteps = 10;
/** Relative error in norm allowed between ours and torch (bf16 products). */
const TOLERANCE = 2e-2;
/** Tokens that fp32 near-ties may route differently (ours' router GEMM and torch's sum in other orders). */
const MISMATCH_SHARE = 0.02;
const label = `H=${H} F=${F} E=${E} top-${k} ${shape.router.scoreFunction}${shape.router.groups > 1 ? ` ${shape.router.groups} groups keep ${shape.router.topkGroups}` : ''}`;
const log = (...m) => console.error(`[serve ${shapeName}]`, ...m);
const tStart = performance.now();
const elapsed = () => `${((performance.now() - tStart) / 1e3).toFixed(1)} s`;
log(`${label}, T = ${TS.join(', ')}, ${rounds} round(s), ${repeats} repeats a round, device ${dev}`);

const sync = () => {
  if (onGpu) synchronize(dev);
};
const fmtRange = ([lo, hi], d = 3) => (Number.isFinite(lo) ? `${num(lo, d)}–${num(hi, d)}` : null);

// ------------------------------------------------------------------------------------ the layer
// Random weights made on the device (Philox, seeded): router and w13 ~ N(0, 1/H), w2 ~ N(0, 1/F),
// so logits and activations stay O(1); the selection bias ~ N(0, 0.05²); x ~ N(0, 1).
const r = shape.router;
const weights = {
  router: Tensor.randn([1, H, E], { dtype: 'bf16', device: dev, seed: 101, std: 1 / Math.sqrt(H) }),
  bias: r.selectionBias ? Tensor.randn([E], { device: dev, seed: 102, std: 0.05 }) : null,
  w13: Tensor.randn([E, H, 2 * F], { dtype: 'bf16', device: dev, seed: 103, std: 1 / Math.sqrt(H) }),
  w2: Tensor.randn([E, F, H], { dtype: 'bf16', device: dev, seed: 104, std: 1 / Math.sqrt(F) }),
};
const layerConfig = {
  hidden: H,
  ffn: F,
  numExperts: E,
  topK: k,
  scoreFunction: r.scoreFunction,
  groups: r.groups,
  topkGroups: r.topkGroups,
  normalize: r.normalize,
  routeScale: r.routeScale,
  selectionBias: r.selectionBias,
  dtype: 'bf16',
  device: dev,
};
// Two layers on the same weights (each owns views of them; the storage is shared): `eager` runs
// every forward eagerly, `graphed` replays its captured steps (forward of a captured T always replays).
const views = () => ({
  router: weights.router.view(1, H, E),
  bias: weights.bias ? weights.bias.view(E) : null,
  w13: weights.w13.view(E, H, 2 * F),
  w2: weights.w2.view(E, F, H),
});
const eager = new MoEInference(layerConfig, views());
const graphed = new MoEInference(layerConfig, views());
const graphedTile = withTile ? new MoEInference(layerConfig, views()) : null; // captured with groupedGemm.decode off
for (const t of Object.values(weights)) t?.dispose();
const expertBytes = 3 * H * F * 2; // w13 (gate and up) + w2 of one expert, bf16
const routerBytes = H * E * 2;
log(`weights ${(eager.weightBytes / 1e9).toFixed(2)} GB on ${dev} (${elapsed()})`);

const xAll = Tensor.randn([Tmax, H], { dtype: 'bf16', device: dev, seed: 105 });
const xs = new Map(TS.map((T) => [T, xAll.narrow(0, 0, T).clone()]));
const yEager = new Map(TS.map((T) => [T, Tensor.empty([T, H], { dtype: 'bf16', device: dev })]));
const yGraph = new Map(TS.map((T) => [T, Tensor.empty([T, H], { dtype: 'bf16', device: dev })]));
const yTile = new Map(TS.map((T) => [T, Tensor.empty([T, H], { dtype: 'bf16', device: dev })]));
const all = new Map(TS.map((T) => [T, Tensor.fromArray([0, T], { dtype: 'i32', device: dev })]));

// Our routing per T, through the layer's own first two ops (router GEMM, routerForward) on its
// weights: the experts the step touches (the roof's bytes) and the indices for the peer's check.
const routing = new Map();
for (const T of TS) {
  const logits = groupedGemm('NN', xs.get(T), eager.weights.router, all.get(T), { dtype: 'f32' });
  const rf = routerForward(logits, eager.router, eager.weights.bias ? { bias: eager.weights.bias } : {});
  const idx = Int32Array.from(rf.indices.toArray());
  routing.set(T, { indices: rf.indices, experts: new Set(idx).size });
  logits.dispose();
  for (const [name, t] of Object.entries(rf)) if (name !== 'indices') t.dispose();
}

// Ours eager once per T (the check's outputs), then the graphs: captured per T, replayed once, and
// compared with the eager output bit for bit.
for (const T of TS) eager.forward(xs.get(T), { out: yEager.get(T) });
sync();
let graphState = null;
const graphInfo = new Map();
const graphCheck = new Map();
const bits = (t) => {
  const a = t.toArray();
  return new Uint16Array(a.buffer, a.byteOffset, a.length);
};
const bf16ToF32 = (u) => {
  const f = new Float32Array(1);
  const i = new Uint32Array(f.buffer);
  i[0] = u << 16;
  return f[0];
};
for (const T of TS) {
  try {
    graphInfo.set(T, graphed.captureDecode(T));
  } catch (e) {
    if (e instanceof UnavailableError) {
      graphState = `skipped: ${e.message}`;
      break;
    }
    graphState = `capture failed at T=${T}: ${e.message}`;
    log(graphState);
    break;
  }
  graphed.forward(xs.get(T), { out: yGraph.get(T) });
  const a = bits(yGraph.get(T));
  const b = bits(yEager.get(T));
  let differ = 0;
  let maxAbs = 0;
  for (let i = 0; i < a.length; i++) {
    if (a[i] !== b[i]) {
      differ++;
      maxAbs = Math.max(maxAbs, Math.abs(bf16ToF32(a[i]) - bf16ToF32(b[i])));
    }
  }
  graphCheck.set(T, { differ, maxAbs });
}
if (graphState) log(`ours graph ${graphState}`);
else log(`ours: ${TS.length} graphs captured (${elapsed()})`);
const hasGraph = (T) => graphInfo.has(T);

// The tile kernels' graphs: captured with the decode kernel switched off (the graph keeps that
// choice), checked against ours eager by relative error in norm.
const tileInfo = new Map();
const tileCheck = new Map();
let tileState = withTile ? null : 'skipped (--no-tile)';
if (withTile && graphState) tileState = `skipped: no graphs (${graphState})`;
if (tileState === null) {
  const before = setKernelOptions({ groupedGemm: { decode: false } });
  try {
    for (const T of TS) {
      tileInfo.set(T, graphedTile.captureDecode(T));
      graphedTile.forward(xs.get(T), { out: yTile.get(T) });
    }
  } catch (e) {
    tileState = `capture failed: ${e.message}`;
    log(`ours tile graph ${tileState}`);
    tileInfo.clear();
  } finally {
    setKernelOptions(before);
  }
  for (const T of tileInfo.keys()) {
    const a = Array.from(bits(yTile.get(T)), bf16ToF32);
    const b = Array.from(bits(yEager.get(T)), bf16ToF32);
    tileCheck.set(T, { relErrVsEager: relErrInNorm(a, b) });
  }
  if (tileInfo.size) log(`ours tile: ${tileInfo.size} graphs captured with groupedGemm.decode off (${elapsed()})`);
}
const hasTile = (T) => tileInfo.has(T);

// Phases: the expert GEMMs alone, each in its own graph, on our routing's group sizes at T.
const phaseGraphs = new Map(); // T -> { tile: { up, down }, decode: { up, down } }
let phaseState = !withPhases ? 'skipped (--no-phases)' : !onGpu ? 'skipped (no graphs on the CPU)' : null;
const phaseTensors = [];
if (phaseState === null) {
  const phaseStream = new Stream(dev);
  phaseTensors.push(phaseStream);
  try {
    for (const T of PHASE_TS.filter((t) => TS.includes(t))) {
      const idx = Int32Array.from(routing.get(T).indices.toArray());
      const counts = new Array(E).fill(0);
      for (const e of idx) counts[e]++;
      const off = [0];
      for (const c of counts) off.push(off[off.length - 1] + c);
      const R = T * k;
      const rows = Tensor.randn([R, H], { dtype: 'bf16', device: dev, seed: 106 });
      const hIn = Tensor.randn([R, F], { dtype: 'bf16', device: dev, seed: 107 });
      const offsets = Tensor.fromArray(off, { dtype: 'i32', device: dev });
      const h = Tensor.empty([R, F], { dtype: 'bf16', device: dev });
      const out = Tensor.empty([R, H], { dtype: 'bf16', device: dev });
      phaseTensors.push(rows, hIn, offsets, h, out);
      const w = eager.weights;
      const graphs = {};
      for (const [name, decode] of [
        ['tile', false],
        ['decode', true],
      ]) {
        if (!withTile && decode !== decodeDefault) continue;
        const before = setKernelOptions({ groupedGemm: { decode } });
        try {
          graphs[name] = {
            up: CudaGraph.capture(phaseStream, () => void groupedGemmEpilogue('NN', Epilogue.SwiGLU, rows, w.w13, offsets, h, null)),
            down: CudaGraph.capture(phaseStream, () => void groupedGemm('NN', hIn, w.w2, offsets, { out })),
          };
        } finally {
          setKernelOptions(before);
        }
      }
      phaseGraphs.set(T, { graphs, counts });
    }
  } catch (e) {
    phaseState = `failed: ${e.message}`;
    log(`phases ${phaseState}`);
  }
}

// ------------------------------------------------------------- the peer: inputs, start, the check
let peer = null;
let peerState = noPeer ? 'skipped (--no-peer)' : null;
let ready = null;
let inputsNote = null;
if (!noPeer && !torchAvailable()) {
  peerState = 'skipped: torch is not installed for python3';
  log(`torch peer ${peerState}${dryRun ? ' (dry run: going on without it)' : ''}`);
}
if (!noPeer && peerState === null) {
  const routerView = eager.weights.router.view(H, E);
  const tensors = {
    x: xAll,
    router: routerView,
    ...(eager.weights.bias ? { bias: eager.weights.bias } : {}),
    w13: eager.weights.w13,
    w2: eager.weights.w2,
    ...Object.fromEntries(TS.map((T) => [`y_${T}`, yEager.get(T)])),
    ...Object.fromEntries(TS.map((T) => [`idx_${T}`, routing.get(T).indices])),
  };
  const bytes = Object.values(tensors).reduce((s, t) => s + t.numel * (t.dtype === 'bf16' ? 2 : 4), 0);
  // /dev/shm (memory) when it and the host's free memory have room, else the temporary folder (disk,
  // through the page cache); neither: no peer.
  const room = (path) => {
    try {
      const st = statfsSync(path);
      return st.bavail * st.bsize;
    } catch {
      return 0;
    }
  };
  const need = 1.1 * bytes + (1 << 30);
  const base = existsSync('/dev/shm') && room('/dev/shm') > need && freemem() > need ? '/dev/shm' : room(tmpdir()) > need ? tmpdir() : null;
  if (base === null) {
    peerState = `skipped: no room for the peer's ${(bytes / 1e9).toFixed(1)} GB of inputs (/dev/shm ${(room('/dev/shm') / 1e9).toFixed(1)} GB free, ${tmpdir()} ${(room(tmpdir()) / 1e9).toFixed(1)} GB, host memory ${(freemem() / 1e9).toFixed(1)} GB)`;
    log(`torch peer ${peerState}`);
  } else {
    const dir = mkdtempSync(join(base, 'serve-'));
    try {
      const t0 = performance.now();
      writeInputs(dir, tensors);
      const writeS = (performance.now() - t0) / 1e3;
      inputsNote = { dir: base, gb: num(bytes / 1e9, 2), writeS: num(writeS, 1) };
      log(`inputs for the peer: ${(bytes / 1e9).toFixed(2)} GB in ${dir} (${writeS.toFixed(1)} s)`);
      const peerCfg = {
        H,
        F,
        E,
        k,
        score: r.scoreFunction,
        groups: r.groups,
        topk_groups: r.topkGroups,
        normalize: r.normalize,
        route_scale: r.routeScale,
        bias: r.selectionBias,
        Ts: TS,
      };
      peer = new PeerSession('serve_torch.py', [dir, JSON.stringify(peerCfg), dryRun ? 'cpu' : 'cuda']);
      ready = await peer.ready(150_000); // start, load (~10 s for deepseek), capture 5 graphs, check
      inputsNote.peerLoadS = num(ready.load_s, 1);
      log(
        `torch peer ready (${((performance.now() - t0) / 1e3).toFixed(1)} s after the inputs began; its load ${ready.load_s.toFixed(1)} s, captures ${ready.capture_s.toFixed(1)} s)`,
      );
    } catch (e) {
      peerState = `failed: ${String(e.message ?? e)
        .split('\n')
        .slice(-3)
        .join(' | ')}`;
      log(`torch peer ${peerState}`);
      await peer?.close(5_000);
      peer = null;
    } finally {
      routerView.dispose();
      rmSync(dir, { recursive: true, force: true }); // loaded (or failed): the files are done with
    }
  }
}

// --------------------------------------------------------------------------------- the rounds
// The copy roof: a 1 GiB device-to-device copy, read + write counted.
const copyBytes = dryRun ? 16 << 20 : 1 << 30;
const copySrc = Tensor.zeros([copyBytes / 4], { device: dev });
const copyDst = Tensor.empty([copyBytes / 4], { device: dev });

function oursRound(round) {
  const rows = TS.map((T) => {
    const x = xs.get(T);
    const eagerMs = timeRegion(() => eager.forward(x, { out: yEager.get(T) }), { device: dev, warmup, repeats });
    let graphMs = null;
    let tileGraphMs = null;
    const timeGraph = () => {
      if (hasGraph(T)) graphMs = timeRegion(() => graphed.forward(x, { out: yGraph.get(T) }), { device: dev, warmup, repeats });
    };
    const timeTile = () => {
      if (hasTile(T)) tileGraphMs = timeRegion(() => graphedTile.forward(x, { out: yTile.get(T) }), { device: dev, warmup, repeats });
    };
    // Alternating which of the two graphs goes first, round by round.
    for (const f of round % 2 ? [timeTile, timeGraph] : [timeGraph, timeTile]) f();
    const phases = {};
    const ph = phaseGraphs.get(T);
    if (ph) {
      const names = Object.keys(ph.graphs);
      for (const name of round % 2 ? [...names].reverse() : names) {
        const g = ph.graphs[name];
        phases[name] = {
          upMs: timeRegion(() => g.up.replay(), { device: dev, warmup, repeats }),
          downMs: timeRegion(() => g.down.replay(), { device: dev, warmup, repeats }),
        };
      }
    }
    return { T, eagerMs, graphMs, tileGraphMs, phases };
  });
  const copyMs = timeRegion(() => copyDst.copy_(copySrc), { device: dev, warmup: 2, repeats: 10 });
  return { rows, copyMs, copyGBs: (2 * copyBytes) / (copyMs * 1e6) };
}

const ours = [];
const torch = [];
for (let round = 0; round < rounds; round++) {
  const t0 = performance.now();
  ours.push(oursRound(round));
  sync();
  let theirs = null;
  if (peer) {
    try {
      theirs = await peer.request({ cmd: 'round', warmup, repeats }, 60_000);
      if (theirs.error) log(`round ${round + 1}: torch peer error: ${theirs.error}`);
    } catch (e) {
      theirs = { error: String(e.message ?? e) };
      peerState = `failed in round ${round + 1}: ${theirs.error}`;
      log(`torch peer ${peerState}; the remaining rounds run without it`);
      await peer.close(5_000);
      peer = null;
    }
  }
  torch.push(theirs ?? {});
  const o = ours.at(-1);
  const at = (T) => o.rows.find((q) => q.T === T);
  const tAt = (T) => theirs?.rows?.find((q) => q.T === T);
  log(
    `round ${round + 1}/${rounds} (${((performance.now() - t0) / 1e3).toFixed(1)} s): ` +
      TS.map((T) => {
        const g = at(T).graphMs ?? at(T).eagerMs;
        const d = at(T).tileGraphMs;
        const tg = tAt(T)?.graph_ms ?? tAt(T)?.eager_ms;
        return `T=${T} ${g.toFixed(3)}${d === null ? '' : `/${d.toFixed(3)}`}${Number.isFinite(tg) ? `/${tg.toFixed(3)}` : ''}`;
      }).join(', ') +
      ` ms (ours ${hasGraph(TS[0]) ? 'graph' : 'eager'}${hasTile(TS[0]) ? ' / ours tile graph' : ''}${peer || theirs?.rows ? ' / torch' : ''}), copy ${o.copyGBs.toFixed(0)} GB/s`,
  );
}

// ------------------------------------------------------------------------------ host figures
/** Median wall ms of one call of fn with no synchronisation after it, the GPU idle before each call. */
function hostMs(fn) {
  const times = [];
  for (let i = 0; i < warmup + hostRepeats; i++) {
    sync();
    const t0 = performance.now();
    fn();
    times.push(performance.now() - t0);
  }
  sync();
  return median(times.slice(warmup));
}
/** Host waits (device-to-host copies, synchronisations) per step over `waitSteps` steps. */
function waitsPerStep(fn) {
  sync();
  const w0 = cuda.hostWaitCounts();
  for (let i = 0; i < waitSteps; i++) fn();
  const w1 = cuda.hostWaitCounts();
  sync();
  return {
    deviceToHost: (w1.deviceToHost - w0.deviceToHost) / waitSteps,
    synchronizations: (w1.synchronizations - w0.synchronizations) / waitSteps,
  };
}
const host = new Map();
for (const T of TS) {
  const x = xs.get(T);
  const e = () => eager.forward(x, { out: yEager.get(T) });
  const g = () => graphed.forward(x, { out: yGraph.get(T) });
  host.set(T, {
    eagerMs: hostMs(e),
    graphMs: hasGraph(T) ? hostMs(g) : null,
    eagerWaits: waitsPerStep(e),
    graphWaits: hasGraph(T) ? waitsPerStep(g) : null,
  });
}
let torchHost = null;
if (peer) {
  try {
    torchHost = await peer.request({ cmd: 'host', warmup, repeats: hostRepeats }, 60_000);
    if (torchHost.error) log(`torch peer host figures: ${torchHost.error}`);
  } catch (e) {
    log(`torch peer host figures failed: ${e.message ?? e}`);
  }
  await peer.close(10_000);
}

// ------------------------------------------------------------------------------------- report
const copyGBs = median(ours.map((o) => o.copyGBs));
const oursCol = (T, key) => ours.map((o) => o.rows.find((q) => q.T === T)?.[key] ?? NaN);
const torchCol = (T, key) => torch.map((t) => t?.rows?.find((q) => q.T === T)?.[key] ?? NaN);
const ratio = (a, b) => a.map((v, i) => b[i] / v).filter(Number.isFinite); // b/a per round
const checkByT = new Map((ready?.check ?? []).map((c) => [c.T, c]));
/** Per kernel set: up and down medians over rounds, and rest = ours graph − up − down (tile kernels' rounds). */
function phasesOf(T, og) {
  const out = { groupRows: phaseGraphs.get(T).counts };
  for (const name of Object.keys(phaseGraphs.get(T).graphs)) {
    const up = ours.map((o) => o.rows.find((q) => q.T === T)?.phases?.[name]?.upMs ?? NaN);
    const down = ours.map((o) => o.rows.find((q) => q.T === T)?.phases?.[name]?.downMs ?? NaN);
    out[name] = {
      upMs: num(median(up), 4),
      upRange: range(up).map((v) => num(v, 4)),
      downMs: num(median(down), 4),
      downRange: range(down).map((v) => num(v, 4)),
    };
  }
  // The GEMMs ours graph runs: the decode graphs follow the same rule (decode_rows) as the layer's.
  const mine = decodeDefault ? 'decode' : 'tile';
  const up = ours.map((o) => o.rows.find((q) => q.T === T)?.phases?.[mine]?.upMs ?? NaN);
  const down = ours.map((o) => o.rows.find((q) => q.T === T)?.phases?.[mine]?.downMs ?? NaN);
  out.restMs = num(median(og.map((g, i) => g - up[i] - down[i])), 4);
  return out;
}
const perT = TS.map((T) => {
  const oe = oursCol(T, 'eagerMs');
  const og = oursCol(T, 'graphMs');
  const te = torchCol(T, 'eager_ms');
  const tg = torchCol(T, 'graph_ms');
  const ot = oursCol(T, 'tileGraphMs');
  const experts = routing.get(T).experts;
  const roofBytes = experts * expertBytes + routerBytes;
  const roofMs = (roofBytes / (copyGBs * 1e9)) * 1e3;
  const h = host.get(T);
  const th = torchHost?.rows?.find((q) => q.T === T);
  return {
    T,
    experts,
    roofBytes,
    roofMs,
    oursEager: { median: median(oe), range: range(oe), perRound: oe },
    oursGraph: { median: median(og), range: range(og), perRound: og },
    torchEager: { median: median(te), range: range(te), perRound: te },
    torchGraph: { median: median(tg), range: range(tg), perRound: tg },
    graphRatio: ratio(og, tg), // torch graph / ours graph, per round
    eagerRatio: ratio(oe, te), // torch eager / ours eager, per round
    oursTileGraph: { median: median(ot), range: range(ot), perRound: ot },
    tileRatio: ratio(og, ot), // ours tile graph / ours graph, per round
    torchTileRatio: ratio(ot, tg), // torch graph / ours tile graph, per round
    tileCheck: tileCheck.get(T) ?? null,
    tileGraphInfo: tileInfo.get(T) ?? null,
    phases: phaseGraphs.has(T) ? phasesOf(T, og) : null,
    host: h,
    torchHost: th ? { eagerMs: th.eager_ms, graphMs: th.graph_ms } : null,
    graphCheck: graphCheck.get(T) ?? null,
    graphInfo: graphInfo.get(T) ?? null,
    workspaceBytes: eager.workspaceBytes(T),
    check: checkByT.get(T) ?? null,
  };
});
const rows = perT.map((p) => ({
  T: p.T,
  experts: p.experts,
  'roof ms': num(p.roofMs),
  'ours eager': num(p.oursEager.median),
  'ours graph': num(p.oursGraph.median),
  'graph range': fmtRange(p.oursGraph.range),
  'torch eager': num(p.torchEager.median),
  'torch graph': num(p.torchGraph.median),
  'tgraph/ours': p.graphRatio.length ? num(median(p.graphRatio), 2) : null,
  'ratio range': p.graphRatio.length ? fmtRange(range(p.graphRatio), 2) : null,
  'teager/ours': p.eagerRatio.length ? num(median(p.eagerRatio), 2) : null,
  'ours/roof': num((Number.isFinite(p.oursGraph.median) ? p.oursGraph.median : p.oursEager.median) / p.roofMs, 2),
  'ours tile graph': num(p.oursTileGraph.median),
  'tile/graph': p.tileRatio.length ? num(median(p.tileRatio), 2) : null,
  'tgraph/tile': p.torchTileRatio.length ? num(median(p.torchTileRatio), 2) : null,
  'tile/roof': num(p.oursTileGraph.median / p.roofMs, 2),
  'host ms eager': num(p.host.eagerMs),
  'host ms graph': num(p.host.graphMs),
  'waits/step graph': p.host.graphWaits ? p.host.graphWaits.deviceToHost + p.host.graphWaits.synchronizations : null,
}));

// The verdicts.
const failures = [];
let checkResult;
if (ready === null) {
  checkResult = noPeer
    ? 'skipped (--no-peer)'
    : dryRun && peerState?.startsWith('skipped')
      ? `skipped (dry run): ${peerState}`
      : `not run: ${peerState ?? 'no answer'}`;
} else {
  const bad = [];
  for (const c of ready.check) {
    const judged = c.routing_mismatch_tokens > 0 ? c.rel_err_same_routing : c.rel_err;
    if (!(typeof judged === 'number' && judged < TOLERANCE)) bad.push(`T=${c.T} relErr ${judged}`);
    if (c.routing_mismatch_tokens > Math.ceil(MISMATCH_SHARE * c.T))
      bad.push(`T=${c.T} ${c.routing_mismatch_tokens} tokens routed differently (more than ${MISMATCH_SHARE * 100}%)`);
  }
  checkResult = bad.length
    ? `FAILED: ${bad.join(', ')} (tolerance ${TOLERANCE})`
    : `passed: ours eager vs torch within ${TOLERANCE} at every T`;
}
if (checkResult.startsWith('FAILED') || checkResult.startsWith('not run')) failures.push(`check ${checkResult}`);
const graphDiffers = [...graphCheck.entries()]
  .filter(([, g]) => g.differ > 0)
  .map(([T, g]) => `T=${T}: ${g.differ} elements (max |Δ| ${g.maxAbs})`);
const graphResult = graphState?.startsWith('skipped')
  ? graphState
  : graphState
    ? `FAILED: ${graphState}`
    : graphDiffers.length
      ? `FAILED: graph ≠ eager at ${graphDiffers.join('; ')}`
      : `passed: graph == eager bit for bit at every T`;
if (graphResult.startsWith('FAILED')) failures.push(`ours graph ${graphResult}`);
const waiting = perT.filter((p) => p.host.graphWaits && p.host.graphWaits.deviceToHost + p.host.graphWaits.synchronizations !== 0);
const waitsResult = !hasGraph(TS[0])
  ? 'not measured (no graphs)'
  : waiting.length
    ? `FAILED: the graph step waits on the host at T=${waiting.map((p) => p.T).join(', ')}`
    : `passed: 0 host waits per graph step at every T (${waitSteps} steps each)`;
if (waitsResult.startsWith('FAILED')) failures.push(`host waits ${waitsResult}`);
const tileBad = [...tileCheck.entries()].filter(([, c]) => !(c.relErrVsEager < TOLERANCE));
const tileResult = tileState
  ? tileState
  : tileBad.length
    ? `FAILED: ${tileBad.map(([T, c]) => `T=${T} relErr ${c.relErrVsEager}`).join(', ')} (tolerance ${TOLERANCE})`
    : `passed: ours tile graph vs ours eager (groupedGemm.decode ${decodeDefault ? 'on' : 'off'}) within ${TOLERANCE} at every T (max ${num(Math.max(...[...tileCheck.values()].map((c) => c.relErrVsEager)), 5)})`;
if (tileResult.startsWith('FAILED') || tileResult.startsWith('capture failed')) failures.push(`tile ${tileResult}`);

const checkRows = perT
  .filter((p) => p.check || p.graphCheck)
  .map((p) => ({
    T: p.T,
    'relErr vs torch': num(p.check?.rel_err, 5),
    'relErr (same routing)': num(p.check?.rel_err_same_routing, 5),
    'tokens routed differently': p.check?.routing_mismatch_tokens ?? null,
    'torch experts': p.check?.experts_touched ?? null,
    'ours graph≠eager elements': p.graphCheck?.differ ?? null,
    'torch graph−eager max|Δ|': p.check?.graph_vs_eager_max_abs ?? null,
  }));

const peerNote =
  ready === null
    ? peerState
    : `torch ${ready.torch} on ${ready.device} (${ready.grouped_mm}), graphs ${ready.graphs}${Object.keys(ready.graph_errors).length ? ` (errors: ${JSON.stringify(ready.graph_errors)})` : ''}: the same layer on the same bf16 weights and inputs: logits = x·Wr in fp32, ${r.scoreFunction}${r.selectionBias ? ' + selection bias' : ''}${r.groups > 1 ? `, ${r.groups} groups scored by their top ${k / r.topkGroups}, keep ${r.topkGroups}` : ''}, top-${k}${r.normalize ? ', renormalised' : ''}${r.routeScale !== 1 ? `, × ${r.routeScale}` : ''}; stable sort by expert, offsets by searchsorted (no host sync), rows gathered, torch._grouped_mm with [W1 | W3] fused then chunk, silu·mul, torch._grouped_mm with W2, weighted gather-sum in fp32; graph: torch.cuda.CUDAGraph of that forward (warm-up on a side stream, then capture), a step = copy x in, replay, copy y out${peerState ? `; ${peerState}` : ''}`;

writeResult(
  `${shape.area}${dryRun ? '-dryrun' : ''}`,
  rows,
  {
    config: {
      shape: shapeName,
      ...cfg,
      ...r,
      sharedExpert: false,
      dtype: 'bf16',
      dropless: true,
      Ts: TS,
      device: dev,
      rounds,
      warmup,
      repeats,
      hostRepeats,
      waitSteps,
    },
    check: checkResult,
    graph: graphResult,
    hostWaits: waitsResult,
    kernels: `ours eager and ours graph: the kernel switches in force (groupedGemm.decode ${decodeDefault ? 'on' : 'off'}); ours tile graph: groupedGemm.decode off`,
    tile: tileResult,
    phases:
      phaseState ??
      `T = ${PHASE_TS.join(', ')}: the up (SwiGLU) and down GEMMs alone on our routing's group sizes (random rows), each captured in its own graph, with the tile kernels and with groupedGemm.decode on, timed in the same rounds (medians over rounds); restMs = ours graph − up − down of the kernels ours graph runs (${decodeDefault ? 'decode' : 'tile'}) per round (router, permute, combine, the copies in and out, the graph launch)`,
    timing: `${rounds} round(s); each times ours (per T: eager, then graph) and then the torch peer (per T: eager, then graph), one Python process kept alive for the run. Per region: the GPU idle, CUDA events around one call (a step's latency from an idle GPU, host launch work included), median of ${repeats} after ${warmup} warm-up; per variant the median of the round medians and the range over rounds. 'tgraph/ours' = torch graph / ours graph per round (median, 'ratio range' its min–max); 'teager/ours' = torch eager / ours eager per round (median). Ours eager = MoEInference.forward(x, { out }) through its per-T workspace; ours graph = forward of a captured T (copy x in, one graph launch, copy y out); torch graph the same three steps`,
    roof: `roof ms = (experts touched by our routing of those T tokens × 3·H·F·2 bytes + the router's H·E·2 bytes) / the device-copy bandwidth (a ${copyBytes / 2 ** 20} MiB Tensor.copy_, read + write counted, median over rounds: ${num(copyGBs, 1)} GB/s); 'ours/roof' = ours graph (eager without graphs) / roof`,
    host: `host ms: the wall time of one forward() call with no synchronisation after it, the GPU idle before each (median of ${hostRepeats}): the host's cost per step (the graph step: two device copies and one graph launch). waits/step: cuda.hostWaitCounts() (device-to-host copies + synchronisations) over ${waitSteps} steps, per step; 0 required for the graph path`,
    peer: peerNote,
    inputs: inputsNote,
    tolerance: `relative error in norm ‖ours − torch‖/‖torch‖ below ${TOLERANCE} (bf16 products agree to about 1e-2); tokens whose fp32 near-ties pick other experts on one side are counted and left out of the judged error ('same routing'), at most ${MISMATCH_SHARE * 100}% of T (rounded up) of them`,
    memory: `weights ${eager.weightBytes} bytes per layer (each side); workspace per T and what each graph holds (workspace, captured input and output, its pool) in perT`,
  },
  {
    checkRows,
    copy: { bytes: copyBytes, GBs: num(copyGBs, 1), perRound: ours.map((o) => num(o.copyGBs, 1)) },
    perT: perT.map((p) => ({
      T: p.T,
      experts: p.experts,
      roofBytes: p.roofBytes,
      roofMs: num(p.roofMs, 4),
      ...Object.fromEntries(
        ['oursEager', 'oursGraph', 'torchEager', 'torchGraph'].map((key) => [
          key,
          { median: num(p[key].median, 4), range: p[key].range.map((v) => num(v, 4)), perRound: p[key].perRound.map((v) => num(v, 4)) },
        ]),
      ),
      graphRatioPerRound: p.graphRatio.map((v) => num(v, 3)),
      oursTileGraph: {
        median: num(p.oursTileGraph.median, 4),
        range: p.oursTileGraph.range.map((v) => num(v, 4)),
        perRound: p.oursTileGraph.perRound.map((v) => num(v, 4)),
      },
      tileRatioPerRound: p.tileRatio.map((v) => num(v, 3)),
      torchTileRatioPerRound: p.torchTileRatio.map((v) => num(v, 3)),
      tileCheck: p.tileCheck,
      tileGraph: p.tileGraphInfo,
      phases: p.phases,
      eagerRatioPerRound: p.eagerRatio.map((v) => num(v, 3)),
      host: {
        eagerMs: num(p.host.eagerMs, 4),
        graphMs: num(p.host.graphMs, 4),
        eagerWaitsPerStep: p.host.eagerWaits,
        graphWaitsPerStep: p.host.graphWaits,
      },
      torchHost: p.torchHost ? { eagerMs: num(p.torchHost.eagerMs, 4), graphMs: num(p.torchHost.graphMs, 4) } : null,
      workspaceBytes: p.workspaceBytes,
      graph: p.graphInfo,
      graphCheck: p.graphCheck,
      check: p.check,
    })),
    peerReady: ready,
  },
  { print: 'compact' },
);
if (checkRows.length) printTable('check (once, before timing)', checkRows);
const phaseRows = perT
  .filter((p) => p.phases)
  .map((p) => ({
    T: p.T,
    'group rows': p.phases.groupRows.filter((c) => c > 0).join(' '),
    'up tile': p.phases.tile?.upMs ?? null,
    'up decode': p.phases.decode?.upMs ?? null,
    'down tile': p.phases.tile?.downMs ?? null,
    'down decode': p.phases.decode?.downMs ?? null,
    'rest (graph − up − down)': p.phases.restMs,
    'ours graph': num(p.oursGraph.median),
    'ours tile graph': num(p.oursTileGraph.median),
  }));
if (phaseRows.length)
  printTable('phases (ms, each GEMM alone in its own graph; rest = router, permute, combine, copies, launch)', phaseRows);
console.log(`tile: ${tileResult}${phaseState ? `\nphases: ${phaseState}` : ''}`);
console.log(`check: ${checkResult}\ngraph: ${graphResult}\nhost waits: ${waitsResult}\n(${elapsed()})`);

// ------------------------------------------------------------------------------------ cleanup
eager.dispose();
graphed.dispose();
graphedTile?.dispose();
for (const { graphs } of phaseGraphs.values()) for (const g of Object.values(graphs)) for (const x of Object.values(g)) x.dispose();
for (const t of phaseTensors) t.dispose();
for (const m of [xs, yEager, yGraph, yTile, all]) for (const t of m.values()) t.dispose();
for (const { indices } of routing.values()) indices.dispose();
for (const t of [xAll, copySrc, copyDst]) t.dispose();
if (failures.length) {
  console.error(`serve ${shapeName}: ${failures.join('; ')}`);
  process.exitCode = 1;
}
