// Weak scaling of one MoE layer training step under expert parallelism (issue #8): every rank holds
// El experts and T tokens. The step at EP = P (experts spread over the P ranks, rows through the
// communicator) stands beside the same per-rank work at EP = 1 (each rank alone with El experts and
// its T tokens: no exchange), and the step's communication is timed on its own.
//   mpirun -np P node benchmarks/ep-step.bench.mjs [--out DIR] [--quick] [--dry-run] [--transport ipc|nccl]
//        [--overlap] [--shared-ffn Fs] [--fp8 true|keep] [--rounds N] [--timeout-ms N]
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
// meets the others at a barrier, so the regions start together. --rounds N (default 3): each round
// times every transport's step (with and without a comm stream) and then the step at EP=1, so the
// efficiency is a ratio within one round (a drifting clock hits both) and is reported as the median
// and range over rounds; the exchanges alone are timed once per transport.
//   step (EP=P)   forward + backward of MoELayer({ group: world }). The optimizer step is local and
//                 the same at any EP size (benchmarks/moe-layer.bench.mjs times it).
//   step (EP=1)   the same on a layer with El experts and a one-rank group, on this rank's GPU.
//   comm          the step's four exchanges through the layer's Dispatcher on the routing its
//                 forward chose: dispatch + combine (forward), combineBackward + dispatchBackward
//                 (backward), each with its count exchange and host read, on rows of the step's size.
//   compute ≈ step(EP=P) − comm (the layer does not overlap them unless given a comm stream). The
//                 comm regions also hold the permute, unpermute, regrouping and the count reads,
//                 so this undercounts compute a little.
//   exposed comm ≈ step with a comm stream − compute: what the overlap left of the exchanges.
// Weak-scaling efficiency = step(EP=1) / step(EP=P). Below 1 for two reasons: the exchanges, and
// load imbalance (at EP=1 with top-8 of 8 experts every expert gets every token; at EP=P a rank
// gets what the router sends it): 'imbalance' = the rows this rank received / (T·k).
// Ranks sharing a GPU (MPI backend, host staging) contend for it: the EP=1 figure is then the
// slowest of P concurrent runs, and the comm figure measures host staging, not NVLink.
import { capacity, disposeSaved, MoELayer, synchronize, Tensor } from '../dist/lib/index.js';
import { args, benchFailures, benchWorld, dryRun, flag, median, quick, range, timeRegion, writeResult } from './harness.mjs';

