// FP8 row quantisation: the CUDA kernels against the CPU reference (the same conversion code, so
// the fp8 bytes and the scales match exactly); dequantised rows within e4m3 precision.
import { describe, expect, it } from 'vitest';

import { Tensor, tidy } from '../../lib/index.js';
import { dequantizeFp8, quantizeFp8 } from '../../lib/moe/fp8.js';
import { freshSeed, relErr, values } from '../helpers.js';
import { hasGpu } from './gpu.js';

describe.skipIf(!hasGpu)('fp8 quantisation on the GPU', () => {
  it.each([[1, 128], [4096, 7168], [333, 384]])('[%i, %i] bf16 rows', (R, H) => {
    tidy(() => {
      const c = Tensor.randn([R, H], { seed: freshSeed(), std: 3, device: 'cpu' }).cast('bf16');
      const g = c.to('cuda:0');
      const qc = quantizeFp8(c), qg = quantizeFp8(g);
      expect(Array.from(qg.q.toArray() as Uint8Array)).toEqual(Array.from(qc.q.toArray() as Uint8Array));
      expect(values(qg.scales)).toEqual(values(qc.scales));
      const back = dequantizeFp8(qg, 'bf16');
      expect(values(back)).toEqual(values(dequantizeFp8(qc, 'bf16')));
      expect(relErr(values(back), values(c))).toBeLessThan(0.05);
    });
  });
});
