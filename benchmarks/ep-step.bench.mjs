// Weak scaling of one MoE layer training step under expert parallelism (issue #8): every rank holds
// El experts and T tokens. The step at EP = P (experts spread over the P ranks, rows through the
// communicator) stands beside the same per-rank work at EP = 1 (each rank alone with El experts and
// its T tokens: no exchange), and the step's communication is timed on its own.
//   mpirun -np P node benchmarks/ep-step.bench.mjs [--out DIR] [--quick] [--dry-run] [--transport ipc|nccl]
//        [--overlap] [--shared-ffn Fs] [--fp8 true|keep] [--timeout-ms N]
//   node benchmarks/ep-step.bench.mjs                                  (P = 1: no exchange at all)
// Shape: T = 4096 tokens per rank, H = 7168, F = 2048, 8 experts per rank (E = 8P), top-8, bf16,
// softmax routing, dropless, no shared expert (--dry-run: tiny shapes on the CPU, MPI backend).
// --shared-ffn Fs: a shared expert of width Fs in every layer, EP=1 included (DeepSeek-V3: 2048):
//                 the compute a comm stream can hide the exchanges behind.
// Transports (lib/moe/dispatcher.ts): several ranks on GPUs time the step through 'ipc' (peer
// memory) and 'nccl' (the communicator's all-to-all), one layer each, one after the other
// (--transport picks one); on the CPU (dry runs) the MPI all-to-all.
// --fp8 true|keep: the layers dispatch fp8 rows (MoELayer's fp8Dispatch, EP=1 included: the same
//            per-rank work); with 'keep' the comm regions combine a bf16 stand-in for the expert
//            output (the rows arrive as e4m3). Result file ep-step-…-fp8 / -fp8keep.
// --overlap: per transport also the same step on a layer with a comm stream (commStream: true:
//            the exchanges on their own stream beside the shared expert and the router backward);
//            'overlap saves ms' = step without − step with.
// Timing: CUDA events, median after warm-up; before each region every rank waits for its device and
// meets the others at a barrier, so the regions start together.
//   step (EP=P)   forward + backward of MoELayer({ group: world }). The optimizer step is local and
//                 the same at any EP size (benchmarks/moe-layer.bench.mjs times it).
//   step (EP=1)   the same on a layer with El experts and a one-rank group, on this rank's GPU.
//   comm          the step's four exchanges through the layer's Dispatcher on the routing its
//                 forward chose: dispatch + combine (forward), combineBackward + dispatchBackward
//                 (backward), each with its count exchange and host read, on rows of the step's size.
//   compute ≈ step(EP=P) − comm (the layer does not overlap them unless given a comm stream). The
//                 comm regions also hold the permute, unpermute, regrouping and the count reads,
//                 so this undercounts compute a little.
// Weak-scaling efficiency = step(EP=1) / step(EP=P). Below 1 for two reasons: the exchanges, and
// load imbalance (at EP=1 with top-8 of 8 experts every expert gets every token; at EP=P a rank
// gets what the router sends it): 'imbalance' = the rows this rank received / (T·k).
// Ranks sharing a GPU (MPI backend, host staging) contend for it: the EP=1 figure is then the
// slowest of P concurrent runs, and the comm figure measures host staging, not NVLink.
import { capacity, disposeSaved, MoELayer, synchronize, Tensor } from '../dist/lib/index.js';
import { args, benchWorld, dryRun, flag, quick, timeRegion, writeResult } from './harness.mjs';

// A minute per collective at most: a rank that fails must not leave the others waiting 5 minutes.
const { world, P, rank, dev, onGpu, log } = await benchWorld({ timeoutMs: 60_000 });
if (args.includes('--help')) {
  log(
    'mpirun -np P node benchmarks/ep-step.bench.mjs [--out DIR] [--quick] [--dry-run] [--transport ipc|nccl] [--overlap] [--shared-ffn Fs] [--fp8 true|keep] [--timeout-ms N]',
  );
  process.exit(0);
}

