/**
 * Grouped GEMM: rows grouped by expert (offsets [E+1] i32, on the same device), each group times
 * its own matrix. bf16 operands (f32 accepted on the CPU), fp32 accumulation, no host sync.
 *
 *   'NN'  out[M,N]   = a[M,K] · b_e[K,N]     b [E,K,N]      forward
 *   'NT'  out[M,K]   = a[M,N] · b_eᵀ         b [E,K,N]      dA = dC · Wᵀ
 *   'TN'  out[E,K,N] : out_e = a_eᵀ · b_e    a [M,K], b [M,N]  dW (inner dim = each group's rows)
 *
 * 'NN' also takes fp8 rows for `a` (quantizeFp8's { q, scales }, what an fp8 dispatch with
 * `fp8: 'keep'` delivers): the product of the dequantised rows, through a bf16 copy of them
 * (native/ops/moe/grouped_gemm/grouped_gemm.cc says why the kernel does not dequantise its tiles).
 *
 * See native/ops/moe/grouped_gemm/grouped_gemm.h for the fused SwiGLU epilogues used by experts.ts.
 */
import { type DType } from '../dtype.js';
import { invalidArgument, shown } from '../errors.js';
import { checkDType, checkOptions, checkResultDType, checkSeparate, checkTensor, checkTensors, withOutput } from '../validate.js';
import { native } from '../native.js';
import { GEMM_EPILOGUE, GEMM_MODE } from '../native-codes.js';
import { Tensor } from '../tensor.js';
import { type Fp8Rows } from './fp8.js';

export type GemmMode = 'NN' | 'NT' | 'TN';
/** The fused epilogues (GEMM_EPILOGUE in lib/native-codes.ts). */
export const Epilogue = GEMM_EPILOGUE;
export type Epilogue = (typeof Epilogue)[keyof typeof Epilogue];

export interface GroupedGemmOptions {
  /**
   * Where the result goes (its own memory: sharing any with `a` or `b` is refused). Rows past
   * offsets[E] (NN, NT) are not written: a fresh output holds whatever memory was there.
   */
  out?: Tensor;
  /** Output dtype when `out` is not given (default: a's dtype). */
  dtype?: DType;
  /** out += result (f32 out only). */
  accumulate?: boolean;
}

/** a as the binding takes it: the rows and, for fp8 rows, their scales. */
function rowsOf(op: string, a: Tensor | Fp8Rows): [Tensor, Tensor | null] {
  if (Tensor.isTensor(a)) return [a, null];
  if (a === null || typeof a !== 'object' || !Tensor.isTensor(a.q) || !Tensor.isTensor(a.scales))
    invalidArgument(
      op,
      `'a' must be a Tensor or fp8 rows { q, scales } (quantizeFp8's result); received ${a === null ? 'null' : typeof a}`,
    );
  checkTensors(op, { 'a.q': a.q, 'a.scales': a.scales });
  return [a.q, a.scales];
}

function outShape(mode: GemmMode, a: Tensor, b: Tensor, offsets: Tensor): number[] {
  const E = (offsets.shape[0] ?? 1) - 1;
  if (mode === 'TN') return [E, a.shape[1] ?? 0, b.shape[1] ?? 0];
  if (mode === 'NN') return [a.shape[0] ?? 0, b.shape[2] ?? 0];
  return [a.shape[0] ?? 0, b.shape[1] ?? 0];
}

export function groupedGemm(mode: GemmMode, aRows: Tensor | Fp8Rows, b: Tensor, offsets: Tensor, options: GroupedGemmOptions = {}): Tensor {
  const op = 'groupedGemm';
  options = checkOptions(options, op, { out: true, dtype: true, accumulate: true });
  checkResultDType(options.dtype, op, ['bf16', 'f32']);
  if (typeof mode !== 'string' || !Object.hasOwn(GEMM_MODE, mode))
    invalidArgument(op, `'mode' must be 'NN', 'NT' or 'TN'; received ${shown(mode)}`);
  const [a, aScales] = rowsOf(op, aRows);
  if (aScales && mode !== 'NN') invalidArgument(op, `fp8 rows are taken by the 'NN' (forward) product only; received mode '${mode}'`);
  checkTensors(op, { a, b, offsets });
  if (offsets.ndim !== 1 || (offsets.shape[0] as number) < 1)
    invalidArgument(op, `'offsets' must be [E+1]; received [${offsets.shape.join(',')}]`);
  if (options.out !== undefined) checkTensor(options.out, op, 'out');
  checkSeparate(op, { out: options.out }, { a, b, 'a.scales': aScales });
  if (options.accumulate && !options.out) invalidArgument(op, `'accumulate' needs 'out'`);
  const dtype = options.dtype === undefined ? (aScales ? b.dtype : a.dtype) : checkDType(options.dtype, op);
  const make = (): Tensor => Tensor.empty(outShape(mode, a, b, offsets), { dtype, device: a.device });
  return withOutput(op, options.out, make, (out) =>
    native().groupedGemm(
      GEMM_MODE[mode],
      Epilogue.Store,
      a.handle,
      b.handle,
      offsets.handle,
      out.handle,
      null,
      options.accumulate ?? false,
      aScales ? aScales.handle : null,
    ),
  );
}

/** @internal The fused SwiGLU forward and dSwiGLU backward products (experts.ts). */
export function groupedGemmEpilogue(
  mode: GemmMode,
  epilogue: Epilogue,
  aRows: Tensor | Fp8Rows,
  b: Tensor,
  offsets: Tensor,
  out: Tensor,
  g: Tensor | null,
): void {
  const [a, aScales] = rowsOf('groupedGemm', aRows);
  native().groupedGemm(
    GEMM_MODE[mode],
    epilogue,
    a.handle,
    b.handle,
    offsets.handle,
    out.handle,
    g ? g.handle : null,
    false,
    aScales ? aScales.handle : null,
  );
}
