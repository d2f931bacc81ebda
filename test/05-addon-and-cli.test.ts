// The addon loads with no GPU, driver or NCCL; what is missing is reported with where it looked;
// `moe-ep info` describes the installation. Run in child processes, as a user would.
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import { UnavailableError } from '../lib/index.js';
import { native, packageRoot } from '../lib/native.js';

const root = packageRoot();
const cli = join(root, 'dist', 'lib', 'cli', 'main.js');

function run(args: string[], env: Record<string, string> = {}): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [cli, ...args], { env: { ...process.env, ...env }, encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('moe-ep info', () => {
  it('reports the backend, the GPUs or why there are none, NCCL and MPI', () => {
    const r = run(['info']);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/^moe-ep \d+\.\d+\.\d+/);
    expect(r.stdout).toMatch(/backend +(cuda|cpu)/);
    if (native().cudaStatus().deviceCount === 0) expect(r.stdout).toMatch(/GPUs +none: .+/);
    else expect(r.stdout).toMatch(/GPU 0 +.+compute capability \d\.\d/);
    expect(r.stdout).toMatch(/NCCL +(\d+\.\d+\.\d+ from \/|not loaded: |not loaded, not needed without GPUs)/);
    expect(r.stdout).toMatch(/MPI +/);
  });

  it('--json gives the same facts as data', () => {
    const r = run(['info', '--json']);
    expect(r.status, r.stderr).toBe(0);
    const i = JSON.parse(r.stdout) as { addon: { backend: string }; cuda: { devices: unknown[]; unavailable: string } };
    expect(['cpu', 'cuda']).toContain(i.addon.backend);
    if (i.cuda.devices.length === 0) expect(i.cuda.unavailable.length).toBeGreaterThan(10);
  });

  it('--version prints the package version', () => {
    const version = (JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { version: string }).version;
    for (const flag of ['--version', '-v']) expect(run([flag]).stdout).toBe(`${version}\n`);
  });

  it('--help works on every command and subcommand, within 100 columns', () => {
    const helps: [string[], RegExp][] = [
      [['--help'], /^usage: moe-ep <command>/],
      [['train', '--help'], /^usage: moe-ep train /],
      [['info', '--help'], /^usage: moe-ep info \[--json\]/],
      [['ckpt', '--help'], /^usage: moe-ep ckpt <command>/],
      [['ckpt', 'inspect', '--help'], /^usage: moe-ep ckpt inspect <dir>[\s\S]*--no-verify +skip reading/],
      [['ckpt', 'reshard', '--help'], /^usage: moe-ep ckpt reshard <dir>[\s\S]*--ep N +the new expert-parallel size/],
      [['hf', '--help'], /^usage: moe-ep hf inspect <dir>/],
      [['hf', 'inspect', '--help'], /^usage: moe-ep hf inspect <dir> \[--json\] \[--ranks P\][\s\S]*--ranks P +the expert weights/],
    ];
    for (const [args, pattern] of helps) {
      const r = run(args);
      expect(r.status, args.join(' ')).toBe(0);
      expect(r.stdout).toMatch(pattern);
      for (const line of r.stdout.split('\n')) expect([...line].length, `${args.join(' ')}: ${line}`).toBeLessThanOrEqual(100);
    }
  });

  it('an unknown command fails with usage', () => {
    const r = run(['frobnicate']);
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/unknown command 'frobnicate'[\s\S]*usage: moe-ep/);
  });

  it('unknown options and stray arguments fail with usage rather than being ignored', () => {
    const typo = run(['info', '--jsn']);
    expect(typo.status).toBe(2);
    expect(typo.stderr).toMatch(/unknown option --jsn \(did you mean --json\?\)[\s\S]*usage: moe-ep info \[--json\]/);
    expect(run(['info', 'extra']).stderr).toMatch(/unexpected argument extra/);
    const inspect = run(['ckpt', 'inspect', '/nonexistent', '--verbose']);
    expect(inspect.status).toBe(2);
    expect(inspect.stderr).toMatch(/unknown option --verbose/);
    expect(run(['ckpt', 'reshard', '/a', '/b', '--ep', '2', '--out', '/c']).stderr).toMatch(/unexpected argument \/b/);
    // Exit 2 for every command line that cannot be read, the usage on stderr; 1 for a failure.
    for (const args of [
      [],
      ['ckpt'],
      ['ckpt', 'inspect'],
      ['ckpt', 'reshard', '/a', '--ep'],
      ['train', 'stray'],
      ['train', '--steps'],
      ['train', '--config'],
      ['info', 'extra'],
      ['hf'],
      ['hf', 'inspect'],
      ['hf', 'inspect', '/a', '/b'],
      ['hf', 'inspect', '/a', '--ranks'],
    ]) {
      const r = run(args);
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stdout, args.join(' ')).toBe('');
    }
    expect(run([]).stderr).toMatch(/^usage: moe-ep <command>/);
    expect(run(['train', 'stray']).stderr).toMatch(/unexpected argument 'stray'/);
  });
});

