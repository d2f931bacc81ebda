/**
 * The optimizer half of a training step: data-parallel gradient reduction, global-norm clipping
 * and the fused AdamW step on the fp32 masters (bf16 compute copies refreshed in the same kernel).
 *
 * Replicated gradients (router, norms, shared experts, head) are averaged over the world of W
 * ranks. An expert's gradient already holds its EP group's tokens (through the dispatcher); it is
 * summed over the EDP group (the ranks holding the same experts) and divided by W. Both then equal
 * the gradient of the global mean loss. The norm is taken over all of them: expert parts differ
 * across an EP group (and agree across EDP groups), replicated ones agree everywhere.
 */
import { scale } from '../basic-ops.js';
import { type Device } from '../device.js';
import { type ExpertParallelGroup } from '../moe/dispatcher.js';
import { type Communicator } from '../parallel/communicator.js';
import { keep, Tensor } from '../tensor.js';
import { type TrainConfig } from './config.js';
import { adamwStep, sumOfSquares } from './dense-ops.js';
import { type Param } from './model.js';

/** A parameter and its AdamW moments (fp32, its shape). */
export interface OptimState {
  param: Param;
  expAvg: Tensor;
  expAvgSq: Tensor;
}

/** The groups gradients are reduced over. */
export interface GradientGroups {
  /** All W ranks (undefined: this process alone). */
  world: Communicator | undefined;
  /** The expert-parallel group the layers dispatch in. */
  ep: ExpertParallelGroup;
  /** The ranks holding the same experts (undefined when EP spans the world). */
  edp: Communicator | undefined;
}

/** Zero moments for every parameter, kept out of the callers' tidy() scopes (freed by disposeOptimState). */
export function createOptimState(params: readonly Param[], device: Device): OptimState[] {
  return params.map((param) => ({
    param,
    expAvg: keep(Tensor.zeros(param.master.shape, { device })),
    expAvgSq: keep(Tensor.zeros(param.master.shape, { device })),
  }));
}

export function disposeOptimState(state: readonly OptimState[]): void {
  for (const s of state) {
    s.expAvg.dispose();
    s.expAvgSq.dispose();
  }
}

/**
 * Reduces every gradient in place (see the module doc) and returns the global L2 norm of the
 * reduced gradients. Reading the norm is a deliberate host sync: it decides the clipping scale, and
 * the metrics need it.
 */
export function reduceGradients(
  state: readonly OptimState[],
  grads: ReadonlyMap<string, Tensor>,
  groups: GradientGroups,
  device: Device,
): number {
  const W = groups.world?.size ?? 1;
  const sqReplicated = Tensor.zeros([1], { device });
  const sqExpert = Tensor.zeros([1], { device });
  for (const s of state) {
    const g = grads.get(s.param.name) as Tensor;
    if (W > 1) {
      if (s.param.kind === 'replicated') groups.world?.allReduce(g, 'avg');
      else {
        groups.edp?.allReduce(g, 'sum'); // the same experts on the other EP groups
        scale(g, 1 / W, { out: g });
      }
    }
    sumOfSquares(g, { out: s.param.kind === 'replicated' ? sqReplicated : sqExpert, accumulate: true });
  }
  // Experts differ across an EP group (and agree across EDP groups); replicated ones agree everywhere.
  if (groups.ep.size > 1) (groups.ep as Communicator).allReduce(sqExpert, 'sum');
  return Math.sqrt(sqReplicated.item() + sqExpert.item());
}

/** The factor clipping to a global norm of `clipNorm` scales the gradients by (clipNorm 0: no clipping). */
export function clipScale(gradNorm: number, clipNorm: number): number {
  return clipNorm > 0 && gradNorm > clipNorm ? clipNorm / (gradNorm + 1e-6) : 1;
}

/**
 * One fused AdamW step for every parameter (`step` is 1-based, for the bias correction); norm
 * weights and biases take no weight decay (Param.decay).
 */
export function optimizerStep(
  state: readonly OptimState[],
  grads: ReadonlyMap<string, Tensor>,
  o: TrainConfig['optimizer'],
  { lr, step, gradScale }: { lr: number; step: number; gradScale: number },
): void {
  for (const s of state) {
    adamwStep(s.param.master, grads.get(s.param.name) as Tensor, s.expAvg, s.expAvgSq, {
      lr,
      step,
      beta1: o.beta1,
      beta2: o.beta2,
      eps: o.eps,
      weightDecay: s.param.decay ? o.weightDecay : 0,
      gradScale,
      ...(s.param.computeBf16 ? { paramBf16: s.param.computeBf16 } : {}),
    });
    s.param.computeF32?.copy_(s.param.master);
  }
}