const cfg = dryRun ? { T: 64, H: 128, F: 64, El: 4, k: 2 } : { T: 4096, H: 7168, F: 2048, El: 8, k: 8 };
const { T, H, F, El, k } = cfg;
const E = El * P;
const sharedFfn = Number(flag('--shared-ffn', '0'));
if (!Number.isSafeInteger(sharedFfn) || sharedFfn < 0)
  throw new Error(`--shared-ffn must be a non-negative integer; received ${flag('--shared-ffn')}`);
const Fs = dryRun && sharedFfn > 0 ? 32 : sharedFfn;
const fp8Flag = flag('--fp8', null);
if (fp8Flag !== null && fp8Flag !== 'true' && fp8Flag !== 'keep') throw new Error(`--fp8 must be true or keep; received ${fp8Flag}`);
const fp8Dispatch = fp8Flag === null ? false : fp8Flag === 'keep' ? 'keep' : true;
const asked = flag('--transport', null);
if (asked !== null && asked !== 'ipc' && asked !== 'nccl') throw new Error(`--transport must be ipc or nccl; received ${asked}`);
// One rank: no exchange ('local'). Several: both transports on GPUs, the all-to-all on the CPU.
const transports = P === 1 ? ['local'] : asked ? [asked] : onGpu ? ['ipc', 'nccl'] : ['nccl'];
const overlaps = args.includes('--overlap') ? [false, true] : [false];
const dtype = dryRun ? 'f32' : 'bf16';
const staged = onGpu && world.backend === 'mpi';
const warmup = dryRun ? 1 : staged ? 1 : 3;
const repeats = dryRun ? 3 : staged ? 3 : quick ? 10 : 30;

/** Every rank waits for its device, then all meet: each timed region starts together. */
function align() {
  if (onGpu) synchronize(dev);
  if (P > 1) {
    world.barrier();
    if (onGpu) synchronize(dev);
  }
}
const time = (body, setup) => timeRegion(body, { device: dev, warmup, repeats, setup, before: align });

function disposeForward(f) {
  disposeSaved(f);
  for (const t of [f.y, f.tokensPerExpert, f.dropped, f.auxLoss, f.routerEntropy]) t.dispose();
}
function disposeGrads(g) {
  for (const t of Object.values(g)) t?.dispose();
}
/** Median ms of one forward + backward of `layer` on x, dy. */
function stepMs(layer, x, dy) {
  return time(() => {
    const f = layer.forward(x);
    const g = layer.backward(f, dy);
    return () => {
      disposeGrads(g);
      disposeForward(f);
    };
  });
}

const layerConfig = {
  hidden: H,
  ffn: F,
  topK: k,
  scoreFunction: 'softmax',
  dtype,
  device: dev,
  seed: 1234,
  ...(Fs ? { sharedFfn: Fs } : {}),
  ...(fp8Dispatch ? { fp8Dispatch } : {}),
};
const x = Tensor.randn([T, H], { dtype, device: dev, seed: 11 + rank });
const dy = Tensor.randn([T, H], { dtype, device: dev, seed: 31 + rank });

