// One MoE layer training step (forward, backward, AdamW) on one GPU, against a PyTorch layer doing
// the same arithmetic with torch._grouped_mm on the SAME weights and inputs, timed in the same run
// in alternating rounds, with the outputs and gradients compared once; and a breakdown of our step
// into its phases, each timed on the GPU and set against the roof (a measured tensor-core peak and
// a measured device-copy bandwidth).
//   node benchmarks/moe-layer.bench.mjs [--shape main|fine|all] [--rounds N] [--out DIR] [--quick]
//                                       [--no-peer] [--peak-tflops X] [--variant G.K=true|false[,…]] [--dry-run]
// Shapes (bf16, softmax routing without renormalisation, dropless, no shared expert, no aux losses):
//   main  H=7168 F=2048 E=32 top-8 T=4096 (DeepSeek-V3's hidden and expert sizes, 32 experts on one GPU)
//   fine  H=2048 F=768 E=128 top-8 T=4096 (many small experts: the MoE layer of Qwen3-30B-A3B, the
//         fine-grained E=128 F=768 shape of benchmarks/grouped-gemm.bench.mjs; see the README)
//   all   (default) main, then fine, each in its own process: moe-layer-<commit>.json and
//         moe-layer-fine-<commit>.json (one file per shape).
// Rounds (--rounds N, default 5): each round times ours (forward, backward, forward + backward,
// AdamW, the phase breakdown, the copy bandwidth) and then the torch peer (the same, and a square
// bf16 matmul), so clock drift hits both alike. The peer is one Python process kept alive for the
// whole run, driven per round through stdin/stdout on inputs written and loaded once. Reported per
// metric: the median of the round medians and the range over rounds; the ratio torch/ours per round,
// its median and min–max.
// Timing: CUDA events, median of `repeats` after warm-up per round, the GPU idle before each region:
//   forward  = MoELayer.forward (router GEMM, routing, capacity, permute, experts, combine)
//   backward = MoELayer.backward (a fresh forward before each, untimed)
//   step     = forward + backward in one region
//   step, host ahead = the same queued behind 1 GiB copies that outlast the host's time to issue it
//              (measured before the rounds): the host has issued the step before the GPU starts it
//              (ours only). The copies draw less power than the step, which then starts with power
//              to spare: read it beside the back-to-back row, not as the GPU's wait for the host alone
//   step, N back to back = N steps queued in one region (main 12, fine 64: ~200 ms), over N: a
//              training loop's steady state, the GEMMs at the clock their sustained power allows;
//              torch the same (the figure issue 20's step goal is read against)
//   adamw    = three fused AdamW steps on the fp32 masters, refreshing the bf16 compute copies
// Breakdown: the layer's exported ops called one by one in the layer's order (layer.ts, experts.ts,
// the dispatcher's one-rank path) on the step's own tensors, outputs preallocated; each phase timed
// on its own behind a 1 GiB device copy that keeps the GPU busy while the host queues the calls, so
// a phase's figure is GPU time without the host's per-call cost. Sum of phases vs the measured pass:
// the gap is the host and launch overhead between kernels.
// Timeline: one step traced (lib/trace.ts), the GPU idle at its start: per mark of the layer and its
// dispatcher, when the host and the GPU reached it; where the GPU's lag behind the host is near 0,
// the GPU had run out of work (the trace that found the host waiting for each forward: benchmarks/README.md).
// --variant G.K=true|false[,…] (kernel switches, lib/kernel-options.ts: e.g. groupedGemm.trimTails=false;
// layer.recompute=experts|layer, MoELayer's recompute, and layer.weightGradDtype=bf16, the experts'
// weight gradients in bf16 as torch's autograd gives them (the dW phases then write bf16), each on a
// second layer of the same weights):
// a second 'ours' with those switches set, timed in the same rounds as the default (the two in the
// order A B in even rounds, B A in odd ones, then torch), so that a kernel change is read at the
// layer in one run, beside the default at the same clock drift; per metric and per phase its time
// and the ratio variant/default per round (> 1: the default faster). Its outputs and gradients are
// checked once against the default's (y, dx, the router's gradient, the first and last experts'
// w13 and w2 gradients; relative error in norm within TOLERANCE, judged only where both routed every
// token alike). The file is <area>-vs-<switches>-<commit>.json, so it never replaces a plain run's.
// Check: outputs and gradients against the torch layer (once, before timing), relative error in norm
// within TOLERANCE (bf16); the script exits 1 when a check fails or the peer did not run on a GPU
// (after writing the result). --dry-run: tiny shapes on the CPU (wall clock), to check the script and
// the peer's arithmetic; without torch installed the dry run skips the peer and says so.
// On an H200 (estimate, not yet measured): main ~40–60 s (the 5 rounds ~16 s, ~3 s each; the rest
// is fixed: ~9 GB of inputs written to /dev/shm, the peer's start, load and check, first calls),
// fine ~20–30 s; all about 1–1.5 min, under 3. --quick (5 repeats a round instead of 10, 5 phase
// repeats instead of 8) saves about 8 s of the rounds: ~1–1.3 min.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statfsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

// ------------------------------------------------------------------------------------- shapes
const SHAPES = {
  main: { area: 'moe-layer', streak: 12, full: { T: 4096, H: 7168, F: 2048, E: 32, k: 8 }, dry: { T: 64, H: 128, F: 64, E: 32, k: 8 } },
  fine: {
    area: 'moe-layer-fine',
    streak: 64,
    full: { T: 4096, H: 2048, F: 768, E: 128, k: 8 },
    dry: { T: 64, H: 64, F: 48, E: 128, k: 8 },
  },
};
const argv = process.argv.slice(2);
const shapeAt = argv.indexOf('--shape');
const shapeName = shapeAt >= 0 ? argv[shapeAt + 1] : 'all';
if (shapeName === 'all') {
  // One process per shape: a shape's GPU memory (and a failure) stays its own; this one loads nothing.
  const rest = shapeAt < 0 ? argv : argv.filter((_, i) => i !== shapeAt && i !== shapeAt + 1); // without '--shape all'
  let status = 0;
  for (const name of Object.keys(SHAPES)) {
    // Bounded (a hung shape must not eat the next one's time): ~1 min expected, 5 at most. Killed,
    // it leaves no peer behind: the peer exits when its stdin closes.
    const r = spawnSync(process.execPath, [fileURLToPath(import.meta.url), ...rest, '--shape', name], {
      stdio: 'inherit',
      timeout: 300_000,
      killSignal: 'SIGKILL',
    });
    if (r.status !== 0) {
      console.error(`moe-layer --shape ${name}: ${r.error?.message ?? (r.signal ? `killed by ${r.signal}` : `exit ${r.status}`)}`);
      status = 1;
    }
  }
  process.exit(status);
}
if (!Object.hasOwn(SHAPES, shapeName)) {
  console.error(`--shape must be main, fine or all; received ${shapeName}`);
  process.exit(2);
}
const shape = SHAPES[shapeName];

const {
  adamwStep,
  capacity,
  CudaGraph,
  disposeSaved,
  emptyCache,
  groupedGemm,
  memoryStats,
  MoELayer,
  permute,
  permuteBackward,
  RECOMPUTE_MODES,
  resetPeakMemory,
  routerBackward,
  routerEntropy,
  routerForward,
  setKernelOptions,
  Stream,
  synchronize,
  Tensor,
  tidy,
  trace,
  unpermute,
  unpermuteBackward,
} = await import('../dist/lib/index.js');
// @internal: the fused SwiGLU / dSwiGLU products expertsForward and expertsBackward make.
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
const dev = dryRun ? 'cpu' : 'cuda:0';
const onGpu = !dryRun;
const cfg = dryRun ? shape.dry : shape.full;
const { T, H, F, E, k } = cfg;
const rounds = Number(flag('--rounds', '5'));
if (!Number.isSafeInteger(rounds) || rounds < 1) throw new Error(`--rounds must be a positive integer; received ${flag('--rounds')}`);
const peakFlag = flag('--peak-tflops', null);
const peakOverride = peakFlag === null ? null : Number(peakFlag);
if (peakOverride !== null && !(peakOverride > 0)) throw new Error(`--peak-tflops must be a positive number; received ${peakFlag}`);
const variant = parseVariant(flag('--variant', null));
const warmup = dryRun ? 1 : 3;
const repeats = dryRun ? 3 : quick ? 5 : 10; // per round
const phaseRepeats = dryRun ? 2 : quick ? 5 : 8; // per phase per round
// Steps back to back (a training loop's steady state): `streak` steps queued in one region, ~200 ms
// of GPU work on the H200, long enough for the power controller to act on them; the same for torch.
const streak = dryRun ? 2 : shape.streak;
const streakRepeats = dryRun ? 2 : 3; // per round, after one warm-up streak
const phaseInner = dryRun ? 1 : 3; // back-to-back calls per timed phase region
/**
 * --variant's switches: { update (setKernelOptions's argument), layerOptions (MoELayer options for a
 * second layer of the same weights, or null), slug (for the file name) }, or null without the flag.
 * Each entry is group.switch=true|false, or layer.recompute=MODE; setKernelOptions refuses unknown
 * names, and a variant that changes nothing in force is refused too (it would time the default twice).
 */
