// Mismatched calls (issue 14, item 1), on any backend: before any data moves the ranks agree on the
// call, so each mismatch is an InvalidArgumentError on EVERY rank naming the op, this rank, the
// peers that differ and both values; nothing was sent, so the communicator stays usable. Without
// the agreement these overran buffers (malloc(): corrupted top size) or hung.
//   --device cpu (default): host tensors (MPI under mpirun).
//   --device cuda: each rank's GPU (NCCL with a GPU per rank; MPI staging when ranks share one).
import { capacity, Dispatcher, init, InvalidArgumentError, MoEInference, Tensor } from '../../dist/lib/index.js';
import { check, expectThrow, same, scriptDevice } from './common.mjs';

const world = await init({ timeoutMs: 20000 });
const { device } = await scriptDevice(world);
const { rank: r, size: n, backend } = world;
check(n >= 2, 'needs at least 2 ranks');
const on = { device };
const range = (k, f) => Array.from({ length: k }, (_, i) => f(i));

// this rank's view: rank 0 differs from the others
const lead = r === 0;
const mine = (a, b) => (lead ? a : b);
const theirs = (a, b) => (lead ? b : a);
const peer = lead ? `ranks? 1[\\d, ]*` : 'rank 0';
const mismatch = (fn, op, call) =>
  expectThrow(
    fn,
    InvalidArgumentError,
    new RegExp(
      `^${op}: rank ${r} of ${n}: ${peer} calls? ${theirs(...call)} but this rank calls ${mine(...call)}( \\(as do(es)? ranks? [\\d, ]+\\))?; every rank must make the same call with the same dtype and shape \\(nothing was sent; the ${backend} communicator stays usable\\)$`,
    ),
    `${op} mismatch`,
  );
mismatch(() => world.allReduce(Tensor.zeros([mine(2, 3)], on)), 'allReduce', [
  'allReduce\\(sum\\) on 2 rows × 1 f32',
  'allReduce\\(sum\\) on 3 rows × 1 f32',
]);
mismatch(() => world.allReduce(Tensor.zeros([4], on), mine('sum', 'max')), 'allReduce', [
  'allReduce\\(sum\\) on 4 rows × 1 f32',
  'allReduce\\(max\\) on 4 rows × 1 f32',
]);
mismatch(() => world.allGather(Tensor.zeros([1000, mine(32, 64)], on)), 'allGather', [
  'allGather on 1000 rows × 32 f32',
  'allGather on 1000 rows × 64 f32',
]);
mismatch(() => world.broadcast(Tensor.zeros([3], { ...on, dtype: mine('i32', 'f32') }), 0), 'broadcast', [
  'broadcast\\(root 0\\) on 3 rows × 1 i32',
  'broadcast\\(root 0\\) on 3 rows × 1 f32',
]);
mismatch(() => world.broadcast(Tensor.zeros([3], on), mine(0, n - 1)), 'broadcast', [
  'broadcast\\(root 0\\) on 3 rows × 1 f32',
  `broadcast\\(root ${n - 1}\\) on 3 rows × 1 f32`,
]);
// a large allToAll: 64 KiB against 128 KiB per peer
mismatch(() => world.allToAll(Tensor.zeros([n * mine(256, 512), 64], on)), 'allToAll', [
  `allToAll on ${n * 256} rows × 64 f32`,
  `allToAll on ${n * 512} rows × 64 f32`,
]);
// different calls altogether
const t = Tensor.zeros([2], on);
mismatch(() => (lead ? world.allReduce(t) : world.broadcast(t, 0)), lead ? 'allReduce' : 'broadcast', [
  'allReduce\\(sum\\) on 2 rows × 1 f32',
  'broadcast\\(root 0\\) on 2 rows × 1 f32',
]);
mismatch(() => (lead ? world.barrier() : world.allToAll(Tensor.zeros([n, 1], on))), lead ? 'barrier' : 'allToAll', [
  'barrier',
  `allToAll on ${n} rows × 1 f32`,
]);
// allToAllV: rank 0 expects one row too many from rank 1; every rank names that pair
const ones = range(n, () => 1);
const expects = range(n, (p) => (r === 0 && p === 1 ? 2 : 1));
const send = Tensor.zeros([n, 2], on);
expectThrow(
  () => world.allToAllV(send, ones, Tensor.zeros([n + (lead ? 1 : 0), 2], on), expects),
  InvalidArgumentError,
  new RegExp(
    `^allToAllV: rank ${r} of ${n}: rank 1 sends 1 rows to rank 0 but rank 0 expects 2 \\(recvRows\\[1\\]\\); exchange the counts first \\(nothing was sent; the ${backend} communicator stays usable\\)$`,
  ),
  'count mismatch',
);