// ------------------------------------------------------------------------------- EP = P
log(
  `ep-step: ${P} rank(s), backend ${world.backend}, device ${dev}, T=${T} per rank, H=${H} F=${F}${Fs ? ` shared ${Fs}` : ''}, ${El} experts per rank (E=${E}), top-${k}, transports ${transports.join(', ')}${overlaps.length > 1 ? ', with and without a comm stream' : ''}, warm-up ${warmup}, repeats ${repeats}`,
);
/** Per transport: the step without (and with) a comm stream, and the step's exchanges alone. */
function measure(transport) {
  const choice = transport === 'local' ? {} : { transport };
  const layer = new MoELayer({ ...layerConfig, numExperts: E, group: world, ...choice });
  const stepP = stepMs(layer, x, dy);
  const used = layer.dispatcher.transport ?? transport;
  // The step's exchanges on the routing the layer's forward chose, rows of the step's size.
  const f0 = layer.forward(x);
  const indices = f0.saved.indices.clone();
  const weights = f0.saved.weights.clone();
  disposeForward(f0);
  const cap = capacity(indices, weights, { numExperts: E });
  const d = layer.dispatcher;
  // What combine and combineBackward take as the experts' output: the dispatched rows themselves,
  // or with fp8 'keep' (e4m3 rows) a bf16 stand-in of their shape, made once.
  let standIn = null;
  const expertOut = (got) => {
    if (fp8Dispatch !== 'keep') return got.rows;
    standIn ??= Tensor.randn([got.rows.shape[0], H], { dtype, device: dev, seed: 51 + rank });
    return standIn;
  };
  const disposeDispatched = (got) => {
    for (const t of [got.rows, got.scales, got.weights]) t?.dispose();
    got.handle.dispose();
  };
  const commForward = time(() => {
    const got = d.dispatch(x, indices, weights, cap);
    const y = d.combine(expertOut(got), got.handle, weights);
    return () => {
      y.dispose();
      disposeDispatched(got);
    };
  });
  const commBackward = time(
    (got) => {
      const back = d.combineBackward(dy, expertOut(got), got.handle, weights);
      const dx = d.dispatchBackward(back.dExpertOut, got.handle);
      return () => {
        for (const t of [dx, back.dExpertOut, back.dWeights]) t.dispose();
        disposeDispatched(got);
      };
    },
    () => d.dispatch(x, indices, weights, cap),
  );
  const recvRows = (() => {
    const got = d.dispatch(x, indices, weights, cap);
    const n = got.rows.shape[0];
    disposeDispatched(got);
    return n;
  })();
  standIn?.dispose();
  for (const t of [indices, weights]) t.dispose();
  for (const t of Object.values(cap)) if (t instanceof Tensor) t.dispose();
  layer.dispose();
  let stepOverlap = NaN;
  if (overlaps.includes(true)) {
    // The same weights (same seed) and inputs, the exchanges on the layer's own comm stream.
    const over = new MoELayer({ ...layerConfig, numExperts: E, group: world, commStream: true, ...choice });
    stepOverlap = stepMs(over, x, dy);
    over.dispose();
  }
  log(`  ${used}: step ${stepP.toFixed(3)} ms${overlaps.length > 1 ? `, with a comm stream ${stepOverlap.toFixed(3)} ms` : ''}`);
  return { used, values: [stepP, stepOverlap, commForward, commBackward, recvRows] };
}
const measured = transports.map(measure);

// ------------------------------------------------------------------------------- EP = 1
const alone = new MoELayer({ ...layerConfig, numExperts: El });
const step1 = stepMs(alone, x, dy);
alone.dispose();

