// Dispatch / combine (Dispatcher.dispatch and Dispatcher.combine) in DeepEP's configuration, with
// DeepEP's byte accounting, next to DeepEP's published figures and to torch.distributed
// all_to_all_single measured in the same run on the same layout. BF16 and FP8 dispatch, BF16 combine.
//   node benchmarks/dispatch.bench.mjs [--out DIR] [--quick] [--no-peer] [--timeout-ms N] [--dry-run [--full]]
//   mpirun -np N node benchmarks/dispatch.bench.mjs [...]     (one rank per GPU: NCCL;
//                                                              ranks sharing a GPU: MPI, host staging)
// Configuration (DeepEP's tests/test_intranode.py): 4096 tokens per rank, hidden 7168, top-8 of 256
// experts, routing uniformly random (8 distinct experts per token, seeded per rank), dropless.
// Bytes: 'GB/s' = rows this rank receives in dispatch × hidden × 2, counting the rows it sends to
// itself; combine moves the same rows back, so it is credited the same bytes. FP8 rows are
// hidden + hidden/128·4 bytes (e4m3 values and their fp32 scales).
// Our dispatcher ships one row per (token, expert); DeepEP's normal kernels ship one row per
// (token, destination rank), and DeepEP's test credits exactly those (recv_x.numel() · 2, times
// (1 + 4/128)/2 for FP8). 'GB/s (token rows)' credits only those unique (token, rank) rows: the
// like-for-like figure beside DeepEP's. DeepEP's published EP8 figures (H800, NVLink) are FP8
// dispatch 153 GB/s and BF16 combine 158 GB/s; it publishes no BF16 dispatch figure.
// Timing: CUDA events around one call, median after warm-up; before each call every rank waits
// for its device and meets the others at a barrier. dispatch is Dispatcher.dispatch (permute, the
// count exchange with its host read, all-to-all-v of rows and gate weights, regroup by local
// expert); combine is Dispatcher.combine (regroup back, all-to-all-v back, weighted unpermute).
// The peer (benchmarks/peers/dispatch_torch.py): each rank starts one python process after its
// own timing; they form a torch.distributed group (NCCL when every rank has its GPU, gloo with
// host staging when ranks share one, like our MPI backend) and time all_to_all_single on the same
// split sizes, plus the gather + all-to-all (dispatch) and all-to-all + weighted index_add_
// (combine) that do what ours does, and all_to_all_single of rows of the FP8 dispatch's size.
// Ranks sharing a GPU (MPI backend, host staging): each call takes a large fraction of a second, so
// fewer repeats (10, --quick 5; recorded in the result).
// --dry-run: tiny shapes on the CPU (wall-clock timing), to check the script (with --full: the real
// shapes, slowly, to check sizes); the peer runs on the CPU with gloo when python3 has torch (under
// mpirun through the same host-staging code path as on a shared GPU, with unpinned buffers).
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { capacity, Dispatcher, synchronize, Tensor, trace } from '../dist/lib/index.js';
import { args, benchWorld, dryRun, quick, randomRouting, timeRegion, writeInputs, writeResult } from './harness.mjs';

const noPeer = args.includes('--no-peer');

// DeepEP README (V1, now docs/legacy.md), normal kernels, H800, intranode EP8, NVLink bottleneck
// bandwidth, DeepSeek-V3 pretraining setting: FP8 dispatch, BF16 combine.
const DEEPEP = { source: 'DeepEP V1 README (docs/legacy.md), normal kernels, H800, intranode EP8, NVLink', dispatchFp8GBs: 153, combineGBs: 158 };

const { world, le, P, rank, dev, onGpu, log } = await benchWorld();

// --dry-run --full: DeepEP's shapes on the CPU (slow: checks sizes, MPI counts and the peer at scale).
const full = args.includes('--full');
const cfg = dryRun && !full ? { T: 64, H: 256, k: 8, E: 32 } : { T: 4096, H: 7168, k: 8, E: 256 };
const { T, H, k, E } = cfg;
if (E % P !== 0) throw new Error(`${E} experts do not split over ${P} ranks`);
const El = E / P;
// Ranks sharing a GPU stage every exchange through pinned host memory: ~0.1–1 s a call at this size.
const staged = onGpu && world.backend === 'mpi';
const warmup = dryRun ? 1 : staged ? 2 : 5;
const repeats = dryRun ? 3 : staged ? (quick ? 5 : 10) : quick ? 10 : 50;