function parseVariant(text) {
  if (text === null) return null;
  const update = {};
  let layerOptions = null;
  const parts = [];
  for (const entry of text.split(',')) {
    const w = /^layer\.weightGradDtype=([a-z0-9]+)$/.exec(entry.trim());
    if (w) {
      if (w[1] !== 'bf16') throw new Error(`--variant: '${entry}': weightGradDtype is bf16 (f32 is the default)`);
      layerOptions = { ...layerOptions, weightGradDtype: 'bf16' };
      parts.push('gradsBf16');
      continue;
    }
    const r = /^layer\.recompute=([a-z]+)$/.exec(entry.trim());
    if (r) {
      if (!RECOMPUTE_MODES.includes(r[1]) || r[1] === 'none')
        throw new Error(
          `--variant: '${entry}': recompute is one of ${RECOMPUTE_MODES.filter((m) => m !== 'none').join(', ')} (none is the default)`,
        );
      layerOptions = { ...layerOptions, recompute: r[1] };
      parts.push(`recompute-${r[1]}`);
      continue;
    }
    const m = /^([A-Za-z]+)\.([A-Za-z]+)=(true|false)$/.exec(entry.trim());
    if (!m)
      throw new Error(
        `--variant: '${entry}' is not group.switch=true|false (e.g. groupedGemm.trimTails=false; lib/kernel-options.ts lists the switches), layer.recompute=experts|layer or layer.weightGradDtype=bf16`,
      );
    (update[m[1]] ??= {})[m[2]] = m[3] === 'true';
    parts.push(`${m[2]}-${m[3] === 'true' ? 'on' : 'off'}`);
  }
  let before;
  try {
    before = setKernelOptions(update); // refuses a switch it does not know, naming it
  } catch (e) {
    throw new Error(`--variant ${text}: ${e.message}`, { cause: e });
  }
  setKernelOptions(before);
  const changes = Object.entries(update).some(([g, keys]) => Object.entries(keys).some(([key, v]) => before[g][key] !== v));
  if (!changes && !layerOptions)
    throw new Error(`--variant ${text}: every switch is already so (the default would be timed against itself)`);
  return { text, update, layerOptions, slug: parts.join('-') };
}
/** fn() with the variant's switches set and its layer in place, the previous ones put back afterwards. */
function withVariant(fn) {
  const before = setKernelOptions(variant.update);
  const defaultLayer = layer;
  layer = variantLayer ?? layer;
  inVariant = true;
  try {
    return fn();
  } finally {
    inVariant = false;
    layer = defaultLayer;
    setKernelOptions(before);
  }
}
/** Inside withVariant: its switches and layer are in force (the step's CUDA graph is captured per side). */
let inVariant = false;
/** Relative error in norm allowed between ours and torch (bf16 products; see the notes). */
const TOLERANCE = 2e-2;
const label = `T=${T} H=${H} F=${F} E=${E} top-${k}`;
const log = (...m) => console.error(`[moe-layer ${shapeName}]`, ...m);
log(`${label}, ${rounds} round(s), ${repeats} repeats a round, device ${dev}`);

const layerConfig = { hidden: H, ffn: F, numExperts: E, topK: k, scoreFunction: 'softmax', dtype: 'bf16', device: dev, seed: 1234 };
/** The layer timed: the default's, or the variant's (same weights, its options) inside withVariant. */
let layer = new MoELayer(layerConfig);
const variantLayer = variant?.layerOptions ? new MoELayer({ ...layerConfig, ...variant.layerOptions }) : null;
if (layer.config.normalize !== false) throw new Error('expected the softmax default normalize = false');
const x = Tensor.randn([T, H], { dtype: 'bf16', device: dev, seed: 11 });
const dy = Tensor.randn([T, H], { dtype: 'bf16', device: dev, seed: 12 });

const sync = () => {
  if (onGpu) synchronize(dev);
};
/** Frees a forward's outputs and saved tensors (idempotent: backward already freed the saved ones). */
function disposeForward(f) {
  disposeSaved(f);
  for (const t of [f.y, f.tokensPerExpert, f.dropped, f.auxLoss, f.routerEntropy]) t.dispose();
}
function disposeGrads(g) {
  for (const t of Object.values(g)) t?.dispose();
}

/** Median ms of body(ctx), setup() untimed before each run, the device idle at the start. */
const timeLayer = (body, { setup, before = sync } = {}) => timeRegion(body, { device: dev, warmup, repeats, setup, before });

/** Median wall-clock ms of body() with the GPU idle at the start; `endSync` syncs or not. */
function wallRegion(body, { endSync }) {
  const times = [];
  for (let i = 0; i < warmup + repeats; i++) {
    sync();
    const t0 = performance.now();
    const cleanup = body();
    if (endSync) sync();
    times.push(performance.now() - t0);
    sync();
    cleanup?.();
  }
  return median(times.slice(warmup));
}

/** W1 and W3 [El,H,F] out of the interleaved w13 [El,H,2F] (column 2i = W1[:,i], 2i+1 = W3[:,i]). */
function deinterleave(w13) {
  const [El, Hh, F2] = w13.shape;
  return tidy(() => {
    const pairs = w13.view(El, Hh, F2 / 2, 2);
    return [0, 1].map((s) =>
      pairs
        .narrow(3, s, 1)
        .contiguous()
        .view(El, Hh, F2 / 2),
    );
  });
}

// ------------------------------------------------------------------ one step, kept for the check
const f0 = layer.forward(x);
const oursIndices = f0.saved.indices.clone(); // backward releases what forward saved
const y0 = f0.y;
const g0 = layer.backward(f0, dy);
sync();

// ------------------------------------------------ --variant: its outputs against the default's, once
/**
 * One step with the variant's switches against f0/g0 (the default's): relative error in norm per
 * tensor (the experts' gradients on their first and last expert: the whole of w13's is GBs on the
 * host), and the tokens the two routed differently (a switch on the router's GEMM may flip a
 * near-tie; y and dx then differ on those tokens by design, so nothing is judged).
 */
function checkVariant() {
  const { f, g, indices } = withVariant(() => {
    const f = layer.forward(x);
    const indices = f.saved.indices.clone(); // backward releases what forward saved
    return { f, g: layer.backward(f, dy), indices };
  });
  const host = (t) => t.toFloat32Array();
  const a = indices.toArray();
  const b = oursIndices.toArray();
  let rerouted = 0;
  for (let t = 0; t < T; t++) {
    for (let j = 0; j < k; j++) {
      if (a[t * k + j] !== b[t * k + j]) {
        rerouted++;
        break;
      }
    }
  }
  const expertSlices = (name) => [0, E - 1].map((e) => [`${name}[${e}]`, g[name].narrow(0, e, 1), g0[name].narrow(0, e, 1)]);
  const pairs = [['y', f.y, y0], ['dx', g.dx, g0.dx], ['router', g.router, g0.router], ...expertSlices('w13'), ...expertSlices('w2')];
  const relErr = {};
  for (const [name, mine, ref] of pairs) relErr[name] = num(relErrInNorm(host(mine), host(ref)), 6);
  disposeGrads(g);
  disposeForward(f);
  indices.dispose();
  const failed = Object.entries(relErr)
    .filter(([, v]) => !(v < TOLERANCE))
    .map(([n]) => n);
  const result =
    rerouted > 0
      ? `not judged: ${rerouted} token(s) routed differently`
      : failed.length
        ? `FAILED: ${failed.join(', ')} ≥ ${TOLERANCE}`
        : `passed: all ${pairs.length} within ${TOLERANCE}`;
  log(`variant ${variant.text} against the default: ${result} (${JSON.stringify(relErr)})`);
  return { result, rerouted, relErr };
}
const variantCheck = variant ? checkVariant() : null;

