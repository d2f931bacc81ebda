// Kernel switches (lib/kernel-options.ts): the environment read once at load as the starting values,
// setKernelOptions over them, every value reaching the addon, bad names and values refused. The
// kernels they choose run on the GPU only (test/gpu/10-router, test/gpu/12-grouped-gemm).
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';

import { afterEach, describe, expect, it } from 'vitest';

import {
  InvalidArgumentError,
  kernelOptionDefaults,
  type KernelOptions,
  kernelOptions,
  kernelOptionsFromEnvironment,
  resetKernelOptions,
  setKernelOptions,
} from '../lib/index.js';
import { native, packageRoot } from '../lib/native.js';

// Every measured winner on (the decode kernel included). The losing variants have no switch: they
// live in benchmarks/kernels/grouped_gemm/.
const defaults: KernelOptions = {
  groupedGemm: { hopper: true, fewRows: true, decode: true, skinny: true, bResident: true, trimTails: true, splitRows: true },
  router: { fast: true, pdl: true },
};

describe('kernel switches', () => {
  afterEach(() => {
    resetKernelOptions();
  });

  it('default to every measured winner on', () => {
    expect(kernelOptionDefaults).toEqual(defaults);
    expect(kernelOptionsFromEnvironment({})).toEqual(defaults);
  });

  it("take their starting values from the environment: '0' is off, '1' on, anything else leaves the default", () => {
    expect(
      kernelOptionsFromEnvironment({
        MOE_EP_GG_HOPPER: '0',
        MOE_EP_GG_FEW_ROWS: '1',
        MOE_EP_GG_B_RESIDENT: '0',
        MOE_EP_GG_TRIM_TAILS: '0',
        MOE_EP_GG_SPLIT_ROWS: '0',
        MOE_EP_ROUTER_FAST: 'no',
        MOE_EP_PDL: '0',
      }),
    ).toEqual({
      groupedGemm: { hopper: false, fewRows: true, decode: true, skinny: true, bResident: false, trimTails: false, splitRows: false },
      router: { fast: true, pdl: false },
    });
    expect(
      kernelOptionsFromEnvironment({
        MOE_EP_GG_FEW_ROWS: '0',
        MOE_EP_GG_PINGPONG: '1',
        MOE_EP_ROUTER_FAST: '0',
        MOE_EP_GG_DECODE: '0',
        MOE_EP_GG_FUSED_HANDOFF: '0',
        MOE_EP_GG_SKINNY: '0',
      }),
    ).toEqual({
      groupedGemm: { hopper: true, fewRows: false, decode: false, skinny: false, bResident: true, trimTails: true, splitRows: true },
      router: { fast: false, pdl: true },
    });
    expect(kernelOptionsFromEnvironment({ MOE_EP_GG_DECODE: 'yes' }).groupedGemm.decode).toBe(true);
    expect(kernelOptionsFromEnvironment({ MOE_EP_GG_SKINNY: 'off' }).groupedGemm.skinny).toBe(true);
  });

  it('setKernelOptions changes the switches named, keeps the others, reaches the addon, and returns what was in force', () => {
    const start = kernelOptions();
    expect(native().kernelOptions()).toEqual(start);
    const before = setKernelOptions({ groupedGemm: { hopper: false, decode: !start.groupedGemm.decode }, router: { pdl: false } });
    expect(before).toEqual(start);
    const now = {
      groupedGemm: { ...start.groupedGemm, hopper: false, decode: !start.groupedGemm.decode },
      router: { ...start.router, pdl: false },
    };
    expect(kernelOptions()).toEqual(now);
    expect(native().kernelOptions()).toEqual(now);
    setKernelOptions({ router: { fast: false } });
    expect(native().kernelOptions()).toEqual({ ...now, router: { ...now.router, fast: false } });
    setKernelOptions({ groupedGemm: { fewRows: !start.groupedGemm.fewRows } });
    expect(native().kernelOptions().groupedGemm).toEqual({ ...now.groupedGemm, fewRows: !start.groupedGemm.fewRows });
    setKernelOptions({ groupedGemm: { skinny: !start.groupedGemm.skinny } });
    expect(native().kernelOptions().groupedGemm).toEqual({
      ...now.groupedGemm,
      fewRows: !start.groupedGemm.fewRows,
      skinny: !start.groupedGemm.skinny,
    });
    setKernelOptions({ groupedGemm: { trimTails: !start.groupedGemm.trimTails } });
    expect(native().kernelOptions().groupedGemm).toEqual({
      ...now.groupedGemm,
      fewRows: !start.groupedGemm.fewRows,
      skinny: !start.groupedGemm.skinny,
      trimTails: !start.groupedGemm.trimTails,
    });
    setKernelOptions({ groupedGemm: { splitRows: !start.groupedGemm.splitRows } });
    expect(native().kernelOptions().groupedGemm).toEqual({
      ...now.groupedGemm,
      fewRows: !start.groupedGemm.fewRows,
      skinny: !start.groupedGemm.skinny,
      trimTails: !start.groupedGemm.trimTails,
      splitRows: !start.groupedGemm.splitRows,
    });
    setKernelOptions(before);
    expect(native().kernelOptions()).toEqual(start);
    // kernelOptions() hands out a copy
    const copy = kernelOptions();
    copy.groupedGemm.fewRows = !copy.groupedGemm.fewRows;
    expect(kernelOptions()).toEqual(start);
  });

  it('refuses unknown names and values that are not booleans, changing nothing', () => {
    const start = kernelOptions();
    const bad: [unknown, RegExp][] = [
      [{ grouped_gemm: { hopper: false } }, /unknown option 'grouped_gemm' \(did you mean 'groupedGemm'\?\)/],
      [{ groupedGemm: { hoper: false } }, /groupedGemm: unknown option 'hoper' \(did you mean 'hopper'\?\)/],
      [{ router: { fast: 0 } }, /'router\.fast' must be a boolean; received 0/],
      [{ router: { pdl: null } }, /'router\.pdl' must be a boolean; received null/],
      [{ groupedGemm: { hopper: false }, router: { tile: 32 } }, /router: unknown option 'tile'/],
      // the switches whose losing kernels moved to the ladder: unknown now, and said to be retired
      [
        { groupedGemm: { pingpong: true } },
        /groupedGemm: unknown option 'pingpong'; expected 'hopper', 'fewRows', 'decode', 'skinny', 'bResident', 'trimTails', 'splitRows'; 'pingpong' chose between kernel variants until the slower one left the addon/,
      ],
      [
        { groupedGemm: { fusedHandoff: false } },
        /groupedGemm: unknown option 'fusedHandoff'.*'fusedHandoff' chose between kernel variants/,
      ],
      [{ groupedGemm: { pingpong: false, fusedHandoff: true } }, /unknown options 'pingpong', 'fusedHandoff'/],
      [null, /'options' must be an object/],
    ];
    for (const [update, message] of bad) {
      expect(() => setKernelOptions(update as never)).toThrow(InvalidArgumentError);
      expect(() => setKernelOptions(update as never)).toThrow(message);
      expect(kernelOptions()).toEqual(start);
      expect(native().kernelOptions()).toEqual(start);
    }
  });

  it('the raw binding takes every switch and refuses a missing or mistyped one, naming it', () => {
    expect(() => native().setKernelOptions({ groupedGemm: { hopper: true }, router: defaults.router } as never)).toThrow(
      /setKernelOptions: 'groupedGemm.fewRows' must be a boolean/,
    );
    expect(() => native().setKernelOptions({ groupedGemm: { hopper: true, fewRows: true }, router: defaults.router } as never)).toThrow(
      /setKernelOptions: 'groupedGemm.decode' must be a boolean/,
    );
    expect(() =>
      native().setKernelOptions({ groupedGemm: { hopper: true, fewRows: true, decode: true }, router: defaults.router } as never),
    ).toThrow(/setKernelOptions: 'groupedGemm.skinny' must be a boolean/);
    expect(() =>
      native().setKernelOptions({
        groupedGemm: { hopper: true, fewRows: true, decode: true, skinny: true },
        router: defaults.router,
      } as never),
    ).toThrow(/setKernelOptions: 'groupedGemm.bResident' must be a boolean/);
    expect(() =>
      native().setKernelOptions({
        groupedGemm: { hopper: true, fewRows: true, decode: true, skinny: true, bResident: true },
        router: defaults.router,
      } as never),
    ).toThrow(/setKernelOptions: 'groupedGemm.trimTails' must be a boolean/);
    expect(() => native().setKernelOptions({ groupedGemm: defaults.groupedGemm } as never)).toThrow(
      /setKernelOptions: 'router' must be an object/,
    );
    expect(() => native().setKernelOptions({ ...defaults, router: { fast: true, pdl: 1 } } as never)).toThrow(
      /'router.pdl' must be a boolean/,
    );
  });

  // Until session 31 a worker could load the package beside this thread and share the switches; its
  // load overwrote the addon's process-wide bindings, and using tensors on both threads crashed the
  // process. A second thread is now refused while this one holds the addon (test 05, "worker threads").
  it('a worker thread that loads the package while this thread holds the addon is refused, and the switches here stay', async () => {
    const start = kernelOptions();
    setKernelOptions({ groupedGemm: { decode: !start.groupedGemm.decode } });
    const index = pathToFileURL(join(packageRoot(), 'dist', 'lib', 'index.js')).href;
    const code = `const { parentPort } = require('node:worker_threads');
      import(${JSON.stringify(index)}).then((m) => {
        try {
          m.setKernelOptions({ groupedGemm: { skinny: !m.kernelOptions().groupedGemm.skinny } });
          parentPort.postMessage({ loaded: true });
        } catch (e) {
          parentPort.postMessage({ error: String(e) });
        }
      }, (e) => parentPort.postMessage({ error: String(e) }));`;
    const worker = new Worker(code, { eval: true, env: { ...process.env, MOE_EP_GG_DECODE: start.groupedGemm.decode ? '1' : '0' } });
    const seen = await new Promise<{ loaded?: boolean; error?: string }>((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
    });
    await worker.terminate();
    expect(seen.error).toMatch(/the addon is already in use by another JavaScript thread of this process/);
    const now = kernelOptions();
    expect(now.groupedGemm.decode).toBe(!start.groupedGemm.decode);
    expect(now.groupedGemm.skinny).toBe(start.groupedGemm.skinny);
    expect(native().kernelOptions()).toEqual(now);
    setKernelOptions({ groupedGemm: { decode: start.groupedGemm.decode } });
  });

  it('a fresh process starts from its environment before any op runs, and names retired switches once', () => {
    const index = join(packageRoot(), 'dist', 'lib', 'index.js');
    const native_ = join(packageRoot(), 'dist', 'lib', 'native.js');
    const script = `const m = await import(${JSON.stringify(index)}); const n = await import(${JSON.stringify(native_)});
      console.log(JSON.stringify({ ts: m.kernelOptions(), addon: n.native().kernelOptions() }));`;
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      MOE_EP_GG_FEW_ROWS: '0',
      MOE_EP_GG_PINGPONG: '1',
      MOE_EP_GG_FUSED_HANDOFF: '0',
      MOE_EP_ROUTER_FAST: '0',
      MOE_EP_GG_DECODE: '0',
      MOE_EP_GG_SKINNY: '0',
      MOE_EP_GG_B_RESIDENT: '0',
      MOE_EP_GG_TRIM_TAILS: '0',
      MOE_EP_GG_SPLIT_ROWS: '0',
      MOE_EP_GG_HOPPER_HANDOFF: '1',
      MOE_EP_GG_TILE: '32',
    };
    delete env['MOE_EP_GG_HOPPER'];
    delete env['MOE_EP_PDL'];
    delete env['MOE_EP_GG_HOPPER_STAGED'];
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { env, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const expected = {
      groupedGemm: { hopper: true, fewRows: false, decode: false, skinny: false, bResident: false, trimTails: false, splitRows: false },
      router: { fast: false, pdl: true },
    };
    expect(JSON.parse(r.stdout)).toEqual({ ts: expected, addon: expected });
    expect(r.stderr).toMatch(
      /MOE_EP_GG_TILE, MOE_EP_GG_HOPPER_HANDOFF, MOE_EP_GG_PINGPONG, MOE_EP_GG_FUSED_HANDOFF no longer switch anything/,
    );
    expect(r.stderr.match(/no longer switch/g)).toHaveLength(1);
  });
});