const routing = (seed) => randomRouting(T, k, E, seed);
const seedOf = (r) => 20250 + 7919 * r;

// Unique (token, destination rank) rows every source rank sends to this rank: what DeepEP ships.
// Every rank regenerates all ranks' routing (it is a pure function of the seed).
let tokenRowsRecv = 0;
for (let src = 0; src < P; src++) {
  const use = routing(seedOf(src)).idx;
  for (let t = 0; t < T; t++) {
    for (let j = 0; j < k; j++) {
      if (Math.floor(use[t * k + j] / El) === rank) {
        tokenRowsRecv++;
        break;
      }
    }
  }
}

const { idx, w } = routing(seedOf(rank));
const indices = Tensor.fromArray(idx, { dtype: 'i32', shape: [T, k], device: dev });
const weights = Tensor.fromArray(w, { dtype: 'f32', shape: [T, k], device: dev });
const x = Tensor.randn([T, H], { dtype: 'bf16', seed: 100 + rank, device: dev });
const cap = capacity(indices, weights, { numExperts: E }); // dropless: no capacity factor
const dispatcher = new Dispatcher({ numExperts: E, group: world });

/** Every rank waits for its device, then all meet: each timed call starts together. */
function align() {
  if (onGpu) synchronize(dev);
  if (P > 1) {
    world.barrier();
    if (onGpu) synchronize(dev);
  }
}

/** Median ms of fn() with the ranks lined up before each run; fn returns a cleanup, run untimed. */
const timeOp = (fn) => timeRegion(fn, { device: dev, warmup, repeats, before: align });

// One dispatch kept for combine, the layout figures and the check.
const kept = dispatcher.dispatch(x, indices, weights, cap);
const recvRows = kept.handle.recvRows.reduce((a, b) => a + b, 0);
const selfRows = kept.handle.recvRows[rank];
const sendRows = kept.handle.sendRows.slice();

