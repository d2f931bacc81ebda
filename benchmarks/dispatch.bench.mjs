// Dispatch / combine (Dispatcher.dispatch and Dispatcher.combine) in DeepEP's configuration, per
// transport, with DeepEP's byte accounting, beside DeepEP's published figures and torch.distributed
// all_to_all_single on the same rows, timed in the same run, interleaved by rounds.
//   node benchmarks/dispatch.bench.mjs [--out DIR] [--quick] [--no-peer] [--rounds N] [--transport ipc|nccl]
//        [--timeout-ms N] [--dry-run [--full]]
//   mpirun -np N node benchmarks/dispatch.bench.mjs [...]
// Configuration (DeepEP's tests/test_intranode.py): 4096 tokens per rank, hidden 7168, top-8 of 256
// experts, routing uniformly random (8 distinct experts per token, seeded per rank), dropless.
// Transports (lib/moe/dispatcher.ts): one rank: 'local' (the permute is the dispatch), or with
// --transport ipc the peer-memory kernels pushing to the rank itself (so ncu can profile them in one
// process). Several
// ranks: 'ipc' (peer memory: one row per (token, destination rank) pushed into the peer's buffer;
// ranks on one GPU or with peer access) and 'nccl' (the communicator's all-to-all of one row per
// (token, expert): NCCL with a GPU per rank, MPI with host staging when ranks share a GPU); both
// are timed unless --transport picks one.
// Bytes, per receiving rank:
//   'GB/s (DeepEP)': unique (token, destination rank) rows received, this rank's own included,
//                    × hidden × 2 (FP8: × (hidden + hidden/128·4)); DeepEP's test counts exactly these
//                    (recv_x.numel()·2). Combine is credited the same rows (it sends them back).
//   'wire MB': bytes this rank's dispatch sends to other ranks: token rows (ipc) or (token, expert)
//              rows plus gate weights (nccl); its own rows stay local in both.
// Timing: CUDA events around one call, median after warm-up; before each call every rank waits for
// its device and meets the others at a barrier. Rounds: each round times every transport, then the
// torch peer (benchmarks/peers/dispatch_torch.py, one python process per rank, torch.distributed
// NCCL with a GPU per rank, gloo with host staging when ranks share a GPU): the ratios are per round,
// reported as median and range, so a drifting GPU clock hits both sides alike.
// Ours includes the layout on the device, and in dropless mode the one host read of the received
// counts; DeepEP's tuning loop reuses a cached layout (no count exchange).
// FP8, two ways: 'dispatch FP8' delivers rows dequantised to bf16 (fp8: true); 'dispatch FP8 kept'
// delivers the e4m3 rows and their scales (fp8: 'keep'), as DeepEP's FP8 dispatch does, for the
// expert GEMM to read as they are (groupedGemm('NN') takes them).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { capacity, dequantizeFp8, Dispatcher, synchronize, Tensor, trace } from '../dist/lib/index.js';
import {
  args,
  benchFailures,
  benchWorld,
  dryRun,
  median,
  quick,
  randomRouting,
  range,
  timeRegion,
  writeInputs,
  writeResult,
} from './harness.mjs';

const noPeer = args.includes('--no-peer');
const flag = (name, dflt) => (args.includes(name) ? args[args.indexOf(name) + 1] : dflt);

// Published intranode figures, DeepEP's accounting (benchmarks/README.md, shared research notes).
// Which dispatch dtype each was measured with matters: set BF16 rows beside BF16 figures, and the
// 'dispatch FP8 kept' rows beside FP8 ones.
const PUBLISHED =
  'DeepEP V1 normal kernels EP8: H800 FP8 dispatch 153 / BF16 combine 158 GB/s; 8×H100 BF16 dispatch 329 / BF16 combine 287 GB/s; UCCL-EP (DeepEP kernels) EP8 on 8×H200 FP8 dispatch 320 / BF16 combine 319 GB/s; DeepEP EP2 on 2×H100 FP8 dispatch ~460 GB/s';
