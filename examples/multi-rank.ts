// examples/multi-rank.ts — the Multi-rank example of the README, run by test/mpi/run.test.ts:
//   node dist/examples/multi-rank.js               one process
//   mpirun -np 2 node dist/examples/multi-rank.js  two ranks (MPI on the CPU; NCCL with a GPU per rank)
import { getDefaultDevice, init, MoELayer, ops, Tensor, tidy } from '../lib/index.js';

const world = await init(); // rank, size, local rank and device from the launcher
const { rank, size } = world;
console.log(`${world} on ${getDefaultDevice()}`); // Communicator(mpi, rank 0 of 2) on cpu; nccl with a GPU per rank

const t = Tensor.fromArray([rank + 1]); // the default device: the rank's GPU, else the CPU
world.allReduce(t, 'sum'); // in place: 3 on every rank of 2

// Ragged all-to-all: exchange the row counts first (as tensors: NCCL moves device memory), then the rows.
const sendRows = Array.from({ length: size }, (_, p) => p + 1 + rank);
const recvRows = world.allToAll(Tensor.fromArray(sendRows, { dtype: 'i32' })).toNumbers();
const send = Tensor.randn([sendRows.reduce((a, b) => a + b), 16], { seed: rank });
const recv = Tensor.empty([recvRows.reduce((a, b) => a + b), 16]);
world.allToAllV(send, sendRows, recv, recvRows);

// An MoE layer with its 4·size experts spread over the ranks (each holds 4), and the
// all-to-alls on their own stream beside the shared expert.
const layer = new MoELayer({ hidden: 64, ffn: 32, numExperts: 4 * size, topK: 2, sharedFfn: 32, group: world, commStream: true });
const grads = tidy(() => {
  const x = Tensor.randn([128, 64], { dtype: 'bf16', seed: 10 + rank }); // this rank's tokens
  const fwd = layer.forward(x);
  return layer.backward(fwd, Tensor.randn([128, 64], { dtype: 'bf16', seed: 20 + rank }));
});
// Data parallelism over the ranks' tokens, as moe-ep train does: the replicated weights' gradients
// are averaged; an expert's gradient already sums every rank's tokens (dispatch brought them to
// it), so it is divided by the ranks to match.
for (const g of [grads.router, grads.sharedW13, grads.sharedW2]) if (g) world.allReduce(g, 'avg');
for (const g of [grads.w13, grads.w2]) ops.scale(g, 1 / size, { out: g });
console.log(
  `rank ${rank}: allReduce ${t.item()}, received ${recvRows.join(' + ')} rows, ${layer.localExperts} local experts, dx ${grads.dx.shape}`,
);

for (const g of Object.values(grads)) g?.dispose();
for (const x of [t, send, recv]) x.dispose();
layer.dispose();
world.dispose();
