// Under mpirun with --device cuda: the last rank stops in the middle of a run through the
// peer-memory ('ipc') transport; the others must end their call in a TimeoutError naming it within
// the communicator's timeout (3 s), never hang.
//   --stop freeze (default): the rank freezes itself (SIGSTOP); rank 0 kills it after reporting.
//   --stop kill: the rank kills itself (SIGKILL); needs mpirun's recovery mode (--enable-recovery,
//                or OMPI_MCA_orte_enable_recovery=1), or the launcher tears the job down first.
//   --capacity: capacity mode, where dispatch never waits on the host: the timeout surfaces at the
//               next call after the device finished waiting.
//   --other-t: the surviving ranks' step has half the tokens of the first (capacity mode: the stopped
//              rank's mail still says the first step's T, which must not read as a token mismatch).
// Prints "rank R after N ms: TimeoutError: ..." on every surviving rank.
import { capacity, Dispatcher, init, synchronize, Tensor, TimeoutError } from '../../dist/lib/index.js';
import { scriptDevice } from './common.mjs';

const arg = (name, dflt) => (process.argv.includes(name) ? process.argv[process.argv.indexOf(name) + 1] : dflt);
const stop = arg('--stop', 'freeze');
const capacityMode = process.argv.includes('--capacity');
const otherT = process.argv.includes('--other-t');
const world = await init();
const { device } = await scriptDevice(world);
const { rank, size: P } = world;
const E = 4 * P,
  k = 2,
  T = 64,
  H = 256;
const d = new Dispatcher({ numExperts: E, group: world, transport: 'ipc', padToCapacity: capacityMode });
/** A step's inputs for `tokens` rows. */
function inputs(tokens) {
  const indices = Tensor.fromArray(
    Array.from({ length: tokens * k }, (_, i) => (i * 7 + rank + (i % k)) % E),
    { dtype: 'i32', shape: [tokens, k], device },
  );
  const weights = Tensor.rand([tokens, k], { seed: 5 + rank, device });
  const x = Tensor.randn([tokens, H], { seed: 9 + rank, device }).cast('bf16');
  const cap = capacity(indices, weights, { numExperts: E, ...(capacityMode ? { capacityFactor: 2 } : {}) });
  return { indices, weights, x, cap };
}
let { indices, weights, x, cap } = inputs(T);
// Every rank alive: one step, and every rank's pid for the clean-up.
{
  const { rows, handle } = d.dispatch(x, indices, weights, cap);
  d.combine(rows, handle, weights).dispose();
  handle.dispose();
  rows.dispose();
}
const pids = world.allGather(Tensor.fromArray([process.pid], { dtype: 'i32', device: 'cpu' })).toArray();
synchronize(device);
world.barrier();
world.timeoutMs = 3000;
if (rank === P - 1) process.kill(process.pid, stop === 'kill' ? 'SIGKILL' : 'SIGSTOP');
if (otherT) ({ indices, weights, x, cap } = inputs(T / 2));
const t0 = Date.now();
try {
  const { rows, handle } = d.dispatch(x, indices, weights, cap);
  synchronize(device);
  d.combine(rows, handle, weights);
  synchronize(device);
  console.log(`rank ${rank}: completed?!`);
} catch (e) {
  console.log(`rank ${rank} after ${Date.now() - t0} ms: ${e instanceof TimeoutError ? 'TimeoutError' : e.name}: ${e.message}`);
  process.exitCode = 1;
}
if (rank === 0 && stop === 'freeze') process.kill(pids[P - 1], 'SIGKILL');
process.exit(process.exitCode ?? 0);
