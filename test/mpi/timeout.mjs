// Rank 1 arrives 3 s late at an allToAllV whose timeout is 2 s: every other rank must throw a
// TimeoutError naming the op, itself and rank 1, within the timeout plus slack; the communicator is
// then aborted. Rank 1's late call finds its peers gone (they gave up after agreeing on nothing) and
// times out in turn, naming them; every rank then exits cleanly (MPI_Finalize still completes, as
// every peer reaches it within the deadline an unclean process gives it).
import { init, InvalidArgumentError, Tensor, TimeoutError } from '../../dist/lib/index.js';
import { check, expectThrow, sleepMs } from './common.mjs';

const world = await init({ timeoutMs: 2000 });
const { rank: r, size: n } = world;
world.barrier();
const send = Tensor.zeros([n, 4], { device: 'cpu' });
const recv = Tensor.zeros([n, 4], { device: 'cpu' });
const ones = Array(n).fill(1);
if (r === 1) {
  sleepMs(3000);
  const others = Array.from({ length: n }, (_, p) => p).filter((p) => p !== 1);
  expectThrow(
    () => world.allToAllV(send, ones, recv, ones),
    TimeoutError,
    new RegExp(`^allToAllV: timed out after 2000 ms on rank 1 of ${n} \\(mpi\\); not heard from ranks? ${others.join(', ')}(;|$)`),
    'late rank',
  );
} else {
  const t0 = Date.now();
  expectThrow(
    () => world.allToAllV(send, ones, recv, ones),
    TimeoutError,
    new RegExp(`^allToAllV: timed out after 2000 ms on rank ${r} of ${n} \\(mpi\\); not heard from rank 1(;|$)`),
    'timeout',
  );
  const dt = Date.now() - t0;
  check(dt >= 1900 && dt < 4000, `threw after ${dt} ms (timeout 2000)`);
  check(world.aborted, 'aborted after the timeout');
  expectThrow(() => world.barrier(), InvalidArgumentError, /was aborted/, 'later call');
}
console.log(`ok rank ${r}`);
