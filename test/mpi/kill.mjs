// Rank 1 dies (SIGKILL) just before a collective; the others wait in allToAllV with a 3 s timeout.
// Either they time out (TimeoutError naming rank 1) or the launcher tears the job down first; the
// runner asserts only that the job ends, non-zero, well within a bound.
import { init, Tensor, TimeoutError } from '../../dist/lib/index.js';

const world = await init({ timeoutMs: 3000 });
const { rank: r, size: n } = world;
world.barrier();
if (r === 1) process.kill(process.pid, 'SIGKILL');
const ones = Array(n).fill(1);
try {
  world.allToAllV(Tensor.zeros([n, 1], { device: 'cpu' }), ones, Tensor.zeros([n, 1], { device: 'cpu' }), ones);
  console.log(`rank ${r}: completed?!`);
} catch (e) {
  console.log(`rank ${r}: ${e instanceof TimeoutError ? 'TimeoutError' : e.name}: ${e.message}`);
}
