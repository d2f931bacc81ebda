// The forward product on fp8 rows (what an fp8 'keep' dispatch delivers) against the two ways it
// could be done without them, timed interleaved in rounds on the GPU:
//   fp8 rows      groupedGemm('NN') / the SwiGLU product reading { q, scales } as they are (on Hopper
//                 the kernel dequantises each tile in shared memory);
//   dequantise    dequantizeFp8 to bf16, then the same product on the bf16 rows (the path before:
//                 what fp8: true dispatch does at its end, plus the GEMM);
//   bf16 rows     the product on bf16 rows alone (no fp8 anywhere: the floor the fused path aims at).
// The outputs of 'fp8 rows' and 'dequantise' must be equal bit for bit (checked once per shape).
// torch has no grouped GEMM taking e4m3 rows with per-128 scales beside bf16 weights; its
// torch._grouped_mm on the same bf16 rows is benchmarks/grouped-gemm.bench.mjs's 'forward NN' and
// 'up NN+SwiGLU' rows on the same shapes (run it in the same session to set the two side by side).
//   node benchmarks/fp8-rows.bench.mjs [--out DIR] [--quick] [--rounds N]
// Bytes and FLOPs: FLOPs 2·M·K·N; the rows' bytes per variant: fp8 M·K·(1 + 4/128), dequantise that
// plus the bf16 copy written and read (M·K·4), bf16 M·K·2.
import { dequantizeFp8, quantizeFp8, synchronize, Tensor, tidy } from '../dist/lib/index.js';
import { Epilogue, groupedGemm, groupedGemmEpilogue } from '../dist/lib/moe/grouped-gemm.js';
import { flag, median, num, quick, range, timeRegion, writeResult } from './harness.mjs';

const dev = 'cuda:0';
const rounds = Number(flag('--rounds', quick ? '3' : '5'));
const repeats = quick ? 10 : 20;

// The layer's up projection (benchmarks/moe-layer.bench.mjs: T=4096, top-8 of E=32, H=7168, F=2048)
// and grouped-gemm.bench.mjs's balanced forward (T=32768 rows over 64 experts, H=7168 → 2048).
const shapes = [
  { name: 'layer up + SwiGLU (E=32, M=32768, K=7168, N=4096)', E: 32, M: 32768, K: 7168, N: 4096, swiglu: true },
  { name: 'balanced forward NN (E=64, M=32768, K=7168, N=2048)', E: 64, M: 32768, K: 7168, N: 2048, swiglu: false },
];
const VARIANTS = ['fp8 rows', 'dequantise', 'bf16 rows'];

const rows = [];
for (const s of shapes) {
  const counts = new Array(s.E).fill(s.M / s.E);
  const off = [0];
  for (const c of counts) off.push(off.at(-1) + c);
  const offsets = Tensor.fromArray(off, { dtype: 'i32', device: dev });
  const x = Tensor.randn([s.M, s.K], { dtype: 'bf16', device: dev, seed: 11 });
  const fp8 = quantizeFp8(x);
  const dense = dequantizeFp8(fp8, 'bf16');
  const b = Tensor.randn([s.E, s.K, s.N], { dtype: 'bf16', device: dev, seed: 12, std: 0.02 });
  const outCols = s.swiglu ? s.N / 2 : s.N;
  const out = Tensor.empty([s.M, outCols], { dtype: 'bf16', device: dev });
  const g = s.swiglu ? Tensor.empty([s.M, s.N], { dtype: 'bf16', device: dev }) : null;
  const product = (a) =>
    s.swiglu ? groupedGemmEpilogue('NN', Epilogue.SwiGLU, a, b, offsets, out, g) : groupedGemm('NN', a, b, offsets, { out });
  const run = {
    'fp8 rows': () => product(fp8),
    dequantise: () => {
      const a = dequantizeFp8(fp8, 'bf16');
      product(a);
      return () => a.dispose();
    },
    'bf16 rows': () => product(dense),
  };
  // Check: the fused product equals the dequantise-then-multiply one, bit for bit.
  run['fp8 rows']();
  const fused = out.clone();
  tidy(() => run.dequantise()());
  synchronize(dev);
  const same = Buffer.from(fused.toArray().buffer).equals(Buffer.from(out.toArray().buffer));
  fused.dispose();
  if (!same) console.error(`${s.name}: the fused product differs from the dequantised one`);

  const ms = Object.fromEntries(VARIANTS.map((v) => [v, []]));
  for (let r = 0; r < rounds; r++)
    for (const v of VARIANTS) ms[v].push(timeRegion(run[v], { device: dev, warmup: 3, repeats }));
  const flops = 2 * s.M * s.K * s.N;
  const rowBytes = { 'fp8 rows': s.M * s.K * (1 + 4 / 128), dequantise: s.M * s.K * (1 + 4 / 128 + 4), 'bf16 rows': s.M * s.K * 2 };
  for (const v of VARIANTS) {
    const perRound = (other) => ms[other].map((m, i) => m / ms[v][i]);
    rows.push({
      shape: s.name,
      variant: v,
      ms: num(median(ms[v])),
      'ms range': range(ms[v]).map((u) => num(u)).join('–'),
      'TFLOP/s': num(flops / median(ms[v]) / 1e9, 1),
      'rows GB': num(rowBytes[v] / 1e9, 3),
      'dequantise / this': num(median(perRound('dequantise')), 3),
      'dequantise / this range': range(perRound('dequantise')).map((u) => num(u, 3)).join('–'),
      'bf16 rows / this': num(median(perRound('bf16 rows')), 3),
      'bf16 rows / this range': range(perRound('bf16 rows')).map((u) => num(u, 3)).join('–'),
      'bit-equal to dequantise': v === 'fp8 rows' ? same : null,
    });
  }
  for (const t of [offsets, x, fp8.q, fp8.scales, dense, b, out, g]) t?.dispose();
}

writeResult('fp8-rows', rows, {
  timing: `CUDA events around one call, median of ${repeats} after 3 warm-up calls; ${rounds} rounds, each timing the three variants in turn; ratios per round, median and range`,
  variants:
    "fp8 rows: the product reading e4m3 rows + per-128 scales (fp8 'keep' dispatch's output); dequantise: dequantizeFp8 to bf16, then the product; bf16 rows: the product on bf16 rows",
  peer: "torch._grouped_mm on the same bf16 rows: benchmarks/grouped-gemm.bench.mjs ('forward NN' on the balanced shape, 'up NN+SwiGLU' on the layer shape)",
});
