/**
 * Element types. Their numeric codes are the native enum's (DTYPE_CODE in lib/native-codes.ts).
 * bf16 and f16 values travel through Uint16Array (their raw bits), fp8e4m3 through Uint8Array.
 */
import { DTYPE_CODE } from './native-codes.js';

export const DTYPES = ['f32', 'bf16', 'f16', 'i32', 'i64', 'u8', 'fp8e4m3'] as const;
export type DType = (typeof DTYPES)[number];

export const dtypeSize: Record<DType, number> = { f32: 4, bf16: 2, f16: 2, i32: 4, i64: 8, u8: 1, fp8e4m3: 1 };
export const FLOATING: readonly DType[] = ['f32', 'bf16', 'f16', 'fp8e4m3'];
/** float32's largest finite value and its smallest normal one. */
export const F32_MAX = 3.4028234663852886e38;
export const F32_MIN_NORMAL = 1.1754943508222875e-38;

/** The TypedArray holding a dtype's raw values. */
export type StorageArray<D extends DType = DType> = D extends 'f32'
  ? Float32Array
  : D extends 'bf16' | 'f16'
    ? Uint16Array
    : D extends 'i32'
      ? Int32Array
      : D extends 'i64'
        ? BigInt64Array
        : Uint8Array;

const dtypeOfCode = new Map(Object.entries(DTYPE_CODE).map(([d, c]) => [c, d as DType]));

export function dtypeFromCode(code: number): DType {
  const d = dtypeOfCode.get(code);
  if (d === undefined) throw new Error(`unknown dtype code ${code}`);
  return d;
}

/** Wraps raw bytes in the dtype's TypedArray. */
export function storageView(dtype: DType, buffer: ArrayBuffer): StorageArray {
  switch (dtype) {
    case 'f32':
      return new Float32Array(buffer);
    case 'bf16':
    case 'f16':
      return new Uint16Array(buffer);
    case 'i32':
      return new Int32Array(buffer);
    case 'i64':
      return new BigInt64Array(buffer);
    default:
      return new Uint8Array(buffer);
  }
}

/** The dtype whose storage array this is, when it is unambiguous (Uint16Array could be bf16 or f16). */
export function dtypeOfArray(a: ArrayBufferView): DType | undefined {
  if (a instanceof Float32Array) return 'f32';
  if (a instanceof Int32Array) return 'i32';
  if (a instanceof BigInt64Array) return 'i64';
  if (a instanceof Uint8Array) return 'u8';
  return undefined;
}
