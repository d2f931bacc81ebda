/**
 * Permute / unpermute (native/ops/moe/permute): router assignments regrouped into expert-contiguous
 * rows for the expert GEMMs, and combined back per token.
 *
 * Naming: x [T,H] tokens; indices, weights [T,k] from the router; a CapacityResult from capacity().
 * Expert e owns rows offsets[e] .. offsets[e+1]; its kept assignments fill the first
 * keptPerExpert[e] of them in token order, the rest of the segment is padding (zero rows, weight 0,
 * token -1). A segment is keptPerExpert[e] rows, or exactly C with `padToCapacity`, rounded up to a
 * multiple of `align` (e.g. 128 for a GEMM tile).
 *
 * Outputs of permute():
 *   rows      [R,H]  x's dtype       rows[r] = x[rowToken[r]] (zeros for padding)
 *   offsets   [E+1]  i32
 *   rowOf     [T,k]  i32             destination row of (t, j), -1 when dropped
 *   rowWeight [R]    f32             the gate weight travelling with the row (0 for padding)
 *   rowToken  [R]    i32             source token, -1 for padding
 *   invalid   [1]    i32             CUDA only: assignments skipped as malformed (see permute.h); the
 *                                    CPU path throws instead
 * R is computed here. With padToCapacity it is E·roundUp(C, align), known without a sync (the layer
 * can be captured in a CUDA graph). Otherwise it needs keptPerExpert on the host: that read is the
 * caller's one deliberate synchronisation (dropless routing has to know how many rows there are).
 */
import { type DType } from '../dtype.js';
import { invalidArgument } from '../errors.js';
import {
  checkBoolean,
  checkOptions,
  checkPositiveInt,
  checkResultDType,
  checkSeparate,
  checkTensor,
  checkTensors,
  withOutput,
  withOutputs,
} from '../validate.js';
import { native } from '../native.js';
import { Tensor } from '../tensor.js';
import { type CapacityResult } from './capacity.js';

/**
 * The largest `align`: rows are padded per expert to a multiple of it (a GEMM tile is 64-256 rows);
 * 2^30 made every expert's segment a gigabyte-sized allocation from a three-token input.
 */
export const MAX_ALIGN = 65536;

/** The dtypes the row results (unpermute's y, the backwards' row gradients) may be asked for. */
const ROW_RESULTS: readonly DType[] = ['f32', 'bf16'];

export interface PermuteOutputs {
  rows: Tensor;
  offsets: Tensor;
  rowOf: Tensor;
  rowWeight: Tensor;
  rowToken: Tensor;
  invalid: Tensor;
}

export interface PermuteResult extends PermuteOutputs {
  /** R: rows including padding. */
  numRows: number;
  /**
   * Rows of each expert's segment, padding included. Known on the host without a device read in
   * capacity mode and whenever the row count needed the counts; dropless with align 1 reads them
   * (a synchronisation) on first access only.
   */
  readonly segmentRows: number[];
}

export interface PermuteOptions {
  /** Every expert segment padded to a multiple of this many rows (default 1). */
  align?: number;
  /** Every expert segment exactly C rows (then rounded up to `align`); needs a capacity factor. */
  padToCapacity?: boolean;
  out?: Partial<PermuteOutputs>;
}

const roundUp = (v: number, a: number): number => Math.ceil(v / a) * a;

/**
 * R for a permutation. With padToCapacity: E·roundUp(C, align), no sync. Otherwise the kept counts
 * are read to the host: a deliberate device synchronisation.
 */
export function permutedRowCount(cap: CapacityResult, options: { align?: number; padToCapacity?: boolean } = {}): number {
  options = checkOptions(options, 'permutedRowCount', { align: true, padToCapacity: true });
  return segmentRowCounts(cap, options).reduce((a, b) => a + b, 0);
}

/** Rows of each expert's segment (what the layout's offsets step by), read once on the host. */
function segmentRowCounts(cap: CapacityResult, options: { align?: number; padToCapacity?: boolean }): number[] {
  const op = 'permute';
  checkCap(cap, op);
  const align = checkPositiveInt(options.align ?? 1, op, 'align', { below: MAX_ALIGN + 1 });
  if (options.padToCapacity) {
    if (cap.capacity === null) invalidArgument(op, `'padToCapacity' needs a capacity (capacity() was called without 'capacityFactor')`);
    return new Array<number>(cap.numExperts).fill(roundUp(cap.capacity, align));
  }
  // Deliberate host sync: dropless (or unpadded) layouts size their rows from the kept counts.
  const kept = cap.keptPerExpert.toArray() as Int32Array;
  // Sized from here before the native checks run: counts outside [0, T·k] are not capacity()'s.
  const assignments = cap.slot.numel;
  return Array.from(kept, (c, e) => {
    if (!(c >= 0 && c <= assignments))
      invalidArgument(op, `'cap.keptPerExpert'[${e}] = ${c} is outside [0, ${assignments}] (T·k of 'cap.slot')`);
    return roundUp(c, align);
  });
}