// How DeepEP's own test times (deep_ep tests/test_intranode.py), against ours.
const DEEPEP_TIMING =
  "DeepEP's figures come from its tuning loop: a cached layout, FP8 input already quantised, the mean of back-to-back calls with L2 flushed, the best of its configurations, rank 0; ours include the layout, the count exchange and its host read and the FP8 quantisation, and take the median of single calls each after a sync and a barrier: ours are the conservative side";

// A minute per collective at most: a transport that hangs fails with a TimeoutError well inside the
// task's bound, and the result file is still written with what the other transports measured.
const { world, le, P, rank, dev, onGpu, log } = await benchWorld({ timeoutMs: 60_000 });

const full = args.includes('--full');
const cfg = dryRun && !full ? { T: 64, H: 256, k: 8, E: 32 } : { T: 4096, H: 7168, k: 8, E: 256 };
const { T, H, k, E } = cfg;
if (E % P !== 0) throw new Error(`${E} experts do not split over ${P} ranks`);
const El = E / P;
const rounds = Number(flag('--rounds', dryRun ? 1 : 3));
// One rank: the permute alone ('local'); with --transport ipc, the peer-memory kernels pushing to
// the rank itself (one process, so ncu can profile them).
const transports = flag('--transport', null) ? [flag('--transport')] : P === 1 ? ['local'] : onGpu ? ['ipc', 'nccl'] : ['nccl'];
// Ranks sharing a GPU through MPI staging take ~0.2–1 s a call: few repeats there.
const staged = (t) => (t === 'nccl' || t === 'mpi') && onGpu && world.backend === 'mpi';
const warmupOf = (t) => (dryRun ? 1 : staged(t) ? 1 : 5);
const repeatsOf = (t) => (dryRun ? 3 : staged(t) ? 3 : quick ? 10 : 30);

// Every rank regenerates every rank's routing (a pure function of the seed): what each rank
// receives, per transport's accounting, and the all-to-all layout the torch peer replays.
const seedOf = (r) => 20250 + 7919 * r;
const routingOf = (r) => randomRouting(T, k, E, seedOf(r));
let tokenRowsRecv = 0,
  selfTokenRows = 0,
  expertRowsRecv = 0,
  selfExpertRows = 0;
for (let src = 0; src < P; src++) {
  const use = routingOf(src).idx;
  for (let t = 0; t < T; t++) {
    let hit = false;
    for (let j = 0; j < k; j++) {
      if (Math.floor(use[t * k + j] / El) !== rank) continue;
      expertRowsRecv++;
      if (src === rank) selfExpertRows++;
      hit = true;
    }
    if (hit) {
      tokenRowsRecv++;
      if (src === rank) selfTokenRows++;
    }
  }
}
const { idx, w } = routingOf(rank);
// What this rank sends: (token, expert) rows per destination (the all-to-all), unique token rows (ipc).
const sendRows = new Array(P).fill(0);
const sendTokenRows = new Array(P).fill(0);
let tokenRowsSentOut = 0;
for (let t = 0; t < T; t++) {
  const dests = new Set();
  for (let j = 0; j < k; j++) {
    const p = Math.floor(idx[t * k + j] / El);
    sendRows[p]++;
    dests.add(p);
  }
  for (const p of dests) sendTokenRows[p]++;
  tokenRowsSentOut += [...dests].filter((p) => p !== rank).length;
}
// Unique token rows each source sends here: the split sizes of the torch all-to-all that moves
// what 'ipc' moves (one row per (token, destination rank)).
const recvTokenRows = Array.from({ length: P }, (_, src) => {
  const use = routingOf(src).idx;
  let n = 0;
  for (let t = 0; t < T; t++)
    for (let j = 0; j < k; j++)
      if (Math.floor(use[t * k + j] / El) === rank) {
        n++;
        break;
      }
  return n;
});
const recvRows = Array.from({ length: P }, (_, src) => {
  const use = routingOf(src).idx;
  let n = 0;
  for (let i = 0; i < T * k; i++) if (Math.floor(use[i] / El) === rank) n++;
  return n;
});
const expertRowsSentOut = sendRows.reduce((a, b, p) => a + (p === rank ? 0 : b), 0);

