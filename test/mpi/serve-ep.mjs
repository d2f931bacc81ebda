// Under mpirun with --device cuda (ranks may share one GPU, CUDA IPC between processes): MoEInference
// at EP = world size through the peer-memory transport's low-latency path (capacity mode), and its
// decode step captured in a CUDA graph on every rank.
//   - EP = P equals EP = 1 on the same weights (each rank runs its own tokens through a one-rank
//     layer holding all experts: capacity() decides the same drops on both), bf16 tolerance;
//   - captureDecode(T) on every rank for T = 1, 8, 64, 128 (128 grows the transport's buffers:
//     every rank captures its earlier graphs again); the replay equals the eager step bit for bit
//     over several rounds of new inputs, eager steps and replays interleaved;
//   - ten replays in a row (the device-side step counters advance): no host wait of any kind and
//     no allocation, and the result still equals the eager step;
//   - dropless and the NCCL/MPI fallback refuse capture with an UnavailableError saying why.
//   --kill: after capturing, the last rank kills itself (SIGKILL; needs mpirun's recovery mode,
//           OMPI_MCA_orte_enable_recovery=1) and the others replay: each prints
//           "rank R after N ms: TimeoutError: ..." (the failed wait, recorded by the replay's kernels,
//           thrown by the next forward).
// Every rank prints the seed (rank 0's, shared); a failure names the case.
import { cuda, init, memoryStats, MoEInference, synchronize, Tensor, tidy, TimeoutError, UnavailableError } from '../../dist/lib/index.js';
import { check, expectThrow, progress, relErr, scriptDevice } from './common.mjs';

const world = await init();
const P = world.size;
const rank = world.rank;
const { device, gpu } = await scriptDevice(world);
check(gpu, 'serve-ep.mjs needs --device cuda');
const kill = process.argv.includes('--kill');
// One seed for every rank (the weights are the same everywhere): rank 0's.
const mySeed = Number(process.env.MOE_EP_TEST_SEED ?? Date.now() % 100000);
const seed = world.allGather(Tensor.fromArray([mySeed], { dtype: 'i32', device: 'cpu' })).toArray()[0];
console.log(`rank ${rank}: seed ${seed}`);
const on = { device };
const vals = (t) => Array.from(t.toFloat32Array());
const bits = (t) => Buffer.from(t.toArray().buffer);
const bf16 = (shape, s, std = 1) => tidy(() => Tensor.randn(shape, { seed: s, std, ...on }).cast('bf16'));

const cases = [
  {
    name: 'Mixtral-like: softmax top-2 of 8, normalised, capacity 1.25 (drops)',
    config: { hidden: 256, ffn: 128, numExperts: 8, topK: 2, normalize: true, capacityFactor: 1.25 },
  },
  {
    name: 'DeepSeek-like: sigmoid + bias, 4 groups keep 2, top-4 of 16, route scale, shared expert, capacity E/k (no drops)',
    config: {
      hidden: 256,
      ffn: 128,
      numExperts: 16,
      topK: 4,
      scoreFunction: 'sigmoid',
      groups: 4,
      topkGroups: 2,
      routeScale: 2.5,
      selectionBias: true,
      sharedFfn: 128,
      capacityFactor: 4,
    },
  },
];

/** The full weights (every expert), the same on every rank; `part` takes this rank's experts (copies). */
function weightsFor(c, s) {
  const { hidden: H, ffn: F, numExperts: E, sharedFfn: Fs = 0 } = c;
  const all = {
    router: bf16([1, H, E], s, 0.5),
    bias: c.selectionBias ? Tensor.randn([E], { seed: s + 1, std: 0.05, ...on }) : null,
    w13: bf16([E, H, 2 * F], s + 2, 0.06),
    w2: bf16([E, F, H], s + 3, 0.08),
    sharedW13: Fs ? bf16([1, H, 2 * Fs], s + 4, 0.06) : null,
    sharedW2: Fs ? bf16([1, Fs, H], s + 5, 0.08) : null,
  };
  const El = E / P;
  const part = () => ({
    ...Object.fromEntries(Object.entries(all).map(([k, t]) => [k, t?.clone() ?? null])),
    w13: all.w13.narrow(0, rank * El, El).clone(),
    w2: all.w2.narrow(0, rank * El, El).clone(),
  });
  const full = () => Object.fromEntries(Object.entries(all).map(([k, t]) => [k, t?.clone() ?? null]));
  const dispose = () => Object.values(all).forEach((t) => t?.dispose());
  return { part, full, dispose };
}