// A minute per collective at most: a rank that fails must not leave the others waiting 5 minutes.
const { world, P, rank, dev, onGpu, log } = await benchWorld({ timeoutMs: 60_000 });
if (args.includes('--help')) {
  log(
    'mpirun -np P node benchmarks/ep-step.bench.mjs [--out DIR] [--quick] [--dry-run] [--transport ipc|nccl] [--overlap] [--shared-ffn Fs] [--fp8 true|keep] [--rounds N] [--timeout-ms N]',
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
const rounds = Number(flag('--rounds', dryRun ? '1' : '3'));
if (!Number.isSafeInteger(rounds) || rounds < 1) throw new Error(`--rounds must be a positive integer; received ${flag('--rounds')}`);

/** Every rank waits for its device, then all meet: each timed region starts together. */
function align() {
  if (onGpu) synchronize(dev);
  if (P > 1 && !world.aborted) {
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
/** The step's exchanges alone, through `layer`'s Dispatcher on the routing its forward chose. */
function commMs(layer) {
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
  try {
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
    const got = d.dispatch(x, indices, weights, cap);
    const recvRows = got.rows.shape[0];
    disposeDispatched(got);
    return { commForward, commBackward, recvRows };
  } finally {
    standIn?.dispose();
    for (const t of [indices, weights]) t.dispose();
    for (const t of Object.values(cap)) if (t instanceof Tensor) t.dispose();
  }
}

// A transport that fails (a throw, or a peer's TimeoutError) is recorded and the others go on.
const { failed, stageFailed, ...failures } = benchFailures(world);
// Per transport its layers (the same weights: same seed), made once: without and with a comm stream.
const runs = transports.map((transport) => {
  const choice = transport === 'local' ? {} : { transport };
  const run = { name: transport, stepP: [], stepOverlap: [], commForward: NaN, commBackward: NaN, recvRows: NaN, layer: null, over: null };
  let failure = null;
  try {
    run.layer = new MoELayer({ ...layerConfig, numExperts: E, group: world, ...choice });
    if (overlaps.includes(true)) run.over = new MoELayer({ ...layerConfig, numExperts: E, group: world, commStream: true, ...choice });
  } catch (e) {
    failure = failed(transport, e);
  }
  // Every stage ends with the ranks agreeing whether any failed it (benchFailures): a failure on
  // one rank drops that transport on all of them, and the collectives stay in step.
  if (stageFailed(transport, failure)) run.error = true;
  return run;
});
const alone = new MoELayer({ ...layerConfig, numExperts: El });
const step1 = [];
for (let round = 0; round < rounds && !world.aborted; round++) {
  for (const run of runs) {
    if (run.error || world.aborted) continue;
    let failure = null;
    try {
      run.stepP.push(stepMs(run.layer, x, dy));
      run.name = run.layer.dispatcher.transport ?? run.name;
      if (run.over) run.stepOverlap.push(stepMs(run.over, x, dy));
      if (round === 0) Object.assign(run, commMs(run.layer));
    } catch (e) {
      failure = failed(run.name, e);
    }
    if (stageFailed(run.name, failure)) run.error = true;
  }
  try {
    step1.push(stepMs(alone, x, dy)); // this rank alone (the barrier before each call aside)
  } catch (e) {
    failures.errors['EP=1'] = failed('EP=1', e);
    step1.push(NaN);
  }
  log(
    `  round ${round + 1}/${rounds}: EP=1 ${step1.at(-1)?.toFixed(3)} ms; ${runs.map((r) => (r.error ? `${r.name} failed` : `${r.name} ${r.stepP.at(-1)?.toFixed(3)} ms${r.over ? ` (comm stream ${r.stepOverlap.at(-1)?.toFixed(3)})` : ''}`)).join(', ')}`,
  );
}
alone.dispose();
for (const run of runs) {
  run.layer?.dispose();
  run.over?.dispose();
}

// ------------------------------------------------------------------------------- report
// Per rank: step1 per round, then per transport stepP per round, stepOverlap per round, the comm
// regions and the rows received.
const perRound = (a) => Array.from({ length: rounds }, (_, i) => a[i] ?? NaN);
const mine = [
  ...perRound(step1),
  ...runs.flatMap((r) => [...perRound(r.stepP), ...perRound(r.stepOverlap), r.commForward, r.commBackward, r.recvRows]),
].map((v) => (Number.isFinite(v) ? v : -1));
const width = mine.length;
// A communicator aborted by a failure cannot gather: rank 0 then reports its own figures alone.
const all = failures.gather(mine).map((v) => (v < 0 ? NaN : v));
const reported = all.length / width;
const perTransport = 2 * rounds + 3; // stepP and stepOverlap per round, the two comm regions, the rows
// perRank[r] = { step1: [rounds], runs: [{ stepP: [rounds], stepOverlap: [rounds], commForward, commBackward, recvRows }] }
const perRank = Array.from({ length: reported }, (_, r) => {
  const row = all.slice(r * width, (r + 1) * width);
  return {
    step1: row.slice(0, rounds),
    runs: runs.map((_, ti) => {
      const at = rounds + ti * perTransport;
      return {
        stepP: row.slice(at, at + rounds),
        stepOverlap: row.slice(at + rounds, at + 2 * rounds),
        commForward: row[at + 2 * rounds],
        commBackward: row[at + 2 * rounds + 1],
        recvRows: row[at + 2 * rounds + 2],
      };
    }),
  };
});
if (rank === 0) {
  const num = (v, dgt = 3) => (Number.isFinite(v) ? +v.toFixed(dgt) : null);
  const spread = (a, dgt = 3) =>
    a.filter(Number.isFinite).length > 1
      ? range(a)
          .map((v) => num(v, dgt))
          .join('–')
      : null;
  // forward + backward (3×): three H×F products per routed row, three H×Fs per token with a shared expert
  const flops = 3 * 2 * T * H * 3 * (k * F + Fs);
  const rows = [];
  runs.forEach((run, ti) => {
    for (const overlap of overlaps) {
      for (let r = 0; r < reported; r++) {
        const pr = perRank[r];
        const m = pr.runs[ti];
        const steps = overlap ? m.stepOverlap : m.stepP;
        const eff = steps.map((s, i) => pr.step1[i] / s);
        const step = median(steps);
        const compute = median(m.stepP) - m.commForward - m.commBackward;
        rows.push({
          rank: r,
          transport: run.name,
          'comm stream': overlap,
          'step EP=P ms': num(step),
          'step range': spread(steps),
          'step EP=1 ms': num(median(pr.step1)),
          'weak-scaling eff.': num(median(eff), 2),
          'eff. range': spread(eff, 2),
          'comm fwd ms': overlap ? null : num(m.commForward),
          'comm bwd ms': overlap ? null : num(m.commBackward),
          'compute ≈ ms': overlap ? null : num(compute),
          'comm share': overlap ? null : num((m.commForward + m.commBackward) / median(m.stepP), 2),
          'exposed comm ≈ ms': overlap ? num(step - compute) : null,
          'overlap saves ms': overlap ? num(median(m.stepP) - step) : null,
          'rows received': m.recvRows,
          imbalance: num(m.recvRows / (T * k), 2),
          'TFLOP/s EP=P': num(flops / (step * 1e-3) / 1e12, 1),
        });
      }
    }
  });
  // A collective step is as slow as its slowest rank: per round the largest over ranks, then the
  // median and range of the rounds' efficiencies.
  const slowest = runs.flatMap((run, ti) =>
    overlaps.map((overlap) => {
      const worst = (pick) => Array.from({ length: rounds }, (_, i) => Math.max(...perRank.map((pr) => pick(pr)[i])));
      const stepP = worst((pr) => (overlap ? pr.runs[ti].stepOverlap : pr.runs[ti].stepP));
      const step1Worst = worst((pr) => pr.step1);
      const eff = stepP.map((s, i) => step1Worst[i] / s);
      return {
        transport: run.name,
        commStream: overlap,
        stepP: num(median(stepP)),
        stepRange: spread(stepP),
        step1: num(median(step1Worst)),
        efficiency: num(median(eff), 2),
        efficiencyRange: spread(eff, 2),
        commForward: num(Math.max(...perRank.map((pr) => pr.runs[ti].commForward))),
        commBackward: num(Math.max(...perRank.map((pr) => pr.runs[ti].commBackward))),
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
        transports: runs.map((r) => r.name),
        commStream: overlaps,
        warmup,
        repeats,
        rounds,
      },
      backend: world.backend,
      device: dev,
      timing: `CUDA events, median; each region starts after a device sync and a barrier of all ranks. step = MoELayer forward + backward (no optimizer step: local, the same at any EP size). ${rounds} round(s), each timing every transport's step (its own layers, same weights), with and without a comm stream, then the step at EP=1: 'step EP=P ms' and 'step EP=1 ms' are medians over rounds, 'weak-scaling eff.' the median of the rounds' ratios, with their ranges`,
      comm: "the layer's Dispatcher on the routing its forward chose, timed once per transport: forward = dispatch + combine, backward = combineBackward + dispatchBackward, each including its count exchange and host read; compute ≈ step − comm on the layer without a comm stream (not overlapped); exposed comm ≈ step with a comm stream − that compute",
      overlap:
        overlaps.length > 1
          ? "'comm stream' true: the same step on a layer with commStream: true (the exchanges on their own stream beside the shared expert and the router backward); 'overlap saves ms' = step without − step with"
          : 'not timed (--overlap)',
      weakScaling:
        'efficiency = step at EP=1 with the same per-rank experts and tokens / step at EP=P, within each round; it also falls with load imbalance: imbalance = rows this rank received / (T·k) (1 at EP=1)',
      flops:
        '2·(T·k)·H·3F per forward (W1, W3, W2) plus 2·T·H·3Fs for a shared expert, ×3 for forward + backward; router and permute not counted',
      sharedGpu:
        world.backend === 'mpi' && onGpu
          ? 'ranks share a GPU through the MPI backend: the EP=1 runs contend for it and the exchanges are host staging, not NVLink'
          : undefined,
      ...failures.notes(reported),
      slowestRank: slowest,
    },
  );
}
for (const t of [x, dy]) t.dispose();
await failures.end();
