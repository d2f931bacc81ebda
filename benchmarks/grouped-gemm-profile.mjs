// Runs each grouped-GEMM product of the benchmark's shapes twice (a warm-up, then the one to profile),
// for a profiler such as Nsight Compute to attach to (scripts/device-session.sh step `ncu`):
//   ncu --clock-control none --launch-skip-before-match 0 ... node benchmarks/grouped-gemm-profile.mjs
// Each product is bracketed by a synchronize, so kernels do not overlap. MOE_EP_GG_SHAPES=0,2 picks
// shapes, MOE_EP_GG_PRODUCTS=TN,TN32 products (NN, NT, TN, TN32: dW with fp32 results, as training
// computes it). Prints the order of the launches (shape, product), which the profiler's report follows.
import { synchronize, Tensor, tidy } from '../dist/lib/index.js';
import { groupedGemm } from '../dist/lib/moe/grouped-gemm.js';
import { shapes } from './grouped-gemm-shapes.mjs';

const dev = process.argv.includes('--cpu') ? 'cpu' : 'cuda:0';
const only = process.env.MOE_EP_GG_SHAPES;
const products = process.env.MOE_EP_GG_PRODUCTS?.split(',');
for (const p of products ?? [])
  if (!['NN', 'NT', 'TN', 'TN32'].includes(p)) throw new Error(`MOE_EP_GG_PRODUCTS: unknown product '${p}' (NN, NT, TN, TN32)`);
for (const [i, s] of shapes.entries()) {
  if (only && !only.split(',').includes(String(i))) continue;
  const scale = dev === 'cpu' ? 64 : 1; // a quick check of the script on the CPU: shapes shrunk
  const M = Math.max(1, Math.floor(s.M / scale)),
    K = (s.K / 16 / (dev === 'cpu' ? 8 : 1)) * 16,
    N = s.N;
  const E = s.counts.length;
  const counts = dev === 'cpu' ? Array.from({ length: E }, (_, e) => Math.floor(((e + 1) * M) / E) - Math.floor((e * M) / E)) : s.counts;
  const off = [0];
  for (const c of counts) off.push(off[off.length - 1] + c);
  tidy(() => {
    const a = Tensor.randn([M, K], { dtype: 'bf16', device: dev, seed: 1 });
    const b = Tensor.randn([E, K, N], { dtype: 'bf16', device: dev, std: 0.02, seed: 2 });
    const dC = Tensor.randn([M, N], { dtype: 'bf16', device: dev, seed: 3 });
    const offsets = Tensor.fromArray(off, { dtype: 'i32', device: dev });
    for (const [tag, product, run] of [
      ['NN', 'forward NN', () => groupedGemm('NN', a, b, offsets)],
      ['NT', 'dA NT', () => groupedGemm('NT', dC, b, offsets)],
      ['TN', 'dW TN', () => groupedGemm('TN', a, dC, offsets)],
      ['TN32', 'dW TN fp32', () => groupedGemm('TN', a, dC, offsets, { dtype: 'f32' })],
    ]) {
      if (products ? !products.includes(tag) : tag === 'TN32') continue; // by default the three bf16 products, as before
      for (let rep = 0; rep < 2; rep++) {
        synchronize(dev);
        run().dispose();
        synchronize(dev);
      }
      console.log(`profiled: shape ${i} '${s.name}' ${product}`);
    }
  });
}
