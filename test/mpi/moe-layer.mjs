// Under mpirun: the dispatcher and the MoE layer at EP = world size against one-rank references
// holding the same global weights. Each rank routes its own tokens.
import { Dispatcher, init, MoELayer, singleRankGroup, Tensor, tidy } from '../../dist/lib/index.js';
import { capacity } from '../../dist/lib/moe/capacity.js';
import { check } from './common.mjs';

const world = await init();
const P = world.size;
const rank = world.rank;
const relErr = (a, b) => {
  let n = 0, d = 0;
  for (let i = 0; i < a.length; i++) { n += (a[i] - b[i]) ** 2; d += b[i] ** 2; }
  return Math.sqrt(n / Math.max(d, 1e-30));
};
const vals = (t) => Array.from(t.toFloat32Array());

// 1. Dispatch → identity experts → combine returns Σ_j w·x, with crafted routing: every token of
//    the last rank goes to rank 0's experts (that rank receives nothing from itself), and the
//    last expert receives nothing at all.
tidy(() => {
  const E = 2 * P, k = 2, T = 5 + rank, H = 8;
  const idx = [];
  for (let t = 0; t < T; t++) {
    if (rank === P - 1) idx.push(0, 1);
    else idx.push((t + rank) % (E - 1), (t + rank + 1) % (E - 1));
  }
  const indices = Tensor.fromArray(idx, { dtype: 'i32', shape: [T, k], device: 'cpu' });
  const weights = Tensor.rand([T, k], { seed: 50 + rank, device: 'cpu' });
  const x = Tensor.randn([T, H], { seed: 60 + rank, device: 'cpu' });
  const d = new Dispatcher({ numExperts: E, group: world });
  const cap = capacity(indices, weights, { numExperts: E });
  const { rows, handle } = d.dispatch(x, indices, weights, cap);
  check(handle.localRows.reduce((a, b) => a + b, 0) === rows.shape[0], 'dispatched rows match the layout');
  if (rank === P - 1) check(handle.localRows[1] === 0 || E - 1 !== rank * 2 + 1, 'the last expert receives nothing');
  const y = d.combine(rows, handle, weights);
  const wv = vals(weights), xv = vals(x), yv = vals(y);
  const ref = xv.map((v, i) => v * (wv[Math.floor(i / H) * k] + wv[Math.floor(i / H) * k + 1]));
  check(relErr(yv, ref) < 1e-6, `dispatch∘combine identity: relErr ${relErr(yv, ref)}`);
  handle.dispose();
});

// 1b. The same with fp8 rows on the wire (H = 256: two scale blocks per row): within e4m3 precision.
tidy(() => {
  const E = 2 * P, k = 2, T = 9 + rank, H = 256;
  const idx = [];
  for (let t = 0; t < T; t++) idx.push((t + rank) % E, (t + rank + 1) % E);
  const indices = Tensor.fromArray(idx, { dtype: 'i32', shape: [T, k], device: 'cpu' });
  const weights = Tensor.rand([T, k], { seed: 70 + rank, device: 'cpu' });
  const x = Tensor.randn([T, H], { seed: 80 + rank, device: 'cpu' }).cast('bf16');
  const cap = capacity(indices, weights, { numExperts: E });
  const d = new Dispatcher({ numExperts: E, group: world, fp8: true });
  const { rows, handle } = d.dispatch(x, indices, weights, cap);
  const y = d.combine(rows, handle, weights);
  const wv = vals(weights), xv = vals(x);
  const ref = xv.map((v, i) => v * (wv[Math.floor(i / H) * k] + wv[Math.floor(i / H) * k + 1]));
  const e = relErr(vals(y), ref);
  check(e < 0.05 && e > 0, `fp8 dispatch∘combine: relErr ${e}`);
  handle.dispose();
});

// 2. The layer at EP = P equals the one-rank layer with the same global weights, forward and
//    backward; local expert gradients equal the reference gradients summed over ranks.
for (const extra of [{}, { capacityFactor: 1.0, padToCapacity: true, scoreFunction: 'sigmoid' }]) {
  const cfg = { hidden: 16, ffn: 8, numExperts: 4 * P, topK: 2, dtype: 'f32', device: 'cpu', seed: 42, sharedFfn: 4, auxLossCoef: 0.01, ...extra };
  const ep = new MoELayer({ ...cfg, group: world });
  const ref = new MoELayer({ ...cfg, group: singleRankGroup });
  tidy(() => {
    // Capacity mode moves fixed segments of C = ceil(cf·T·k/E) rows: every rank must have the same T.
    const T = extra.padToCapacity ? 24 : 24 + 3 * rank;
    const x = Tensor.randn([T, 16], { seed: 100 + rank, device: 'cpu' });
    const dy = Tensor.randn([T, 16], { seed: 200 + rank, device: 'cpu' });
    const fe = ep.forward(x), fr = ref.forward(x);
    check(relErr(vals(fe.y), vals(fr.y)) < 1e-6, `forward ${JSON.stringify(extra)}: relErr ${relErr(vals(fe.y), vals(fr.y))}`);
    const ge = ep.backward(fe, dy), gr = ref.backward(fr, dy);
    check(relErr(vals(ge.dx), vals(gr.dx)) < 1e-5, `dx: relErr ${relErr(vals(ge.dx), vals(gr.dx))}`);
    check(relErr(vals(ge.router), vals(gr.router)) < 1e-5, 'router gradient');
    const El = ep.localExperts;
    for (const [name, g, r] of [['w13', ge.w13, gr.w13], ['w2', ge.w2, gr.w2]]) {
      world.allReduce(r, 'sum');
      const slice = r.narrow(0, rank * El, El).contiguous();
      check(relErr(vals(g), vals(slice)) < 1e-5, `${name} gradient of the local experts: relErr ${relErr(vals(g), vals(slice))}`);
    }
  });
  ep.dispose();
  ref.dispose();
}
console.log(`ok rank ${rank} of ${P}`);
