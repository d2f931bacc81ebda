// MoEInference across ranks on the GPU: test/mpi/serve-ep.mjs with 2 and 4 ranks sharing one GPU
// (CUDA IPC between processes; the MPI communicator only exchanges the transport's handles). The
// low-latency path (capacity mode through the peer-memory transport) at EP = P equals EP = 1 on the
// same weights; captureDecode on every rank; replays equal eager steps over rounds of new inputs,
// interleaved with them; ten replays in a row wait for nothing and allocate nothing; the transport
// growing recaptures the graphs; dropless and the NCCL/MPI fallback refuse capture saying why; and a
// rank killed after capture makes the others' next forward throw a TimeoutError within the timeout.
// Cross-process spin-waits on one GPU progress by time slicing unless the MPS daemon runs
// (scripts/device-session.sh starts it): slower, same results.
import { describe, expect, it } from 'vitest';

import { native } from '../../lib/native.js';
import { hasMpirun, mpirun } from '../mpi/mpirun.js';
import { hasGpu } from './gpu.js';

const hasMpi = hasGpu && native().mpiStatus(true).loaded;
const oneGpu = {
  CUDA_VISIBLE_DEVICES: (process.env['CUDA_VISIBLE_DEVICES'] ?? '0').split(',')[0] ?? '0',
  MOE_EP_TEST_PROGRESS: '1',
  MOE_EP_CRASH_BACKTRACE: '1',
};

describe.skipIf(!(hasGpu && hasMpirun && hasMpi))('MoEInference across ranks sharing one GPU (low-latency path, CUDA graphs)', () => {
  for (const P of [2, 4]) {
    it(`${P} ranks: EP=${P} equals EP=1; captured decode steps replay the eager step bit for bit, without host waits or allocations; refusals say why`, () => {
      const r = mpirun(P, 'serve-ep.mjs', 300_000, ['--device', 'cuda'], oneGpu);
      expect(r.status, r.out).toBe(0);
      for (let k = 0; k < P; k++) expect(r.out).toContain(`ok rank ${k} of ${P}`);
    }, 360_000);
  }

  it('a rank killed (SIGKILL) after capture: the others get a TimeoutError from their next forward within the 3 s timeout', () => {
    const r = mpirun(2, 'serve-ep.mjs', 120_000, ['--device', 'cuda', '--kill'], { ...oneGpu, OMPI_MCA_orte_enable_recovery: '1' });
    const m = /rank 0 after (\d+) ms: TimeoutError: (.*)/.exec(r.out);
    expect(m, r.out).not.toBeNull();
    expect(Number(m![1]), r.out).toBeLessThan(8000);
    expect(m![2], r.out).toMatch(/MoEInference\.forward.*peer-memory transport/);
  }, 150_000);
});
