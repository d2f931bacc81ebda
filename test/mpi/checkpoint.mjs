// Sharded checkpoints under mpirun (see run.test.ts).
//   save <root>        every rank builds the same MoE layer (its experts by global index), saves a
//                      checkpoint with Adam moments, writes the layer's output on a fixed batch to
//                      <root>/y.bin (rank 0), reloads at this EP size (each rank its own experts) and
//                      at EP=1 (rank 0 alone reading every expert): identical tensors and outputs.
//   load <dir> <y.bin> a layer with other weights loads <dir> at this EP size (any size, also without
//                      mpirun) and gives the same output as y.bin, bit for bit.
//   faults <dir>       each rank saves into a root of its own (<dir>/node-<rank>, as node-local disks
//                      would be): every rank gets a CheckpointError naming the shared file system,
//                      nothing is committed, and keep: 1 does not prune rank 0's good checkpoint; a
//                      rank given a bad option fails every rank at once, naming it.
import * as fs from 'node:fs';
import { join } from 'node:path';

import {
  CheckpointError,
  InvalidArgumentError,
  disposeState,
  init,
  latestCheckpoint,
  listCheckpoints,
  loadCheckpoint,
  loadMoELayer,
  moeLayerState,
  saveCheckpoint,
  Tensor,
} from '../../dist/lib/index.js';
import { MoELayer } from '../../dist/lib/moe/layer.js';
import { check, expectThrow, positionalArgs, relErr, same, scriptDevice, scriptTransport } from './common.mjs';

//   --device cuda (after the mode's arguments): the layers on each rank's GPU in bf16 (NCCL with a
//                 GPU per rank, MPI staging when ranks share one); y.bin holds f32 values either way.
//   --transport auto|ipc|nccl (default auto): the layers' transport when several ranks run them.
const [mode, dir, yPath] = positionalArgs();
const world = await init({ timeoutMs: 20000 });
const { rank: r, size: n } = world;
const { device } = await scriptDevice(world);
const on = { device };
const cfg = { hidden: 8, ffn: 6, numExperts: 8, topK: 2, dtype: device === 'cpu' ? 'f32' : 'bf16', device, sharedFfn: 4 };
const group = n > 1 ? world : undefined;
// The transport only where rows cross ranks (one rank: no group, no transport).
const transportConfig = scriptTransport().config;
const tr = n > 1 ? transportConfig : {};
const x = Tensor.randn([12, 8], { seed: 99, device, dtype: cfg.dtype }); // the same batch on every rank
const bits = (t) => Buffer.from(t.toArray().buffer);
// Outputs at another EP size: bit for bit in f32 on the CPU (every transport sums a token's k
// expert rows in the same fp32 order); within bf16 rounding on the GPU, where the peer-memory
// transport returns each rank's partial sum in bf16 before the owner adds them.
function sameOutput(got, want, what) {
  if (device === 'cpu') return check(Buffer.from(got.buffer).equals(Buffer.from(want.buffer)), `${what} differs`);
  check(relErr(got, want) < 1e-2, `${what}: relErr ${relErr(got, want)} (bf16 tolerance 1e-2)`);
}
const f32 = (t) => (t.dtype === 'f32' ? t : t.cast('f32'));