// Check: identity experts, so combine(dispatch(x)) = x · Σ_j w[t, j] (first rows, on the host).
function identityRelErr(y) {
  const n = Math.min(T, 64);
  const ys = y.narrow(0, 0, n);
  const xs = x.narrow(0, 0, n);
  const yv = ys.toFloat32Array();
  const xv = xs.toFloat32Array();
  ys.dispose();
  xs.dispose();
  let num = 0;
  let den = 0;
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
let checkRelErr;
{
  const y = dispatcher.combine(kept.rows, kept.handle, weights);
  checkRelErr = identityRelErr(y);
  y.dispose();
  if (!(checkRelErr < 1e-2)) console.error(`rank ${rank}: dispatch∘combine with identity experts is off: relErr ${checkRelErr}`);
}

// The same check through the FP8 dispatcher: e4m3 keeps 3 mantissa bits (relErr in norm ~2e-2).
const dispatcherFp8 = new Dispatcher({ numExperts: E, group: world, fp8: true });
let checkFp8RelErr;
{
  const d = dispatcherFp8.dispatch(x, indices, weights, cap);
  const y = dispatcherFp8.combine(d.rows, d.handle, weights);
  checkFp8RelErr = identityRelErr(y);
  for (const t of [y, d.rows, d.weights]) t.dispose();
  d.handle.dispose();
  if (!(checkFp8RelErr < 8e-2)) console.error(`rank ${rank}: FP8 dispatch∘combine with identity experts is off: relErr ${checkFp8RelErr}`);
}

log(`dispatch: ${P} rank(s), backend ${world.backend}, device ${dev}, T=${T} H=${H} top-${k} E=${E}, warm-up ${warmup}, repeats ${repeats}`);
const dispatchMs = timeOp(() => {
  const d = dispatcher.dispatch(x, indices, weights, cap);
  return () => {
    d.rows.dispose();
    d.weights.dispose();
    d.handle.dispose();
  };
});
const combineMs = timeOp(() => {
  const y = dispatcher.combine(kept.rows, kept.handle, weights);
  return () => y.dispose();
});
// FP8 dispatch (e4m3 rows + one fp32 scale per 128 values), combine unchanged (BF16).
const dispatchFp8Ms = timeOp(() => {
  const d = dispatcherFp8.dispatch(x, indices, weights, cap);
  return () => {
    d.rows.dispose();
    d.weights.dispose();
    d.handle.dispose();
  };
});

// One BF16 dispatch + combine traced (lib/trace.ts): per phase, when the host got there and when
// the GPU did, from the first mark. Where the GPU's time jumps with the host's, it waited for it.
function traced() {
  align();
  trace.enable();
  try {
    const d = dispatcher.dispatch(x, indices, weights, cap);
    const y = dispatcher.combine(kept.rows, kept.handle, weights);
    const rows = trace.collect().map((r) => ({ phase: r.name, hostMs: +r.hostMs.toFixed(3), gpuMs: r.gpuMs === null ? null : +r.gpuMs.toFixed(3) }));
    y.dispose();
    d.rows.dispose();
    d.weights.dispose();
    d.handle.dispose();
    return rows;
  } finally {
    trace.disable();
  }
}
traced(); // warm: the events' first creation
const timeline = traced();
if (rank === 0 || P <= 2) {
  log(`rank ${rank}: one traced BF16 dispatch + combine (ms from the first mark)`);
  if (rank === 0 || !quick) console.table(timeline);
}

// ---------------------------------------------------------------------------------------- peer
// Rank 0 picks a scratch folder name and a free port for torch's rendezvous; every rank learns them.
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
let peer = { skipped: true };
if (!noPeer) {
  const shared = Tensor.fromArray(rank === 0 ? [await freePort(), Math.floor(Math.random() * 2 ** 30)] : [0, 0], { dtype: 'i32', device: dev });
  if (P > 1) world.broadcast(shared, 0);
  const [port, token] = Array.from(shared.toArray());
  shared.dispose();
  const root = join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), `moe-dispatch-${token}`);
  const dir = join(root, `rank${rank}`);
  mkdirSync(dir, { recursive: true });
  const p = kept.handle.permuted;
  const counts = (a) => Tensor.fromArray(a, { dtype: 'i32', device: 'cpu' });
  const sendT = counts(sendRows);
  const recvT = counts(kept.handle.recvRows);
  writeInputs(dir, { x, rowToken: p.rowToken, rowWeight: p.rowWeight, sendRows: sendT, recvRows: recvT });
  sendT.dispose();
  recvT.dispose();
  align(); // every rank's inputs are written and its GPU is idle before the peers start
  // our backend → the peer's: one rank or one GPU per rank: NCCL; ranks sharing a GPU (our MPI
  // backend, host staging): gloo on pinned host copies. Dry run: the same choice on CPU tensors,
  // gloo for NCCL (gloo-staged under mpirun runs the staging copies through unpinned buffers).
  const peerMode = world.backend === 'mpi' ? 'gloo-staged' : dryRun ? 'gloo' : 'nccl';
  const masterAddr = process.env.MOE_PEER_MASTER_ADDR ?? '127.0.0.1';
  const loopback = masterAddr === '127.0.0.1' || masterAddr === 'localhost';
  const r = spawnSync('python3', [join(import.meta.dirname, 'peers', 'dispatch_torch.py'), dir, String(repeats), peerMode, onGpu ? 'cuda' : 'cpu'], {
    encoding: 'utf8',
    // Expected well under a minute; torch's own timeout (180 s) ends a hung collective first. Below
    // the callers' limits (device-session: 300–600 s), so the result is still written.
    timeout: 240_000,
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
      MOE_PEER_WARMUP: String(warmup),
      // Every rank is on this host: gloo's sockets on the loopback interface (a host without a
      // network may resolve its own name to nothing reachable).
      ...(loopback && !process.env.GLOO_SOCKET_IFNAME ? { GLOO_SOCKET_IFNAME: 'lo' } : {}),
    },
  });
  if (r.status === 0) {
    const lines = r.stdout.trim().split('\n');
    peer = JSON.parse(lines[lines.length - 1]);
  } else {
    peer = { error: `${r.error?.message ?? `exit ${r.status}`}: ${(r.stderr ?? '').trim().split('\n').slice(-3).join(' | ')}` };
    console.error(`rank ${rank}: torch peer failed: ${peer.error}`);
  }
  align();
  rmSync(dir, { recursive: true, force: true });
  if (rank === 0) rmSync(root, { recursive: true, force: true });
}