/** The fields of a CapacityResult that size the layout on the host. */
function checkCap(cap: CapacityResult, op: string): void {
  if (cap === null || typeof cap !== 'object') invalidArgument(op, `'cap' must be the result of capacity()`);
  checkTensor(cap.slot, op, 'cap.slot');
  checkTensor(cap.keptPerExpert, op, 'cap.keptPerExpert');
  const E = checkPositiveInt(cap.numExperts, op, 'cap.numExperts');
  if (cap.keptPerExpert.ndim !== 1 || cap.keptPerExpert.shape[0] !== E) {
    invalidArgument(op, `'cap.keptPerExpert' [${cap.keptPerExpert.shape.join(',')}] must be [${E}] ('cap.numExperts')`);
  }
  const C = cap.capacity;
  if (C !== null && (!Number.isSafeInteger(C) || C < 0 || C >= 2 ** 31 - 1)) {
    invalidArgument(op, `'cap.capacity' must be null or a non-negative integer; received ${String(C)}`);
  }
}

/** The tensors given in an `out` object, named out.<key> (entries left undefined are made by the op). */
function givenOutputs(op: string, out: object | undefined): Record<string, Tensor> {
  if (out === undefined || out === null || typeof out !== 'object') return {}; // withOutputs names a bad `out`
  return Object.fromEntries(
    Object.entries(out)
      .filter(([, t]) => t !== undefined)
      .map(([k, t]) => [`out.${k}`, checkTensor(t, op, `out.${k}`)]),
  );
}

/** Gathers x's rows into expert-contiguous order. See the module doc for the outputs. */
export function permute(x: Tensor, indices: Tensor, weights: Tensor, cap: CapacityResult, options: PermuteOptions = {}): PermuteResult {
  const op = 'permute';
  options = checkOptions(options, op, { align: true, padToCapacity: true, out: true });
  checkTensor(x, op, 'x');
  checkTensor(indices, op, 'indices');
  checkTensor(weights, op, 'weights');
  checkCap(cap, op);
  if (x.ndim !== 2) invalidArgument(op, `'x' must be [T,H]; received [${x.shape.join(',')}]`);
  if (indices.ndim !== 2) invalidArgument(op, `'indices' must be [T,k]; received [${indices.shape.join(',')}]`);
  if (indices.shape[0] !== x.shape[0]) {
    invalidArgument(
      op,
      `'indices' [${indices.shape.join(',')}] has ${indices.shape[0]} tokens but 'x' [${x.shape.join(',')}] has ${x.shape[0]}`,
    );
  }
  const align = checkPositiveInt(options.align ?? 1, op, 'align', { below: MAX_ALIGN + 1 });
  const padToCapacity = checkBoolean(options.padToCapacity ?? false, op, 'padToCapacity');
  checkSeparate(op, givenOutputs(op, options.out), {
    x,
    indices,
    weights,
    'cap.slot': cap.slot,
    'cap.keptPerExpert': cap.keptPerExpert,
  });
  const [T, k] = indices.shape as [number, number];
  // On a GPU, dropless with align 1 keeps every assignment, so R = T·k is known without reading the
  // counts (bad counts are caught by the layout kernel's invalid count there): the segment sizes are
  // read only if someone asks for them (segmentRows, a lazy getter). On the CPU reading is free and
  // checks the counts before the native layout sees them.
  const known = cap.keptPerExpert.device.isCuda && !padToCapacity && align === 1 && cap.capacity === null;
  let segmentRows: number[] | null = known ? null : segmentRowCounts(cap, { align, padToCapacity });
  const R = segmentRows ? segmentRows.reduce((a, b) => a + b, 0) : T * k;
  const H = x.shape[1] as number;
  const E = cap.numExperts;
  const like = (shape: number[], dtype: DType) => (): Tensor => Tensor.empty(shape, { dtype, device: x.device });
  const o = withOutputs<PermuteOutputs>(
    op,
    options.out ?? {},
    {
      rows: like([R, H], x.dtype),
      offsets: like([E + 1], 'i32'),
      rowOf: like([T, k], 'i32'),
      rowWeight: like([R], 'f32'),
      rowToken: like([R], 'i32'),
      invalid: like([1], 'i32'),
    },
    (o) => {
      native().permuteLayout(
        indices.handle,
        cap.slot.handle,
        cap.keptPerExpert.handle,
        weights.handle,
        padToCapacity ? (cap.capacity as number) : -1,
        align,
        o.offsets.handle,
        o.rowOf.handle,
        o.rowToken.handle,
        o.rowWeight.handle,
        o.invalid.handle,
      );
      // rowOf from the layout just written: the CUDA copy runs in token order and reads x once.
      native().permuteRows(x.handle, o.rowToken.handle, o.rows.handle, o.rowOf.handle);
    },
  );
  const result = { ...o, numRows: R } as PermuteResult;
  return Object.defineProperty(result, 'segmentRows', {
    enumerable: false, // not a tensor: tensorsIn() and tidy() need not see it
    get: () => (segmentRows ??= segmentRowCounts(cap, { align, padToCapacity })),
  });
}