describe('loading the addon', () => {
  it('a bad MOE_EP_ADDON path gives one error with possible solutions', () => {
    const r = run(['info'], { MOE_EP_ADDON: '/nonexistent/moe_ep.node' });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/native addon could not be loaded[\s\S]*MOE_EP_ADDON=\/nonexistent[\s\S]*Possible solutions/);
    expect(r.stderr).not.toMatch(/moe-ep: moe-ep:/);
  });

  it('loads with no GPU visible and says so', () => {
    const out = execFileSync(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        `import { info } from ${JSON.stringify(join(root, 'dist/lib/index.js'))}; console.log(JSON.stringify(info().cuda));`,
      ],
      { env: { ...process.env, CUDA_VISIBLE_DEVICES: '' }, encoding: 'utf8' },
    );
    const c = JSON.parse(out) as { devices: unknown[]; unavailable: string };
    expect(c.devices).toEqual([]);
    expect(c.unavailable).toMatch(/no CUDA device|no NVIDIA driver|without CUDA|driver/);
  });
});

// Found by probing (session 31): a worker thread loading the addon beside the main thread overwrote
// its process-wide bindings, and both crashed (SIGSEGV, or V8's HandleScope abort).
describe('worker threads', () => {
  const lib = JSON.stringify(join(root, 'dist/lib/index.js'));
  const node = (code: string) =>
    spawnSync(process.execPath, ['--input-type=module', '-e', code], {
      encoding: 'utf8',
      timeout: 60_000,
      env: { ...process.env, CUDA_VISIBLE_DEVICES: '' },
    });
  const sumIn = (m: string, values: string) => `Array.from(${m}.ops.sum(${m}.Tensor.fromArray(${values}, { device: 'cpu' }), 0).toArray())`;

  it('a second thread using the addon at the same time is refused by name; the first keeps working', () => {
    const r = node(`import * as m from ${lib};
      import { Worker } from 'node:worker_threads';
      const a = m.Tensor.fromArray([1, 2], { device: 'cpu' });
      const w = new Worker(\`import * as m from ${lib.replace(/\\/g, '\\\\')};
        try { m.Tensor.zeros([4], { device: 'cpu' }); console.log('worker loaded'); } catch (e) { console.log('worker: ' + e.constructor.name + ' ' + e.message); }\`, { eval: true, type: 'module' });
      const t0 = Date.now();
      while (Date.now() - t0 < 300) m.Tensor.zeros([4], { device: 'cpu' }).clone().dispose();
      w.on('exit', () => console.log('main: ' + ${sumIn('m', '[1, 2]')}.join() + ' ' + Array.from(a.toArray()).join()));`);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/worker: UnavailableError moe-ep: the addon is already in use by another JavaScript thread of this process/);
    expect(r.stdout).toContain('main: 3 1,2');
  });

  it('a thread refused while a worker holds the addon gets it once the worker exits (the worker took it first); errors keep their classes', () => {
    const r = node(`import { Worker } from 'node:worker_threads';
      const m = await import(${lib});
      const w = new Worker(\`import * as m from ${lib}; import { parentPort } from 'node:worker_threads';
        globalThis.kept = m.Tensor.zeros([1], { device: 'cpu' }); parentPort.postMessage('holding');
        parentPort.once('message', () => process.exit(0));\`, { eval: true, type: 'module' });
      await new Promise((ok) => w.once('message', ok));
      try { m.Tensor.zeros([1], { device: 'cpu' }); console.log('main: loaded?!'); } catch (e) { console.log('main refused: ' + e.message.slice(0, 60)); }
      const exited = new Promise((ok) => w.on('exit', ok));
      w.postMessage('go');
      await exited;
      console.log('main after the worker: ' + ${sumIn('m', '[4, 5]')}.join());
      try { m.Tensor.fromArray([1, 2], { device: 'cpu' }).view([3]); } catch (e) { console.log('error class: ' + e.constructor.name); }`);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.trim().split('\n')).toEqual([
      'main refused: moe-ep: the addon is already in use by another JavaScript th',
      'main after the worker: 9',
      'error class: InvalidArgumentError',
    ]);
  });

  it('threads one after another (each loads, then exits) each get the addon', () => {
    const r = node(`import { Worker } from 'node:worker_threads';
      const code = \`import * as m from ${lib}; console.log('worker ' + ${sumIn('m', '[1, 2, 3]')}.join());\`;
      for (let i = 0; i < 3; i++) await new Promise((ok, fail) => new Worker(code, { eval: true, type: 'module' }).on('exit', ok).on('error', fail));
      const m = await import(${lib});
      console.log('main ' + ${sumIn('m', '[4, 5]')}.join());`);
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout.trim().split('\n')).toEqual(['worker 6', 'worker 6', 'worker 6', 'main 9']);
  });
});

