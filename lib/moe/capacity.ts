/**
 * Capacity: which router assignments each expert keeps (native/ops/moe/capacity).
 *
 * Naming: T tokens, k experts per token, E experts; an assignment is (t, j) with expert
 * indices[t, j] and gate weight weights[t, j]. With a capacity factor cf, every expert keeps at most
 * C = ceil(cf·T·k/E) assignments; without one the layer is dropless (nothing is dropped).
 *
 * Outputs (i32, on the indices' device):
 *   slot          [T,k]  position of (t, j) in its expert's kept list (0..C-1, numbered in (t, j)
 *                        order whatever the policy), or -1 when dropped
 *   keptPerExpert [E]    kept assignments per expert
 *   dropped       [1]    assignments dropped for capacity
 *   invalid       [1]    expert ids outside [0, E) (CUDA only: they are skipped and counted here;
 *                        on the CPU they throw). Check it when inputs are untrusted.
 * A dropped assignment contributes nothing downstream: the caller's residual carries the token.
 * On the GPU nothing here synchronises with the host.
 */
import { invalidArgument } from '../errors.js';
import {
  checkKeys,
  checkNonNegativeInt,
  checkOneOf,
  checkPositiveInt,
  checkPositiveNumber,
  checkTensor,
  withOutputs,
} from '../validate.js';
import { native } from '../native.js';
import { DROP_POLICY } from '../native-codes.js';
import { Tensor } from '../tensor.js';

export type DropPolicy = 'probs' | 'position';
export const DROP_POLICIES: readonly DropPolicy[] = ['probs', 'position'];

export interface CapacityOutputs {
  slot: Tensor;
  keptPerExpert: Tensor;
  dropped: Tensor;
  invalid: Tensor;
}

export interface CapacityResult extends CapacityOutputs {
  /** C, or null when dropless. */
  capacity: number | null;
  numExperts: number;
}

export interface CapacityOptions {
  numExperts: number;
  /** cf > 0; leave out for dropless routing. */
  capacityFactor?: number;
  /** 'probs' (default): keep each expert's C highest-weight assignments (ties: earlier (t, j));
   *  'position': keep the earliest C in (t, j) order. */
  dropPolicy?: DropPolicy;
  /** Preallocated outputs (any subset). */
  out?: Partial<CapacityOutputs>;
}

/**
 * C = min(ceil(cf·T·k/E), T·k). The product is taken in float64; a result within 1e-9 (relative)
 * above an integer is rounded down to it, so that e.g. cf = 1.1, T·k = 100, E = 10 gives 11 and not
 * 12. No expert can receive more than the T·k assignments, so a larger C would keep nothing more,
 * only pad more rows (an absurd capacityFactor with padToCapacity asked for gigabytes of them).
 */
export function expertCapacity(numTokens: number, topK: number, numExperts: number, capacityFactor: number): number {
  const op = 'capacity';
  checkNonNegativeInt(numTokens, op, 'numTokens');
  checkPositiveInt(topK, op, 'topK');
  checkPositiveInt(numExperts, op, 'numExperts');
  checkPositiveNumber(capacityFactor, op, 'capacityFactor');
  const exact = (capacityFactor * numTokens * topK) / numExperts;
  // A factor so large that the product overflows keeps every assignment (Infinity − 1e-9·Infinity is NaN).
  const c = Number.isFinite(exact)
    ? Math.min(numTokens * topK, Math.max(0, Math.ceil(exact - 1e-9 * Math.max(1, exact))))
    : numTokens * topK;
  if (c >= 2 ** 31 - 1) invalidArgument(op, `the capacity ${c} does not fit in i32`);
  return c;
}

/** Decides which assignments each expert keeps and numbers the kept ones. See the module doc. */
export function capacity(indices: Tensor, weights: Tensor | null | undefined, options: CapacityOptions): CapacityResult {
  const op = 'capacity';
  checkTensor(indices, op, 'indices');
  if (options === null || typeof options !== 'object') invalidArgument(op, `'options' must be an object with 'numExperts'`);
  checkKeys(options, op, { numExperts: true, capacityFactor: true, dropPolicy: true, out: true });
  const numExperts = checkPositiveInt(options.numExperts, op, 'numExperts', { below: 2 ** 30 - 1 }); // the addon's bound (INT_MAX / 2)
  const policy = checkOneOf(options.dropPolicy ?? 'probs', op, 'dropPolicy', DROP_POLICIES);
  if (indices.ndim !== 2) invalidArgument(op, `'indices' must be [T,k]; received [${indices.shape.join(',')}]`);
  const [T, k] = indices.shape as [number, number];
  // k comes from indices' shape: named as such (expertCapacity would blame a 'topK' never passed).
  if (k < 1 && options.capacityFactor !== undefined)
    invalidArgument(op, `'indices' [${indices.shape.join(',')}] holds no assignment per token; a capacity factor needs k ≥ 1`);
  const cap = options.capacityFactor === undefined ? null : expertCapacity(T, k, numExperts, options.capacityFactor);
  if (weights !== undefined && weights !== null) checkTensor(weights, op, 'weights');
  else if (policy === 'probs' && cap !== null) invalidArgument(op, `'weights' are needed by dropPolicy 'probs'`);
  const i32 = (shape: number[]) => (): Tensor => Tensor.empty(shape, { dtype: 'i32', device: indices.device });
  const o = withOutputs<CapacityOutputs>(
    op,
    options.out ?? {},
    { slot: i32([T, k]), keptPerExpert: i32([numExperts]), dropped: i32([1]), invalid: i32([1]) },
    // Dropless keeps everything, so both policies give the same slots: no weights needed.
    (o) =>
      native().capacity(
        indices.handle,
        weights ? weights.handle : null,
        numExperts,
        cap ?? -1,
        cap === null ? DROP_POLICY.position : DROP_POLICY[policy],
        o.slot.handle,
        o.keptPerExpert.handle,
        o.dropped.handle,
        o.invalid.handle,
      ),
    { indices, weights },
  );
  return { ...o, capacity: cap, numExperts };
}
