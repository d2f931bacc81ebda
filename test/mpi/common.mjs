// Shared by the scripts mpirun starts (see run.test.ts): assertions that exit non-zero with a message.
export function check(cond, message) {
  if (!cond) {
    console.error(`FAIL rank ${process.env.OMPI_COMM_WORLD_RANK ?? process.env.PMI_RANK ?? '?'}: ${message}`);
    process.exit(1);
  }
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
