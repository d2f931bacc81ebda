/**
 * The numbers the addon takes for its enums, in one table. Each mirrors a native enum (named beside
 * it); a call site passes `TABLE[name]`, never a bare number, so a renumbering is changed here once.
 */
import type { DType } from './dtype.js';

/** native/core/dtype.h DType. The order is DTYPES' (dtypeFromCode reads it back). */
export const DTYPE_CODE: Readonly<Record<DType, number>> = { f32: 0, bf16: 1, f16: 2, i32: 3, i64: 4, u8: 5, fp8e4m3: 6 };

/** native/core/device.h DeviceType. */
export const DEVICE_TYPE = { cpu: 0, cuda: 1 } as const;

/** native/ops/basic/elementwise/elementwise.h BinaryOp. */
export const BINARY_OP = { add: 0, mul: 1 } as const;

/** native/ops/basic/activation/activation.h Activation. */
export const ACTIVATION = { relu: 0, silu: 1, gelu: 2, geluTanh: 3 } as const;

/** native/ops/basic/reduce/reduce.h ReduceOp. */
export const REDUCE_OP = { sum: 0, max: 1 } as const;

/** native/ops/basic/random/random.h RandomKind. */
export const RANDOM_KIND = { uniform: 0, normal: 1 } as const;

/** native/ops/moe/capacity/capacity.h DropPolicy. */
export const DROP_POLICY = { probs: 0, position: 1 } as const;

/** native/ops/moe/router/router.h ScoreFn. */
export const SCORE_FUNCTION = { softmax: 0, sigmoid: 1 } as const;

/** native/ops/moe/grouped_gemm/grouped_gemm.h GemmMode. */
export const GEMM_MODE = { NN: 0, NT: 1, TN: 2 } as const;

/** native/ops/moe/grouped_gemm/grouped_gemm.h GemmEpilogue. */
export const GEMM_EPILOGUE = { Store: 0, SwiGLU: 1, DSwiGLU: 2 } as const;

/** native/comm/communicator.h ReduceOp (the collectives'). */
export const COLLECTIVE_REDUCE = { sum: 0, max: 1, min: 2, avg: 3 } as const;
