/**
 * FP8 (e4m3) rows with one fp32 scale per 128 values (DeepEP / DeepSeek-V3 dispatch format):
 * scale = amax/448 per block, values saturated. Halves the bytes a bf16 dispatch moves.
 */
import { invalidArgument, shown } from '../errors.js';
import { checkTensor, checkTensors } from '../validate.js';
import { native } from '../native.js';
import { type DType } from '../dtype.js';
import { Tensor } from '../tensor.js';

export const FP8_BLOCK = 128;

export interface Fp8Rows {
  q: Tensor; // [R, H] fp8e4m3
  scales: Tensor; // [R, H/128] f32
}

export function quantizeFp8(x: Tensor): Fp8Rows {
  checkTensor(x, 'quantizeFp8', 'x'); // a disposed one named here (x.shape below would not say whose)
  if (x.ndim !== 2) invalidArgument('quantizeFp8', `'x' must be a [R, H] tensor`);
  const [R, H] = x.shape as [number, number];
  if (H % FP8_BLOCK !== 0) invalidArgument('quantizeFp8', `'x' rows of ${H} values are not a multiple of ${FP8_BLOCK}`);
  const q = Tensor.empty([R, H], { dtype: 'fp8e4m3', device: x.device });
  const scales = Tensor.empty([R, H / FP8_BLOCK], { dtype: 'f32', device: x.device });
  try {
    native().quantizeFp8(x.handle, q.handle, scales.handle);
  } catch (e) {
    q.dispose();
    scales.dispose();
    throw e;
  }
  return { q, scales };
}

/** Back to `dtype` (bf16 or f32): value · scale, rounded once. */
export function dequantizeFp8(rows: Fp8Rows, dtype: DType = 'bf16'): Tensor {
  const op = 'dequantizeFp8';
  if (rows === null || typeof rows !== 'object' || !Tensor.isTensor(rows.q) || !Tensor.isTensor(rows.scales))
    invalidArgument(op, `'rows' must be fp8 rows { q, scales } (quantizeFp8's result)`);
  checkTensors(op, { 'rows.q': rows.q, 'rows.scales': rows.scales });
  if (dtype !== 'bf16' && dtype !== 'f32') invalidArgument(op, `'dtype' must be 'bf16' or 'f32'; received ${shown(dtype)}`);
  // The result takes rows.q's shape: checked here, where the addon would blame the result ('out').
  if (rows.q.ndim !== 2 || (rows.q.shape[1] as number) % FP8_BLOCK !== 0)
    invalidArgument(op, `'rows.q' must be [R, H] with H a multiple of ${FP8_BLOCK}; received [${rows.q.shape.join(',')}]`);
  const out = Tensor.empty(rows.q.shape, { dtype, device: rows.q.device });
  try {
    native().dequantizeFp8(rows.q.handle, rows.scales.handle, out.handle);
  } catch (e) {
    out.dispose();
    throw e;
  }
  return out;
}