// ------------------------------------------------------- memory: what a forward keeps, a step's peak
/**
 * Bytes the current layer's forward keeps for backward (live after it, less before), and a step's
 * peak above what was live before it (the allocator's counts: blocks as handed out, rounded).
 */
function stepMemory() {
  sync();
  const before = memoryStats(dev).liveBytes;
  resetPeakMemory(dev);
  const f = layer.forward(x);
  sync();
  const keptBytes = memoryStats(dev).liveBytes - before;
  const g = layer.backward(f, dy);
  sync();
  const stepPeakBytes = memoryStats(dev).peakBytes - before;
  disposeGrads(g);
  disposeForward(f);
  return { keptBytes, stepPeakBytes };
}
const memory = { default: stepMemory(), variant: variant ? withVariant(stepMemory) : null };
log(`memory: ${JSON.stringify(memory)}`);

// ------------------------------------------------------------- the peer: inputs, start, the check
/** The peer's answers: check (once), rounds (one per round, or { error }). */
let peer = null;
let peerState = noPeer ? 'skipped (--no-peer)' : null;
let check = null;
if (!noPeer && !torchAvailable()) {
  peerState = 'skipped: torch is not installed for python3';
  log(`torch peer ${peerState}${dryRun ? ' (dry run: going on without it)' : ''}`);
}
if (!noPeer && peerState === null) {
  // The weights the forward above used (compute copies, before any AdamW step), ours outputs and grads.
  const [w1, w3] = deinterleave(layer.compute.w13);
  const [dW1, dW3] = deinterleave(g0.w13);
  const routerW = layer.compute.router.view(H, E);
  const tensors = {
    x,
    dy,
    router: routerW,
    w1,
    w3,
    w2: layer.compute.w2,
    y: y0,
    dx: g0.dx,
    dRouter: g0.router,
    dW1,
    dW3,
    dW2: g0.w2,
    indices: oursIndices,
  };
  const bytes = Object.values(tensors).reduce((s, t) => s + t.numel * (t.dtype === 'f32' || t.dtype === 'i32' ? 4 : 2), 0);
  let base = tmpdir();
  try {
    const st = statfsSync('/dev/shm');
    if (existsSync('/dev/shm') && st.bavail * st.bsize > 1.25 * bytes) base = '/dev/shm';
  } catch {
    // no /dev/shm: the temporary folder
  }
  const dir = mkdtempSync(join(base, 'moe-layer-'));
  try {
    const t0 = performance.now();
    writeInputs(dir, tensors);
    for (const t of [w1, w3, dW1, dW3, routerW]) t.dispose();
    log(`inputs for the peer: ${(bytes / 1e9).toFixed(2)} GB in ${dir} (${((performance.now() - t0) / 1e3).toFixed(1)} s)`);
    peer = new PeerSession('moe_layer_torch.py', [dir, String(k), dryRun ? 'cpu' : 'cuda']);
    check = await peer.ready(150_000); // loads the inputs, runs the check (~15 s for main)
    log(`torch peer ready (${((performance.now() - t0) / 1e3).toFixed(1)} s after the inputs began)`);
  } catch (e) {
    peerState = `failed: ${String(e.message ?? e)
      .split('\n')
      .slice(-3)
      .join(' | ')}`;
    log(`torch peer ${peerState}`);
    await peer?.close(5_000);
    peer = null;
  } finally {
    rmSync(dir, { recursive: true, force: true }); // loaded (or failed): the files are done with
  }
}

// AdamW on the fp32 masters, the bf16 compute copies refreshed in the same kernel. The check above
// ran before any step; afterwards the weights move by at most lr per step (timing is unaffected).
// The moments (11.3 GB on the main shape) exist only while AdamW is timed, zeroed each time (their
// values do not change the time), so the steps' peak and theirs do not add up beside the torch peer.
const params = [
  [layer.master.router, g0.router, layer.compute.router.view(H, E)],
  [layer.master.w13, g0.w13, layer.compute.w13],
  [layer.master.w2, g0.w2, layer.compute.w2],
].map(([p, g, c]) => ({ p, g, c }));
let adamSteps = 0;

// ------------------------------------------------------------------------- the phase breakdown
// The step's own tensors, made once by the layer's sequence of ops, then each op re-run into them.
const all = Tensor.fromArray([0, T], { dtype: 'i32', device: dev }); // the layer's wholeBatch(T)
const W = layer.compute;
const { align, padToCapacity } = layer.dispatcher;
const B = {};
B.logits = groupedGemm('NN', x, W.router, all, { dtype: 'f32' });
B.r = routerForward(B.logits, layer.router, { bias: layer.bias });
B.cap = capacity(B.r.indices, B.r.weights, { numExperts: E, dropPolicy: layer.config.dropPolicy });
B.p = permute(x, B.r.indices, B.r.weights, B.cap, { align, padToCapacity });
const R = B.p.numRows; // T·k: dropless, align 1
const rowsShape = (n) => Tensor.empty([R, n], { dtype: 'bf16', device: dev });
B.g = rowsShape(2 * F);
B.h = rowsShape(F);
groupedGemmEpilogue('NN', Epilogue.SwiGLU, B.p.rows, W.w13, B.p.offsets, B.h, B.g);
B.out = groupedGemm('NN', B.h, W.w2, B.p.offsets);
B.y = unpermute(B.out, B.p.rowOf, B.r.weights, { dtype: 'bf16' });
B.entropy = routerEntropy(B.r.scores);
B.aux = Tensor.zeros([1], { device: dev });
B.ub = unpermuteBackward(dy, B.out, B.r.weights, B.p.rowOf, B.p.rowToken, { dtype: 'bf16' });
B.dG = rowsShape(2 * F);
groupedGemmEpilogue('NT', Epilogue.DSwiGLU, B.ub.dRows, W.w2, B.p.offsets, B.dG, B.g);
B.dA = groupedGemm('NT', B.dG, W.w13, B.p.offsets);
// Into the check's gradients, which AdamW reads below (the same products of the same inputs): 5.6 GB
// fewer on the main shape beside the torch peer.
B.dW13 = groupedGemm('TN', B.p.rows, B.dG, B.p.offsets, { dtype: 'f32', out: g0.w13 });
B.dW2 = groupedGemm('TN', B.h, B.ub.dRows, B.p.offsets, { dtype: 'f32', out: g0.w2 });
// --variant layer.weightGradDtype=bf16: the dW phases write bf16 while the variant's layer is in place.
const gradsBf16 = variant?.layerOptions?.weightGradDtype === 'bf16';
B.dW13bf16 = gradsBf16 ? groupedGemm('TN', B.p.rows, B.dG, B.p.offsets, { dtype: 'bf16' }) : null;
B.dW2bf16 = gradsBf16 ? groupedGemm('TN', B.h, B.ub.dRows, B.p.offsets, { dtype: 'bf16' }) : null;
/** The dW phase's output: f32, or bf16 while a layer with weightGradDtype 'bf16' is the one timed. */
const dWOut = (f32, bf16) => (layer.config.weightGradDtype === 'bf16' ? bf16 : f32);
// ... and AdamW then reads the experts' gradients in bf16 (the router's stay f32), as a training
// loop with that layer would: the dW phases' bf16 outputs (the same shapes; no 2.8 GB more).
params[1].gBf16 = B.dW13bf16;
params[2].gBf16 = B.dW2bf16;
const adamwGrad = (q) => dWOut(q.g, q.gBf16 ?? q.g);
B.dLogits = routerBackward(B.ub.dWeights, { scores: B.r.scores, indices: B.r.indices }, layer.router);
B.dLogitsC = B.dLogits.cast('bf16');
B.dxRouter = groupedGemm('NT', B.dLogitsC, W.router, all, { dtype: 'bf16' });
B.dx = permuteBackward(B.dA, B.p.rowOf, { dtype: 'bf16', add: B.dxRouter });
B.dRouter = groupedGemm('TN', x, B.dLogitsC, all, { dtype: 'f32' });

