// Under mpirun with --device cuda: with a capacity factor (fixed segments) every rank must dispatch
// the same number of tokens through the peer-memory ('ipc') transport. Here the last rank
// dispatches half as many as the others after a first step that agreed. The receivers' kernels see
// the sources' token counts in the mail: every rank must end in an InvalidArgumentError naming the
// ranks and both counts at its next call into the transport (here the combine, after a
// synchronize), not wrong results without an error; and every later call must refuse. (A T past the
// transport's token capacity is another case: that rank grows its buffers alone and the others time
// out; docs/serving.md.)
// Prints "ok rank R of P" when it did.
import { capacity, Dispatcher, init, InvalidArgumentError, synchronize, Tensor, tidy } from '../../dist/lib/index.js';
import { check, expectThrow, scriptDevice } from './common.mjs';

const world = await init({ timeoutMs: 20000 });
const { device } = await scriptDevice(world);
const { rank, size: P } = world;
check(P >= 2, 'needs at least 2 ranks');
const E = 4 * P,
  k = 2,
  H = 256,
  T = 64;
const d = new Dispatcher({ numExperts: E, group: world, transport: 'ipc', padToCapacity: true });

/** One dispatch of `tokens` rows, a synchronize (the receivers' check has run), then the combine. */
function step(tokens) {
  tidy(() => {
    const indices = Tensor.fromArray(
      Array.from({ length: tokens * k }, (_, i) => (i * 7 + rank + (i % k)) % E),
      { dtype: 'i32', shape: [tokens, k], device },
    );
    const weights = Tensor.rand([tokens, k], { seed: 5 + rank, device });
    const x = Tensor.randn([tokens, H], { seed: 9 + rank, device }).cast('bf16');
    const cap = capacity(indices, weights, { numExperts: E, capacityFactor: 2 });
    const { rows, handle } = d.dispatch(x, indices, weights, cap);
    synchronize(device);
    try {
      d.combine(rows, handle, weights);
    } finally {
      handle.dispose();
    }
  });
}

step(T); // every rank the same T: no error
synchronize(device);
world.barrier();
const mine = rank === P - 1 ? T / 2 : T;
const others = rank === P - 1 ? `rank 0 dispatched ${T}` : `rank ${P - 1} dispatched ${T / 2}`;
const pattern = new RegExp(
  `^combine: rank ${rank} of ${P}: .*${others}.* tokens but this rank dispatched ${mine}; with a capacity factor \\(fixed segments\\) every rank must dispatch the same number of tokens`,
);
const e = expectThrow(() => step(mine), InvalidArgumentError, pattern, 'a step with another T on the last rank');
console.log(`rank ${rank}: ${e.name}: ${e.message}`);
// The transport stays refused: the next call says the same.
expectThrow(() => step(mine), InvalidArgumentError, /every rank must dispatch the same number of tokens/, 'the call after');
console.log(`ok rank ${rank} of ${P}`);
process.exit(0);
