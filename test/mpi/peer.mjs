// Under mpirun with --device cuda: the peer-memory ('ipc') transport against the communicator's
// all-to-all ('nccl' choice; MPI carries it when ranks share a GPU) on the same inputs, and the
// identity combine(dispatch(x)) = x·Σw. Ranks may share one GPU (CUDA IPC between processes).
//   - dispatch: rows, gate weights and the local layout equal bit for bit (both order rows by local
//     expert, then source rank, then the source's slot order); fp8 rows too (same quantisation);
//   - combine, dispatchBackward: equal within rounding (the ipc path sums per rank first, in the
//     rows' dtype on the wire); combineBackward: d(expertOut) bit for bit, d(weights) within 1e-5;
//   - capacity mode: no device-to-host copy and no synchronisation in dispatch + combine;
//   - dropless growth: token counts that outgrow the transport's buffers (collective regrowth);
//   - crafted routing: the last rank sends everything to rank 0 (it receives nothing from itself);
//   - fp8 rows kept (fp8: 'keep'): the e4m3 bytes and scales equal the all-to-all's bit for bit,
//     dequantised they are the fp8: true rows, and the experts on them give the same outputs.
// Each rank prints its seed; a failure names the case.
import { capacity, cuda, dequantizeFp8, Dispatcher, expertsForward, init, ops, synchronize, Tensor, tidy } from '../../dist/lib/index.js';
import { check, progress, relErr, scriptDevice } from './common.mjs';

const world = await init();
const P = world.size;
const rank = world.rank;
const { device, gpu } = await scriptDevice(world);
check(gpu, 'peer.mjs needs --device cuda');
const seed = Number(process.env.MOE_EP_TEST_SEED ?? Date.now() % 100000) + 7919 * rank;
console.log(`rank ${rank}: seed ${seed}`);
const on = { device };

const vals = (t) => Array.from(t.toFloat32Array());
const bits = (t) => Buffer.from(t.toArray().buffer);
const ints = (t) => Array.from(t.toArray());
/** The same values in a view that starts one element past its storage: off the 16-byte boundary
 *  the transport's kernels move rows in (it must copy such an input, not fault). */
function misaligned(t) {
  const n = t.shape.reduce((a, b) => a * b, 1);
  const view = Tensor.empty([n + 1], { dtype: t.dtype, device })
    .narrow(0, 1, n)
    .view(...t.shape);
  ops.scale(t, 1, { out: view });
  return view;
}

/** k distinct experts per token from a seeded LCG; crafted: every token to rank 0's experts. */
function routing(T, k, E, s, crafted) {
  let state = s >>> 0;
  const next = () => (state = (Math.imul(state, 1664525) + 1013904223) >>> 0) / 2 ** 32;
  const idx = [];
  const El = E / P;
  for (let t = 0; t < T; t++) {
    const pool = crafted ? Array.from({ length: El }, (_, e) => e) : Array.from({ length: E }, (_, e) => e);
    for (let j = 0; j < k; j++) idx.push(pool.splice(Math.floor(next() * pool.length), 1)[0]);
  }
  return idx;
}

const cases = [
  { name: 'f32 dropless', dtype: 'f32', E: 4 * P, k: 2, H: 64 },
  { name: 'bf16 dropless top-8', dtype: 'bf16', E: 16 * P, k: 8, H: 128 },
  { name: 'bf16 dropless align 8', dtype: 'bf16', E: 4 * P, k: 2, H: 64, align: 8 },
  { name: 'bf16 capacity', dtype: 'bf16', E: 4 * P, k: 2, H: 64, cf: 1.0, pad: true },
  { name: 'f32 capacity, tight (drops)', dtype: 'f32', E: 4 * P, k: 3, H: 32, cf: 0.5, pad: true },
  { name: 'fp8 dropless', dtype: 'bf16', E: 4 * P, k: 2, H: 256, fp8: true },
  { name: 'bf16 crafted (last rank sends all to rank 0)', dtype: 'bf16', E: 4 * P, k: 2, H: 64, crafted: true },
  { name: 'bf16 odd hidden (4-byte path)', dtype: 'bf16', E: 2 * P, k: 2, H: 6 },
];

