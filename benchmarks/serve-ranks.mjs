// serve.bench.mjs --ranks P: the decode step of MoEInference across P ranks (expert parallel, the
// low-latency path: capacity mode through the peer-memory transport), eager against replayed from a
// CUDA graph (captureDecode on every rank), and the low-latency dispatch and combine alone.
//   mpirun --oversubscribe -np P node benchmarks/serve.bench.mjs --ranks P [--experts E] [--quick] [--out DIR] [--dry-run]
// Ranks sharing ONE GPU (CUDA_VISIBLE_DEVICES=0; the device session's serve-ep step): CUDA IPC
// between processes on the same device, so the figures say what the protocol, the launches and the
// host cost, not what NVLink would give. Without the MPS daemon the ranks' kernels time-slice the
// GPU (each cross-rank wait then costs a slice); with it they run side by side. Result:
// serve-<P>ranks-shared-gpu-<commit>.json.
// One GPU per rank (mpirun -np P on a machine of P GPUs; the session's multi-bench step): peer
// memory between the GPUs, the figure to set beside DeepEP's low-latency kernels (EP8, 128 tokens,
// hidden 7168, top-8: about 77 µs dispatch (FP8) and 114 µs combine on H800 over RDMA; ours moves
// bf16 rows both ways). Result: serve-<P>ranks-<P>gpus[-E<E>]-<commit>.json. Which case ran is read from the
// ranks' devices, not assumed.
// Shape: DeepSeek-V3's expert shape (H=7168, F=2048, top-8, sigmoid, bias) with E = 8·P experts
// (8 per rank; --experts E: E experts, a multiple of P, e.g. DeepSeek-V3's 256), capacity factor
// E/k (C = T: nothing dropped, N = E·T rows per rank), no shared expert; every rank has T tokens
// (T = 1, 8, 64, 128), random inputs seeded per rank.
// Timing: per T, CUDA events around one call after every rank waited for its device and met the
// others at a barrier; median of `repeats` after warm-up on each rank; the row reports rank 0's
// median and the largest median over the ranks (a collective step is as slow as its slowest rank).
// Graph steps: a device copy of x into the captured input, one replay, a copy out. Also the host
// waits (device-to-host copies, synchronisations) during 10 replayed steps on rank 0: must be 0.
// --dry-run: tiny shapes on the CPU through the MPI all-to-all (no graphs, no peer transport; the
// script's own calls only). Bounded: the whole run exits 1 past 170 s.
import { capacity, cuda, Dispatcher, MoEInference, synchronize, Tensor, tidy } from '../dist/lib/index.js';
import { peerCombineInto, peerDecodeBuffers, peerDecodeNeed, peerDispatchInto } from '../dist/lib/moe/peer-dispatch.js';
import { benchWorld, dryRun, flag, num, printTable, quick, randomRouting, timeRegion, writeResult } from './harness.mjs';