const Ts = [1, 8, 64, 128];
let survivors = null; // --kill: the layer and the graph's T the survivors replay

for (const [ci, c] of cases.entries()) {
  const what = (s) => `${c.name}: ${s} (rank ${rank} of ${P}, seed ${seed})`;
  const w = weightsFor(c.config, seed + 1000 * ci);
  const ref = new MoEInference({ ...c.config, device }, w.full());
  const eager = new MoEInference({ ...c.config, device, group: world, transport: 'ipc' }, w.part());
  const graphed = new MoEInference({ ...c.config, device, group: world, transport: 'ipc' }, w.part());
  w.dispose();
  const H = c.config.hidden;
  const xFor = (T, round) => bf16([T, H], seed + 7919 * (rank + 1) + 101 * T + round);

  // 1. Capture the small buckets on every rank (the first warm-up creates the transport).
  check(graphed.decodeGraphs().length === 0, what('no graphs before capture'));
  const small = Ts.slice(0, -1);
  const before = small.map((T) => graphed.captureDecode(T));
  for (const info of before) check(info.nodes > 5 && info.transportBytes > 0, what(`captureDecode info ${JSON.stringify(info)}`));
  progress(`${c.name}: captured T = ${small.join(', ')}`);

  // 2. Eager at EP = P against EP = 1 on this rank's tokens. The largest T outgrows the transport's
  //    first buffers (case 0): the graphs captured above are captured again (here at the capture
  //    of that T; else at their next forward).
  for (const T of Ts) {
    tidy(() => {
      const x = xFor(T, 0);
      const y = eager.forward(x);
      const yRef = ref.forward(x);
      const err = relErr(vals(y), vals(yRef));
      check(err < 1e-2, what(`T ${T}: EP=${P} against EP=1 relErr ${err}`));
    });
  }
  progress(`${c.name}: eager EP=${P} against EP=1`);
  const last = graphed.captureDecode(Ts[Ts.length - 1]);
  if (ci === 0)
    check(
      last.transportBytes > (before[0]?.transportBytes ?? 0),
      what(`the transport did not grow for T ${last.T}: ${before[0]?.transportBytes} → ${last.transportBytes} bytes`),
    );
  check(
    JSON.stringify(graphed.decodeGraphs().map((g) => g.T)) === JSON.stringify(Ts),
    what(`graphs ${JSON.stringify(graphed.decodeGraphs())}`),
  );
  progress(`${c.name}: captured T = ${Ts.join(', ')}`);

  // 3. Replays against eager steps, interleaved, with new inputs each round.
  for (let round = 1; round <= 3; round++) {
    for (const T of Ts) {
      tidy(() => {
        const x = xFor(T, round);
        const ye = Tensor.empty([T, H], { dtype: 'bf16', ...on });
        const yg = Tensor.empty([T, H], { dtype: 'bf16', ...on });
        eager.forward(x, { out: ye });
        graphed.forward(x, { out: yg });
        check(bits(yg).equals(bits(ye)), what(`T ${T}, round ${round}: the replay differs from the eager step`));
        const err = relErr(vals(yg), vals(ref.forward(x)));
        check(err < 1e-2, what(`T ${T}, round ${round}: replay against EP=1 relErr ${err}`));
      });
    }
  }
  progress(`${c.name}: replays equal eager steps`);

  // 4. Ten replays in a row: no host wait, no allocation; then still the eager result.
  {
    const x8 = xFor(8, 9);
    const y8 = Tensor.empty([8, H], { dtype: 'bf16', ...on });
    graphed.forward(x8, { out: y8 });
    synchronize(device);
    world.barrier();
    const waits0 = cuda.hostWaitCounts();
    const m0 = memoryStats(device);
    for (let i = 0; i < 10; i++) graphed.forward(x8, { out: y8 });
    const waits1 = cuda.hostWaitCounts();
    const m1 = memoryStats(device);
    check(
      JSON.stringify(waits1) === JSON.stringify(waits0),
      what(`host waits during 10 replays: ${JSON.stringify(waits0)} → ${JSON.stringify(waits1)}`),
    );
    check(m1.allocations === m0.allocations && m1.deviceMallocs === m0.deviceMallocs, what('allocations during 10 replays'));
    const ye = eager.forward(x8);
    check(bits(y8).equals(bits(ye)), what('after 10 replays in a row: differs from the eager step'));
    for (const t of [x8, y8, ye]) t.dispose();
  }
  progress(`${c.name}: ten replays in a row`);

  if (kill && ci === cases.length - 1) {
    survivors = { graphed, H, eager, ref };
    break;
  }
  graphed.dispose();
  eager.dispose();
  ref.dispose();
}