// A dispatcher in capacity mode with padToCapacity sizes its segments from its own C: ranks whose T
// gives another C are told so, not only that the counts differ.
{
  const E = 2 * n,
    k = 2,
    T = mine(8, 16),
    H = 4;
  const indices = Tensor.fromArray(
    range(T * k, (i) => (i + Math.floor(i / k)) % E),
    { dtype: 'i32', shape: [T, k], device },
  );
  const weights = Tensor.rand([T, k], { seed: 5 + r, device });
  const x = Tensor.randn([T, H], { seed: 7 + r, device });
  const d = new Dispatcher({ numExperts: E, group: world, padToCapacity: true, transport: 'nccl' }); // the all-to-all's check
  const cap = capacity(indices, weights, { numExperts: E, capacityFactor: 1 });
  expectThrow(
    () => d.dispatch(x, indices, weights, cap),
    InvalidArgumentError,
    /expects .*With padToCapacity every rank sends C rows per expert, so every rank needs the same capacity C = min\(ceil\(capacityFactor·T·k\/E\), T·k\): the ranks' T or capacityFactor give different ones$/,
    'capacity mode with another C on rank 0',
  );
  d.dispose();
}

// A served layer whose configuration differs on rank 0 (another topK and no capacity): its first
// forward refuses on every rank together, naming both fields with both values, before any exchange.
{
  const E = 2 * n,
    H = 8,
    F = 4,
    El = 2,
    T = 4;
  const dtype = device === 'cpu' ? 'f32' : 'bf16';
  const w = (shape, seed) => Tensor.randn(shape, { seed, device }).cast(dtype);
  const inf = new MoEInference(
    { hidden: H, ffn: F, numExperts: E, topK: mine(1, 2), ...(lead ? {} : { capacityFactor: 2 }), group: world, dtype, device },
    { router: w([1, H, E], 1), w13: w([El, H, 2 * F], 2 + r), w2: w([El, F, H], 3 + r) },
  );
  const other = lead ? 1 : 0;
  const topK = `topK ${mine(1, 2)} on rank ${r} but ${theirs(1, 2)} on rank ${other}`;
  const cf = `capacityFactor ${mine('none', 2)} on rank ${r} but ${theirs('none', 2)} on rank ${other}`;
  expectThrow(
    () => inf.forward(w([T, H], 9 + r)),
    InvalidArgumentError,
    new RegExp(
      `^MoEInference\\.forward: the expert-parallel group's layers differ \\(${topK}; ${cf}[;)].*build every rank's layer with the same configuration$`,
    ),
    'MoEInference whose topK and capacity differ on rank 0',
  );
  // captureDecode compares first too: a rank without a capacity factor would otherwise refuse on
  // its own (dropless cannot be captured) while the others waited in the exchange (a reviewer's find).
  expectThrow(
    () => inf.captureDecode(T),
    InvalidArgumentError,
    new RegExp(`^MoEInference\\.captureDecode: the expert-parallel group's layers differ \\(${topK}; ${cf}[;)]`),
    'captureDecode of a MoEInference whose topK and capacity differ on rank 0',
  );
  inf.dispose();
}

check(!world.aborted, 'still usable after the mismatches');
same(world.allReduce(Tensor.full([1], 1, on)).toNumbers(), [n], 'allReduce after the mismatches');
const recv = world.allToAllV(Tensor.full([n, 2], r, on), ones, Tensor.zeros([n, 2], on), ones);
same(
  recv.toNumbers(),
  range(2 * n, (i) => Math.floor(i / 2)),
  'allToAllV after the mismatches',
);
world.barrier();
world.dispose();
console.log(`ok rank ${r} of ${n} (${backend})`);
