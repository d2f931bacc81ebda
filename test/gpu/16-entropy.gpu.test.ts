// The router entropy metric on the GPU against the CPU reference (fresh random scores).
import { describe, expect, it } from 'vitest';

import { Tensor, tidy } from '../../lib/index.js';
import { routerEntropy } from '../../lib/moe/router.js';
import { freshSeed, poisoned } from '../helpers.js';
import { hasGpu } from './gpu.js';

describe.skipIf(!hasGpu)('router entropy on the GPU', () => {
  it.each([
    [16384, 256],
    [1000, 37],
    [1, 8],
  ])('[%i, %i]', (T, E) => {
    tidy(() => {
      const c = Tensor.rand([T, E], { seed: freshSeed(), device: 'cpu' });
      const g = c.to('cuda:0');
      const out = poisoned([1], 'f32', 'cuda:0');
      routerEntropy(g, { out });
      // fp32 per-row sums and logs against the double CPU loop
      expect(Math.abs(out.item() - routerEntropy(c).item()) / Math.log(E)).toBeLessThan(1e-5);
    });
  });

  it('a row with a NaN or infinite score makes the mean NaN, as on the CPU', () => {
    tidy(() => {
      for (const bad of [NaN, Infinity]) {
        const c = Tensor.rand([1000, 64], { seed: freshSeed(), device: 'cpu' });
        c.narrow(0, 517, 1).narrow(1, 3, 1).fill_(bad);
        const out = poisoned([1], 'f32', 'cuda:0');
        routerEntropy(c.to('cuda:0'), { out });
        expect(out.item(), String(bad)).toBeNaN();
        expect(routerEntropy(c).item(), String(bad)).toBeNaN();
      }
    });
  });
});