if (!kill) {
  // 5. What cannot be captured says why (on every rank alike).
  const c = cases[0].config;
  const w = weightsFor(c, seed + 5000);
  {
    const { capacityFactor, ...dropless } = c;
    check(capacityFactor > 0, 'case 0 has a capacity factor');
    const inf = new MoEInference({ ...dropless, device, group: world, transport: 'ipc' }, w.part());
    expectThrow(
      () => inf.captureDecode(8),
      UnavailableError,
      /dropless.*cannot be captured.*'capacityFactor'.*E\/k = 4 never drops/,
      'dropless capture',
    );
    inf.dispose();
  }
  {
    const inf = new MoEInference({ ...c, device, group: world, transport: 'nccl' }, w.part());
    const ll = new MoEInference({ ...c, device, group: world, transport: 'ipc' }, w.part());
    tidy(() => {
      const x = xFor0(c.hidden);
      const err = relErr(vals(inf.forward(x)), vals(ll.forward(x)));
      check(err < 1e-2, `the all-to-all fallback against the low-latency path: relErr ${err} (rank ${rank}, seed ${seed})`);
    });
    expectThrow(
      () => inf.captureDecode(8),
      UnavailableError,
      /only the 'ipc' peer-memory transport can be captured.*runs eagerly/,
      'nccl capture',
    );
    inf.dispose();
    ll.dispose();
  }
  w.dispose();
  progress('refusals');
  synchronize(device);
  world.barrier();
  console.log(`ok rank ${rank} of ${P}`);
} else {
  // 6. A rank dies after capture; the others replay and get the TimeoutError within the timeout.
  const { graphed, H } = survivors;
  const x = xFor0(H, 8);
  const y = Tensor.empty([8, H], { dtype: 'bf16', ...on });
  synchronize(device);
  world.barrier();
  world.timeoutMs = 3000;
  if (rank === P - 1) process.kill(process.pid, 'SIGKILL');
  const t0 = Date.now();
  try {
    for (let i = 0; i < 3; i++) {
      graphed.forward(x, { out: y }); // the replay's waits fail on the device; the next forward throws
      synchronize(device);
    }
    console.log(`rank ${rank}: completed?!`);
  } catch (e) {
    console.log(`rank ${rank} after ${Date.now() - t0} ms: ${e instanceof TimeoutError ? 'TimeoutError' : e.name}: ${e.message}`);
    process.exitCode = 1;
  }
  process.exit(process.exitCode ?? 0);
}

function xFor0(H, T = 8) {
  return bf16([T, H], seed + 31 * (rank + 1));
}