const indices = Tensor.fromArray(idx, { dtype: 'i32', shape: [T, k], device: dev });
const weights = Tensor.fromArray(w, { dtype: 'f32', shape: [T, k], device: dev });
const x = Tensor.randn([T, H], { dtype: 'bf16', seed: 100 + rank, device: dev });
const cap = capacity(indices, weights, { numExperts: E }); // dropless: no capacity factor

/** Every rank waits for its device, then all meet: each timed call starts together. */
function align() {
  if (onGpu) synchronize(dev);
  if (P > 1 && !world.aborted) {
    world.barrier();
    if (onGpu) synchronize(dev);
  }
}

// Check: identity experts, so combine(dispatch(x)) = x · Σ_j w[t, j] (first rows, on the host).
function identityRelErr(y) {
  const n = Math.min(T, 64);
  const ys = y.narrow(0, 0, n),
    xs = x.narrow(0, 0, n);
  const yv = ys.toFloat32Array(),
    xv = xs.toFloat32Array();
  ys.dispose();
  xs.dispose();
  let num = 0,
    den = 0;
  for (let t = 0; t < n; t++) {
    let s = 0;
    for (let j = 0; j < k; j++) s += w[t * k + j];
    for (let h = 0; h < H; h++) {
      const ref = xv[t * H + h] * s;
      num += (yv[t * H + h] - ref) ** 2;
      den += ref * ref;
    }
  }
  return Math.sqrt(num / Math.max(den, 1e-30));
}

// Per transport: a BF16 dispatcher, an FP8 one whose rows arrive dequantised (fp8: true) and one
// whose rows arrive as FP8 with their scales (fp8: 'keep', DeepEP's FP8 dispatch; the expert GEMM
// reads them as they are), one dispatch kept for combine, the checks.
// A transport that fails (a throw, or a peer's TimeoutError) is recorded and the others go on: the
// result file keeps what they measured and says what failed. Every stage ends with the ranks
// agreeing whether any of them failed it, so a failure on one rank drops that transport on all of
// them and the collectives stay in step.
const { failed, stageFailed, ...failures } = benchFailures(world);
const runs = transports.map((t) => {
  let run = null;
  let failure = null;
  try {
    run = setUp(t);
  } catch (e) {
    failure = failed(t, e);
  }
  if (stageFailed(t, failure)) {
    return {
      name: t,
      check: NaN,
      check8: NaN,
      check8k: NaN,
      ms: { dispatch: [], combine: [], dispatchFp8: [], dispatchFp8Kept: [] },
      ...(run ?? {}),
      error: true,
    };
  }
  return run;
});
function setUp(t) {
  const group = world;
  const choice = t === 'local' ? {} : { transport: t };
  const bf16 = new Dispatcher({ numExperts: E, group, ...choice });
  const fp8 = new Dispatcher({ numExperts: E, group, fp8: true, ...choice });
  const fp8Kept = new Dispatcher({ numExperts: E, group, fp8: 'keep', ...choice });
  const kept = bf16.dispatch(x, indices, weights, cap);
  const y = bf16.combine(kept.rows, kept.handle, weights);
  const check = identityRelErr(y);
  y.dispose();
  const d8 = fp8.dispatch(x, indices, weights, cap);
  const y8 = fp8.combine(d8.rows, d8.handle, weights);
  const check8 = identityRelErr(y8);
  for (const u of [y8, d8.rows, d8.weights]) u.dispose();
  d8.handle.dispose();
  const dk = fp8Kept.dispatch(x, indices, weights, cap);
  const deq = dequantizeFp8({ q: dk.rows, scales: dk.scales }, 'bf16');
  const yk = fp8Kept.combine(deq, dk.handle, weights);
  const check8k = identityRelErr(yk);
  for (const u of [yk, deq, dk.rows, dk.scales, dk.weights]) u.dispose();
  dk.handle.dispose();
  if (!(check < 1e-2)) console.error(`rank ${rank} ${t}: dispatch∘combine with identity experts is off: relErr ${check}`);
  if (!(check8 < 8e-2)) console.error(`rank ${rank} ${t}: FP8 dispatch∘combine is off: relErr ${check8}`);
  if (!(check8k < 8e-2)) console.error(`rank ${rank} ${t}: FP8 (kept) dispatch∘combine is off: relErr ${check8k}`);
  return {
    name: bf16.transport ?? t,
    bf16,
    fp8,
    fp8Kept,
    kept,
    check,
    check8,
    check8k,
    ms: { dispatch: [], combine: [], dispatchFp8: [], dispatchFp8Kept: [] },
  };
}
log(
  `dispatch: ${P} rank(s), backend ${world.backend}, device ${dev}, T=${T} H=${H} top-${k} E=${E}, transports ${runs.map((r) => r.name).join(', ')}, ${rounds} round(s)`,
);

