// Inputs of the grouped-GEMM GPU tests (12, 13): the same random bf16 tensor on the CPU (the
// reference's) and on cuda:0, and group offsets from row counts, on both.
import { Tensor, tidy } from '../../lib/index.js';
import { freshSeed } from '../helpers.js';

/** A bf16 tensor uniform in [-scale, scale) from `seed`: [on the CPU, on cuda:0]. */
export function pair(shape: number[], seed = freshSeed(), scale = 1): [Tensor, Tensor] {
  const c = tidy(() => Tensor.rand(shape, { seed, low: -scale, high: scale, device: 'cpu' }).cast('bf16'));
  return [c, c.to('cuda:0')];
}

/** Offsets [E+1] (i32) of groups of `counts` rows: [on the CPU, on cuda:0]. */
export function offsets(counts: number[]): [Tensor, Tensor] {
  const off = [0];
  for (const c of counts) off.push((off[off.length - 1] as number) + c);
  const t = Tensor.fromArray(off, { dtype: 'i32', device: 'cpu' });
  return [t, t.to('cuda:0')];
}