// The roofs' own measurements: a 1 GiB device copy (also the pad in front of each phase) and a
// square bf16 product through our grouped GEMM (one group).
const copyBytes = dryRun ? 16 << 20 : 1 << 30;
const copySrc = Tensor.zeros([copyBytes / 4], { device: dev });
const copyDst = Tensor.empty([copyBytes / 4], { device: dev });
const sqN = dryRun ? 128 : 8192;
const sqA = Tensor.randn([sqN, sqN], { dtype: 'bf16', device: dev, seed: 21 });
const sqB = Tensor.randn([1, sqN, sqN], { dtype: 'bf16', device: dev, seed: 22 });
const sqC = Tensor.empty([sqN, sqN], { dtype: 'bf16', device: dev });
const sqOffsets = Tensor.fromArray([0, sqN], { dtype: 'i32', device: dev });

// Bytes: each tensor a phase reads or writes counted once (an ideal kernel's traffic), bf16 = 2,
// f32 and i32 = 4. FLOPs: 2·m·n·k per product.
const b2 = 2;
const b4 = 4;
const Tk = T * k;
const PHASES = [
  // forward: layer.forward → dispatcher (one rank: the permute is the dispatch) → expertsForward → combine
  {
    pass: 'forward',
    name: 'router GEMM',
    call: "groupedGemm('NN', x, Wr, [0,T], f32)",
    flops: 2 * T * H * E,
    bytes: T * H * b2 + H * E * b2 + T * E * b4,
    run: () => groupedGemm('NN', x, W.router, all, { out: B.logits }),
  },
  {
    pass: 'forward',
    name: 'routing',
    call: 'routerForward(logits, router, { bias })',
    bytes: 2 * T * E * b4 + 2 * Tk * b4 + 2 * E * b4,
    run: () => routerForward(B.logits, layer.router, { bias: layer.bias, out: B.r }),
  },
  {
    pass: 'forward',
    name: 'capacity',
    call: 'capacity(indices, weights, { numExperts, dropPolicy })',
    bytes: 2 * Tk * b4 + 2 * E * b4,
    run: () =>
      capacity(B.r.indices, B.r.weights, {
        numExperts: E,
        dropPolicy: layer.config.dropPolicy,
        out: { slot: B.cap.slot, keptPerExpert: B.cap.keptPerExpert, dropped: B.cap.dropped, invalid: B.cap.invalid },
      }),
  },
  {
    pass: 'forward',
    name: 'permute',
    call: 'permute(x, indices, weights, cap): layout + row gather (the one-rank dispatch)',
    bytes: T * H * b2 + R * H * b2 + 4 * Tk * b4 + 3 * R * b4 + (E + 1) * b4,
    run: () =>
      permute(x, B.r.indices, B.r.weights, B.cap, {
        align,
        padToCapacity,
        out: {
          rows: B.p.rows,
          offsets: B.p.offsets,
          rowOf: B.p.rowOf,
          rowWeight: B.p.rowWeight,
          rowToken: B.p.rowToken,
          invalid: B.p.invalid,
        },
      }),
  },
  {
    pass: 'forward',
    name: 'up GEMM + SwiGLU',
    call: "groupedGemmEpilogue('NN', SwiGLU, rows, w13, offsets, h, g)",
    flops: 2 * R * H * 2 * F,
    bytes: R * H * b2 + E * H * 2 * F * b2 + R * 2 * F * b2 + R * F * b2,
    run: () => groupedGemmEpilogue('NN', Epilogue.SwiGLU, B.p.rows, W.w13, B.p.offsets, B.h, B.g),
  },
  {
    pass: 'forward',
    name: 'down GEMM',
    call: "groupedGemm('NN', h, w2, offsets)",
    flops: 2 * R * F * H,
    bytes: R * F * b2 + E * F * H * b2 + R * H * b2,
    run: () => groupedGemm('NN', B.h, W.w2, B.p.offsets, { out: B.out }),
  },
  {
    pass: 'forward',
    name: 'combine',
    call: 'unpermute(out, rowOf, weights)',
    bytes: R * H * b2 + 2 * Tk * b4 + T * H * b2,
    run: () => unpermute(B.out, B.p.rowOf, B.r.weights, { dtype: 'bf16', out: B.y }),
  },
  {
    pass: 'forward',
    name: 'entropy + aux zero',
    call: 'routerEntropy(scores); Tensor.zeros([1])',
    bytes: T * E * b4 + 2 * b4,
    run: () => {
      routerEntropy(B.r.scores, { out: B.entropy });
      B.aux.fill_(0);
    },
  },
  // backward: layer.backward → combineBackward → expertsBackward → routerBackward → router dx GEMM → dispatchBackward (+ router dx) → router dW GEMM
  {
    pass: 'backward',
    name: 'combine bwd',
    call: 'unpermuteBackward(dy, out, weights, rowOf, rowToken)',
    bytes: T * H * b2 + 2 * R * H * b2 + 3 * Tk * b4 + R * b4,
    run: () => unpermuteBackward(dy, B.out, B.r.weights, B.p.rowOf, B.p.rowToken, { dtype: 'bf16', out: B.ub }),
  },
  {
    pass: 'backward',
    name: 'down dA GEMM + dSwiGLU',
    call: "groupedGemmEpilogue('NT', DSwiGLU, dOut, w2, offsets, dG, g)",
    flops: 2 * R * H * F,
    bytes: R * H * b2 + E * F * H * b2 + 2 * R * 2 * F * b2,
    run: () => groupedGemmEpilogue('NT', Epilogue.DSwiGLU, B.ub.dRows, W.w2, B.p.offsets, B.dG, B.g),
  },
  {
    pass: 'backward',
    name: 'up dA GEMM',
    call: "groupedGemm('NT', dG, w13, offsets)",
    flops: 2 * R * 2 * F * H,
    bytes: R * 2 * F * b2 + E * H * 2 * F * b2 + R * H * b2,
    run: () => groupedGemm('NT', B.dG, W.w13, B.p.offsets, { out: B.dA }),
  },
  {
    pass: 'backward',
    name: 'dW13 GEMM (f32)',
    call: "groupedGemm('TN', rows, dG, offsets, f32)",
    flops: 2 * R * H * 2 * F,
    bytes: R * H * b2 + R * 2 * F * b2 + E * H * 2 * F * b4,
    run: () => groupedGemm('TN', B.p.rows, B.dG, B.p.offsets, { out: dWOut(B.dW13, B.dW13bf16) }),
  },
  {
    pass: 'backward',
    name: 'dW2 GEMM (f32)',
    call: "groupedGemm('TN', h, dOut, offsets, f32)",
    flops: 2 * R * F * H,
    bytes: R * F * b2 + R * H * b2 + E * F * H * b4,
    run: () => groupedGemm('TN', B.h, B.ub.dRows, B.p.offsets, { out: dWOut(B.dW2, B.dW2bf16) }),
  },
  {
    pass: 'backward',
    name: 'router bwd + cast',
    call: 'routerBackward(dWeights, { scores, indices }); dLogits.cast(bf16)',
    bytes: 2 * Tk * b4 + 3 * T * E * b4 + T * E * b2,
    run: () => {
      routerBackward(B.ub.dWeights, { scores: B.r.scores, indices: B.r.indices }, layer.router, { out: B.dLogits });
      B.dLogitsC.copy_(B.dLogits); // the layer's dLogits.cast(dtype): the same copy kernel
    },
  },
  {
    pass: 'backward',
    name: 'router dx GEMM',
    call: "groupedGemm('NT', dLogits, Wr, [0,T])",
    flops: 2 * T * E * H,
    bytes: T * E * b2 + H * E * b2 + T * H * b2,
    run: () => groupedGemm('NT', B.dLogitsC, W.router, all, { out: B.dxRouter }),
  },
  {
    pass: 'backward',
    name: 'permute bwd + router dx',
    call: 'permuteBackward(dA, rowOf, { add: dxRouter }) (the one-rank dispatch backward, the router dx summed in)',
    bytes: R * H * b2 + Tk * b4 + 2 * T * H * b2,
    run: () => permuteBackward(B.dA, B.p.rowOf, { dtype: 'bf16', add: B.dxRouter, out: B.dx }),
  },
  {
    pass: 'backward',
    name: 'router dW GEMM (f32)',
    call: "groupedGemm('TN', x, dLogits, [0,T], f32)",
    flops: 2 * T * H * E,
    bytes: T * H * b2 + T * E * b2 + H * E * b4,
    run: () => groupedGemm('TN', x, B.dLogitsC, all, { out: B.dRouter }),
  },
];