for (const [ci, c] of cases.entries()) {
  tidy(() => {
    const T = c.pad ? 40 : 37 + 5 * rank;
    const idx = routing(T, c.k, c.E, seed + 101 * ci, c.crafted && rank === P - 1);
    const indices = Tensor.fromArray(idx, { dtype: 'i32', shape: [T, c.k], ...on });
    const weights = Tensor.rand([T, c.k], { seed: seed + 1, ...on });
    const x = Tensor.randn([T, c.H], { seed: seed + 2, ...on }).cast(c.dtype);
    const dy = Tensor.randn([T, c.H], { seed: seed + 3, ...on }).cast(c.dtype);
    const cap = capacity(indices, weights, { numExperts: c.E, ...(c.cf ? { capacityFactor: c.cf } : {}) });
    const common = { numExperts: c.E, group: world, fp8: !!c.fp8, padToCapacity: !!c.pad, align: c.align ?? 1 };
    const ipc = new Dispatcher({ ...common, transport: 'ipc' });
    const ref = new Dispatcher({ ...common, transport: 'nccl' });
    const before = cuda.hostWaitCounts();
    const A = ipc.dispatch(x, indices, weights, cap);
    const yA = ipc.combine(A.rows, A.handle, weights);
    const waits = cuda.hostWaitCounts();
    const B = ref.dispatch(x, indices, weights, cap);
    const what = `${c.name} (rank ${rank} of ${P}, seed ${seed})`;
    check(ipc.transport === 'ipc', `${what}: transport ${ipc.transport}: ${ipc.transportReason}`);
    if (c.pad) {
      check(
        waits.deviceToHost === before.deviceToHost && waits.synchronizations === before.synchronizations,
        `${what}: capacity-mode dispatch + combine waited on the host: ${JSON.stringify(before)} → ${JSON.stringify(waits)}`,
      );
    }
    // With align > 1 (dropless) the layouts differ by design: the all-to-all pads every (source,
    // expert) segment at the sender, ipc pads each local expert's rows once. Outputs must agree.
    const sameLayout = (c.align ?? 1) === 1 || c.pad;
    const sum = (a) => a.reduce((u, v) => u + v, 0);
    if (sameLayout) {
      check(
        JSON.stringify(A.handle.localRows) === JSON.stringify(B.handle.localRows),
        `${what}: localRows ${A.handle.localRows} vs ${B.handle.localRows}`,
      );
      check(JSON.stringify(ints(A.handle.localOffsets)) === JSON.stringify(ints(B.handle.localOffsets)), `${what}: localOffsets differ`);
      check(bits(A.rows).equals(bits(B.rows)), `${what}: dispatched rows differ from the all-to-all's`);
      check(bits(A.weights).equals(bits(B.weights)), `${what}: dispatched gate weights differ`);
    } else {
      check(
        A.handle.localRows.every((n) => n % c.align === 0) && sum(A.handle.localRows) <= sum(B.handle.localRows),
        `${what}: localRows ${A.handle.localRows}`,
      );
      check(
        Math.abs(sum(vals(A.weights)) - sum(vals(B.weights))) < 1e-3,
        `${what}: the dispatched gate weights do not add up to the all-to-all's`,
      );
    }
    progress(`${c.name}: dispatch`);

    const yB = ref.combine(B.rows, B.handle, weights);
    const tol = c.dtype === 'f32' ? 1e-6 : 1e-2;
    check(relErr(vals(yA), vals(yB)) < tol, `${what}: combine relErr ${relErr(vals(yA), vals(yB))}`);
    if (!c.fp8 && !c.cf) {
      // Identity experts: every entry kept, so y = x·Σ_j w[t, j].
      const wv = vals(weights),
        xv = vals(x);
      const expect = xv.map((v, i) => {
        const t = Math.floor(i / c.H);
        let s = 0;
        for (let j = 0; j < c.k; j++) s += wv[t * c.k + j];
        return v * s;
      });
      check(relErr(vals(yA), expect) < tol, `${what}: combine(dispatch(x)) ≠ x·Σw: relErr ${relErr(vals(yA), expect)}`);
    }
    progress(`${c.name}: combine`);

    const gA = ipc.combineBackward(dy, A.rows, A.handle, weights);
    const gB = ref.combineBackward(dy, B.rows, B.handle, weights);
    if (sameLayout) check(bits(gA.dExpertOut).equals(bits(gB.dExpertOut)), `${what}: combineBackward d(expertOut) differs`);
    check(
      relErr(vals(gA.dWeights), vals(gB.dWeights)) < 1e-5,
      `${what}: combineBackward d(weights) relErr ${relErr(vals(gA.dWeights), vals(gB.dWeights))}`,
    );
    progress(`${c.name}: combineBackward`);

    const dxA = ipc.dispatchBackward(gA.dExpertOut, A.handle);
    const dxB = ref.dispatchBackward(gB.dExpertOut, B.handle);
    check(relErr(vals(dxA), vals(dxB)) < tol, `${what}: dispatchBackward relErr ${relErr(vals(dxA), vals(dxB))}`);
    progress(`${c.name}: dispatchBackward`);

    // Inputs given as views off a 16-byte boundary: the same bits as from aligned ones.
    const M = ipc.dispatch(misaligned(x), indices, weights, cap);
    check(bits(M.rows).equals(bits(A.rows)), `${what}: dispatch of a misaligned x differs`);
    check(bits(ipc.combine(misaligned(A.rows), A.handle, weights)).equals(bits(yA)), `${what}: combine of misaligned rows differs`);
    const gM = ipc.combineBackward(misaligned(dy), misaligned(A.rows), A.handle, weights);
    check(
      bits(gM.dExpertOut).equals(bits(gA.dExpertOut)) && bits(gM.dWeights).equals(bits(gA.dWeights)),
      `${what}: combineBackward of misaligned dy and rows differs`,
    );
    check(
      bits(ipc.dispatchBackward(misaligned(gA.dExpertOut), A.handle)).equals(bits(dxA)),
      `${what}: dispatchBackward of misaligned rows differs`,
    );
    M.handle.dispose();
    progress(`${c.name}: misaligned inputs`);
    A.handle.dispose();
    B.handle.dispose();
    ipc.dispose();
    ref.dispose();
  });
}

