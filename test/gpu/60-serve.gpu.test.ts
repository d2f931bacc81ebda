// MoEInference on the GPU (bf16): equal to the training layer's forward and to the CPU in f32 (same
// weights), a decode step that never waits for the host (queued behind long GPU work, the call
// returns before that work is done), no device malloc per step into `out`, and a Hugging Face
// checkpoint loaded onto the GPU against its family reference.
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import {
  Event,
  HfMoECheckpoint,
  memoryStats,
  MoEInference,
  MoELayer,
  moeLayerFromHf,
  type MoELayerConfig,
  ops,
  synchronize,
  Tensor,
  tidy,
} from '../../lib/index.js';
import { disposeSaved } from '../../lib/moe/layer.js';
import { buildHfCheckpoint, encode, normals, testConfigs } from '../hf-fixtures.mjs';
import { hfMoEReference, moeSizes } from '../hf-moe-reference.mjs';
import { freshSeed, relErr, values } from '../helpers.js';
import { hasGpu } from './gpu.js';

const gpu = 'cuda:0' as const;

const cases: [string, Partial<MoELayerConfig>][] = [
  ['dropless softmax top-2, normalised (Mixtral-like)', { topK: 2, normalize: true }],
  [
    'sigmoid + bias, 4 groups keep 2, top-4, route scale, shared expert (DeepSeek-V3-like)',
    { scoreFunction: 'sigmoid', groups: 4, topkGroups: 2, routeScale: 2.5, sharedFfn: 256 },
  ],
  ['capacity 1.25 (fixed segments)', { capacityFactor: 1.25 }],
];

