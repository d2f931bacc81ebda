#!/usr/bin/env node
// Turns a vitest JSON report into the committed summary of a GPU test run:
//   node scripts/gpu-test-summary.mjs <vitest-report.json> <out.json>
// with the commit (MOE_EP_COMMIT, since the GPU machine gets no .git), GPU, driver, CUDA, NCCL,
// Node and the counts passed/failed/skipped. Prints the closing line "N passed, N failed".
import { readFileSync, writeFileSync } from 'node:fs';

import { info } from '../dist/lib/index.js';

const [reportPath, outPath] = process.argv.slice(2);
const report = JSON.parse(readFileSync(reportPath, 'utf8'));
const tests = report.testResults.flatMap((f) =>
  f.assertionResults.map((a) => ({
    file: f.name.replace(/^.*\/test\//, 'test/'),
    name: a.fullName,
    status: a.status,
    failure: a.failureMessages?.[0]?.split('\n')[0],
  })),
);
const count = (s) => tests.filter((t) => t.status === s).length;
const i = info();
const summary = {
  kind: 'gpu-tests',
  date: new Date().toISOString(),
  commit: process.env.MOE_EP_COMMIT ?? 'unknown',
  command: process.env.MOE_EP_TEST_COMMAND ?? 'npm run test:gpu',
  machine: process.env.MOE_EP_MACHINE ?? 'unknown',
  gpus: i.cuda.devices.map((d) => `${d.name} (${(d.totalMemory / 2 ** 30).toFixed(0)} GiB, cc ${d.computeCapability})`),
  driver: i.cuda.driverVersion,
  cudaRuntime: i.cuda.runtimeVersion,
  addon: { backend: i.addon.backend, architectures: i.addon.cudaArchitectures, ncclAbiChecked: i.addon.ncclAbiChecked },
  nccl: i.nccl.loaded ? `${i.nccl.versionString} (${i.nccl.path})` : `not loaded: ${i.nccl.error.split('\n')[0]}`,
  node: process.version,
  passed: count('passed'),
  failed: count('failed'),
  skipped: count('skipped') + count('pending') + count('todo'),
  failures: tests.filter((t) => t.status === 'failed'),
  files: [...new Set(tests.map((t) => t.file))],
};
writeFileSync(outPath, JSON.stringify(summary, null, 2) + '\n');
console.log(`gpu tests: ${summary.passed} passed, ${summary.failed} failed, ${summary.skipped} skipped on ${summary.gpus.join(', ')}`);