/** Median ms of one call of fn on the GPU alone: `phaseInner` calls queued behind a 1 GiB copy. */
function timePhase(fn) {
  return timeRegion(() => fn(), {
    device: dev,
    warmup: 2,
    repeats: phaseRepeats,
    inner: phaseInner,
    // Idle, then a ~0.5 ms copy queued before the start event: the GPU is still busy with it while
    // the host queues the timed calls, so they run back to back without the host's per-call cost.
    before: () => {
      sync();
      copyDst.copy_(copySrc);
    },
  });
}

/**
 * The step's GPU time with the host ahead, as in a training loop whose host outruns its GPU: the step
 * queued behind enough 1 GiB copies (~0.5 ms each on an H200) to outlast the host's time to issue it
 * (measured once here, before the rounds, plus one copy), so that the start event fires after the
 * host has issued the whole step. Against the step timed from an idle GPU (the 'forward + backward'
 * row), the difference is the GPU's wait for the host, and also the power the copies left unspent
 * (13 copies before it made a step 10% faster at 7a15c7b: benchmarks/README.md).
 */
const headStart = (() => {
  if (!onGpu) return { copies: 1, hostMs: null, copyMs: null }; // the CPU runs the copies before the step anyway
  const hostMs = wallRegion(layerStep, { endSync: false });
  const copyMs = timeRegion(() => copyDst.copy_(copySrc), { device: dev, warmup: 2, repeats: 5, before: sync });
  return { copies: Math.min(64, Math.ceil(hostMs / copyMs) + 1), hostMs, copyMs };
})();
log(
  `host ahead: ${headStart.copies} copies before the step (host ${num(headStart.hostMs, 3)} ms a step, a copy ${num(headStart.copyMs, 3)} ms)`,
);
function timeStepHostAhead() {
  return timeLayer(layerStep, {
    before: () => {
      sync();
      for (let i = 0; i < headStart.copies; i++) copyDst.copy_(copySrc);
    },
  });
}

/**
 * A step's GPU time in a training loop's steady state: `streak` steps queued back to back in one
 * region (each step's gradients and saved tensors released as soon as it is queued: the allocator
 * reuses them in stream order), the region's time over `streak`. Only the first step starts from an
 * idle GPU; the host, issuing a step in well under a step's GPU time, stays ahead after it. The
 * GEMMs run at the clock their sustained power allows, as in training (kernels-notes.md, the power
 * limit): the figure issue 20's step goal is read against.
 */
function timeStreak() {
  const ms = timeRegion(
    () => {
      for (let i = 0; i < streak; i++) layerStep()();
    },
    { device: dev, warmup: 1, repeats: streakRepeats, before: sync },
  );
  return ms / streak;
}

/**
 * The default layer's step captured in a CUDA graph (lib/graph.ts; one rank, dropless: every shape
 * fixed), made after the eager steps above made the layer's per-T tensors: a training loop with no
 * launch gaps and no host work per step. Its gradients live in the graph's pool (a step's peak,
 * 8 GB on the main shape) and each replay rewrites them, so it is captured anew for each timing and
 * its memory handed back to the driver after it, so that the torch peer, another process, finds
 * the room (cached, it would serve only this process). Two pools kept beside the torch peer did not
 * fit an H100's 80 GB (results/moe-layer-oom-with-peer-197934c-h100.log). The variant is not
 * graphed. Not on the CPU (no graphs).
 */
const graphStream = onGpu ? new Stream(dev) : null;
const graphChecks = [];
function captureStep() {
  const run = () =>
    tidy(() => {
      const f = layer.forward(x);
      const grads = layer.backward(f, dy);
      return { y: f.y, ...Object.fromEntries(Object.entries(grads).filter(([, t]) => t !== null)) };
    });
  // A capture that runs out of memory cannot give the cache back (that synchronises, which a capture
  // forbids), so the eager steps' cached blocks go back to the driver first.
  synchronize(dev);
  emptyCache(dev);
  return CudaGraph.capture(graphStream, run, { retain: [x, dy] });
}
function releaseStep(g) {
  for (const t of Object.values(g.outputs)) t.dispose();
  g.dispose();
  synchronize(dev); // the pool's replays done, its blocks cached: hand them back
  emptyCache(dev);
}
/** Once, on the first capture: a replay gives the eager step's y and dx bit for bit. */
function checkStepGraph(side, g) {
  g.replay();
  const f = layer.forward(x);
  let same;
  try {
    const grads = layer.backward(f, dy);
    try {
      same = ['y', 'dx'].every((k) => {
        const a = (k === 'y' ? f.y : grads.dx).toArray();
        const b = g.outputs[k].toArray();
        return Buffer.from(a.buffer).equals(Buffer.from(b.buffer));
      });
    } finally {
      disposeGrads(grads);
    }
  } finally {
    disposeForward(f);
  }
  graphChecks.push({ side, nodes: g.nodeCount, poolBytes: g.poolBytes, reservedBytes: memoryStats(dev).reservedBytes, sameBits: same });
  if (!same) throw new Error('the CUDA graph of the step differs from the eager step (y or dx)');
}
/** timeStreak with each step one replay of the step's CUDA graph (NaN on the CPU, or when the capture failed: graphChecks says why). */
function timeGraphStreak() {
  if (!onGpu || inVariant) return NaN;
  const side = 'default';
  if (graphChecks.some((c) => c.side === side && c.error)) return NaN;
  let g = null;
  try {
    g = captureStep();
    if (!graphChecks.some((c) => c.side === side)) checkStepGraph(side, g);
    const graph = g;
    const ms = timeRegion(
      () => {
        for (let i = 0; i < streak; i++) graph.replay();
      },
      { device: dev, warmup: 1, repeats: streakRepeats, before: sync },
    );
    return ms / streak;
  } catch (e) {
    graphChecks.push({ side, error: String(e?.message ?? e) });
    log(`step graph (${side}): ${e?.message ?? e}`);
    return NaN;
  } finally {
    if (g) releaseStep(g);
  }
}

// ------------------------------------------------------------------------------------- rounds
/** One round of ours: the layer's passes, AdamW, the phases, the roofs' own measurements. */
function oursRound() {
  const forwardMs = timeLayer(() => {
    const f = layer.forward(x);
    return () => disposeForward(f);
  });
  const backwardMs = timeLayer(
    (f) => {
      const g = layer.backward(f, dy);
      return () => {
        disposeGrads(g);
        disposeForward(f);
      };
    },
    { setup: () => layer.forward(x) },
  );
  const stepMs = timeLayer(layerStep);
  const stepHostAheadMs = timeStepHostAhead();
  const streakMs = timeStreak();
  const graphStreakMs = timeGraphStreak();
  const moments = params.map((q) => ({ m: Tensor.zeros(q.p.shape, { device: dev }), v: Tensor.zeros(q.p.shape, { device: dev }) }));
  let adamwMs;
  try {
    adamwMs = timeLayer(() => {
      adamSteps++;
      params.forEach((q, i) => {
        const { m, v } = moments[i];
        adamwStep(q.p, adamwGrad(q), m, v, { lr: 1e-6, step: adamSteps, weightDecay: 0.1, paramBf16: q.c });
      });
      return undefined;
    });
  } finally {
    for (const { m, v } of moments) {
      m.dispose();
      v.dispose();
    }
  }
  const phases = PHASES.map((p) => timePhase(p.run));
  const copyMs = timeRegion(() => copyDst.copy_(copySrc), { device: dev, warmup: 2, repeats: 10, before: sync });
  const gemmMs = timeRegion(() => groupedGemm('NN', sqA, sqB, sqOffsets, { out: sqC }), {
    device: dev,
    warmup: 2,
    repeats: 5,
    before: sync,
  });
  return {
    forwardMs,
    backwardMs,
    stepMs,
    stepHostAheadMs,
    streakMs,
    graphStreakMs,
    adamwMs,
    phases,
    copyMs,
    copyGBs: (2 * copyBytes) / (copyMs * 1e6), // read + write
    gemmMs,
    gemmTflops: (2 * sqN ** 3) / (gemmMs * 1e-3) / 1e12,
  };
}
/** One forward + backward; returns the cleanup of what it made. */
function layerStep() {
  const f = layer.forward(x);
  const g = layer.backward(f, dy);
  return () => {
    disposeGrads(g);
    disposeForward(f);
  };
}