const timeOp = (t, fn) => timeRegion(fn, { device: dev, warmup: warmupOf(t), repeats: repeatsOf(t), before: align });
function timeTransport(run) {
  const t = run.name;
  const dispose = (d) => () => {
    d.rows.dispose();
    d.scales?.dispose();
    d.weights.dispose();
    d.handle.dispose();
  };
  run.ms.dispatch.push(timeOp(t, () => dispose(run.bf16.dispatch(x, indices, weights, cap))));
  run.ms.combine.push(
    timeOp(t, () => {
      const y = run.bf16.combine(run.kept.rows, run.kept.handle, weights);
      return () => y.dispose();
    }),
  );
  run.ms.dispatchFp8.push(timeOp(t, () => dispose(run.fp8.dispatch(x, indices, weights, cap))));
  run.ms.dispatchFp8Kept.push(timeOp(t, () => dispose(run.fp8Kept.dispatch(x, indices, weights, cap))));
}

// ---------------------------------------------------------------------------------------- peer
async function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}
// The all-to-all layout of (token, expert) rows the peer replays: rows grouped by global expert,
// each expert's in (token, entry) order, as the permute builds them.
const order = Array.from({ length: T * k }, (_, i) => i).sort((a, b) => idx[a] - idx[b] || a - b);
const peerInputs = {
  x,
  rowToken: Tensor.fromArray(
    order.map((i) => Math.floor(i / k)),
    { dtype: 'i32', device: 'cpu' },
  ),
  rowWeight: Tensor.fromArray(
    order.map((i) => w[i]),
    { dtype: 'f32', device: 'cpu' },
  ),
  sendRows: Tensor.fromArray(sendRows, { dtype: 'i32', device: 'cpu' }),
  recvRows: Tensor.fromArray(recvRows, { dtype: 'i32', device: 'cpu' }),
  sendTokenRows: Tensor.fromArray(sendTokenRows, { dtype: 'i32', device: 'cpu' }),
  recvTokenRows: Tensor.fromArray(recvTokenRows, { dtype: 'i32', device: 'cpu' }),
};
const peerRounds = [];
/** A torch peer's bound: inside the task's, with the rounds before it. */
const PEER_TIMEOUT_MS = 150_000;
async function timePeer() {
  const shared = Tensor.fromArray(rank === 0 ? [await freePort(), Math.floor(Math.random() * 2 ** 30)] : [0, 0], {
    dtype: 'i32',
    device: 'cpu',
  });
  if (P > 1) world.broadcast(shared, 0);
  const [port, token] = Array.from(shared.toArray());
  shared.dispose();
  const root = join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), `moe-dispatch-${token}`);
  const dir = join(root, `rank${rank}`);
  mkdirSync(dir, { recursive: true });
  writeInputs(dir, peerInputs);
  align();
  const peerMode = world.backend === 'mpi' ? (onGpu ? 'gloo-staged' : 'gloo') : dryRun ? 'gloo' : 'nccl';
  const masterAddr = process.env.MOE_PEER_MASTER_ADDR ?? '127.0.0.1';
  const loopback = masterAddr === '127.0.0.1' || masterAddr === 'localhost';
  const r = spawnSync(
    'python3',
    [
      join(import.meta.dirname, 'peers', 'dispatch_torch.py'),
      dir,
      String(peerMode === 'nccl' ? repeatsOf('ipc') : 3),
      peerMode,
      onGpu ? 'cuda' : 'cpu',
    ],
    {
      encoding: 'utf8',
      timeout: PEER_TIMEOUT_MS,
      killSignal: 'SIGKILL',
      maxBuffer: 64 << 20,
      env: {
        ...process.env,
        PYTHONUNBUFFERED: '1',
        RANK: String(rank),
        WORLD_SIZE: String(P),
        LOCAL_RANK: String(le.localRank),
        MASTER_ADDR: masterAddr,
        MASTER_PORT: String(port),
        MOE_PEER_WARMUP: String(peerMode === 'nccl' ? 5 : 1),
        ...(loopback && !process.env.GLOO_SOCKET_IFNAME ? { GLOO_SOCKET_IFNAME: 'lo' } : {}),
      },
    },
  );
  let peer;
  if (r.status === 0) {
    const lines = r.stdout.trim().split('\n');
    peer = JSON.parse(lines[lines.length - 1]);
  } else {
    peer = { error: `${r.error?.message ?? `exit ${r.status}`}: ${(r.stderr ?? '').trim().split('\n').slice(-3).join(' | ')}` };
    console.error(`rank ${rank}: torch peer failed: ${peer.error}`);
  }
  // The ranks meet again once every python is done, however long a failing one takes (up to the
  // spawn's bound): the collective timeout is stretched for this one barrier.
  const timeoutMs = world.timeoutMs;
  if (timeoutMs > 0) world.timeoutMs = Math.max(timeoutMs, PEER_TIMEOUT_MS + 30_000);
  try {
    align();
  } finally {
    if (!world.aborted) world.timeoutMs = timeoutMs;
  }
  rmSync(dir, { recursive: true, force: true });
  if (rank === 0) rmSync(root, { recursive: true, force: true });
  peerRounds.push(peer);
  return peer;
}

