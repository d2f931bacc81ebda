// Rank 1 dies (SIGKILL) just before a collective; the others wait in allToAllV with a 3 s timeout.
// Either they time out (TimeoutError naming rank 1) or the launcher tears the job down first; the
// runner asserts only that the job ends, non-zero, well within a bound.
//   --device cuda: the tensors on each rank's GPU (with a GPU per rank: NCCL, whose watchdog must
//                  abort the communicator). Under mpirun the launcher usually kills the job first;
//                  started without it (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT per
//                  process; scripts/device-session.sh step `multi`) the survivors must report it.
import { getDefaultDevice, init, Tensor, TimeoutError } from '../../dist/lib/index.js';

const i = process.argv.indexOf('--device');
const onGpu = i > 0 && process.argv[i + 1] === 'cuda';
// Start-up under the default timeout (two processes started by hand may be seconds apart), then 3 s.
const world = await init();
world.timeoutMs = 3000;
const { rank: r, size: n } = world;
const device = onGpu ? getDefaultDevice() : 'cpu';
const ones = Array(n).fill(1);
// One exchange while every rank is alive (init() already connects NCCL's peers; this makes sure).
world.allToAllV(Tensor.zeros([n, 1], { device }), ones, Tensor.zeros([n, 1], { device }), ones);
world.barrier();
if (r === 1) process.kill(process.pid, 'SIGKILL');
const t0 = Date.now();
try {
  world.allToAllV(Tensor.zeros([n, 1], { device }), ones, Tensor.zeros([n, 1], { device }), ones);
  console.log(`rank ${r}: completed?!`);
} catch (e) {
  console.log(`rank ${r} after ${Date.now() - t0} ms: ${e instanceof TimeoutError ? 'TimeoutError' : e.name}: ${e.message}`);
  process.exitCode = 1;
}
