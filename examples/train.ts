/**
 * Training from your own code, without the CLI: one MoE layer learning a Zipf-cluster regression,
 * with the experts spread over every rank of the job.
 *
 *   node dist/examples/train.js                  one process (GPU if there is one, else CPU)
 *   mpirun -np 2 node dist/examples/train.js     experts over 2 ranks (MPI on the CPU, NCCL with a GPU per rank)
 * In an installed package: node node_modules/moe-ep/dist/examples/train.js
 */
import { adamwStep, balanceBiasUpdate, ClusterTask, init, mseLoss, MoELayer, ops, Tensor, tidy } from '../lib/index.js';

const steps = Number(process.argv[2] ?? 200);
const world = await init();
const device = world.size > 1 && world.backend !== 'nccl' ? 'cpu' : undefined; // MPI ranks share the CPU here
const layer = new MoELayer({
  hidden: 32,
  ffn: 16,
  numExperts: 8,
  topK: 2,
  scoreFunction: 'sigmoid',
  group: world,
  ...(device ? { device, dtype: 'f32' } : {}),
});
const dtype = layer.config.dtype === 'bf16' ? 'bf16' : 'f32';
const task = new ClusterTask({ dim: 32, clusters: 16, zipf: 1.2, noise: 0.3, seed: 7 });
const params = [layer.master.router, layer.master.w13, layer.master.w2];
const moments = params.map((p) => [Tensor.zeros(p.shape, { device: p.device }), Tensor.zeros(p.shape, { device: p.device })] as const);

for (let step = 0; step < steps; step++) {
  const loss = tidy(() => {
    using batch = task.batch(step, 256, world.rank, world.size); // this rank's share of the global batch
    const { x, y } = ClusterTask.to(batch, layer.device, dtype);
    const fwd = layer.forward(x);
    const { loss, grad } = mseLoss(fwd.y, y);
    const g = layer.backward(fwd, grad as Tensor);
    // The router is replicated: averaged over the ranks. An expert's gradient already sums every
    // rank's tokens (dispatch brought them to it): divided by the ranks to match.
    world.allReduce(g.router, 'avg');
    for (const e of [g.w13, g.w2]) ops.scale(e, 1 / world.size, { out: e });
    [g.router, g.w13, g.w2].forEach((grad, i) =>
      adamwStep(params[i] as Tensor, grad, moments[i]![0], moments[i]![1], { lr: 3e-3, step: step + 1, weightDecay: 0.01 }),
    );
    layer.refreshComputeWeights();
    const load = fwd.tokensPerExpert.cast('f32');
    world.allReduce(load, 'sum');
    balanceBiasUpdate(layer.bias, load, 1e-3);
    world.allReduce(loss, 'avg');
    return loss.item();
  });
  if (world.rank === 0 && (step % 50 === 0 || step === steps - 1)) console.log(`step ${step}  loss ${loss.toFixed(4)}`);
}
layer.dispose();
task.dispose();
world.dispose();