let peerOn = !noPeer;
for (let round = 0; round < rounds && !world.aborted; round++) {
  for (const run of runs) {
    if (run.error || world.aborted) continue;
    let failure = null;
    try {
      timeTransport(run);
    } catch (e) {
      failure = failed(run.name, e);
    }
    if (stageFailed(run.name, failure)) run.error = true;
  }
  if (peerOn && !world.aborted) {
    let failure;
    try {
      failure = (await timePeer()).error ?? null;
    } catch (e) {
      failure = failed('torch peer', e);
    }
    // A peer that failed on any rank is not started again: its rounds so far stay in the file.
    if (stageFailed('torch peer', failure)) peerOn = false;
  }
  log(
    `round ${round + 1}/${rounds}: ${runs.map((r) => `${r.name} dispatch ${r.ms.dispatch.at(-1)?.toFixed(3)} ms`).join(', ')}${noPeer ? '' : `, torch a2a ${peerRounds.at(-1)?.dispatch_a2a_ms?.toFixed?.(3)} ms`}`,
  );
}

// One BF16 dispatch + combine per transport traced (lib/trace.ts): when the host and the GPU
// reached each phase, from the first mark. Where the GPU's time jumps with the host's, it waited.
function traced(run, fp8 = false) {
  align();
  trace.enable();
  try {
    const d = (fp8 ? run.fp8 : run.bf16).dispatch(x, indices, weights, cap);
    const y = run.bf16.combine(run.kept.rows, run.kept.handle, weights);
    const rows = trace
      .collect()
      .map((r) => ({ phase: r.name, hostMs: +r.hostMs.toFixed(3), gpuMs: r.gpuMs === null ? null : +r.gpuMs.toFixed(3) }));
    y.dispose();
    d.rows.dispose();
    d.weights.dispose();
    d.handle.dispose();
    return rows;
  } finally {
    trace.disable();
  }
}
const timelines = Object.fromEntries(
  runs
    .filter((run) => !run.error && !world.aborted)
    .flatMap(
      (run) => (
        traced(run),
        traced(run, true),
        [
          [run.name, traced(run)],
          [`${run.name} FP8`, traced(run, true)],
        ]
      ),
    ),
);

