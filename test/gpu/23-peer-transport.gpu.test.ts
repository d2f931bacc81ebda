// The peer-memory ('ipc') transport with several ranks sharing one GPU (CUDA IPC between
// processes; the MPI communicator only exchanges the buffers' handles): test/mpi/peer.mjs against
// the all-to-all path at 2 and 4 ranks, the EP layer at 4 ranks against one rank (test/mpi's
// moe-layer.mjs; 2 ranks run in test 21, also through 'ipc'), a rank dispatching another T in
// capacity mode (test/mpi/peer-tokens.mjs), and a rank that stops or dies mid-step (also with the
// others then dispatching another T: still a TimeoutError naming it, not a token mismatch).
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

describe.skipIf(!(hasGpu && hasMpirun && hasMpi))('the peer-memory transport, ranks sharing one GPU', () => {
  for (const P of [2, 4]) {
    it(`${P} ranks: dispatch, combine and both backward passes equal the all-to-all's (bf16, f32, fp8, capacity, align, crafted routing), capacity mode waits for nothing on the host, dropless buffers regrow`, () => {
      const r = mpirun(P, 'peer.mjs', 300_000, ['--device', 'cuda'], oneGpu);
      expect(r.status, r.out).toBe(0);
      for (let k = 0; k < P; k++) expect(r.out).toContain(`ok rank ${k} of ${P}`);
    }, 360_000);
  }

  it('4 ranks: the EP=4 layer (through ipc) equals the one-rank CPU layer forward and backward, with and without a comm stream', () => {
    const r = mpirun(4, 'moe-layer.mjs', 300_000, ['--device', 'cuda'], oneGpu);
    expect(r.status, r.out).toBe(0);
    for (let k = 0; k < 4; k++) expect(r.out).toContain(`ok rank ${k} of 4`);
  }, 360_000);

  for (const P of [2, 4]) {
    it(`${P} ranks, capacity mode: the last rank dispatching half the others' tokens ends every rank in an InvalidArgumentError naming the ranks and both counts, and later calls refuse`, () => {
      const r = mpirun(P, 'peer-tokens.mjs', 120_000, ['--device', 'cuda'], oneGpu);
      expect(r.status, r.out).toBe(0);
      for (let k = 0; k < P; k++) expect(r.out).toContain(`ok rank ${k} of ${P}`);
    }, 180_000);
  }

  // Frozen (SIGSTOP) in dropless and capacity mode, and killed (SIGKILL: mpirun must then leave the
  // others running, which its recovery mode does).
  const faults: { name: string; args: string[]; env: Record<string, string> }[] = [
    { name: 'a rank frozen mid-step', args: [], env: {} },
    { name: 'a rank frozen mid-step (capacity mode)', args: ['--capacity'], env: {} },
    // The frozen rank's mail still holds the previous step's T: not a token mismatch.
    { name: 'a rank frozen mid-step (capacity mode), the others dispatching another T', args: ['--capacity', '--other-t'], env: {} },
    { name: 'a rank killed mid-step (SIGKILL)', args: ['--stop', 'kill'], env: { OMPI_MCA_orte_enable_recovery: '1' } },
  ];
  for (const f of faults) {
    it(`${f.name}: the others end in a TimeoutError naming it within the 3 s timeout`, () => {
      const r = mpirun(2, 'peer-fault.mjs', 60_000, ['--device', 'cuda', ...f.args], { ...oneGpu, ...f.env });
      const m = /rank 0 after (\d+) ms: TimeoutError: (.*)/.exec(r.out);
      expect(m, r.out).not.toBeNull();
      expect(Number(m![1]), r.out).toBeLessThan(8000);
      expect(m![2], r.out).toMatch(/peer-memory transport.*waiting for rank\(s\) 1/);
    }, 90_000);
  }
});
