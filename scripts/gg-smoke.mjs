// Quick grouped-GEMM check on a GPU (run it under `timeout`: a kernel that deadlocks shows as a
// timeout, not a hung test run): NN, NT, TN and the fused epilogues on small ragged inputs against the
// CPU reference, printing the relative errors. Exit 1 if any is over the bf16 tolerance.
import { Tensor, tidy } from '../dist/lib/index.js';
import { Epilogue, groupedGemm, groupedGemmEpilogue } from '../dist/lib/moe/grouped-gemm.js';

const relErr = (x, y) => {
  let num = 0,
    den = 0;
  for (let i = 0; i < x.length; i++) {
    num += (x[i] - y[i]) ** 2;
    den += y[i] ** 2;
  }
  return Math.sqrt(num / Math.max(den, 1e-30));
};
const vals = (t) => Array.from(t.cast('f32').toArray());
let failed = 0;
const report = (what, e) => {
  const ok = Number.isFinite(e) && e < 1e-2;
  if (!ok) failed++;
  console.log(`${what.padEnd(40)} rel err ${e.toExponential(2)} ${ok ? 'ok' : 'FAIL'}`);
};
for (const [E, K, N, counts] of [
  [1, 64, 256, [128]],
  [3, 128, 512, [200, 0, 77]],
  [4, 256, 1024, [1500, 1700, 0, 2900]],
  [5, 200, 328, [300, 1, 0, 250, 149]],
]) {
  tidy(() => {
    const M = counts.reduce((s, c) => s + c, 0);
    const off = [0];
    for (const c of counts) off.push(off[off.length - 1] + c);
    const mk = (shape, seed) => Tensor.rand(shape, { seed, low: -1, high: 1, device: 'cpu' }).cast('bf16');
    const a = mk([M, K], 1),
      b = mk([E, K, N], 2),
      dC = mk([M, N], 3);
    const o = Tensor.fromArray(off, { dtype: 'i32', device: 'cpu' });
    const g = (t) => t.to('cuda:0');
    const tag = `E=${E} K=${K} N=${N} M=${M}`;
    report(`NN ${tag}`, relErr(vals(groupedGemm('NN', g(a), g(b), g(o)).to('cpu')), vals(groupedGemm('NN', a, b, o))));
    report(`NT ${tag}`, relErr(vals(groupedGemm('NT', g(dC), g(b), g(o)).to('cpu')), vals(groupedGemm('NT', dC, b, o))));
    report(`TN ${tag}`, relErr(vals(groupedGemm('TN', g(a), g(dC), g(o)).to('cpu')), vals(groupedGemm('TN', a, dC, o))));
    const F = N / 2;
    const hG = Tensor.empty([M, F], { dtype: 'bf16', device: 'cuda:0' }),
      hC = Tensor.empty([M, F], { dtype: 'bf16', device: 'cpu' });
    groupedGemmEpilogue('NN', Epilogue.SwiGLU, g(a), g(b), g(o), hG, null);
    groupedGemmEpilogue('NN', Epilogue.SwiGLU, a, b, o, hC, null);
    report(`SwiGLU ${tag}`, relErr(vals(hG.to('cpu')), vals(hC)));
  });
}
process.exit(failed ? 1 : 0);
