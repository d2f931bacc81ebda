// Bad calls, table-driven: each must throw a clear error of the right class that names the op and
// the argument, and none may take the process down.
import { existsSync, readFileSync } from 'node:fs';

import { describe, expect, it } from 'vitest';

import {
  DisposedError,
  Event,
  InvalidArgumentError,
  memoryStats,
  MoeError,
  ops,
  OutOfMemoryError,
  Stream,
  Tensor,
  UnavailableError,
} from '../lib/index.js';
import { native } from '../lib/native.js';

const cpu = 'cpu' as const;
const f = (shape: number[], dtype: 'f32' | 'bf16' | 'i32' | 'u8' | 'fp8e4m3' = 'f32'): Tensor => Tensor.zeros(shape, { dtype, device: cpu });
const disposed = (): Tensor => {
  const t = f([2, 2]);
  t.dispose();
  return t;
};

type Case = [name: string, call: () => unknown, errorClass: typeof MoeError, message: RegExp];

const cases: Case[] = [
  // wrong dtype
  ['add of mixed dtypes', () => ops.add(f([2, 3]), f([2, 3], 'bf16')), InvalidArgumentError, /add: 'b' .* has dtype bf16 but 'a'/],
  ['add on u8', () => ops.add(f([2], 'u8'), f([2], 'u8')), InvalidArgumentError, /add: 'a' .* expected one of f32, bf16, f16, i32, i64/],
  ['matmul on i32', () => ops.matmul(f([2, 2], 'i32'), f([2, 2], 'i32')), InvalidArgumentError, /matmul: 'a' .*i32/],
  ['sum of fp8', () => ops.sum(f([4], 'fp8e4m3'), 0), InvalidArgumentError, /sum: 'a' .*fp8e4m3/],
  ['unknown dtype name', () => Tensor.zeros([2], { dtype: 'f64' as never, device: cpu }), InvalidArgumentError, /'dtype' must be one of/],
  ['rand into an integer tensor', () => f([3], 'i32').random_(0, 0, 1, 1), InvalidArgumentError, /rand: 'out' .*i32/],
  // shape mismatch
  ['add of different shapes', () => ops.add(f([2, 3]), f([3, 2])), InvalidArgumentError, /add: 'b' shape \[3,2\] is neither/],
  ['matmul inner mismatch', () => ops.matmul(f([2, 3]), f([4, 5])), InvalidArgumentError, /matmul: inner dimensions differ/],
  ['matmul of 3-D', () => ops.matmul(f([2, 3, 4]), f([4, 5])), InvalidArgumentError, /matmul: expects 2-D/],
  ['out of the wrong shape', () => ops.scale(f([2, 3]), 2, { out: f([3, 2]) }), InvalidArgumentError, /scale: 'out' has shape \[3,2\] but 'a' has shape \[2,3\]/],
  ['copy between shapes', () => f([2, 3]).copy_(f([6])), InvalidArgumentError, /copy: 'src' has shape \[6\] but 'dst'/],
  ['view with a wrong count', () => f([2, 3]).view(4, 2), InvalidArgumentError, /view: 'shape' \[4,2\] has 8 elements but the tensor/],
  ['view with two -1', () => f([2, 3]).view(-1, -1), InvalidArgumentError, /more than one -1/],
  ['narrow past the end', () => f([2, 3]).narrow(1, 2, 5), InvalidArgumentError, /narrow: 'start' 2 and 'length' 5 do not fit/],
  ['sum over a missing dim', () => ops.sum(f([2, 3]), 2), InvalidArgumentError, /sum: 'dim' = 2 is out of range/],
  ['max of an empty dim', () => ops.max(f([0, 3]), 0), InvalidArgumentError, /max: cannot take the max over dimension 0/],
  ['fromArray count mismatch', () => Tensor.fromArray([1, 2, 3], { shape: [2, 2], device: cpu }), InvalidArgumentError, /fromArray: 'data' has 3 values/],
  ['fromArray non-integer into i32', () => Tensor.fromArray([1.5], { dtype: 'i32', device: cpu }), InvalidArgumentError, /'data'\[0\] = 1.5 is not an integer/],
  ['Uint16Array without a dtype', () => Tensor.fromArray(new Uint16Array(2), { device: cpu }), InvalidArgumentError, /Uint16Array holds raw bf16 or f16 bits/],
  ['fill i32 with a fraction', () => f([2], 'i32').fill_(0.5), InvalidArgumentError, /fill: 'value' 0.5 is not an integer/],
  ['fill u8 out of range', () => f([2], 'u8').fill_(300), InvalidArgumentError, /fill: 'value' 300 does not fit u8/],
  // disposed tensors
  ['disposed input', () => ops.add(disposed(), f([2, 2])), DisposedError, /disposed/],
  ['disposed out', () => ops.scale(f([2, 2]), 1, { out: disposed() }), DisposedError, /disposed/],
  ['disposed stream', () => { const s = new Stream(cpu); s.dispose(); s.synchronize(); }, DisposedError, /disposed/],
  // negative or absurd sizes
  ['negative size', () => Tensor.empty([2, -1], { device: cpu }), InvalidArgumentError, /'shape' must be an array of non-negative integers/],
  ['fractional size', () => Tensor.empty([2.5], { device: cpu }), InvalidArgumentError, /non-negative integers/],
  ['absurd size', () => Tensor.empty([2 ** 30, 2 ** 30, 2 ** 30], { device: cpu }), InvalidArgumentError, /has too many elements|64 TiB/],
  ['too many dims', () => Tensor.empty([1, 1, 1, 1, 1, 1, 1, 1, 1], { device: cpu }), InvalidArgumentError, /at most 8/],
  ['allocation past the 64 TiB guard', () => Tensor.empty([2 ** 23, 2 ** 23 + 1], { dtype: 'u8', device: cpu }), InvalidArgumentError, /too many elements|64 TiB/],
  // wrong device
  ['bad device string', () => Tensor.zeros([2], { device: 'gpu' as never }), InvalidArgumentError, /'device' must be 'cpu', 'cuda' or 'cuda:N'/],
  ['a device that does not exist', () => Tensor.zeros([2], { device: 'cuda:63' }), MoeError, /cuda:63/],
  // unsupported layout
  ['strided input to add', () => ops.add(f([3, 4]).transpose(), f([4, 3])), InvalidArgumentError, /add: 'a' .* strided is not contiguous/],
  ['view of a strided tensor', () => f([3, 4]).transpose().view(12), InvalidArgumentError, /cannot view a non-contiguous tensor/],
  // wrong JS types reaching the raw binding
  ['raw: tensor expected', () => native().fill({} as never, 1), InvalidArgumentError, /fill: 'out' must be a tensor/],
  ['raw: number expected', () => native().fill(f([1]).handle, 'x' as never), InvalidArgumentError, /fill: 'value' must be a number/],
  ['raw: bad dtype code', () => native().tensorEmpty([1], 99, 0, 0), InvalidArgumentError, /not a dtype code/],
  ['raw: bad shape element', () => native().tensorEmpty([1, 'a' as never], 0, 0, 0), InvalidArgumentError, /element 1 is not a number/],
  ['ops given a non-tensor', () => ops.add(3 as never, f([1])), InvalidArgumentError, /add: 'a' must be a Tensor/],
  ['elapsed time of unrecorded events', () => new Event(cpu, { timing: true }).elapsedTime(new Event(cpu, { timing: true })), InvalidArgumentError, /both events must be recorded/],
];

