// What the expert GEMM pays for taking fp8 rows (an fp8 'keep' dispatch's { q, scales }) instead of
// bf16 rows, timed interleaved in rounds on the GPU:
//   fp8 rows      groupedGemm('NN') / the SwiGLU product on { q, scales }: a bf16 copy of the rows
//                 (dequantizeFp8), then the product;
//   bf16 rows     the same product on bf16 rows.
// The first is what fp8: true dispatch plus the GEMM does, moved to the consumer: with 'keep' the
// dispatch writes half the bytes (benchmarks/dispatch.bench.mjs 'dispatch FP8 kept') and this pays
// the copy back. The Hopper kernel dequantising its tiles in shared memory was measured here and lost
// (results fp8-rows-a7ab0af.json and fp8-rows-dc98f05.json, whose 'fp8 rows' rows are that kernel
// and whose 'dequantise' rows are today's path; native/ops/moe/grouped_gemm/grouped_gemm.cc says why).
// torch._grouped_mm on the same bf16 rows is grouped-gemm.bench.mjs's 'forward NN' (balanced shape)
// and 'up NN+SwiGLU' (layer shape).
//   node benchmarks/fp8-rows.bench.mjs [--out DIR] [--quick] [--rounds N]
// FLOPs 2·M·K·N; the rows' bytes: fp8 M·K·(1 + 4/128) read, the bf16 copy M·K·2 written and read;
// bf16 M·K·2.
import { dequantizeFp8, quantizeFp8, synchronize, Tensor } from '../dist/lib/index.js';
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
const VARIANTS = ['fp8 rows', 'bf16 rows'];

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
    'bf16 rows': () => product(dense),
  };
  // Check: the product on fp8 rows equals the product on the dequantised rows, bit for bit.
  run['fp8 rows']();
  const viaFp8 = out.clone();
  run['bf16 rows']();
  synchronize(dev);
  const same = Buffer.from(viaFp8.toArray().buffer).equals(Buffer.from(out.toArray().buffer));
  viaFp8.dispose();
  if (!same) console.error(`${s.name}: the product on fp8 rows differs from the one on the dequantised rows`);

  const ms = Object.fromEntries(VARIANTS.map((v) => [v, []]));
  for (let r = 0; r < rounds; r++) for (const v of VARIANTS) ms[v].push(timeRegion(run[v], { device: dev, warmup: 3, repeats }));
  const flops = 2 * s.M * s.K * s.N;
  const rowBytes = { 'fp8 rows': s.M * s.K * (1 + 4 / 128 + 4), 'bf16 rows': s.M * s.K * 2 };
  for (const v of VARIANTS) {
    const perRound = (other) => ms[other].map((m, i) => m / ms[v][i]);
    rows.push({
      shape: s.name,
      variant: v,
      ms: num(median(ms[v])),
      'ms range': range(ms[v])
        .map((u) => num(u))
        .join('–'),
      'TFLOP/s': num(flops / median(ms[v]) / 1e9, 1),
      'rows GB': num(rowBytes[v] / 1e9, 3),
      'bf16 rows / this': num(median(perRound('bf16 rows')), 3),
      'bf16 rows / this range': range(perRound('bf16 rows'))
        .map((u) => num(u, 3))
        .join('–'),
      'bit-equal to bf16 rows of the dequantised values': v === 'fp8 rows' ? same : null,
    });
  }
  for (const t of [offsets, x, fp8.q, fp8.scales, dense, b, out, g]) t?.dispose();
}

writeResult('fp8-rows', rows, {
  timing: `CUDA events around one call, median of ${repeats} after 3 warm-up calls; ${rounds} rounds, each timing both variants in turn; ratios per round, median and range`,
  variants:
    "fp8 rows: the product on e4m3 rows + per-128 scales (fp8 'keep' dispatch's output), i.e. dequantizeFp8 to a bf16 copy, then the product; bf16 rows: the product on bf16 rows (the dequantised values)",
  peer: "torch._grouped_mm on the same bf16 rows: benchmarks/grouped-gemm.bench.mjs ('forward NN' on the balanced shape, 'up NN+SwiGLU' on the layer shape)",
});