if (mode === 'save') {
  const a = new MoELayer({ ...cfg, seed: 5, ...(group ? { group, ...tr } : {}) });
  a.bias.copy_(Tensor.fromArray([0.1, -0.2, 0.3, 0, 0.05, 0, -0.1, 0.2], on));
  // Moments drawn by global position, like the weights: the same global state at any EP size.
  const El = a.localExperts;
  const first = r * El;
  const mom = (t, s, perExpert) => ({
    expAvg: Tensor.randn([...t.shape], { seed: s, offset: first * perExpert, device }),
    expAvgSq: Tensor.rand([...t.shape], { seed: s + 1, offset: first * perExpert, device }),
  });
  const moments = { w13: mom(a.master.w13, 3, 8 * 12), w2: mom(a.master.w2, 5, 6 * 8) };
  const state = moeLayerState(a, 0, moments);
  saveCheckpoint(dir, {
    step: 7,
    comm: world,
    replicated: state.replicated,
    sharded: state.sharded,
    manifestExtras: { ep: { size: n, expertsPerRank: El, numExperts: 8 }, config: cfg, optimizer: { step: 7 } },
  });
  disposeState(state);
  const y = a.forward(x).y;
  if (r === 0) fs.writeFileSync(join(dir, 'y.bin'), bits(f32(y)));

  // Reload at this EP size: each rank's own experts and moments come back exactly.
  const b = new MoELayer({ ...cfg, seed: 6, ...(group ? { group, ...tr } : {}) });
  const zeros = (t) => ({ expAvg: Tensor.zeros([...t.shape], on), expAvgSq: Tensor.zeros([...t.shape], on) });
  const mb = { w13: zeros(b.master.w13), w2: zeros(b.master.w2) };
  const reader = loadCheckpoint(dir, { comm: world });
  check(reader.manifest.world.size === n && reader.manifest.files[`rank-${n - 1}.safetensors`], 'manifest lists every rank file');
  loadMoELayer(reader, b, 0, mb);
  for (const k of ['router', 'w13', 'w2', 'sharedW13', 'sharedW2'])
    check(bits(b.master[k]).equals(bits(a.master[k])), `EP=${n} reload: ${k} differs`);
  for (const k of ['w13', 'w2'])
    for (const m of ['expAvg', 'expAvgSq']) check(bits(mb[k][m]).equals(bits(moments[k][m])), `EP=${n} reload: moment ${k}.${m} differs`);
  check(bits(b.bias).equals(bits(a.bias)), 'bias differs');
  check(bits(b.forward(x).y).equals(bits(y)), `EP=${n} reload: output differs`);

  // EP=1: rank 0 alone reads every expert; they equal all ranks' experts gathered.
  const all13 = world.allGather(a.master.w13);
  const all2 = world.allGather(a.master.w2);
  const allM = world.allGather(moments.w13.expAvgSq);
  if (r === 0) {
    const one = new MoELayer({ ...cfg, seed: 8 });
    const m1 = { w13: zeros(one.master.w13), w2: zeros(one.master.w2) };
    loadMoELayer(loadCheckpoint(dir), one, 0, m1);
    check(bits(one.master.w13).equals(bits(all13)), 'EP=1 load: w13 differs from the gathered experts');
    check(bits(one.master.w2).equals(bits(all2)), 'EP=1 load: w2 differs from the gathered experts');
    check(bits(m1.w13.expAvgSq).equals(bits(allM)), 'EP=1 load: exp_avg_sq differs');
    sameOutput(f32(one.forward(x).y).toFloat32Array(), f32(y).toFloat32Array(), 'EP=1 load: output');
  }
  world.barrier();
} else if (mode === 'load') {
  const b = new MoELayer({ ...cfg, seed: 11, ...(group ? { group, ...tr } : {}) });
  const reader = loadCheckpoint(dir, { comm: world });
  loadMoELayer(reader, b, 0);
  const y = b.forward(x).y;
  const ref = new Float32Array(new Uint8Array(fs.readFileSync(yPath)).buffer);
  const what = `output at EP=${n} on ${device} from ${dir} (written at EP=${reader.manifest.ep.size})`;
  if (reader.manifest.ep.size === n) same(f32(y).toFloat32Array(), ref, what);
  else sameOutput(f32(y).toFloat32Array(), ref, what);
  world.barrier();
} else if (mode === 'faults') {
  const own = join(dir, `node-${r}`);
  const rep = Tensor.fromArray([1, 2]);
  if (r === 0) saveCheckpoint(own, { step: 4, replicated: { rep } }); // a good one-process checkpoint
  world.barrier();
  expectThrow(
    () => saveCheckpoint(own, { step: 5, comm: world, replicated: { rep }, sharded: { [`e${r}`]: Tensor.fromArray([r]) }, keep: 1 }),
    CheckpointError,
    /rank 0 could not commit: rank 1's rank-1\.safetensors is not in .* as rank 0 sees it \(missing\): every rank must see the checkpoint folder on one shared file system/,
    'a save into roots that differ per rank',
  );
  world.barrier();
  check(
    fs.readdirSync(own).every((e) => !e.startsWith('.tmp-')),
    `rank ${r}: a temporary folder was left in ${own}`,
  );
  if (r === 0) {
    check(
      JSON.stringify(listCheckpoints(own).map((c) => c.step)) === '[4]',
      `the good step 4 was pruned: ${JSON.stringify(listCheckpoints(own))}`,
    );
    check(latestCheckpoint(own)?.step === 4, 'the good step 4 no longer loads');
  }
  // A bad option on one rank: that rank's own error, the other's names it, no one waits for a timeout.
  const t0 = Date.now();
  const e = expectThrow(
    () => saveCheckpoint(join(dir, 'shared'), { step: 1, comm: world, replicated: { rep }, keep: r === 1 ? 0 : 2 }),
    InvalidArgumentError,
    r === 1
      ? /^saveCheckpoint: 'keep' must be a positive integer/
      : /another rank's arguments were refused, nothing was written: rank 1: saveCheckpoint: 'keep'/,
    'a bad option on rank 1',
  );
  check(Date.now() - t0 < 10_000, `the refusal took ${Date.now() - t0} ms (${e.message})`);
  world.barrier(); // the communicator is still usable
  // A root that is not a path on one rank: refused the same way (it threw at once on that rank, leaving the other in the exchange).
  const t1 = Date.now();
  expectThrow(
    () => saveCheckpoint(r === 1 ? null : join(dir, 'shared'), { step: 1, comm: world, replicated: { rep } }),
    InvalidArgumentError,
    r === 1
      ? /^saveCheckpoint: 'root' must be a folder path/
      : /another rank's arguments were refused, nothing was written: rank 1: saveCheckpoint: 'root'/,
    'a root that is not a path on rank 1',
  );
  check(Date.now() - t1 < 10_000, `the root refusal took ${Date.now() - t1} ms`);
  world.barrier();
  check(!fs.existsSync(join(dir, 'shared')) || fs.readdirSync(join(dir, 'shared')).length === 0, 'something was written');
} else {
  check(false, `unknown mode ${mode}`);
}
world.dispose();
console.log(`ok rank ${r} of ${n}`);
