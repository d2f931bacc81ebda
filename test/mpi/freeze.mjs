// Rank 1 freezes (SIGSTOP) before a collective; rank 0 must raise a TimeoutError naming rank 1
// after its 1.5 s timeout and then leave: MPI_Finalize at exit would wait for the frozen rank
// forever, so after a timeout it gets a deadline and the process exits without it. The runner
// asserts that the job ends (non-zero: mpirun reports the unfinalised exit) well before a hang.
import { init, Tensor, TimeoutError } from '../../dist/lib/index.js';
import { check } from './common.mjs';

const world = await init({ timeoutMs: 1500 });
const { rank: r } = world;
world.barrier();
if (r === 1) {
  console.log(`rank 1 pid ${process.pid} stopping`); // the runner kills it if the launcher did not
  process.kill(process.pid, 'SIGSTOP');
}
const t0 = Date.now();
try {
  world.allReduce(Tensor.zeros([4], { device: 'cpu' }));
  check(false, 'allReduce completed with rank 1 frozen');
} catch (e) {
  check(e instanceof TimeoutError, `threw ${e?.name}: ${e?.message}`);
  console.log(`rank ${r} after ${Date.now() - t0} ms: TimeoutError: ${e.message}`);
}
world.dispose();