describe('bad calls give clear errors', () => {
  it.each(cases)('%s', (_name, call, errorClass, message) => {
    let caught: unknown;
    try {
      call();
    } catch (e) {
      caught = e;
    }
    expect(caught, 'expected an error').toBeInstanceOf(errorClass);
    expect((caught as Error).message).toMatch(message);
    expect(caught).toBeInstanceOf(MoeError);
  });

  // A real malloc failure needs a kernel that refuses to overcommit (mode 0 refuses a 16 TiB request;
  // mode 1 grants anything, as on some GPU machines).
  const overcommit = existsSync('/proc/sys/vm/overcommit_memory') ? readFileSync('/proc/sys/vm/overcommit_memory', 'utf8').trim() : '1';
  it.skipIf(overcommit === '1')('host out of memory is OutOfMemoryError and the allocator keeps working after it', () => {
    const before = memoryStats(cpu).liveBytes;
    expect(() => Tensor.empty([2 ** 22, 2 ** 22], { dtype: 'u8', device: cpu })).toThrow(/out of host memory allocating/);
    expect(() => Tensor.empty([2 ** 22, 2 ** 22], { dtype: 'u8', device: cpu })).toThrow(OutOfMemoryError);
    using t = Tensor.full([3], 1, { device: cpu });
    expect(t.toNumbers()).toEqual([1, 1, 1]);
    t.dispose();
    expect(memoryStats(cpu).liveBytes).toBe(before);
  });

  it('a CUDA device on a machine without one is Unavailable, with the reason', () => {
    if (native().cudaStatus().deviceCount > 0) return;
    expect(() => Tensor.zeros([2], { device: 'cuda:0' })).toThrow(UnavailableError);
    expect(() => Tensor.zeros([2], { device: 'cuda:0' })).toThrow(/not usable: |built without CUDA/);
  });
});