describe('crash reports', () => {
  // For crashes on machines we only see through logs (test/gpu/21 sets it for its mpirun ranks).
  it('MOE_EP_CRASH_BACKTRACE=1: a fatal signal prints the signal, the rank and the native frames, then still kills the process', () => {
    const script = `const m = await import(${JSON.stringify(join(root, 'dist', 'lib', 'index.js'))}); m.Tensor.zeros([1], { device: 'cpu' }); process.kill(process.pid, 'SIGSEGV'); setTimeout(() => console.log('survived'), 2000);`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], {
      env: { ...process.env, MOE_EP_CRASH_BACKTRACE: '1', OMPI_COMM_WORLD_RANK: '1' },
      encoding: 'utf8',
      timeout: 30_000,
    });
    expect(r.signal, r.stderr).toBe('SIGSEGV');
    expect(r.stdout).not.toContain('survived');
    expect(r.stderr).toMatch(/moe-ep: fatal SIGSEGV sent by kill\(\) or raise\(\) in pid \d+ \(rank 1\); native backtrace:/);
    expect(r.stderr).toMatch(/moe_ep\.node\(\+0x[0-9a-f]+\)/);
    expect(r.stderr).toContain('moe-ep: end of backtrace; passing the signal on');
  });

  it('without it the addon leaves the signal alone', () => {
    const script = `const m = await import(${JSON.stringify(join(root, 'dist', 'lib', 'index.js'))}); m.Tensor.zeros([1], { device: 'cpu' }); process.kill(process.pid, 'SIGSEGV');`;
    const env = { ...process.env };
    delete env['MOE_EP_CRASH_BACKTRACE'];
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { env, encoding: 'utf8', timeout: 30_000 });
    expect(r.signal).toBe('SIGSEGV');
    expect(r.stderr).not.toContain('moe-ep: fatal');
  });
});

describe('NCCL', () => {
  it('when missing, the error says what is missing and every place it looked', () => {
    const script = `import { native } from ${JSON.stringify(join(root, 'dist/lib/native.js'))};
      try { native().requireNccl(); console.log('loaded'); } catch (e) { console.log(e.constructor.name + '\\n' + e.message); }`;
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], {
      env: { ...process.env, MOE_EP_NCCL_LIBRARY: '/nonexistent/libnccl.so.2' },
      encoding: 'utf8',
    });
    expect(out).toMatch(/^UnavailableError\nnccl: NCCL \(libnccl\.so\.2\) could not be loaded/);
    expect(out).toMatch(/\/nonexistent\/libnccl\.so\.2: .*No such file/);
    expect(out).toMatch(/MOE_EP_NCCL_LIBRARY/);
  });

  it('the default search tries the system path, then pip and conda locations', () => {
    const s = native().ncclStatus();
    if (s.loaded) {
      expect(s.version).toBeGreaterThan(20000);
      return;
    }
    expect(s.attempts[0]?.path).toBe('libnccl.so.2');
    expect(s.attempts.map((a) => a.path)).toContain('/opt/conda/lib/libnccl.so.2');
    expect(s.error).toMatch(/site-packages\/nvidia\/nccl\/lib\/libnccl\.so\.2: no match/);
    expect(s.error).toMatch(/pip install nvidia-nccl/);
    expect(() => native().requireNccl()).toThrow(UnavailableError);
  });
});