export async function runRanks() {
  const watchdog = setTimeout(() => {
    console.error('serve --ranks: past 170 s; giving up');
    process.exit(1);
  }, 170_000);
  watchdog.unref();
  const { world, P, rank, dev, onGpu, log } = await benchWorld({ timeoutMs: 120_000 });
  const want = Number(flag('--ranks', '0'));
  if (want !== P) {
    console.error(
      `--ranks ${want} but mpirun started ${P} ranks (mpirun --oversubscribe -np ${want} node benchmarks/serve.bench.mjs --ranks ${want})`,
    );
    process.exit(2);
  }
  const Ts = [1, 8, 64, 128];
  const { H, F } = dryRun ? { H: 128, F: 64 } : { H: 7168, F: 2048 };
  const k = 8;
  const E = Number(flag('--experts', String(8 * P)));
  if (!Number.isSafeInteger(E) || E < k || E % P !== 0) {
    console.error(`--experts ${flag('--experts')}: must be an integer of at least ${k} and a multiple of the ${P} ranks`);
    process.exit(2);
  }
  const El = E / P;
  // The ranks' devices: several ranks on one GPU (CUDA IPC within it), or a GPU each (peer memory across GPUs).
  const ordinal = onGpu ? Number(dev.split(':')[1]) : -1;
  const ordinals = Array.from(world.allGather(Tensor.fromArray([ordinal], { dtype: 'i32', device: 'cpu' })).toArray());
  const sharedGpu = !onGpu || new Set(ordinals).size < P;
  const where = sharedGpu
    ? `${P} ranks sharing ONE ${onGpu ? 'GPU' : 'CPU'} (not an NVLink figure)`
    : `${P} ranks on ${P} GPUs (peer memory between them)`;
  const cf = E / k;
  const warmup = dryRun ? 1 : 3;
  const repeats = dryRun ? 3 : quick ? 10 : 20;
  const config = {
    hidden: H,
    ffn: F,
    numExperts: E,
    topK: k,
    scoreFunction: 'sigmoid',
    normalize: true,
    selectionBias: true,
    capacityFactor: cf,
    group: world,
    device: dev,
    ...(onGpu ? { transport: 'ipc' } : {}),
  };
  log(`serve --ranks ${P}: ${where}; H=${H} F=${F} E=${E} top-${k}, capacity ${cf}`);
  const make = (seed) => ({
    router: Tensor.randn([1, H, E], { dtype: 'bf16', device: dev, seed: 11, std: 0.5 }),
    bias: Tensor.randn([E], { device: dev, seed: 12, std: 0.05 }),
    w13: Tensor.randn([El, H, 2 * F], { dtype: 'bf16', device: dev, seed, std: 0.02 }),
    w2: Tensor.randn([El, F, H], { dtype: 'bf16', device: dev, seed: seed + 1, std: 0.02 }),
  });
  const eager = new MoEInference(config, make(100 + 2 * rank));
  const graphed = onGpu ? new MoEInference(config, make(100 + 2 * rank)) : null;
  const lined = () => {
    if (onGpu) synchronize(dev);
    world.barrier();
  };
  const time = (body) => timeRegion(body, { device: dev, warmup, repeats, before: lined });
  /** Every rank's value: rank 0's and the largest. */
  const gather = (v) => {
    const all = Array.from(world.allGather(Tensor.fromArray([Number.isFinite(v) ? v : -1], { device: 'cpu' })).toArray());
    return { r0: all[0], max: Math.max(...all) };
  };

  // The low-latency dispatch and combine alone, on the transport the layers use.
  const d = new Dispatcher({ numExperts: E, group: world, padToCapacity: true, ...(onGpu ? { transport: 'ipc' } : {}) });
  const rows = [];
  for (const T of Ts) {
    const x = Tensor.randn([T, H], { dtype: 'bf16', device: dev, seed: 1000 * T + rank });
    const y = Tensor.empty([T, H], { dtype: 'bf16', device: dev });
    const eagerMs = gather(time(() => eager.forward(x, { out: y })));
    let graphMs = { r0: NaN, max: NaN };
    let dispatchMs = { r0: NaN, max: NaN };
    let combineMs = { r0: NaN, max: NaN };
    let replayWaits = null;
    let transportBytes = null;
    if (graphed) {
      const info = graphed.captureDecode(T);
      transportBytes = info.transportBytes;
      graphMs = gather(time(() => graphed.forward(x, { out: y })));
      lined();
      const w0 = cuda.hostWaitCounts();
      for (let i = 0; i < 10; i++) graphed.forward(x, { out: y });
      const w1 = cuda.hostWaitCounts();
      replayWaits = w1.deviceToHost - w0.deviceToHost + (w1.synchronizations - w0.synchronizations);
      // Dispatch and combine alone: routing uniformly random, every rank T tokens.
      tidy(() => {
        const { idx, w } = randomRouting(T, k, E, 77 + 31 * rank + T);
        const indices = Tensor.fromArray(idx, { dtype: 'i32', shape: [T, k], device: dev });
        const weights = Tensor.fromArray(w, { shape: [T, k], device: dev });
        const cap = capacity(indices, weights, { numExperts: E, capacityFactor: cf });
        const peer = d.peerTransportFor(x, k).grownFor(peerDecodeNeed(T, k, H, 'bf16', El));
        const b = peerDecodeBuffers({ P, localExperts: El, T, topK: k, hidden: H, segment: cap.capacity, dtype: 'bf16' }, x.device);
        try {
          dispatchMs = gather(time(() => peerDispatchInto(peer, x, indices, weights, cap.slot, cap.keptPerExpert, b, 0)));
          combineMs = gather(time(() => peerCombineInto(peer, b.rows, b, y, 0)));
        } finally {
          lined();
          for (const t of b.tensors) t.dispose();
        }
      });
    }
    rows.push({
      T,
      'eager ms (r0)': num(eagerMs.r0),
      'eager ms (max)': num(eagerMs.max),
      'graph ms (r0)': num(graphMs.r0),
      'graph ms (max)': num(graphMs.max),
      'eager/graph': num(eagerMs.max / graphMs.max, 2),
      'dispatch µs (max)': num(dispatchMs.max * 1e3, 1),
      'combine µs (max)': num(combineMs.max * 1e3, 1),
      'host waits in 10 replays': replayWaits,
      'transport MB': transportBytes === null ? null : num(transportBytes / 1e6, 1),
    });
    x.dispose();
    y.dispose();
    log(`T ${T} done`);
  }
  const notes = {
    ranks: P,
    sharing: sharedGpu
      ? `${P} ranks share ONE ${onGpu ? 'GPU' : 'CPU'} (CUDA IPC between processes on the same device): not an NVLink figure`
      : `one GPU per rank (devices ${ordinals.join(', ')}): peer memory between the GPUs`,
    published:
      'DeepEP low-latency kernels (pure RDMA: an H800 and a CX7 InfiniBand NIC per rank), EP8, 128 tokens per rank, hidden 7168, top-8: about 77 µs dispatch (FP8 rows) and 114 µs combine (BF16); ours moves bf16 rows both ways',
    mps: process.env.CUDA_MPS_PIPE_DIRECTORY
      ? `MPS pipe directory ${process.env.CUDA_MPS_PIPE_DIRECTORY}`
      : 'MPS not known to be running (time-sliced)',
    shape: `H=${H} F=${F} E=${E} (${El} per rank) top-${k} sigmoid + bias, capacity ${cf} (C = T), no shared expert`,
    timing: `CUDA events around one call after a device sync and a barrier; median of ${repeats} after ${warmup} warm-up; r0: rank 0, max: the slowest rank`,
  };
  if (rank === 0) {
    writeResult(
      `serve-${P}ranks-${sharedGpu ? 'shared-gpu' : `${P}gpus`}${E === 8 * P ? '' : `-E${E}`}`,
      rows,
      notes,
      {},
      { print: 'none' },
    );
    printTable(`serve --ranks ${P}: ${where}`, rows);
  }
  const bad = rows.some((r) => r['host waits in 10 replays'] !== null && r['host waits in 10 replays'] !== 0);
  graphed?.dispose();
  eager.dispose();
  d.dispose();
  lined();
  world.dispose();
  if (bad) {
    console.error('serve --ranks: a replayed step waited on the host');
    process.exitCode = 1;
  }
}
