// Shared by the scripts mpirun starts (see run.test.ts): assertions that exit non-zero with a message.
export function check(cond, message) {
  if (!cond) {
    console.error(`FAIL rank ${process.env.OMPI_COMM_WORLD_RANK ?? process.env.PMI_RANK ?? '?'}: ${message}`);
    process.exit(1);
  }
}
/**
 * With MOE_EP_TEST_PROGRESS=1 (test/gpu/21 sets it): "rank R: <stage> done" on stderr, so a run that
 * dies of a signal (no JS error, no "ok rank") shows the last stage each rank completed. Writes to
 * a pipe are synchronous in Node on Linux, so the line is out before whatever comes next.
 */
const progressOn = !!process.env.MOE_EP_TEST_PROGRESS && process.env.MOE_EP_TEST_PROGRESS !== '0';
export function progress(stage) {
  if (progressOn) console.error(`rank ${process.env.OMPI_COMM_WORLD_RANK ?? process.env.PMI_RANK ?? '?'}: ${stage} done`);
}
export function same(actual, expected, what) {
  const a = JSON.stringify(Array.from(actual, Number));
  const e = JSON.stringify(Array.from(expected, Number));
  check(a === e, `${what}: got ${a}, expected ${e}`);
}
export function sleepMs(ms) {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}
export function expectThrow(fn, cls, pattern, what) {
  try {
    fn();
  } catch (e) {
    check(e instanceof cls, `${what}: threw ${e?.name} (${e?.message}), expected ${cls.name}`);
    check(pattern.test(e.message), `${what}: message ${JSON.stringify(e.message)} does not match ${pattern}`);
    return e;
  }
  check(false, `${what}: did not throw`);
}
/**
 * The device a script runs on: `--device cpu` (default) or `--device cuda` (the default device
 * init() chose from the local rank; several ranks may share one GPU, through the MPI backend).
 */
export async function scriptDevice(world) {
  const i = process.argv.indexOf('--device');
  const want = i > 0 ? process.argv[i + 1] : 'cpu';
  check(want === 'cpu' || want === 'cuda', `--device must be cpu or cuda; received ${want}`);
  if (want === 'cpu') return { device: 'cpu', gpu: false };
  const { cuda, getDefaultDevice } = await import('../../dist/lib/index.js');
  check(cuda.isAvailable(), `--device cuda: no usable GPU (${cuda.unavailableReason()})`);
  const device = getDefaultDevice().toString();
  check(device.startsWith('cuda:'), `--device cuda: init() left the default device at ${device}`);
  // NCCL refuses two ranks on one GPU: init() must have picked MPI, which stages through pinned memory.
  if (world.size > cuda.deviceCount())
    check(world.backend === 'mpi', `${world.size} ranks share ${cuda.deviceCount()} GPU(s) but init() chose ${world.backend}`);
  return { device, gpu: true };
}

/**
 * `--transport auto|ipc|nccl` (default auto): how the scripts' dispatchers and layers move rows
 * (lib/moe/dispatcher.ts). With one GPU per rank and peer access, 'auto' takes 'ipc', so a run
 * that must cover NCCL asks for it. Returns the value and the config fragment to spread into a
 * Dispatcher, MoELayer or train config ({} for auto).
 */
export function scriptTransport() {
  const i = process.argv.indexOf('--transport');
  const transport = i > 0 ? process.argv[i + 1] : 'auto';
  check(['auto', 'ipc', 'nccl'].includes(transport), `--transport must be auto, ipc or nccl; received ${transport}`);
  return { transport, config: transport === 'auto' ? {} : { transport } };
}

/**
 * The transport a dispatcher used, checked against the one asked for: 'ipc' must be 'ipc'; 'nccl'
 * is the communicator's all-to-all ('nccl', or 'mpi' when the communicator is MPI).
 */
export function checkTransport(dispatcher, asked, what) {
  const used = dispatcher.transport;
  if (asked === 'ipc') check(used === 'ipc', `${what}: --transport ipc but rows went through ${used}`);
  if (asked === 'nccl') check(used === 'nccl' || used === 'mpi', `${what}: --transport nccl but rows went through ${used}`);
  return used;
}

/** The arguments that are not `--name value` options (e.g. checkpoint.mjs's mode and paths). */
export function positionalArgs(options = ['--device', '--transport']) {
  const all = process.argv.slice(2);
  return all.filter((a, i) => !options.includes(a) && !options.includes(all[i - 1]));
}

/** Relative error in norm, ‖a − b‖ / ‖b‖ (the same measure as test/helpers.ts's relErr). */
export function relErr(a, b) {
  let num = 0,
    den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i] - b[i]) ** 2;
    den += b[i] ** 2;
  }
  return Math.sqrt(num / Math.max(den, 1e-30));
}