// fp8 rows kept, dropless and capacity mode: through 'ipc' and the all-to-all the same bytes and
// scales; dequantised, the rows that fp8: true delivers; the experts' forward on them (the GEMM
// reading fp8 rows) equal to the forward on the dequantised rows, bit for bit.
for (const [ci, c] of [
  { name: 'fp8 kept, dropless', pad: false },
  { name: 'fp8 kept, capacity', pad: true, cf: 1.0 },
].entries()) {
  tidy(() => {
    const [E, k, H, F] = [4 * P, 2, 256, 128];
    const T = c.pad ? 40 : 37 + 5 * rank;
    const indices = Tensor.fromArray(routing(T, k, E, seed + 313 * ci, false), { dtype: 'i32', shape: [T, k], ...on });
    const weights = Tensor.rand([T, k], { seed: seed + 11, ...on });
    const x = Tensor.randn([T, H], { seed: seed + 12, ...on }).cast('bf16');
    const cap = capacity(indices, weights, { numExperts: E, ...(c.cf ? { capacityFactor: c.cf } : {}) });
    const common = { numExperts: E, group: world, padToCapacity: c.pad };
    const ipcKeep = new Dispatcher({ ...common, fp8: 'keep', transport: 'ipc' });
    const refKeep = new Dispatcher({ ...common, fp8: 'keep', transport: 'nccl' });
    const ipcDeq = new Dispatcher({ ...common, fp8: true, transport: 'ipc' });
    const what = `${c.name} (rank ${rank} of ${P}, seed ${seed})`;
    const before = cuda.hostWaitCounts();
    const A = ipcKeep.dispatch(x, indices, weights, cap);
    const waits = cuda.hostWaitCounts();
    if (c.pad)
      check(
        waits.deviceToHost === before.deviceToHost && waits.synchronizations === before.synchronizations,
        `${what}: capacity-mode dispatch waited on the host`,
      );
    const B = refKeep.dispatch(x, indices, weights, cap);
    const D = ipcDeq.dispatch(x, indices, weights, cap);
    check(A.rows.dtype === 'fp8e4m3' && A.scales?.dtype === 'f32' && B.scales !== undefined, `${what}: kept rows are ${A.rows.dtype}`);
    check(A.scales.shape.join() === `${A.rows.shape[0]},${H / 128}`, `${what}: scales [${A.scales.shape}]`);
    check(bits(A.rows).equals(bits(B.rows)) && bits(A.scales).equals(bits(B.scales)), `${what}: kept rows differ from the all-to-all's`);
    check(bits(A.weights).equals(bits(B.weights)), `${what}: gate weights differ from the all-to-all's`);
    const deq = dequantizeFp8({ q: A.rows, scales: A.scales }, 'bf16');
    check(bits(deq).equals(bits(D.rows)), `${what}: dequantised kept rows differ from the fp8: true rows`);
    // The experts on the kept rows, the first GEMM reading them as they are.
    const El = E / P;
    const w13 = Tensor.randn([El, H, 2 * F], { seed: seed + 13, std: 0.05, ...on }).cast('bf16');
    const w2 = Tensor.randn([El, F, H], { seed: seed + 14, std: 0.05, ...on }).cast('bf16');
    const fKeep = expertsForward({ q: A.rows, scales: A.scales }, w13, w2, A.handle.localOffsets);
    const fDeq = expertsForward(D.rows, w13, w2, D.handle.localOffsets);
    check(bits(fKeep.out).equals(bits(fDeq.out)) && bits(fKeep.g).equals(bits(fDeq.g)), `${what}: experts on kept rows differ`);
    const y = ipcKeep.combine(fKeep.out, A.handle, weights);
    const yRef = ipcDeq.combine(fDeq.out, D.handle, weights);
    check(bits(y).equals(bits(yRef)), `${what}: combine after the kept rows' experts differs`);
    progress(`${c.name}`);
    for (const d of [A, B, D]) d.handle.dispose();
    ipcKeep.dispose();
    refKeep.dispose();
    ipcDeq.dispose();
  });
}

