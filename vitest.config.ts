import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Native code and child processes: one file at a time keeps memory stats per file meaningful.
    fileParallelism: false,
    testTimeout: 60_000,
  },
});
