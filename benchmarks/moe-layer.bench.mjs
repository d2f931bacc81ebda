// One MoE layer training step (forward, backward, AdamW) on one GPU, against a PyTorch layer doing
// the same arithmetic with torch._grouped_mm on the SAME weights and inputs, measured in the same
// run, with the outputs and gradients compared.
//   node benchmarks/moe-layer.bench.mjs [--out DIR] [--quick] [--no-peer] [--dry-run]
// Layer: H=7168, F=2048, E=32 experts (all on this GPU), top-8, T=4096 tokens, bf16, softmax
// routing without renormalisation (the softmax default: weights are the chosen probabilities),
// dropless, no shared expert, no auxiliary losses.
// Timing: CUDA events, median after warm-up, with the GPU idle before each timed region:
//   forward  = MoELayer.forward (router GEMM, routing, permute, count read, experts, combine)
//   backward = MoELayer.backward (a fresh forward before each, untimed)
//   step     = forward + backward in one region
//   adamw    = three fused AdamW steps on the fp32 masters, refreshing the bf16 compute copies
// Host time (the TypeScript/JS side of a step), see the notes written with the result.
// Check: outputs and gradients against the torch layer in the same run, relative error in norm
// within TOLERANCE (bf16); the script exits 1 when a check fails (after writing the result).
// --dry-run: tiny shapes on the CPU (wall clock), to check the script and the peer's arithmetic.
// On an H200 (estimate): ~9 GB of inputs written for the peer, ~40 GB of GPU memory per process
// at most; the whole run well under two minutes.
import { existsSync, mkdtempSync, rmSync, statfsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { adamwStep, capacity, disposeSaved, MoELayer, permute, routerForward, synchronize, Tensor, tidy } from '../dist/lib/index.js';
import { groupedGemm } from '../dist/lib/moe/grouped-gemm.js';
import { args, dryRun, quick, runPeer, timeRegion, writeInputs, writeResult } from './harness.mjs';

const noPeer = args.includes('--no-peer');
const dev = dryRun ? 'cpu' : 'cuda:0';
const onGpu = !dryRun;
const cfg = dryRun ? { T: 64, H: 128, F: 64, E: 32, k: 8 } : { T: 4096, H: 7168, F: 2048, E: 32, k: 8 };
const { T, H, F, E, k } = cfg;
const warmup = dryRun ? 1 : 3;
const repeats = dryRun ? 3 : quick ? 10 : 30;
/** Relative error in norm allowed between ours and torch (bf16 products; see the notes). */
const TOLERANCE = 2e-2;

const layer = new MoELayer({ hidden: H, ffn: F, numExperts: E, topK: k, scoreFunction: 'softmax', dtype: 'bf16', device: dev, seed: 1234 });
if (layer.config.normalize !== false) throw new Error('expected the softmax default normalize = false');
const x = Tensor.randn([T, H], { dtype: 'bf16', device: dev, seed: 11 });
const dy = Tensor.randn([T, H], { dtype: 'bf16', device: dev, seed: 12 });

const sync = () => {
  if (onGpu) synchronize(dev);
};
const median = (a) => [...a].sort((p, q) => p - q)[Math.floor(a.length / 2)];
/** Frees a forward's outputs and saved tensors (idempotent: backward already freed the saved ones). */
function disposeForward(f) {
  disposeSaved(f);
  for (const t of [f.y, f.tokensPerExpert, f.dropped, f.auxLoss, f.routerEntropy]) t.dispose();
}
function disposeGrads(g) {
  for (const t of Object.values(g)) t?.dispose();
}

/** Median ms of body(ctx), setup() untimed before each run, the device idle at the start. */
const timeLayer = (body, { setup } = {}) => timeRegion(body, { device: dev, warmup, repeats, setup, before: sync });

/** Median wall-clock ms of body() with the GPU idle at the start; `end` syncs or not. */
function wallRegion(body, { endSync }) {
  const times = [];
  for (let i = 0; i < warmup + repeats; i++) {
    sync();
    const t0 = performance.now();
    const cleanup = body();
    if (endSync) sync();
    times.push(performance.now() - t0);
    sync();
    cleanup?.();
  }
  return median(times.slice(warmup));
}

/** W1 and W3 [El,H,F] out of the interleaved w13 [El,H,2F] (column 2i = W1[:,i], 2i+1 = W3[:,i]). */
function deinterleave(w13) {
  const [El, Hh, F2] = w13.shape;
  return tidy(() => {
    const pairs = w13.view(El, Hh, F2 / 2, 2);
    return [0, 1].map((s) => pairs.narrow(3, s, 1).contiguous().view(El, Hh, F2 / 2));
  });
}

// ------------------------------------------------------------------ one step, kept for the check
const f0 = layer.forward(x);
const oursIndices = f0.saved.indices.clone(); // backward releases what forward saved
const y0 = f0.y;
const g0 = layer.backward(f0, dy);
sync();

// ------------------------------------------------------------------------------------- timing
const forwardMs = timeLayer(() => {
  const f = layer.forward(x);
  return () => disposeForward(f);
});
const backwardMs = timeLayer(
  (f) => {
    const g = layer.backward(f, dy);
    return () => {
      disposeGrads(g);
      disposeForward(f);
    };
  },
  { setup: () => layer.forward(x) },
);
/** One forward + backward; returns the cleanup of what it made. */
const layerStep = () => {
  const f = layer.forward(x);
  const g = layer.backward(f, dy);
  return () => {
    disposeGrads(g);
    disposeForward(f);
  };
};
const stepMs = timeLayer(layerStep);

// Host time. The layer waits for the device twice per step, both in the forward: permute reads the
// kept counts per expert (after the router GEMM, routing and capacity) and dispatch reads the
// permuted offsets (after the permute kernel). So the wall time of the forward + backward calls,
// with no trailing synchronize and the GPU idle at the start, is host work + those two waits.
// The waits are measured by replaying that prefix (router GEMM, routerForward, capacity, the kept
// counts read, permute, the offsets read) and timing the two reads themselves, less what a read
// costs when the device is idle (the copy and call, which are host work).
const callsMs = wallRegion(layerStep, { endSync: false });
const wallStepMs = wallRegion(layerStep, { endSync: true });
const all = Tensor.fromArray([0, T], { dtype: 'i32', device: dev });
const waits = [];
const prefix = () => {
  const made = [];
  const logits = groupedGemm('NN', x, layer.compute.router, all, { dtype: 'f32' });
  const r = routerForward(logits, layer.router, { bias: layer.bias });
  const cap = capacity(r.indices, r.weights, { numExperts: E });
  let t0 = performance.now();
  cap.keptPerExpert.toArray(); // the wait inside permute (its own read then finds the device idle)
  const wait1 = performance.now() - t0;
  const p = permute(x, r.indices, r.weights, cap);
  t0 = performance.now();
  p.offsets.toArray(); // the dispatcher's read
  const wait2 = performance.now() - t0;
  t0 = performance.now();
  p.offsets.toArray(); // the same read with the device idle: its own cost
  const idle = performance.now() - t0;
  waits.push(Math.max(0, wait1 - idle) + Math.max(0, wait2 - idle));
  made.push(logits, ...Object.values(r), ...Object.values(cap), ...Object.values(p));
  return () => {
    for (const t of made) if (t instanceof Tensor) t.dispose();
  };
};
wallRegion(prefix, { endSync: false });
const routingWaitMs = median(waits.slice(warmup));
const hostMs = Math.max(0, callsMs - routingWaitMs);
all.dispose();

// ------------------------------------------------------------------------------------- the peer
let peer = { skipped: true };
if (!noPeer) {
  // The weights the forward above used (compute copies, before any AdamW step), ours outputs and grads.
  const [w1, w3] = deinterleave(layer.compute.w13);
  const [dW1, dW3] = deinterleave(g0.w13);
  const routerW = layer.compute.router.view(H, E);
  const tensors = { x, dy, router: routerW, w1, w3, w2: layer.compute.w2, y: y0, dx: g0.dx, dRouter: g0.router, dW1, dW3, dW2: g0.w2, indices: oursIndices };
  const bytes = Object.values(tensors).reduce((s, t) => s + t.numel * (t.dtype === 'f32' || t.dtype === 'i32' ? 4 : 2), 0);
  let base = tmpdir();
  try {
    const st = statfsSync('/dev/shm');
    if (existsSync('/dev/shm') && st.bavail * st.bsize > 1.25 * bytes) base = '/dev/shm';
  } catch {
    // no /dev/shm: the temporary folder
  }
  const dir = mkdtempSync(join(base, 'moe-layer-'));
  try {
    writeInputs(dir, tensors);
    for (const t of [w1, w3, dW1, dW3]) t.dispose();
    peer = runPeer('moe_layer_torch.py', [dir, String(repeats), String(k), dryRun ? 'cpu' : 'cuda', String(warmup)], { timeoutMs: 300_000 });
  } catch (e) {
    peer = { error: String(e.message ?? e).split('\n').slice(-3).join(' | ') };
    console.error(`torch peer failed: ${peer.error}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// AdamW on the fp32 masters, the bf16 compute copies refreshed in the same kernel (states made
// after the peer ran: it shares the GPU).
const params = [
  [layer.master.router, g0.router, layer.compute.router.view(H, E)],
  [layer.master.w13, g0.w13, layer.compute.w13],
  [layer.master.w2, g0.w2, layer.compute.w2],
].map(([p, g, c]) => ({ p, g, c, m: Tensor.zeros(p.shape, { device: dev }), v: Tensor.zeros(p.shape, { device: dev }) }));
let step = 0;
const adamwMs = timeLayer(() => {
  step++;
  for (const q of params) adamwStep(q.p, q.g, q.m, q.v, { lr: 1e-6, step, weightDecay: 0.1, paramBf16: q.c });
  return undefined;
});

// ------------------------------------------------------------------------------------- report
const num = (v, d = 3) => (typeof v === 'number' && Number.isFinite(v) ? +v.toFixed(d) : null);
// Against the faster of the two torch variants (separate W1/W3 GEMMs, or one fused [W1 | W3] GEMM).
const best = (a, b) => [a, b].filter((v) => typeof v === 'number' && Number.isFinite(v)).reduce((p, q) => Math.min(p, q), Infinity);
const ratio = (torch, ours) => (Number.isFinite(torch) && ours > 0 ? +(torch / ours).toFixed(2) : null);
const shape = `T=${T} H=${H} F=${F} E=${E} top-${k}`;
const flopsFwd = 2 * T * k * H * 3 * F + 2 * T * H * E; // experts (W1, W3, W2) + router
const tf = (flops, ms) => (ms > 0 ? +(flops / (ms * 1e-3) / 1e12).toFixed(1) : null);
const rows = [
  { shape, what: 'forward', oursMs: num(forwardMs), torchMs: num(peer.forward_ms), torchFusedMs: num(peer.fused_forward_ms), 'best torch/ours': ratio(best(peer.forward_ms, peer.fused_forward_ms), forwardMs), oursTFLOPs: tf(flopsFwd, forwardMs) },
  { shape, what: 'backward', oursMs: num(backwardMs), torchMs: num(peer.backward_ms), torchFusedMs: num(peer.fused_backward_ms), 'best torch/ours': ratio(best(peer.backward_ms, peer.fused_backward_ms), backwardMs), oursTFLOPs: tf(2 * flopsFwd, backwardMs) },
  { shape, what: 'forward + backward', oursMs: num(stepMs), torchMs: num(peer.step_ms), torchFusedMs: num(peer.fused_step_ms), 'best torch/ours': ratio(best(peer.step_ms, peer.fused_step_ms), stepMs), oursTFLOPs: tf(3 * flopsFwd, stepMs) },
  { shape, what: 'AdamW (fp32 masters → bf16)', oursMs: num(adamwMs), torchMs: num(peer.adamw_ms), torchFusedMs: null, 'best torch/ours': ratio(best(peer.adamw_ms), adamwMs) },
  { shape, what: 'host: forward + backward calls', oursMs: num(callsMs) },
  { shape, what: 'host: routing wait (estimated)', oursMs: num(routingWaitMs) },
  { shape, what: 'host: TypeScript side per step', oursMs: num(hostMs), 'of step': num(hostMs / stepMs, 3) },
  { shape, what: 'wall: step with a synchronize', oursMs: num(wallStepMs) },
];
const err = peer.rel_err ?? {};
// The verdict: every compared tensor within TOLERANCE (none compared: the peer was skipped or failed).
// Tokens routed differently (fp32 near-ties) change their own y and dx rows entirely: then y and dx
// are judged over the tokens routed alike.
const judged = Object.entries(err).filter(([n]) => !(peer.routing_mismatch_tokens > 0 && (n === 'y' || n === 'dx')));
const failed = judged.filter(([, v]) => !(typeof v === 'number' && v < TOLERANCE)).map(([n]) => n);
for (const [name, v] of Object.entries(err)) {
  const isJudged = judged.some(([n]) => n === name);
  rows.push({ shape, what: `relErr ${name}: ours vs torch`, oursMs: null, relErr: num(v, 5), ok: isJudged ? typeof v === 'number' && v < TOLERANCE : null });
}
if (peer.routing_mismatch_tokens !== undefined) rows.push({ shape, what: 'tokens routed differently', relErr: peer.routing_mismatch_tokens });
const checkResult = peer.skipped ? 'skipped (--no-peer)' : peer.error || Object.keys(err).length === 0 ? `not run: ${peer.error ?? 'no errors reported'}` : failed.length ? `FAILED: ${failed.join(', ')} ≥ ${TOLERANCE}` : `passed: all ${judged.length} judged within ${TOLERANCE}`;

writeResult(dryRun ? 'moe-layer-dryrun' : 'moe-layer', rows, {
  config: { ...cfg, dtype: 'bf16', scoreFunction: 'softmax', normalize: false, dropless: true, sharedExpert: false, auxLosses: false, device: dev, warmup, repeats },
  check: checkResult,
  timing: 'CUDA events, median after warm-up, GPU idle before each region. forward = MoELayer.forward; backward = MoELayer.backward after an untimed forward; forward + backward in one region; AdamW = three fused adamwStep calls (router, w13, w2) refreshing the bf16 copies',
  host:
    "callsMs: wall time of the forward() + backward() calls with no trailing synchronize (GPU idle at the start). The layer waits for the device twice per step, in the forward: permute reads the kept counts per expert (after router GEMM, routing, capacity) and dispatch reads the offsets (after the permute kernel); so callsMs = host work + those waits. routingWaitMs replays that prefix and times the two reads themselves, less the time of the same read with the device idle (median over the replays). hostMs = callsMs − routingWaitMs: an estimate of the host-side time per step (JS, validation, allocation, launches); 'of step' compares it to the device time of the step. If other hidden syncs exist they count as host time here (an upper bound).",
  flops: 'forward: 2·T·k·H·3F (experts) + 2·T·H·E (router); backward counted as 2× forward',
  peer: peer.skipped
    ? 'skipped (--no-peer)'
    : `torch ${peer.torch ?? '?'}: the same layer in autograd on the same bf16 weights and inputs: logits = x·Wr in fp32, softmax, top-k, weights = chosen probabilities, sort by expert (groups padded to multiples of 16 rows, no host sync), SwiGLU with torch._grouped_mm (W1 and W3 separate; 'fused': one [H,2F] GEMM), weighted unpermute in fp32, backward with dy; AdamW: torch.optim.AdamW(fused=True) on fp32 masters + copy into the bf16 params${peer.error ? `; error: ${peer.error}` : ''}`,
  tolerance: `relative errors in norm (‖ours − torch‖/‖torch‖) below ${TOLERANCE}: bf16 products agree to about 1e-2; near-ties in the fp32 logits may pick different experts for a few tokens (counted), which moves those tokens’ rows and the norm a little ('same routing': y and dx over the tokens routed alike)`,
  ratio: 'best torch/ours: the faster torch variant’s time / our time (≥ 1: we are faster)',
  torchFusedVsUnfusedY: peer.fused_vs_unfused_y ?? null,
});

for (const q of params) {
  q.m.dispose();
  q.v.dispose();
}
disposeGrads(g0);
for (const t of [y0, f0.tokensPerExpert, f0.dropped, f0.auxLoss, f0.routerEntropy, oursIndices, x, dy]) t.dispose();
layer.dispose();
console.log(`check: ${checkResult}`);
if (checkResult.startsWith('FAILED') || checkResult.startsWith('not run')) process.exitCode = 1;