// Dropless token counts growing past the buffers (the transport regrows collectively), and many
// steps in a row (step-numbered flags, no clearing).
tidy(() => {
  const E = 4 * P,
    k = 2,
    H = 64;
  const d = new Dispatcher({ numExperts: E, group: world, transport: 'ipc' });
  for (let step = 0; step < 12; step++) {
    tidy(() => {
      const T = [37, 900, 64, 2500, 5, 3000][step % 6] + 13 * rank;
      const indices = Tensor.fromArray(routing(T, k, E, seed + 977 * step, false), { dtype: 'i32', shape: [T, k], ...on });
      const weights = Tensor.rand([T, k], { seed: seed + step, ...on });
      const x = Tensor.randn([T, H], { seed: seed + 50 + step, ...on }).cast('bf16');
      const cap = capacity(indices, weights, { numExperts: E });
      const { rows, handle } = d.dispatch(x, indices, weights, cap);
      const y = d.combine(rows, handle, weights);
      const wv = vals(weights),
        xv = vals(x);
      const expect = xv.map((v, i) => {
        const t = Math.floor(i / H);
        return v * (wv[t * k] + wv[t * k + 1]);
      });
      check(relErr(vals(y), expect) < 1e-2, `growth step ${step} (T ${T}, rank ${rank}, seed ${seed}): relErr ${relErr(vals(y), expect)}`);
      handle.dispose();
    });
  }
  d.dispose();
});
progress('growth and repeated steps');
synchronize(device);
world.barrier();
console.log(`ok rank ${rank} of ${P}`);
