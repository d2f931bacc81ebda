// `node stop-after.mjs <ms> <moe-ep arguments...>`: runs the moe-ep CLI and freezes this process
// (SIGSTOP) after <ms> milliseconds, at the next turn of the event loop (between training steps):
// a rank that hangs mid-run, for test/mpi/run.test.ts. It prints its pid so that the test can
// kill it if the launcher did not.
import { fileURLToPath } from 'node:url';

const [ms, ...args] = process.argv.slice(2);
const main = fileURLToPath(new URL('../../dist/lib/cli/main.js', import.meta.url));
process.argv = [process.argv[0], main, ...args];
setTimeout(() => {
  console.log(`pid ${process.pid} stopping`);
  process.kill(process.pid, 'SIGSTOP');
}, Number(ms));
await import(main);