// ------------------------------------------------------------------------------- gather, report
const FIELDS = ['dispatchFp8Ms', 'dispatchMs', 'combineMs', 'recvRows', 'selfRows', 'tokenRowsRecv', 'checkRelErr', 'checkFp8RelErr', 'torchDispatchA2A', 'torchDispatchFp8A2A', 'torchCombineA2A', 'torchDispatchFull', 'torchCombineFull', 'torchCheckRelErr'];
const mine = [dispatchFp8Ms, dispatchMs, combineMs, recvRows, selfRows, tokenRowsRecv, checkRelErr, checkFp8RelErr, peer.dispatch_a2a_ms, peer.dispatch_fp8_a2a_ms, peer.combine_a2a_ms, peer.dispatch_full_ms, peer.combine_full_ms, peer.check_rel_err].map((v) =>
  typeof v === 'number' && Number.isFinite(v) ? v : NaN,
);
const mineT = Tensor.fromArray(mine, { dtype: 'f32', device: dev });
const allT = P > 1 ? world.allGather(mineT) : mineT;
const all = Array.from(allT.toArray());
const perRank = Array.from({ length: P }, (_, r) => Object.fromEntries(FIELDS.map((f, i) => [f, all[r * FIELDS.length + i]])));

if (rank === 0) {
  const bf16Row = H * 2;
  const fp8Row = H + (H / 128) * 4; // e4m3 values plus their fp32 scales: DeepEP's (1 + 4/128)/2 of bf16
  const gbs = (rows, ms, rowBytes = bf16Row) => (Number.isFinite(ms) && ms > 0 ? +((rows * rowBytes) / (ms * 1e6)).toFixed(1) : null);
  const num = (v, d = 3) => (Number.isFinite(v) ? +v.toFixed(d) : null);
  const rows = [];
  for (const [r, m] of perRank.entries()) {
    for (const op of ['dispatch', 'combine']) {
      const ms = op === 'dispatch' ? m.dispatchMs : m.combineMs;
      const a2a = op === 'dispatch' ? m.torchDispatchA2A : m.torchCombineA2A;
      const full = op === 'dispatch' ? m.torchDispatchFull : m.torchCombineFull;
      rows.push({
        rank: r,
        op: `${op} BF16`,
        rows: m.recvRows,
        selfRows: m.selfRows,
        ms: num(ms),
        'GB/s': gbs(m.recvRows, ms),
        'GB/s (token rows)': gbs(m.tokenRowsRecv, ms),
        'DeepEP GB/s': op === 'dispatch' ? null : DEEPEP.combineGBs,
        'torch a2a ms': num(a2a),
        'torch a2a GB/s': gbs(m.recvRows, a2a),
        'torch full ms': num(full),
        'torch full/ours': Number.isFinite(full) && ms > 0 ? +(full / ms).toFixed(2) : null,
      });
    }
  }
  for (const [r, m] of perRank.entries()) {
    rows.push({
      rank: r,
      op: 'dispatch FP8',
      rows: m.recvRows,
      selfRows: m.selfRows,
      ms: num(m.dispatchFp8Ms),
      'GB/s': gbs(m.recvRows, m.dispatchFp8Ms, fp8Row),
      'GB/s (token rows)': gbs(m.tokenRowsRecv, m.dispatchFp8Ms, fp8Row),
      'DeepEP GB/s': DEEPEP.dispatchFp8GBs,
      'torch a2a ms': num(m.torchDispatchFp8A2A),
      'torch a2a GB/s': gbs(m.recvRows, m.torchDispatchFp8A2A, fp8Row),
      'torch full ms': null,
      'torch full/ours': null,
    });
  }
  const slowest = (f) => Math.max(...perRank.map((m) => m[f]));
  // One file per configuration: dispatch-1rank-single, dispatch-2ranks-mpi (sharing a GPU), dispatch-8ranks-nccl.
  const area = `dispatch${dryRun ? '-dryrun' : ''}-${P}rank${P > 1 ? 's' : ''}-${world.backend}${world.timeoutMs === 0 ? '-no-timeout' : ''}`;
  writeResult(area, rows, {
    config: { tokensPerRank: T, hidden: H, topK: k, experts: E, ranks: P, localExperts: El, dtype: 'bf16 (dispatch also fp8 e4m3 + fp32 scale per 128)', routing: 'uniform random top-k distinct experts, seeded per rank; dropless', warmup, repeats },
    backend: world.backend,
    device: dev,
    commTimeoutMs: world.timeoutMs === 0 ? '0: no timeout (NCCL collectives queued without a host wait)' : world.timeoutMs,
    bytes: 'GB/s = received rows × row bytes / median time, rows received from every rank including this one; BF16 rows hidden × 2 bytes, FP8 rows hidden + hidden/128·4 (e4m3 values and fp32 scales); combine is credited the same bytes as the BF16 dispatch (it sends those rows back)',
    tokenRows: "'GB/s (token rows)' credits only unique (token, destination rank) rows, as DeepEP's normal kernels ship them and its test counts them (recv_x.numel()·2, ×(1 + 4/128)/2 for FP8): the like-for-like figure beside DeepEP's",
    deepep: `${DEEPEP.source}: FP8 dispatch ${DEEPEP.dispatchFp8GBs} GB/s, BF16 combine ${DEEPEP.combineGBs} GB/s (no BF16 dispatch figure published). DeepEP's tuning loop times dispatch with a cached layout handle (no count exchange, no host read); ours includes both, so at EP > 1 ours carries one host round trip DeepEP's figure does not`,
    timing: `CUDA events, median of ${repeats} after ${warmup} warm-up; each call starts after a device sync and a barrier of all ranks. dispatch = Dispatcher.dispatch incl. the count exchange and its host read; combine = Dispatcher.combine (identity experts: the dispatched rows go back as they are)`,
    oneRank: P > 1 ? undefined : 'with one rank the dispatcher exchanges nothing (a view): dispatch is permute + the count read, combine is the weighted unpermute; torch a2a with a group of one is a device copy',
    sharedGpu: world.backend === 'mpi' && onGpu ? 'ranks share a GPU through the MPI backend: these figures measure host staging, not NVLink' : undefined,
    peer: peer.skipped
      ? 'skipped (--no-peer)'
      : `torch ${peer.torch ?? '?'} ${peer.backend ?? ''}: all_to_all_single on the same split sizes (a2a; FP8 row: the same rows at hidden + hidden/128·4 bytes, no quantisation); full = x.index_select(rowToken) + a2a (dispatch), a2a back + index_add_ of rows·weight (combine)${peer.error ? `; error on rank 0: ${peer.error}` : ''}`,
    check: `combine(dispatch(x)) with identity experts vs x·Σw on the first rows: max relErr over ranks BF16 ${Math.max(...perRank.map((m) => m.checkRelErr)).toExponential(2)}, FP8 dispatch ${Math.max(...perRank.map((m) => m.checkFp8RelErr)).toExponential(2)}; the torch peer's full path vs the same: ${Math.max(...perRank.map((m) => m.torchCheckRelErr)).toExponential(2)}`,
    slowestRank: { dispatchMs: slowest('dispatchMs'), combineMs: slowest('combineMs') },
    timelineRank0: { what: "one traced BF16 dispatch then combine on rank 0 after a sync and a barrier (lib/trace.ts): hostMs = when the host reached the phase's end, gpuMs = when the GPU did (an event on the stream), from the first mark", rows: timeline },
  });
}

kept.rows.dispose();
kept.weights.dispose();
kept.handle.dispose();
for (const t of [indices, weights, x, mineT]) t.dispose();
if (allT !== mineT) allT.dispose();
for (const t of Object.values(cap)) if (t instanceof Tensor) t.dispose();
dispatcher.dispose();
dispatcherFp8.dispose();
world.dispose();