export interface UnpermuteOptions {
  /** Result dtype, f32 or bf16 (default: the rows' dtype). */
  dtype?: DType;
  out?: Tensor;
}

/**
 * y[t] = Σ_j weights[t,j]·rows[rowOf[t,j]] over kept j, fp32 accumulation, one write per token.
 * A token whose assignments were all dropped gets 0 (its residual carries it).
 */
export function unpermute(rows: Tensor, rowOf: Tensor, weights: Tensor, options: UnpermuteOptions = {}): Tensor {
  const op = 'unpermute';
  options = checkOptions(options, op, { dtype: true, out: true });
  checkResultDType(options.dtype, op, ROW_RESULTS);
  checkTensor(rows, op, 'rows');
  checkTensor(rowOf, op, 'rowOf');
  checkTensor(weights, op, 'weights');
  if (rows.ndim !== 2 || rowOf.ndim !== 2)
    invalidArgument(op, `'rows' must be [R,H] and 'rowOf' [T,k]; received [${rows.shape.join(',')}] and [${rowOf.shape.join(',')}]`);
  if (options.out !== undefined) checkSeparate(op, { out: checkTensor(options.out, op, 'out') }, { rows, rowOf, weights });
  const make = (): Tensor =>
    Tensor.empty([rowOf.shape[0] as number, rows.shape[1] as number], { dtype: options.dtype ?? rows.dtype, device: rows.device });
  return withOutput(op, options.out, make, (y) => native().unpermute(rows.handle, rowOf.handle, weights.handle, y.handle));
}

export interface UnpermuteGradients {
  /** dL/drows [R,H]: weights[t,j]·dy[t] at rowOf[t,j], zeros for padding rows. */
  dRows: Tensor;
  /** dL/dweights [T,k] f32: <dy[t], rows[rowOf[t,j]]> in fp32, 0 for dropped assignments. */
  dWeights: Tensor;
}

/** Backward of unpermute w.r.t. the rows and the gate weights. */
export function unpermuteBackward(
  dy: Tensor,
  rows: Tensor,
  weights: Tensor,
  rowOf: Tensor,
  rowToken: Tensor,
  options: { dtype?: DType; out?: Partial<UnpermuteGradients> } = {},
): UnpermuteGradients {
  const op = 'unpermuteBackward';
  options = checkOptions(options, op, { dtype: true, out: true });
  checkResultDType(options.dtype, op, ROW_RESULTS);
  checkTensors(op, { dy, rows, weights, rowOf, rowToken });
  checkSeparate(op, givenOutputs(op, options.out), {
    dy,
    rows,
    weights,
    rowOf,
    rowToken,
  });
  return withOutputs<UnpermuteGradients>(
    op,
    options.out ?? {},
    {
      dRows: () => Tensor.empty(rows.shape, { dtype: options.dtype ?? rows.dtype, device: rows.device }),
      dWeights: () => Tensor.empty(rowOf.shape, { dtype: 'f32', device: rows.device }),
    },
    (o) =>
      native().unpermuteBackward(dy.handle, rows.handle, weights.handle, rowOf.handle, rowToken.handle, o.dRows.handle, o.dWeights.handle),
  );
}

export interface PermuteBackwardOptions extends UnpermuteOptions {
  /**
   * Another gradient of the same x [T,H] in dx's dtype (the router's), summed into dx in the same
   * fp32 accumulator: one rounding, and no separate pass to add it. `out` must not be `add`.
   */
  add?: Tensor;
}

/**
 * Backward of permute: dx[t] = Σ_j dRows[rowOf[t,j]] (+ add[t]), fp32 accumulation, one write per
 * token.
 */
export function permuteBackward(dRows: Tensor, rowOf: Tensor, options: PermuteBackwardOptions = {}): Tensor {
  const op = 'permuteBackward';
  options = checkOptions(options, op, { dtype: true, out: true, add: true });
  checkResultDType(options.dtype, op, ROW_RESULTS);
  checkTensor(dRows, op, 'dRows');
  checkTensor(rowOf, op, 'rowOf');
  const add = options.add;
  if (add !== undefined) checkTensor(add, op, 'add');
  if (dRows.ndim !== 2 || rowOf.ndim !== 2)
    invalidArgument(op, `'dRows' must be [R,H] and 'rowOf' [T,k]; received [${dRows.shape.join(',')}] and [${rowOf.shape.join(',')}]`);
  if (options.out !== undefined) checkSeparate(op, { out: checkTensor(options.out, op, 'out') }, { dRows, rowOf, add });
  const make = (): Tensor =>
    Tensor.empty([rowOf.shape[0] as number, dRows.shape[1] as number], { dtype: options.dtype ?? dRows.dtype, device: dRows.device });
  return withOutput(op, options.out, make, (dx) =>
    native().permuteBackward(dRows.handle, rowOf.handle, dx.handle, add ? add.handle : null),
  );
}
