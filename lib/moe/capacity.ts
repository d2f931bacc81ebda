/**
 * Capacity: which router assignments each expert keeps (native/ops/capacity).
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
import { checkTensor } from '../args.js';
import { invalidArgument, checkKeys } from '../errors.js';
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

/** @internal Shared by the moe/ modules. */
/** @internal The shared tensor check (lib/args.ts), under the name capacity and permute use. */
export const requireTensor = checkTensor;

/** @internal Allocates an output unless one was given; `made` collects what was allocated here. */
export function output(given: unknown, shape: readonly number[], dtype: Tensor['dtype'], like: Tensor, op: string, name: string, made: Tensor[]): Tensor {
  if (given !== undefined) return requireTensor(given, op, `out.${name}`);
  const t = Tensor.empty(shape, { dtype, device: like.device });
  made.push(t);
  return t;
}

/** @internal Runs fn; tensors allocated for the call are disposed again if it throws. */
export function disposingOnError<T>(made: Tensor[], fn: () => T): T {
  try {
    return fn();
  } catch (e) {
    for (const t of made) t.dispose();
    throw e;
  }
}

function requirePositiveInteger(v: unknown, op: string, name: string): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) {
    invalidArgument(op, `'${name}' must be a positive integer; received ${String(v)}`);
  }
  return v;
}

/**
 * C = ceil(cf·T·k/E). The product is taken in float64; a result within 1e-9 (relative) above an
 * integer is rounded down to it, so that e.g. cf = 1.1, T·k = 100, E = 10 gives 11 and not 12.
 */
export function expertCapacity(numTokens: number, topK: number, numExperts: number, capacityFactor: number): number {
  const op = 'capacity';
  if (!Number.isSafeInteger(numTokens) || numTokens < 0) invalidArgument(op, `'numTokens' must be a non-negative integer; received ${numTokens}`);
  requirePositiveInteger(topK, op, 'topK');
  requirePositiveInteger(numExperts, op, 'numExperts');
  if (typeof capacityFactor !== 'number' || !Number.isFinite(capacityFactor) || capacityFactor <= 0) {
    invalidArgument(op, `'capacityFactor' must be a finite number > 0; received ${String(capacityFactor)}`);
  }
  const exact = (capacityFactor * numTokens * topK) / numExperts;
  const c = Math.max(0, Math.ceil(exact - 1e-9 * Math.max(1, exact)));
  if (c >= 2 ** 31 - 1) invalidArgument(op, `the capacity ${c} does not fit in i32`);
  return c;
}

/** Decides which assignments each expert keeps and numbers the kept ones. See the module doc. */
export function capacity(indices: Tensor, weights: Tensor | null | undefined, options: CapacityOptions): CapacityResult {
  const op = 'capacity';
  requireTensor(indices, op, 'indices');
  if (options === null || typeof options !== 'object') invalidArgument(op, `'options' must be an object with 'numExperts'`);
  checkKeys(options, op, { numExperts: true, capacityFactor: true, dropPolicy: true, out: true });
  const numExperts = requirePositiveInteger(options.numExperts, op, 'numExperts');
  const policy = options.dropPolicy ?? 'probs';
  if (!DROP_POLICIES.includes(policy)) invalidArgument(op, `'dropPolicy' must be one of ${DROP_POLICIES.join(', ')}; received ${String(policy)}`);
  if (indices.ndim !== 2) invalidArgument(op, `'indices' must be [T,k]; received [${indices.shape.join(',')}]`);
  const [T, k] = indices.shape as [number, number];
  const cap = options.capacityFactor === undefined ? null : expertCapacity(T, k, numExperts, options.capacityFactor);
  if (weights !== undefined && weights !== null) requireTensor(weights, op, 'weights');
  else if (policy === 'probs' && cap !== null) invalidArgument(op, `'weights' are needed by dropPolicy 'probs'`);
  const out = options.out ?? {};
  const made: Tensor[] = [];
  return disposingOnError(made, () => {
    const slot = output(out.slot, [T, k], 'i32', indices, op, 'slot', made);
    const keptPerExpert = output(out.keptPerExpert, [numExperts], 'i32', indices, op, 'keptPerExpert', made);
    const dropped = output(out.dropped, [1], 'i32', indices, op, 'dropped', made);
    const invalid = output(out.invalid, [1], 'i32', indices, op, 'invalid', made);
    // Dropless keeps everything, so both policies give the same slots: no weights needed.
    native().capacity(indices.handle, weights ? weights.handle : null, numExperts, cap ?? -1, cap === null ? DROP_POLICY.position : DROP_POLICY[policy], slot.handle,
      keptPerExpert.handle, dropped.handle, invalid.handle);
    return { slot, keptPerExpert, dropped, invalid, capacity: cap, numExperts };
  });
}