const ours = [];
const torch = [];
const oursVariant = []; // --variant: its rounds, timed beside ours' (A B, then B A)
for (let round = 0; round < rounds; round++) {
  const t0 = performance.now();
  if (variant && round % 2 === 1) oursVariant.push(withVariant(oursRound));
  ours.push(oursRound());
  if (variant && round % 2 === 0) oursVariant.push(withVariant(oursRound));
  sync();
  let theirs = null;
  if (peer) {
    try {
      theirs = await peer.request(
        { cmd: 'round', warmup, repeats, streak, streak_repeats: streakRepeats, peak_n: dryRun ? 256 : 8192 },
        60_000,
      ); // ~4 s for main
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
  const best = Math.min(...[theirs?.step_ms, theirs?.fused_step_ms].filter(Number.isFinite));
  log(
    `round ${round + 1}/${rounds} (${((performance.now() - t0) / 1e3).toFixed(1)} s): ours step ${o.stepMs.toFixed(3)} ms` +
      (Number.isFinite(best) ? `, torch ${best.toFixed(3)} ms (${(best / o.stepMs).toFixed(2)}x)` : '') +
      (variant ? `, variant ${oursVariant.at(-1).stepMs.toFixed(3)} ms` : '') +
      `, phases sum ${o.phases.reduce((s, v) => s + v, 0).toFixed(3)} ms, copy ${o.copyGBs.toFixed(0)} GB/s` +
      (Number.isFinite(theirs?.matmul_tflops) ? `, torch matmul ${theirs.matmul_tflops.toFixed(0)} TFLOP/s` : ''),
  );
}
if (peer) await peer.close();

// Host time. On this path (one rank, dropless, align 1) the layer reads nothing from the device: the
// permute knows R = T·k without the counts (since f83fa52) and the dispatcher reads its offsets only
// if asked. So the wall time of the forward() + backward() calls with no trailing synchronize, the
// GPU idle at the start, is the host's (TypeScript, validation, allocation, launches): hostMs.
const callsMs = wallRegion(layerStep, { endSync: false });
const wallStepMs = wallRegion(layerStep, { endSync: true });

// One step traced (lib/trace.ts), the GPU idle at its start: when the host and the GPU reached each
// of the layer's and the dispatcher's marks, from the first. 'GPU lag' = GPU time − host time: near
// 0, the GPU had caught up with the host there (it was waiting for work); large, work was queued.
// (A mark's event costs the host a few µs.) The second of two traced steps is kept.
function tracedStep() {
  sync();
  const wasEnabled = trace.enabled;
  trace.enable();
  try {
    const cleanup = layerStep();
    const rows = trace.collect().map((r) => ({
      mark: r.name,
      hostMs: num(r.hostMs, 3),
      gpuMs: r.gpuMs === null ? null : num(r.gpuMs, 3),
      lagMs: r.gpuMs === null ? null : num(r.gpuMs - r.hostMs, 3),
    }));
    cleanup();
    return rows;
  } finally {
    if (!wasEnabled) trace.disable();
  }
}
tracedStep();
const timeline = tracedStep();

// ------------------------------------------------------------------------------------- report
const fmtRange = ([lo, hi], d = 3) => (Number.isFinite(lo) ? `${num(lo, d)}–${num(hi, d)}` : null);
const col = (arr, key) => arr.map((r) => (typeof r?.[key] === 'number' ? r[key] : NaN));
const flopsFwd = 2 * T * k * H * 3 * F + 2 * T * H * E; // experts (W1, W3, W2) + router
const tf = (flops, ms) => (ms > 0 ? num(flops / (ms * 1e-3) / 1e12, 1) : null);
/** torch's time per round for `torchKey`, its plain and fused variants, and the faster of the two. */
function torchPerRound(torchKey) {
  const t = col(torch, torchKey);
  const tf_ = torchKey === 'adamw_ms' ? t.map(() => NaN) : col(torch, `fused_${torchKey}`);
  return { t, tf_, best: t.map((v, i) => Math.min(...[v, tf_[i]].filter(Number.isFinite))) };
}
/** A row of the comparison: ours and torch per round, the ratio per round against the faster torch variant. */
function compare(what, oursKey, torchKey, flops) {
  const o = col(ours, oursKey);
  const { t, tf_, best } = torchPerRound(torchKey);
  const perRound = best.map((v, i) => v / o[i]); // NaN where the peer gave nothing that round
  const ratios = perRound.filter(Number.isFinite);
  return {
    row: {
      what,
      'ours ms': num(median(o)),
      range: fmtRange(range(o)),
      'torch ms': num(median(t)),
      'fused ms': num(median(tf_)),
      'torch range': fmtRange(range(best)), // the faster variant of each round
      'torch/ours': ratios.length ? num(median(ratios), 2) : null,
      'ratio range': ratios.length ? fmtRange(range(ratios), 2) : null,
      'TFLOP/s': flops ? tf(flops, median(o)) : null,
    },
    perRound: {
      ours: o.map((v) => num(v, 4)),
      torch: t.map((v) => num(v, 4)),
      torchFused: tf_.map((v) => num(v, 4)),
      torchBest: best.map((v) => num(v, 4)),
      ratio: perRound.map((v) => num(v, 3)),
    },
  };
}
const comparisons = [
  compare('forward', 'forwardMs', 'forward_ms', flopsFwd),
  compare('backward', 'backwardMs', 'backward_ms', 2 * flopsFwd),
  compare('forward + backward', 'stepMs', 'step_ms', 3 * flopsFwd),
  compare(`forward + backward, ${streak} back to back`, 'streakMs', 'streak_ms', 3 * flopsFwd),
  compare(
    `forward + backward, ${streak} back to back, ours replayed from a CUDA graph (torch eager)`,
    'graphStreakMs',
    'streak_ms',
    3 * flopsFwd,
  ),
  compare('AdamW (fp32 → bf16)', 'adamwMs', 'adamw_ms', 0),
];
const stepMs = median(col(ours, 'stepMs'));
const stepHostAheadMs = median(col(ours, 'stepHostAheadMs'));
const rows = comparisons.map((c) => c.row);
rows.push({
  what: 'forward + backward, host ahead',
  'ours ms': num(stepHostAheadMs),
  range: fmtRange(range(col(ours, 'stepHostAheadMs'))),
  'TFLOP/s': tf(3 * flopsFwd, stepHostAheadMs),
});
rows.push({ what: 'host per step (TS calls)', 'ours ms': num(callsMs), 'of step': num(callsMs / stepMs, 3) });
rows.push({ what: 'wall: step + synchronize', 'ours ms': num(wallStepMs) });

// --variant: per metric and per phase, its time and the ratio variant/default of each round.
/** Per round variant / default of `pick(round)` (a number): the ratios, their median and range. */
function variantRatios(pick) {
  const perRound = ours.map((o, i) => pick(oursVariant[i]) / pick(o));
  return { perRound: perRound.map((v) => num(v, 4)), median: num(median(perRound), 4), range: range(perRound).map((v) => num(v, 4)) };
}
// [what, ours' key, torch's key (null: no torch counterpart)]
const VARIANT_METRICS = [
  ['forward', 'forwardMs', 'forward_ms'],
  ['backward', 'backwardMs', 'backward_ms'],
  ['forward + backward', 'stepMs', 'step_ms'],
  ['forward + backward, host ahead', 'stepHostAheadMs', null],
  [`forward + backward, ${streak} back to back`, 'streakMs', 'streak_ms'],
  ['AdamW', 'adamwMs', 'adamw_ms'],
];
/** Per round, the faster torch variant's time over the variant's (the same rounds): null without a peer. */
function torchOverVariant(oursKey, torchKey) {
  if (!torchKey) return null;
  const { best } = torchPerRound(torchKey);
  const perRound = best.map((v, i) => v / oursVariant[i]?.[oursKey]);
  const ratios = perRound.filter(Number.isFinite);
  if (!ratios.length) return null;
  return { perRound: perRound.map((v) => num(v, 3)), median: num(median(ratios), 3), range: range(ratios).map((v) => num(v, 3)) };
}
const variantReport = variant && {
  switches: variant.update,
  layerOptions: variant.layerOptions,
  check: variantCheck,
  // What the dW phases wrote on each side (bf16 with layer.weightGradDtype=bf16).
  dWDtype: { default: dWOut(B.dW13, B.dW13bf16).dtype, variant: withVariant(() => dWOut(B.dW13, B.dW13bf16).dtype) },
  // What AdamW read for w13 on each side.
  adamwGradDtype: { default: adamwGrad(params[1]).dtype, variant: withVariant(() => adamwGrad(params[1]).dtype) },
  metrics: VARIANT_METRICS.map(([what, key, torchKey]) => ({
    what,
    ms: num(median(col(oursVariant, key)), 4),
    perRound: col(oursVariant, key).map((v) => num(v, 4)),
    variantOverDefault: variantRatios((r) => r[key]),
    // The variant against torch in the same rounds (e.g. bf16 weight gradients, as torch's layer writes them).
    torchOverVariant: torchOverVariant(key, torchKey),
  })),
  phases: PHASES.map((p, i) => ({
    phase: p.name,
    ms: num(median(oursVariant.map((r) => r.phases[i])), 4),
    variantOverDefault: variantRatios((r) => r.phases[i]),
  })),
};
if (variantReport) {
  for (const m of variantReport.metrics) {
    rows.push({
      what: `variant: ${m.what}`,
      'ours ms': m.ms,
      range: fmtRange(range(m.perRound)),
      'torch/ours': m.torchOverVariant?.median ?? null,
      'ratio range': m.torchOverVariant ? fmtRange(m.torchOverVariant.range, 3) : null,
      'variant/default': m.variantOverDefault.median,
      'v/d range': fmtRange(m.variantOverDefault.range),
    });
  }
}

// Roofs: per round, then the median over rounds.
const copyGBs = median(col(ours, 'copyGBs'));
const torchPeak = median(col(torch, 'matmul_tflops'));
const oursPeak = median(col(ours, 'gemmTflops'));
const peakSource =
  peakOverride !== null
    ? `--peak-tflops ${peakOverride} (given)`
    : Number.isFinite(torchPeak)
      ? `torch.matmul bf16 ${dryRun ? 256 : 8192}³ in the same run (peer), median over rounds`
      : `our groupedGemm bf16 ${sqN}³ (one group) in the same run, median over rounds (no torch peer)`;
const peakTflops = peakOverride ?? (Number.isFinite(torchPeak) ? torchPeak : oursPeak);
const roofs = {
  tensorTflops: num(peakTflops, 1),
  tensorSource: peakSource,
  torchMatmulTflops: { median: num(torchPeak, 1), perRound: col(torch, 'matmul_tflops').map((v) => num(v, 1)) },
  oursSquareGemmTflops: { n: sqN, median: num(oursPeak, 1), perRound: col(ours, 'gemmTflops').map((v) => num(v, 1)) },
  copyGBs: num(copyGBs, 1),
  copyBytes,
  copySource: `Tensor.copy_ of ${copyBytes / 2 ** 20} MiB f32, device to device, read + write counted`,
  copyPerRound: col(ours, 'copyGBs').map((v) => num(v, 1)),
};

// The breakdown: per phase the median over rounds of its per-round median, its roof and share.
const phaseRows = [];
const phases = PHASES.map((p, i) => {
  const per = ours.map((o) => o.phases[i]);
  const ms = median(per);
  const flopMs = p.flops ? (p.flops / (peakTflops * 1e12)) * 1e3 : 0;
  const byteMs = (p.bytes / (copyGBs * 1e9)) * 1e3;
  const roofMs = Math.max(flopMs, byteMs);
  const bound = flopMs >= byteMs ? 'FLOPs' : 'bytes';
  return {
    pass: p.pass,
    phase: p.name,
    call: p.call,
    ms: num(ms, 4),
    msRange: range(per).map((v) => num(v, 4)),
    perRound: per.map((v) => num(v, 4)),
    flops: p.flops ?? 0,
    bytes: p.bytes,
    bound,
    roofMs: num(roofMs, 4),
    shareOfRoof: num(roofMs / ms, 3),
  };
});
const passMs = { forward: median(col(ours, 'forwardMs')), backward: median(col(ours, 'backwardMs')) };
const sums = {};
const pct = (a, b) => num((100 * a) / b, 1);
/** The breakdown's row for a sum of phases: their roof, and their share of the measured pass. */
function pushSum(label, sum, roof, measuredMs) {
  phaseRows.push({ phase: label, ms: num(sum, 4), 'roof ms': num(roof, 4), '%roof': pct(roof, sum), '%pass': pct(sum, measuredMs) });
}
/** A measured pass or step against the sum of its phases: its `phaseSums` entry (`sums[key]`) and its row. */
function pushMeasured(key, label, sum, roof, ms) {
  sums[key] = { phasesMs: num(sum, 4), roofMs: num(roof, 4), measuredMs: num(ms, 4), gapMs: num(ms - sum, 4) };
  phaseRows.push({ phase: label, ms: num(ms, 4), 'roof ms': num(roof, 4), '%roof': pct(roof, ms), 'gap ms': num(ms - sum, 4) });
}
for (const pass of ['forward', 'backward']) {
  const mine = phases.filter((p) => p.pass === pass);
  for (const p of mine) {
    const v = variantReport?.phases.find((q) => q.phase === p.phase);
    phaseRows.push({
      phase: `${pass === 'forward' ? 'F' : 'B'} ${p.phase}`,
      ms: p.ms,
      range: fmtRange(p.msRange, 4),
      GFLOP: p.flops ? num(p.flops / 1e9, 1) : null,
      MB: num(p.bytes / 1e6, 1),
      bound: p.bound,
      'roof ms': p.roofMs,
      '%roof': pct(p.shareOfRoof, 1),
      '%pass': pct(p.ms, passMs[pass]),
      ...(v ? { 'variant ms': v.ms, 'v/d': v.variantOverDefault.median } : {}),
    });
  }
  const sum = mine.reduce((s, p) => s + p.ms, 0);
  const roof = mine.reduce((s, p) => s + p.roofMs, 0);
  pushSum(`${pass}: sum of phases`, sum, roof, passMs[pass]);
  pushMeasured(pass, `${pass}: measured`, sum, roof, passMs[pass]);
}
const sumAll = sums.forward.phasesMs + sums.backward.phasesMs;
const roofAll = sums.forward.roofMs + sums.backward.roofMs;
pushSum('step: sum of phases', sumAll, roofAll, stepMs);
pushMeasured('step', 'step: measured (fwd + bwd)', sumAll, roofAll, stepMs);
// The same step with the host ahead (timeStepHostAhead), and steps back to back (timeStreak): the
// training loop's steady state, at the sustained clock.
pushMeasured('stepHostAhead', 'step: measured, host ahead', sumAll, roofAll, stepHostAheadMs);
pushMeasured('streak', `step: measured, ${streak} back to back`, sumAll, roofAll, median(col(ours, 'streakMs')));

// The check (once, before timing).
const err = check?.rel_err ?? {};
// The verdict: every compared tensor within TOLERANCE (none compared: the peer was skipped or failed).
// Tokens routed differently (fp32 near-ties) change their own y and dx rows entirely: then y and dx
// are judged over the tokens routed alike.
const judged = Object.entries(err).filter(([n]) => !(check.routing_mismatch_tokens > 0 && (n === 'y' || n === 'dx')));
const failed = judged.filter(([, v]) => !(typeof v === 'number' && v < TOLERANCE)).map(([n]) => n);
const checkRows = Object.entries(err).map(([name, v]) => ({
  what: `relErr ${name}`,
  relErr: num(v, 5),
  ok: judged.some(([n]) => n === name) ? typeof v === 'number' && v < TOLERANCE : null,
}));
if (check?.routing_mismatch_tokens !== undefined)
  checkRows.push({ what: 'tokens routed differently', relErr: check.routing_mismatch_tokens });
const checkResult =
  check === null
    ? noPeer
      ? 'skipped (--no-peer)'
      : dryRun && peerState?.startsWith('skipped')
        ? `skipped (dry run): ${peerState}`
        : `not run: ${peerState ?? 'no answer'}`
    : Object.keys(err).length === 0
      ? 'not run: the peer reported no errors'
      : failed.length
        ? `FAILED: ${failed.join(', ')} ≥ ${TOLERANCE}`
        : `passed: all ${judged.length} judged within ${TOLERANCE}`;

const peerNote =
  check === null
    ? peerState
    : `torch ${check.torch} (${check.grouped_mm}): the same layer in autograd on the same bf16 weights and inputs: logits = x·Wr in fp32, softmax, top-k, weights = chosen probabilities, sort by expert (groups padded to multiples of 16 rows, no host sync), SwiGLU with torch._grouped_mm (W1 and W3 separate; 'fused': one [H,2F] GEMM), weighted unpermute in fp32, backward with dy; AdamW: torch.optim.AdamW(fused=True) on fp32 masters + copy into the bf16 params; matmul: torch.matmul of two bf16 N×N matrices (the tensor-core roof)${peerState ? `; ${peerState}` : ''}`;

writeResult(
  `${shape.area}${variant ? `-vs-${variant.slug}` : ''}${dryRun ? '-dryrun' : ''}`,
  rows,
  {
    config: {
      shape: shapeName,
      ...cfg,
      dtype: 'bf16',
      scoreFunction: 'softmax',
      normalize: false,
      dropless: true,
      sharedExpert: false,
      auxLosses: false,
      device: dev,
      rounds,
      warmup,
      repeats,
      phaseRepeats,
      phaseInner,
    },
    check: checkResult,
    timing: `${rounds} round(s); each times ours (forward, backward, forward + backward, AdamW, the phases, the copy and square GEMM) and then the torch peer (both variants, AdamW, matmul), one Python process kept alive for the run. Per round: CUDA events, median of ${repeats} after ${warmup} warm-up, GPU idle before each region. 'ours ms', 'torch ms': the median of the round medians; ranges over rounds; 'torch/ours': per round, the faster torch variant's time over ours, its median and range. forward = MoELayer.forward; backward = MoELayer.backward after an untimed forward; forward + backward in one region; 'forward + backward, host ahead' = the same queued behind ${headStart.copies} copies of ${copyBytes / 2 ** 20} MiB (the host's time to issue a step, ${num(headStart.hostMs, 3)} ms measured before the rounds, over a copy's ${num(headStart.copyMs, 3)} ms, plus one), so that the host has issued the step before the GPU starts it (a training loop whose host outruns its GPU; no torch counterpart); 'forward + backward, ${streak} back to back' = ${streak} steps queued in one region, its time over ${streak} (median of ${streakRepeats} after one warm-up streak; each step's gradients released as it is queued; torch the same, its grads set to None after each backward): a training loop's steady state, the GEMMs at their sustained clock; AdamW = three fused adamwStep calls (router, w13, w2) refreshing the bf16 copies (lr 1e-6: the weights move by at most lr per step after the check; a variant with layer.weightGradDtype=bf16 reads the experts' gradients in bf16: 'adamwGradDtype'); '… ours replayed from a CUDA graph (torch eager)' = the same streak with each of our steps one replay of the default layer's step, captured in each round before its timing and released after (CudaGraph; its y and dx checked once against an eager step's bits: 'graph'), beside torch's eager streak`,
    breakdown: `the layer's ops called one by one in its order on the step's tensors (outputs preallocated: the same kernels without allocation), each phase timed on its own: ${phaseInner} back-to-back calls per region queued behind a ${copyBytes / 2 ** 20} MiB device copy (the GPU stays busy while the host queues them, so a phase is GPU time without the host's per-call cost), median of ${phaseRepeats} regions per round, then the median over rounds. SwiGLU and dSwiGLU are fused into the up GEMM's and the down dA GEMM's epilogues (no separate phase). Roof per phase = max(FLOPs / tensor roof, bytes / copy bandwidth); '% roof' = roof / measured; bound = the larger term. Bytes: each tensor the phase reads or writes counted once (bf16 2, f32 and i32 4 bytes). Small inputs (logits, indices) stay in L2 between the back-to-back calls, as they do between the phases of a real step. sum of phases vs the measured pass: the gap is host and launch overhead (the GPU idle between kernels)`,
    timeline:
      "one forward + backward traced (lib/trace.ts marks of the layer and its dispatcher), the GPU idle at its start, the second of two: per mark the host's and the GPU's time from the first mark and the GPU's lag behind the host (near 0: the GPU had run out of work there)",
    host: "host row: wall time of the forward() + backward() calls with no trailing synchronize, the GPU idle at the start. The layer reads nothing from the device on this path (one rank, dropless, align 1; since a8795c2: before it, tidy() read the dispatch handle's row counts at each forward's end, a wait for the GPU inside this figure), so this is the host's time per step (JS, validation, allocation, launches); 'of step' compares it to the device time of the step. An upper bound if some call blocks (an allocation missing the cache).",
    flops: 'forward: 2·T·k·H·3F (experts) + 2·T·H·E (router); backward counted as 2× forward',
    peer: peerNote,
    tolerance: `relative errors in norm (‖ours − torch‖/‖torch‖) below ${TOLERANCE}: bf16 products agree to about 1e-2; near-ties in the fp32 logits may pick different experts for a few tokens (counted), which moves those tokens’ rows and the norm a little ('same routing': y and dx over the tokens routed alike)`,
    torchFusedVsUnfusedY: check?.fused_vs_unfused_y ?? null,
    memory:
      "memory: per layer (the default's, and the variant's), the bytes a forward keeps for backward (live after it less before) and a step's peak above what was live before it, from the allocator's counts (blocks as handed out), measured once after the check",
    variant: variant
      ? `--variant ${variant.text}: our layer again with those switches set (layer.* options: a second layer of the same weights), timed in the same rounds as the default (A B in even rounds, B A in odd ones, then torch): 'variant: …' rows and the phases' 'variant ms'; variant/default = per round the variant's time over the default's, median and range (> 1: the default faster); its outputs and gradients checked once against the default's (variant.check)`
      : null,
  },
  {
    checkRows,
    comparisons: Object.fromEntries(comparisons.map((c) => [c.row.what, c.perRound])),
    roofs,
    phases,
    phaseSums: sums,
    host: { callsMs: num(callsMs, 4), wallStepMs: num(wallStepMs, 4), ofStep: num(callsMs / stepMs, 3) },
    timeline,
    memory,
    graph: graphChecks,
    variant: variantReport,
    rounds: ours.map((o, i) => ({
      ours: { ...o, phases: Object.fromEntries(PHASES.map((p, j) => [p.name, num(o.phases[j], 4)])) },
      torch: torch[i],
    })),
  },
  { print: 'compact' },
);
const sig = (v) => (Number.isFinite(v) ? +v.toPrecision(3) : null);
const peakFrom = peakOverride !== null ? '--peak-tflops' : Number.isFinite(torchPeak) ? 'torch.matmul' : 'our square GEMM';
printTable(
  `phases of our step, ${label}; roofs ${sig(peakTflops)} TFLOP/s (${peakFrom}), ${sig(copyGBs)} GB/s (device copy); %pass: of the measured pass`,
  phaseRows,
);
printTable(
  'one step traced: when the host and the GPU reached each mark (ms from the first); GPU lag near 0: the GPU waited for the host',
  timeline.map((r) => ({ mark: r.mark, 'host ms': r.hostMs, 'GPU ms': r.gpuMs, 'GPU lag': r.lagMs })),
);
if (checkRows.length) printTable('check (once, before timing)', checkRows);

const bufs = [
  B.logits,
  ...Object.values(B.r),
  ...Object.values(B.cap),
  ...Object.values(B.p),
  B.g,
  B.h,
  B.out,
  B.y,
  B.entropy,
  B.aux,
  ...Object.values(B.ub),
  B.dG,
  B.dA,
  B.dW13,
  B.dW2,
  B.dW13bf16,
  B.dW2bf16,
  B.dLogits,
  B.dLogitsC,
  B.dxRouter,
  B.dRouter,
  B.dx,
];
for (const t of new Set(bufs)) if (t instanceof Tensor) t.dispose();
for (const t of [all, copySrc, copyDst, sqA, sqB, sqC, sqOffsets]) t.dispose();
disposeGrads(g0);
for (const t of [y0, f0.tokensPerExpert, f0.dropped, f0.auxLoss, f0.routerEntropy, oursIndices, x, dy]) t.dispose();
layer.dispose();
variantLayer?.dispose();
console.log(`check: ${checkResult}`);
if (variantCheck) console.log(`variant check: ${variantCheck.result}`);
if (checkResult.startsWith('FAILED') || checkResult.startsWith('not run') || variantCheck?.result.startsWith('FAILED'))
  process.exitCode = 1;