// ------------------------------------------------------------------------------- report
const FIELDS = ['stepP', 'stepOverlap', 'commForward', 'commBackward', 'recvRows'];
const mine = [step1, ...measured.flatMap((m) => m.values)].map((v) => (Number.isFinite(v) ? v : -1));
const width = mine.length;
const mineT = Tensor.fromArray(mine, { dtype: 'f32', device: dev });
const allT = P > 1 ? world.allGather(mineT) : mineT;
const all = Array.from(allT.toArray()).map((v) => (v < 0 ? NaN : v));
// perRank[r][ti] = { step1, stepP, stepOverlap, commForward, commBackward, recvRows }
const perRank = Array.from({ length: P }, (_, r) => {
  const row = all.slice(r * width, (r + 1) * width);
  return measured.map((_, ti) => ({
    step1: row[0],
    ...Object.fromEntries(FIELDS.map((f, i) => [f, row[1 + ti * FIELDS.length + i]])),
  }));
});
if (rank === 0) {
  const num = (v, dgt = 3) => (Number.isFinite(v) ? +v.toFixed(dgt) : null);
  // forward + backward (3×): three H×F products per routed row, three H×Fs per token with a shared expert
  const flops = 3 * 2 * T * H * 3 * (k * F + Fs);
  const rows = [];
  measured.forEach((meas, ti) => {
    for (const overlap of overlaps) {
      for (let r = 0; r < P; r++) {
        const m = perRank[r][ti];
        const step = overlap ? m.stepOverlap : m.stepP;
        rows.push({
          rank: r,
          transport: meas.used,
          'comm stream': overlap,
          'step EP=P ms': num(step),
          'step EP=1 ms': num(m.step1),
          'weak-scaling eff.': num(m.step1 / step, 2),
          'comm fwd ms': overlap ? null : num(m.commForward),
          'comm bwd ms': overlap ? null : num(m.commBackward),
          'compute ≈ ms': overlap ? null : num(m.stepP - m.commForward - m.commBackward),
          'comm share': overlap ? null : num((m.commForward + m.commBackward) / m.stepP, 2),
          'overlap saves ms': overlap ? num(m.stepP - m.stepOverlap) : null,
          'rows received': m.recvRows,
          imbalance: num(m.recvRows / (T * k), 2),
          'TFLOP/s EP=P': num(flops / (step * 1e-3) / 1e12, 1),
        });
      }
    }
  });
  // A collective step is as slow as its slowest rank: per transport and comm stream, the largest.
  const slowest = measured.flatMap((meas, ti) =>
    overlaps.map((overlap) => {
      const worst = (f) => Math.max(...perRank.map((pr) => pr[ti][f]));
      const step = worst(overlap ? 'stepOverlap' : 'stepP');
      return {
        transport: meas.used,
        commStream: overlap,
        stepP: num(step),
        step1: num(worst('step1')),
        efficiency: num(worst('step1') / step, 2),
        commForward: num(worst('commForward')),
        commBackward: num(worst('commBackward')),
      };
    }),
  );
  writeResult(
    `ep-step${dryRun ? '-dryrun' : ''}-${P}rank${P > 1 ? 's' : ''}-${world.backend}${Fs ? `-shared${Fs}` : ''}${fp8Dispatch ? `-fp8${fp8Dispatch === 'keep' ? 'keep' : ''}` : ''}${world.timeoutMs === 0 ? '-no-timeout' : ''}`,
    rows,
    {
      config: {
        tokensPerRank: T,
        hidden: H,
        ffn: F,
        sharedFfn: Fs,
        fp8Dispatch,
        expertsPerRank: El,
        experts: E,
        topK: k,
        ranks: P,
        dtype,
        routing: 'softmax router of the layer (seed 1234), dropless',
        transports: measured.map((m) => m.used),
        commStream: overlaps,
        warmup,
        repeats,
      },
      backend: world.backend,
      device: dev,
      timing:
        'CUDA events, median; each region starts after a device sync and a barrier of all ranks. step = MoELayer forward + backward (no optimizer step: local, the same at any EP size); the transports one after the other, each with its own layer (same weights)',
      comm: "the layer's Dispatcher on the routing its forward chose: forward = dispatch + combine, backward = combineBackward + dispatchBackward, each including its count exchange and host read; compute ≈ step − comm on the layer without a comm stream (not overlapped)",
      overlap:
        overlaps.length > 1
          ? "'comm stream' true: the same step on a layer with commStream: true (the exchanges on their own stream beside the shared expert and the router backward); 'overlap saves ms' = step without − step with"
          : 'not timed (--overlap)',
      weakScaling:
        'efficiency = step at EP=1 with the same per-rank experts and tokens / step at EP=P; it also falls with load imbalance: imbalance = rows this rank received / (T·k) (1 at EP=1)',
      flops:
        '2·(T·k)·H·3F per forward (W1, W3, W2) plus 2·T·H·3Fs for a shared expert, ×3 for forward + backward; router and permute not counted',
      sharedGpu:
        world.backend === 'mpi' && onGpu
          ? 'ranks share a GPU through the MPI backend: the EP=1 runs contend for it and the exchanges are host staging, not NVLink'
          : undefined,
      slowestRank: slowest,
    },
  );
}
for (const t of [x, dy, mineT]) t.dispose();
if (allT !== mineT) allT.dispose();
world.dispose();
