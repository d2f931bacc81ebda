// Every collective of the MPI communicator on N ranks, values checked on every rank (mismatched
// calls: mismatch.mjs).
import { expertGroups, init, InvalidArgumentError, Tensor } from '../../dist/lib/index.js';
import { check, expectThrow, same } from './common.mjs';

const world = await init({ timeoutMs: 20000 });
const { rank: r, size: n } = world;
check(world.backend === 'mpi', `backend ${world.backend}, expected mpi`);
check(n === Number(process.env.OMPI_COMM_WORLD_SIZE ?? process.env.PMI_SIZE), `size ${n}`);
const cpu = { device: 'cpu' };
const range = (k, f) => Array.from({ length: k }, (_, i) => f(i));

// all_reduce
const S = (n * (n + 1)) / 2;
same(world.allReduce(Tensor.fromArray([r + 1, 2 * (r + 1)], cpu)).toNumbers(), [S, 2 * S], 'allReduce sum f32');
same(world.allReduce(Tensor.fromArray([r, -r], cpu), 'max').toNumbers(), [n - 1, 0], 'allReduce max');
same(world.allReduce(Tensor.fromArray([r, -r], cpu), 'min').toNumbers(), [0, -(n - 1)], 'allReduce min');
same(world.allReduce(Tensor.fromArray([2 * r], cpu), 'avg').toNumbers(), [n - 1], 'allReduce avg');
same(world.allReduce(Tensor.fromArray([r + 1, 2 ** 40], { ...cpu, dtype: 'i64' })).toNumbers(), [S, n * 2 ** 40], 'allReduce sum i64');
same(world.allReduce(Tensor.fromArray([r + 1, 3], { ...cpu, dtype: 'bf16' })).toFloat32Array(), [S, 3 * n], 'allReduce sum bf16');

// all_gather: rank q's rows at q*2
const g = world.allGather(
  Tensor.fromArray(
    range(6, (i) => 100 * r + i),
    { ...cpu, shape: [2, 3] },
  ),
);
same(g.shape, [2 * n, 3], 'allGather shape');
same(
  g.toNumbers(),
  range(6 * n, (i) => 100 * Math.floor(i / 6) + (i % 6)),
  'allGather values',
);

// broadcast from the last rank
const b = Tensor.fromArray(r === n - 1 ? [7, 8, 9] : [0, 0, 0], { ...cpu, dtype: 'i32' });
same(world.broadcast(b, n - 1).toNumbers(), [7, 8, 9], 'broadcast');

// all_to_all: 2 rows of width 2 per peer; row j of the chunk for p holds [1000r + 10p + j, -1]
const send = Tensor.fromArray(
  range(n * 4, (i) => (i % 2 ? -1 : 1000 * r + 10 * Math.floor(i / 4) + Math.floor((i % 4) / 2))),
  { ...cpu, shape: [2 * n, 2] },
);
same(
  world.allToAll(send).toNumbers(),
  range(n * 4, (i) => (i % 2 ? -1 : 1000 * Math.floor(i / 4) + 10 * r + Math.floor((i % 4) / 2))),
  'allToAll',
);

// all_to_all_v, ragged: rows(src → dst) = (src + dst) % 3, except rank 0 sends nothing and rank n-1
// receives nothing. Counts are exchanged with allToAll first, as a caller does.
const rows = (src, dst) => (src === 0 || dst === n - 1 ? 0 : (src + dst) % 3);
const sendRows = range(n, (p) => rows(r, p));
const counts = world.allToAll(Tensor.fromArray(sendRows, { ...cpu, dtype: 'i32' }));
const recvRows = counts.toNumbers();
same(
  recvRows,
  range(n, (p) => rows(p, r)),
  'allToAll of counts',
);
const W = 3;
const sendVals = [];
for (let p = 0; p < n; p++)
  for (let j = 0; j < sendRows[p]; j++) for (let c = 0; c < W; c++) sendVals.push(r * 1000 + p * 100 + j * 10 + c);
const sumS = sendRows.reduce((a, x) => a + x, 0);
const sumR = recvRows.reduce((a, x) => a + x, 0);
const sv = Tensor.fromArray(sendVals, { ...cpu, shape: [sumS, W] });
const rv = Tensor.full([sumR, W], -7, cpu);
world.allToAllV(sv, sendRows, rv, recvRows);
const expected = [];
for (let p = 0; p < n; p++)
  for (let j = 0; j < recvRows[p]; j++) for (let c = 0; c < W; c++) expected.push(p * 1000 + r * 100 + j * 10 + c);
same(rv.toNumbers(), expected, 'allToAllV ragged');

// a copy of world (split with one color); abort() makes every later call throw
const copy = world.split(0, r);
check(copy.size === n && copy.rank === r, 'split(0) is a copy of world');
same(copy.allReduce(Tensor.fromArray([1], cpu)).toNumbers(), [n], 'allReduce on the copy');
copy.abort();
check(copy.aborted, 'aborted after abort()');
expectThrow(() => copy.barrier(), InvalidArgumentError, /was aborted/, 'call after abort');
copy.dispose();

// EP / EDP groups
const epSize = n >= 4 ? 2 : n;
const { ep, edp } = expertGroups(world, epSize);
check(ep.size === epSize && ep.rank === r % epSize, `ep group: rank ${ep.rank} of ${ep.size}`);
check(edp.size === n / epSize && edp.rank === Math.floor(r / epSize), `edp group: rank ${edp.rank} of ${edp.size}`);
const g0 = Math.floor(r / epSize) * epSize;
same(ep.allReduce(Tensor.fromArray([r], cpu)).toNumbers(), [range(epSize, (i) => g0 + i).reduce((a, x) => a + x, 0)], 'allReduce over ep');
same(
  edp.allReduce(Tensor.fromArray([r], cpu)).toNumbers(),
  [range(n / epSize, (i) => (r % epSize) + i * epSize).reduce((a, x) => a + x, 0)],
  'allReduce over edp',
);
ep.allToAll(Tensor.zeros([epSize, 1], cpu));
ep.dispose();
edp.dispose();

world.barrier();
world.dispose();
console.log(`ok rank ${r} of ${n}`);