// ------------------------------------------------------------------------------- gather, report
const PEER_KEYS = [
  'dispatch_a2a_ms',
  'dispatch_fp8_a2a_ms',
  'combine_a2a_ms',
  'dispatch_full_ms',
  'combine_full_ms',
  'dispatch_tok_a2a_ms',
  'dispatch_fp8_tok_a2a_ms',
  'combine_tok_a2a_ms',
];
const OPS = ['dispatch', 'combine', 'dispatchFp8', 'dispatchFp8Kept'];
const OP_LABEL = {
  dispatch: 'dispatch BF16',
  combine: 'combine BF16',
  dispatchFp8: 'dispatch FP8',
  dispatchFp8Kept: 'dispatch FP8 kept',
};
// Per rank: for each transport and op, per round ms; per round the peer's; then the counts.
const mine = [
  ...runs.flatMap((run) => OPS.flatMap((op) => Array.from({ length: rounds }, (_, i) => run.ms[op][i] ?? NaN))),
  ...PEER_KEYS.flatMap((key) => Array.from({ length: rounds }, (_, i) => Number(peerRounds[i]?.[key] ?? NaN))),
  ...runs.flatMap((run) => [run.check, run.check8, run.check8k]),
  tokenRowsRecv,
  selfTokenRows,
  expertRowsRecv,
  selfExpertRows,
  tokenRowsSentOut,
  expertRowsSentOut,
].map((v) => (typeof v === 'number' && Number.isFinite(v) ? v : NaN));
// A communicator aborted by a failure cannot gather: rank 0 then reports its own rows alone.
const all = failures.gather(mine);
const width = mine.length;
const reported = all.length / width; // P, or 1 when the gather failed