describe.skipIf(!hasGpu)('MoEInference on the GPU', () => {
  for (const [name, extra] of cases) {
    it(`${name}: equals MoELayer.forward and the CPU; T = 1, 8, 64, 256`, () => {
      const seed = freshSeed();
      const config: MoELayerConfig = { hidden: 256, ffn: 128, numExperts: 16, topK: 4, seed, ...extra };
      const before = memoryStats(gpu).liveBytes;
      {
        using g = new MoELayer({ ...config, device: gpu });
        tidy(() => g.bias.copy_(Tensor.randn([16], { std: 0.02, seed: seed + 1, device: gpu })));
        using inf = MoEInference.fromLayer(g);
        // The same weights in f32 on the CPU.
        const k = inf.config;
        using cpu = new MoEInference(
          {
            hidden: k.hidden,
            ffn: k.ffn,
            numExperts: k.numExperts,
            topK: k.topK,
            scoreFunction: inf.router.scoreFunction,
            groups: inf.router.groups,
            topkGroups: inf.router.topkGroups,
            normalize: inf.router.normalize,
            routeScale: inf.router.routeScale,
            selectionBias: k.selectionBias,
            sharedFfn: k.sharedFfn,
            ...(k.capacityFactor === undefined ? {} : { capacityFactor: k.capacityFactor }),
            dtype: 'f32',
            device: 'cpu',
          },
          tidy(() =>
            Object.fromEntries(
              Object.entries(inf.weights)
                .filter(([, t]) => t)
                .map(([key, t]) => [key, (t as Tensor).to('cpu').cast('f32')]),
            ),
          ) as never,
        );
        for (const T of [1, 8, 64, 256]) {
          tidy(() => {
            const x = Tensor.randn([T, 256], { seed: seed + T, device: gpu }).cast('bf16');
            const fwd = g.forward(x);
            const yTrain = values(fwd.y);
            disposeSaved(fwd);
            const y = values(inf.forward(x));
            expect(relErr(y, yTrain), `seed ${seed}, T ${T}: against the training layer`).toBeLessThan(1e-2);
            const yCpu = values(cpu.forward(x.to('cpu').cast('f32')));
            // Near-tied router scores may pick different experts in bf16: compare in norm.
            expect(relErr(y, yCpu), `seed ${seed}, T ${T}: against the CPU in f32`).toBeLessThan(3e-2);
          });
        }
      }
      synchronize(gpu);
      expect(memoryStats(gpu).liveBytes).toBe(before);
    });
  }

  it('a decode step does not wait for the host: queued behind long GPU work, forward returns before that work ends; no device malloc into `out`', () => {
    for (const [name, extra] of cases) {
      const seed = freshSeed();
      using layer = new MoELayer({ hidden: 1024, ffn: 512, numExperts: 32, topK: 4, seed, device: gpu, ...extra });
      using inf = MoEInference.fromLayer(layer);
      using x = Tensor.randn([8, 1024], { seed: seed + 1, device: gpu }).cast('bf16');
      using out = Tensor.empty([8, 1024], { dtype: 'bf16', device: gpu });
      using ref = Tensor.empty([8, 1024], { dtype: 'bf16', device: gpu });
      inf.forward(x, { out: ref }); // makes the workspace for T = 8
      synchronize(gpu);
      using a = Tensor.randn([4096, 4096], { seed: 3, device: gpu }).cast('bf16');
      using c = Tensor.empty([4096, 4096], { dtype: 'bf16', device: gpu });
      // Calibrate: enough matmuls to keep the GPU busy for about half a second.
      const t0 = new Event(gpu, { timing: true });
      const t1 = new Event(gpu, { timing: true });
      t0.record();
      for (let i = 0; i < 4; i++) ops.matmul(a, a, { out: c });
      t1.record();
      t1.synchronize();
      const perMs = t0.elapsedTime(t1) / 4;
      const n = Math.max(4, Math.ceil(500 / Math.max(perMs, 1e-3)));
      const stats0 = memoryStats(gpu);
      for (let i = 0; i < n; i++) ops.matmul(a, a, { out: c });
      const busy = new Event(gpu);
      busy.record();
      const h0 = performance.now();
      inf.forward(x, { out });
      const hostMs = performance.now() - h0;
      // Had forward synchronised with the device anywhere, the matmuls queued before it would be done.
      expect(
        busy.query(),
        `${name}: forward returned after ${hostMs.toFixed(2)} ms with ${(n * perMs).toFixed(0)} ms of work queued before it`,
      ).toBe(false);
      synchronize(gpu);
      // The workspace holds every buffer; the scratch capacity() and the grouped GEMM take inside comes
      // from the caching allocator's cache (stream-ordered), never from a new cudaMalloc.
      expect(memoryStats(gpu).deviceMallocs - stats0.deviceMallocs, `${name}: device mallocs during the step`).toBe(0);
      expect(
        Buffer.from((out.toArray() as Uint16Array).buffer).equals(Buffer.from((ref.toArray() as Uint16Array).buffer)),
        `${name}: the same bits as the first run`,
      ).toBe(true);
      busy.dispose();
      t0.dispose();
      t1.dispose();
    }
  });

  it('Hugging Face checkpoints (each family, bf16 files) loaded onto the GPU match their references, served and as training layers', () => {
    const root = fs.mkdtempSync(join(tmpdir(), 'moe-serve-gpu-'));
    try {
      for (const family of Object.keys(testConfigs) as (keyof typeof testConfigs)[]) {
        const cfg = testConfigs[family];
        const dir = join(root, family);
        const built = buildHfCheckpoint(dir, cfg, { dtype: 'bf16', shards: 3, seed: 21 });
        const { H } = moeSizes(cfg);
        const x64 = encode(normals(77)(64 * H), 'bf16').decoded;
        using ckpt = HfMoECheckpoint.open(dir);
        for (const [layer, w] of built.layers) {
          const ref = hfMoEReference(cfg, w, x64);
          using moe = MoEInference.fromHf(ckpt, layer, { device: gpu });
          const y = tidy(() => values(moe.forward(Tensor.fromArray(Float32Array.from(x64), { shape: [64, H], device: gpu }).cast('bf16'))));
          expect(relErr(y, ref.y), `${family} layer ${layer} (routing margin ${ref.margin})`).toBeLessThan(3e-2);
          // The same block as a training layer (moeLayerFromHf: f32 masters on the GPU, bf16 compute), forward and backward.
          using train = moeLayerFromHf(ckpt, layer, { device: gpu });
          const yt = tidy(() => {
            const x = Tensor.fromArray(Float32Array.from(x64), { shape: [64, H], device: gpu }).cast('bf16');
            const f = train.forward(x);
            const v = values(f.y);
            const g = train.backward(f, Tensor.full([64, H], 1, { dtype: 'bf16', device: gpu }));
            for (const t of Object.values(g)) if (t) expect(values(t).every(Number.isFinite), `${family}: finite gradients`).toBe(true);
            return v;
          });
          expect(relErr(yt, ref.y), `${family} layer ${layer}, training layer (routing margin ${ref.margin})`).toBeLessThan(3e-2);
        }
      }
    } finally {
      fs.rmSync(root, { recursive: true, force: true });
    }
  });
});
