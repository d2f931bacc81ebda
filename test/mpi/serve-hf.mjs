// Under mpirun: Hugging Face MoE checkpoints served at EP = world size. Each rank opens the same
// checkpoint folder (argv[2], built by test/mpi/serve-hf.test.ts from argv[3]'s family and
// argv[4]'s seed), reads only its own experts into an MoEInference over the world communicator,
// routes its own tokens, and compares y with the family's float64 reference computed from all
// experts' weights (rebuilt in memory from the seed). Dropless, and with fixed capacity segments
// (capacityFactor = E/k: C = T, nothing can be dropped), f32 on the CPU. The same block as a
// training layer over the same ranks (moeLayerFromHf), forward against the reference, then backward.
import { HfMoECheckpoint, init, MoEInference, moeLayerFromHf, Tensor, tidy } from '../../dist/lib/index.js';
import { blockNames, buildHfCheckpoint, encode, normals, testConfigs } from '../hf-fixtures.mjs';
import { hfMoEReference, moeSizes } from '../hf-moe-reference.mjs';
import { check, relErr } from './common.mjs';

const world = await init();
const P = world.size,
  rank = world.rank;
const [dir, family, seedArg, dtype] = process.argv.slice(2);
const cfg = testConfigs[family];
check(cfg !== undefined, `unknown family ${family}`);
const seed = Number(seedArg);
const { layers } = buildHfCheckpoint(null, cfg, { write: false, seed, dtype });
const { H, E, k, Fs } = moeSizes(cfg);

for (const capacityFactor of [undefined, E / k]) {
  const ckpt = HfMoECheckpoint.open(dir);
  for (const [layer, w] of layers) {
    // Ragged token counts when dropless; equal ones in capacity mode (every rank's C must agree).
    const T = capacityFactor === undefined ? 3 + 2 * rank : 6;
    let x64, ref;
    for (let s = 0; ; s++) {
      x64 = encode(normals(7919 * (rank + 1) + 31 * layer + s)(T * H), 'f32').decoded;
      ref = hfMoEReference(cfg, w, x64);
      if ((ref.margin > 1e-4 && ref.minChoice > 0) || s > 20) break;
    }
    const inf = MoEInference.fromHf(ckpt, layer, {
      group: world,
      dtype: 'f32',
      device: 'cpu',
      ...(capacityFactor ? { capacityFactor } : {}),
    });
    check(inf.localExperts === E / P, `rank ${rank} holds ${inf.localExperts} experts, expected ${E / P}`);
    const y = tidy(() =>
      Array.from(inf.forward(Tensor.fromArray(Float32Array.from(x64), { shape: [T, H], device: 'cpu' })).toFloat32Array()),
    );
    const err = relErr(y, ref.y);
    check(
      err < 2e-6,
      `${family} layer ${layer}, ${capacityFactor ? `capacity ${capacityFactor}` : 'dropless'}, rank ${rank} of ${P}: relErr ${err} (routing margin ${ref.margin})`,
    );
    inf.dispose();
    // The same block as a training layer across the ranks (moeLayerFromHf): each rank holds its experts, the same output.
    const train = moeLayerFromHf(ckpt, layer, { group: world, dtype: 'f32', device: 'cpu', ...(capacityFactor ? { capacityFactor } : {}) });
    const yt = tidy(() => {
      const f = train.forward(Tensor.fromArray(Float32Array.from(x64), { shape: [T, H], device: 'cpu' }));
      const v = Array.from(f.y.toFloat32Array());
      train.backward(f, Tensor.full([T, H], 1, { device: 'cpu' })); // collective: every rank's backward exchanges rows
      return v;
    });
    const errT = relErr(yt, ref.y);
    check(errT < 2e-6, `${family} layer ${layer}, training layer, rank ${rank} of ${P}: relErr ${errT}`);
    train.dispose();
  }
  // Only this rank's experts were read: E/P per MoE layer, three matrices each (two rows of the fused
  // tensors each where the experts are fused), besides the replicated tensors; twice (the served
  // layer, then the training layer; once where the block is served only).
  const names = blockNames(cfg, [...layers.keys()][0]);
  const sharedReads = !names.shared || Fs === 0 ? 0 : typeof names.shared === 'function' ? 3 : 2;
  const perLayer = 1 + (names.bias ? 1 : 0) + (names.routerBias ? 1 : 0) + sharedReads + (names.sharedGate ? 1 : 0);
  // MXFP4 (gpt-oss as published): blocks and scales of both, and the two biases.
  const mxfp4 = cfg.quantization_config?.quant_method === 'mxfp4';
  const perExpert = (names.fused ? (mxfp4 ? 4 : 2) : 3) + (names.expertBias ? 2 : 0);
  const expected = 2 * layers.size * (perLayer + perExpert * (E / P));
  check(ckpt.stats.tensorsRead === expected, `rank ${rank}: ${ckpt.stats.tensorsRead} tensors read, expected ${expected}`);
  ckpt.close();
}
console.log(`ok rank ${rank} of ${P} (${family})`);