if (rank === 0) {
  const bf16Row = H * 2;
  const fp8Row = H + (H / 128) * 4;
  const gbs = (rows, ms, rowBytes) => (Number.isFinite(ms) && ms > 0 ? +((rows * rowBytes) / (ms * 1e6)).toFixed(1) : null);
  const num = (v, d = 3) => (Number.isFinite(v) ? +v.toFixed(d) : null);
  const table = [];
  for (let r = 0; r < reported; r++) {
    const row = all.slice(r * width, (r + 1) * width);
    let at = 0;
    const take = (n) => row.slice(at, (at += n));
    const ours = runs.map(() => Object.fromEntries(OPS.map((op) => [op, take(rounds)])));
    const peer = Object.fromEntries(PEER_KEYS.map((key) => [key, take(rounds)]));
    const checks = runs.map(() => take(3));
    const [tokRecv, selfTok, expRecv, selfExp, tokOut, expOut] = take(6);
    runs.forEach((run, ti) => {
      for (const op of OPS) {
        const ms = ours[ti][op];
        // 'ipc' moves a token's row once per destination rank: torch on those split sizes is its peer;
        // the all-to-all transports move (token, expert) rows, as torch does on theirs.
        const byToken = run.name === 'ipc';
        const peerKey = `${op === 'dispatch' ? 'dispatch' : op === 'combine' ? 'combine' : 'dispatch_fp8'}${byToken ? '_tok' : ''}_a2a_ms`;
        const ratios = ms.map((m, i) => peer[peerKey][i] / m).filter(Number.isFinite);
        const full = op === 'dispatch' ? peer.dispatch_full_ms : op === 'combine' ? peer.combine_full_ms : null;
        const fullRatios = full ? ms.map((m, i) => full[i] / m).filter(Number.isFinite) : [];
        const fp8Op = op === 'dispatchFp8' || op === 'dispatchFp8Kept';
        const rowBytes = fp8Op ? fp8Row : bf16Row;
        // dispatch sends its rows out; combine sends back the rows it received from the others
        const wireRows =
          run.name === 'local'
            ? 0
            : op === 'combine'
              ? run.name === 'ipc'
                ? tokRecv - selfTok
                : expRecv - selfExp
              : run.name === 'ipc'
                ? tokOut
                : expOut;
        table.push({
          rank: r,
          transport: run.name,
          op: OP_LABEL[op],
          ms: num(median(ms)),
          'ms range':
            ms.filter(Number.isFinite).length > 1
              ? range(ms)
                  .map((v) => num(v))
                  .join('–')
              : null,
          'GB/s (DeepEP)': gbs(tokRecv, median(ms), rowBytes),
          // combine sends the rows back without the dispatch's entries
          'wire MB': num((wireRows * (rowBytes + (op === 'combine' ? 0 : run.name === 'ipc' ? 12 * k : 4))) / 1e6, 1),
          'torch rows': byToken ? '(token, rank)' : '(token, expert)',
          'torch a2a ms': num(median(peer[peerKey])),
          'torch a2a/ours': ratios.length ? num(median(ratios), 2) : null,
          'ratio range':
            ratios.length > 1
              ? range(ratios)
                  .map((v) => num(v, 2))
                  .join('–')
              : null,
          'torch full ms': full ? num(median(full)) : null,
          'torch full/ours': fullRatios.length ? num(median(fullRatios), 2) : null,
          check: num(checks[ti][op === 'dispatchFp8' ? 1 : op === 'dispatchFp8Kept' ? 2 : 0], 6),
        });
      }
    });
  }
  const area = `dispatch${dryRun ? '-dryrun' : ''}-${P}rank${P > 1 ? 's' : ''}-${world.backend}${world.timeoutMs === 0 ? '-no-timeout' : ''}`;
  writeResult(area, table, {
    config: {
      tokensPerRank: T,
      hidden: H,
      topK: k,
      experts: E,
      ranks: P,
      localExperts: El,
      routing: 'uniform random top-k distinct experts, seeded per rank; dropless',
      rounds,
      repeats: Object.fromEntries(runs.map((r) => [r.name, repeatsOf(r.name)])),
    },
    backend: world.backend,
    device: dev,
    transports: runs.map((r) => ({ name: r.name, why: r.bf16?.transportReason || undefined })),
    rowsRank0: { tokenRowsRecv, selfTokenRows, expertRowsRecv, selfExpertRows, tokenRowsSentOut, expertRowsSentOut },
    bytes:
      "'GB/s (DeepEP)' = unique (token, destination rank) rows received (own included) × row bytes / median ms; BF16 row hidden·2, FP8 row hidden + hidden/128·4; combine credited the BF16 dispatch's rows. 'wire MB' = bytes sent to other ranks: token rows + 12·k bytes of entries each (ipc dispatch), (token, expert) rows + a 4-byte weight each (nccl dispatch), the rows alone (combine)",
    published: PUBLISHED,
    publishedTiming: DEEPEP_TIMING,
    ...failures.notes(reported),
    timing: `per round: CUDA events, median of the repeats after warm-up, each call after a device sync and a barrier; ${rounds} round(s), each timing every transport then the torch peer; 'ms' is the median of the round medians, ranges over rounds; ratios per round`,
    peer: noPeer
      ? 'skipped (--no-peer)'
      : `torch ${peerRounds[0]?.torch ?? '?'} ${peerRounds[0]?.backend ?? ''}: all_to_all_single on the same split sizes as the transport ('torch rows': the (token, expert) rows of the all-to-all transports, or for ipc the unique (token, destination rank) rows it moves); a2a, FP8: the same rows at the FP8 row size; full (the (token, expert) rows only) = x.index_select(rowToken) + a2a (dispatch), a2a back + index_add_ of rows·weight (combine)${peerRounds.find((p) => p.error) ? `; error: ${peerRounds.find((p) => p.error).error}` : ''}`,
    sharedGpu:
      onGpu && P > 1 && world.backend === 'mpi'
        ? "ranks share one GPU: ipc moves rows through that GPU's memory (no NVLink); nccl here is MPI with host staging"
        : undefined,
    timelinesRank0: timelines,
  });
}

for (const run of runs) {
  if (!run.bf16) continue; // failed before it was set up
  run.kept.rows.dispose();
  run.kept.weights.dispose();
  run.kept.handle.dispose();
  run.bf16.dispose();
  run.fp8.dispose();
  run.fp8Kept.dispose();
}
for (const t of [indices, weights, x, ...Object.values(peerInputs)]) if (!t.disposed) t.dispose();
for (const t of Object.values(cap)) if (t instanceof Tensor) t.dispose();
await failures.end();
