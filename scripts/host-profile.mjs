// Where the host's time goes in one MoE layer step on the GPU: the layer (the fine shape of
// moe-layer.bench.mjs unless --shape main) stepped with the V8 CPU profiler on, self time summed by
// function, the wall time per traced mark. The addon's native frames are summed into one row: V8
// names them after an arbitrary addon function (on the H200 every native frame, the synchronize
// every 4 steps included, came out as 'balanceBiasUpdate', which the layer never calls).
//   node scripts/host-profile.mjs [--shape main|fine] [--steps N]
import { Session } from 'node:inspector/promises';

const { MoELayer, Tensor, synchronize, trace, tidy } = await import('../dist/lib/index.js');
const argv = process.argv.slice(2);
const at = (n, d) => (argv.includes(n) ? argv[argv.indexOf(n) + 1] : d);
const shapes = { main: { T: 4096, H: 7168, F: 2048, E: 32, k: 8 }, fine: { T: 4096, H: 2048, F: 768, E: 128, k: 8 } };
const s = shapes[at('--shape', 'fine')];
const steps = Number(at('--steps', '200'));
const dev = 'cuda:0';
const layer = new MoELayer({ hidden: s.H, ffn: s.F, numExperts: s.E, topK: s.k, dtype: 'bf16', device: dev, seed: 1 });
const x = Tensor.randn([s.T, s.H], { seed: 2, dtype: 'bf16', device: dev });
const dy = Tensor.randn([s.T, s.H], { seed: 3, dtype: 'bf16', device: dev });
const step = () =>
  tidy(() => {
    const g = layer.backward(layer.forward(x), dy);
    for (const t of Object.values(g)) t?.dispose();
  });
for (let i = 0; i < 20; i++) step();
synchronize(dev);
// Host time per step, the GPU kept from running ahead by a sync every 4 steps (the launch queue).
const session = new Session();
session.connect();
await session.post('Profiler.enable');
await session.post('Profiler.setSamplingInterval', { interval: 50 });
await session.post('Profiler.start');
let hostMs = 0;
for (let i = 0; i < steps; i++) {
  const t0 = performance.now();
  step();
  hostMs += performance.now() - t0;
  if (i % 4 === 3) synchronize(dev);
}
const { profile } = await session.post('Profiler.stop');
synchronize(dev);
console.log(`host per step ${(hostMs / steps).toFixed(3)} ms over ${steps} steps`);
const hit = new Map();
profile.samples.forEach((id, i) => hit.set(id, (hit.get(id) ?? 0) + (profile.timeDeltas[i] ?? 0)));
const self = new Map();
for (const n of profile.nodes) {
  const f = n.callFrame;
  const native = f.url === '' && f.lineNumber < 0 && !f.functionName.startsWith('(');
  const key = native
    ? '(native: addon calls and the synchronize waits)'
    : `${f.functionName || '(anon)'} ${f.url.split('/').slice(-2).join('/')}:${f.lineNumber + 1}`;
  self.set(key, (self.get(key) ?? 0) + (hit.get(n.id) ?? 0));
}
const total = [...self.values()].reduce((a, b) => a + b, 0);
for (const [k, v] of [...self.entries()].sort((a, b) => b[1] - a[1]).slice(0, 40))
  console.log(`${((v / total) * 100).toFixed(1).padStart(5)}%  ${(v / 1000 / steps).toFixed(4)} ms/step  ${k}`);
// Marks: one step traced, the GPU idle at its start.
synchronize(dev);
trace.enable();
step();
for (const r of trace.collect()) console.log(`${r.name.padEnd(44)} host ${r.hostMs.toFixed(3)}  gpu ${r.gpuMs?.toFixed(3)}`);
