// `moe-ep train`'s files, where an audit found them wanting (session 20): another run's checkpoints
// in a shared --checkpoint.dir are never saved over; metrics.jsonl is rewritten beside itself and
// renamed on --resume (a kill leaves the old file whole), never read from a FIFO, never written
// through a link, and neither is report.html; a folder the run cannot write is named before any
// step; a resume with another model or task is refused, naming the fields; a value flag never takes
// the next flag for its value, and a folder may be named with digits; an expert tensor of the
// right size but the wrong shape is refused; a Hugging Face config with an absurd layer count is
// refused, not allocated.
import { spawnSync } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { CheckpointError, hfMoEModel, joinExperts, latestCheckpoint, Tensor, tidy } from '../lib/index.js';
import { packageRoot } from '../lib/native.js';
import { overridesFromArgs } from '../lib/train/config.js';
import { MetricsLog, readMetrics } from '../lib/train/metrics.js';
import { writeFileAtomic } from '../lib/train/safe-files.js';
import type { CheckpointReader } from '../lib/train/checkpoint.js';
import { testConfigs } from './hf-fixtures.mjs';

const cli = join(packageRoot(), 'dist', 'lib', 'cli', 'main.js');
const root = mkdtempSync(join(tmpdir(), 'moe-train-files-'));
afterAll(() => rmSync(root, { recursive: true, force: true }));
let n = 0;
const fresh = (): string => join(root, `d${n++}`);

// A small model: steps of a few milliseconds.
const small = ['--model.experts', '4', '--data.tokensPerStep', '64', '--no-progress', '--device', 'cpu'];
function train(args: string[], timeout = 60_000) {
  return spawnSync(process.execPath, [cli, 'train', ...small, ...args], { encoding: 'utf8', timeout });
}
const stepLine = (step: number): string =>
  JSON.stringify({ step, loss: 1, auxLoss: 0, lr: 0, gradNorm: 0, tokensPerSecond: 0, layers: [] });

describe('a shared --checkpoint.dir', () => {
  it("holding another run's checkpoints: refused (that run's steps stay as they were); --overwrite replaces them", () => {
    const shared = fresh();
    const a = train(['--steps', '3', '--out', fresh(), '--checkpoint.dir', shared]);
    expect(a.status, a.stderr).toBe(0);
    const before = readFileSync(join(shared, 'step-00000003', 'manifest.json'));
    const b = train(['--steps', '3', '--out', fresh(), '--checkpoint.dir', shared, '--model.ffn', '8']);
    expect(b.status).not.toBe(0);
    expect(b.stderr).toMatch(
      /--checkpoint\.dir .* already holds checkpoints \(latest, step-00000003\): --resume continues from them, --overwrite/,
    );
    expect(readFileSync(join(shared, 'step-00000003', 'manifest.json'))).toEqual(before);
    const c = train(['--steps', '2', '--out', fresh(), '--checkpoint.dir', shared, '--model.ffn', '8', '--overwrite']);
    expect(c.status, c.stderr).toBe(0);
    expect(latestCheckpoint(shared)?.step).toBe(2);
    expect(() => statSync(join(shared, 'step-00000003'))).toThrow(/ENOENT/);
  });
});

describe('metrics.jsonl and report.html', () => {
  it('MetricsLog on resume: steps from resumeAt on and a torn line dropped, the file replaced (not rewritten in place)', () => {
    const dir = fresh();
    mkdirSync(dir);
    const path = join(dir, 'metrics.jsonl');
    writeFileSync(path, [1, 2, 3, 4].map(stepLine).join('\n') + '\n{"step": 5, "lo');
    const inode = statSync(path).ino;
    new MetricsLog(path, { resumeAt: 3 });
    expect(readMetrics(path).map((m) => m.step)).toEqual([1, 2]);
    // A new file renamed over the old: a kill before the rename leaves the old one whole.
    expect(statSync(path).ino).not.toBe(inode);
  });

  it('MetricsLog reads across its 1 MiB chunks: long lines and many of them', () => {
    const dir = fresh();
    mkdirSync(dir);
    const path = join(dir, 'metrics.jsonl');
    const layer = { tokensPerExpert: Array.from({ length: 3000 }, (_, i) => i), maxVio: 0, dropped: 0, loadEntropy: 1, routerEntropy: 1 };
    const lines = Array.from({ length: 200 }, (_, i) => JSON.stringify({ ...JSON.parse(stepLine(i)), layers: [layer, layer] }));
    writeFileSync(path, lines.join('\n') + '\n');
    expect(statSync(path).size).toBeGreaterThan(3 * 2 ** 20);
    new MetricsLog(path, { resumeAt: 150 });
    const kept = readMetrics(path);
    expect(kept.map((m) => m.step)).toEqual(Array.from({ length: 150 }, (_, i) => i));
    expect(kept[149]?.layers[1]?.tokensPerExpert[2999]).toBe(2999);
  });

  it('a link at metrics.jsonl: --resume refuses to read it; one at report.html: replaced; the files they point to untouched', () => {
    const out = fresh();
    expect(train(['--steps', '3', '--out', out]).status).toBe(0);
    const victims = fresh();
    mkdirSync(victims);
    for (const f of ['metrics.jsonl', 'report.html']) {
      writeFileSync(join(victims, f), 'keep me\n');
      rmSync(join(out, f));
      symlinkSync(join(victims, f), join(out, f));
    }
    // The metrics log refuses to read through the link; the report is replaced.
    const r = train(['--steps', '5', '--out', out, '--resume']);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/the metrics log .*metrics\.jsonl: is a symbolic link; only regular files are read/);
    rmSync(join(out, 'metrics.jsonl'));
    const again = train(['--steps', '5', '--out', out, '--resume']);
    expect(again.status, again.stderr).toBe(0);
    for (const f of ['metrics.jsonl', 'report.html']) {
      expect(readFileSync(join(victims, f), 'utf8')).toBe('keep me\n');
      expect(lstatSync(join(out, f)).isFile()).toBe(true);
    }
    expect(readMetrics(join(out, 'metrics.jsonl')).map((m) => m.step)).toEqual([3, 4]); // steps count from 0: the checkpoint at 3 resumes with step 3
  });

  // From a user trial: it printed 'after 0 steps', re-saved the checkpoint and rewrote config.json.
  it('--resume with --steps not past the checkpoint is refused before the run folder is touched; a longer run says its schedule changed', () => {
    const out = fresh();
    expect(train(['--steps', '4', '--out', out]).status).toBe(0);
    const config = readFileSync(join(out, 'config.json'), 'utf8');
    for (const steps of ['4', '3']) {
      const r = train(['--steps', steps, '--out', out, '--resume']);
      expect(r.status, steps).not.toBe(0);
      expect(r.stderr).toMatch(
        new RegExp(`the checkpoint in .* is at step 4 and --steps ${steps} leaves nothing to train: give --steps above 4`),
      );
    }
    expect(readFileSync(join(out, 'config.json'), 'utf8')).toBe(config);
    const longer = train(['--steps', '6', '--out', out, '--resume']);
    expect(longer.status, longer.stderr).toBe(0);
    expect(longer.stdout).toMatch(
      /note: the saved run was set for 4 steps and this one for 6: the learning rate follows the 6-step schedule from step 4 \(\d\.\d\de-\d+ there\)/,
    );
  });

  it('a FIFO at metrics.jsonl: --resume fails at once, naming it (no hang)', () => {
    const out = fresh();
    expect(train(['--steps', '2', '--out', out]).status).toBe(0);
    rmSync(join(out, 'metrics.jsonl'));
    const mk = spawnSync('mkfifo', [join(out, 'metrics.jsonl')]);
    if (mk.status !== 0) return; // no mkfifo here: nothing to test
    const r = train(['--steps', '3', '--out', out, '--resume'], 30_000);
    expect(r.signal).toBe(null);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/the metrics log .*metrics\.jsonl: is a FIFO; only regular files are read/);
  });
});

describe('folders the run cannot write: named before the first step', () => {
  it('--out naming a file, --checkpoint.dir under a file', () => {
    const file = join(fresh() + '-file');
    writeFileSync(file, 'x');
    const r = train(['--steps', '2', '--out', file]);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(/--out .* cannot write there \(it is a file; it must be a folder\)/);
    const c = train(['--steps', '2', '--out', fresh(), '--checkpoint.dir', join(file, 'ckpt')]);
    expect(c.status).not.toBe(0);
    expect(c.stderr).toMatch(/--checkpoint\.dir .*ckpt: cannot write there \(.*-file is a file; it must be a folder\)/);
    expect(c.stdout).not.toMatch(/step 1\//);
  });
});

describe('--resume: the same model and task', () => {
  it('a different model or task is refused, naming every field; a different batch size is not', () => {
    const base = fresh();
    expect(train(['--steps', '3', '--out', base]).status).toBe(0);
    const from = join(base, 'checkpoints');
    const r = train(['--steps', '5', '--out', fresh(), '--resume', from, '--model.topK', '1', '--data.seed', '9', '--model.layers', '1']);
    expect(r.status).not.toBe(0);
    expect(r.stderr).toMatch(
      /saved by a run with model\.layers 2 \(this run: 1\), model\.topK 2 \(this run: 1\), data\.seed 1 \(this run: 9\)/,
    );
    const ok = train(['--steps', '5', '--out', fresh(), '--resume', from, '--data.tokensPerStep', '32']);
    expect(ok.status, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/resumed from .* at step 3/);
  });

  it('an expert tensor of the right size in the wrong shape is refused, naming it', () => {
    tidy(() => {
      const tensors: Record<string, Tensor> = {};
      for (let e = 0; e < 2; e++) {
        tensors[`e${e}.w1`] = Tensor.zeros(e === 1 ? [6, 4] : [4, 6]);
        tensors[`e${e}.w3`] = Tensor.zeros([4, 6]);
        tensors[`e${e}.w2`] = Tensor.zeros([6, 4]);
      }
      const reader = { dir: '/ckpt', get: (name: string) => (tensors[name] as Tensor).clone() } as unknown as CheckpointReader;
      const join2 = () => joinExperts(reader, 0, 2, (e, w) => `e${e}.${w}`);
      expect(join2).toThrow(CheckpointError);
      expect(join2).toThrow(/checkpoint \/ckpt: tensor 'e1\.w1' has shape \[6, 4\] where \[4, 6\] was expected/);
    });
  });
});

describe('command-line values', () => {
  it('a value flag never takes the next flag; --flag=--x passes such a value; folder names of digits stay strings', () => {
    expect(() => overridesFromArgs(['--out', '--no-progress'])).toThrow(
      /'--out' needs a value, and '--no-progress' looks like the next flag \(for a value that starts with '--', write --out=--no-progress\)/,
    );
    expect(overridesFromArgs(['--out=--no-progress']).train?.out).toBe('--no-progress');
    expect(overridesFromArgs(['--out', '123']).train?.out).toBe('123');
    expect(overridesFromArgs(['--checkpoint.dir', '2024', '--resume', '7']).checkpoint).toEqual({ dir: '2024', resume: '7' });
    expect(overridesFromArgs(['--out', 'null']).train?.out).toBe(null);
    // Numbers still parse as numbers, and a negative one is a value, not a flag.
    expect(overridesFromArgs(['--steps', '12', '--balance.gamma', '-1e-3']).train?.steps).toBe(12);
    expect(overridesFromArgs(['--balance.gamma', '-1e-3']).balance?.gamma).toBe(-1e-3);
  });
});

describe('Hugging Face config.json', () => {
  it('an absurd num_hidden_layers is refused, naming the field (not a heap exhausted)', () => {
    for (const layers of [2 ** 31, 65537]) {
      expect(() => hfMoEModel({ ...testConfigs.mixtral, num_hidden_layers: layers })).toThrow(
        new RegExp(`'num_hidden_layers' = ${layers}: more than the 65536 layers this loader takes`),
      );
    }
    expect(hfMoEModel({ ...testConfigs.mixtral, num_hidden_layers: 3 }).moeLayers).toEqual([0, 1, 2]);
  });
});

// Found by probing the CLI (session 31): --overwrite deleted the old run before the command was
// refused; a resumed run's config.json carried the resume into the next run started from it; a
// config file holding null gave a TypeError; repeated flags and --flag=value forms were misreported;
// `ckpt inspect --no-verify` called a checkpoint with a missing shard OK.
describe('the command line, probed', () => {
  const runFiles = (dir: string): string[] =>
    ['metrics.jsonl', 'report.html', 'config.json', 'checkpoints'].filter((f) => existsSync(join(dir, f)));

  it('--overwrite on a command that is then refused leaves the old run (and its --checkpoint.dir) as it was', () => {
    const out = fresh();
    const ckpt = fresh();
    expect(train(['--steps', '2', '--out', out]).status).toBe(0);
    expect(train(['--steps', '2', '--out', fresh(), '--checkpoint.dir', ckpt]).status).toBe(0);
    const before = readFileSync(join(out, 'metrics.jsonl'), 'utf8');
    const file = join(root, `file${n++}`);
    writeFileSync(file, 'x');
    const refused = [
      // the Trainer refuses it (its memory estimate), after the schema passed it
      ['--steps', '2', '--out', out, '--overwrite', '--model.hidden', '100000000'],
      // a checkpoint folder it cannot write
      ['--steps', '2', '--out', out, '--overwrite', '--checkpoint.dir', join(file, 'x')],
      ['--steps', '2', '--out', fresh(), '--checkpoint.dir', ckpt, '--overwrite', '--model.hidden', '100000000'],
    ];
    for (const args of refused) {
      const r = train(args);
      expect(r.status, args.join(' ')).not.toBe(0);
    }
    // A rule of the layer's, now also the config's: refused by field before anything is looked at.
    const normalized = train([
      '--steps',
      '2',
      '--out',
      out,
      '--overwrite',
      '--model.scoreFunction',
      'softmax',
      '--model.normalize',
      'true',
      '--model.topK',
      '1',
    ]);
    expect(normalized.stderr).toMatch(
      /config\.model\.normalize: true with config\.model\.topK 1 makes every weight config\.model\.routeScale/,
    );
    expect(runFiles(out)).toEqual(['metrics.jsonl', 'report.html', 'config.json', 'checkpoints']);
    expect(readFileSync(join(out, 'metrics.jsonl'), 'utf8')).toBe(before);
    expect(latestCheckpoint(join(out, 'checkpoints'))?.step).toBe(2);
    expect(latestCheckpoint(ckpt)?.step).toBe(2);
  });

  it("--overwrite replaces a run whose 'checkpoints' entry is a file (the folder is made afresh)", () => {
    const out = fresh();
    mkdirSync(out);
    writeFileSync(join(out, 'metrics.jsonl'), 'x\n');
    writeFileSync(join(out, 'checkpoints'), 'junk');
    const r = train(['--steps', '2', '--out', out, '--overwrite']);
    expect(r.status, r.stderr).toBe(0);
    expect(latestCheckpoint(join(out, 'checkpoints'))?.step).toBe(2);
  });

  it("a resumed run's config.json does not resume the next run started from it", () => {
    const a = fresh();
    expect(train(['--steps', '2', '--out', a]).status).toBe(0);
    const b = fresh();
    const resumed = train(['--steps', '4', '--out', b, '--resume', join(a, 'checkpoints', 'step-00000002')]);
    expect(resumed.status, resumed.stderr).toBe(0);
    expect(resumed.stdout).toMatch(/resumed from .*step-00000002 at step 2/);
    expect(JSON.parse(readFileSync(join(b, 'config.json'), 'utf8')).checkpoint.resume).toBe(null);
    const c = spawnSync(process.execPath, [cli, 'train', '--config', join(b, 'config.json'), '--out', fresh(), '--steps', '2'], {
      encoding: 'utf8',
    });
    expect(c.status, c.stderr).toBe(0);
    expect(c.stdout).not.toMatch(/resumed/);
    // A hand-written resume in a file, met by --overwrite: the message says where the resume came from.
    const cfg = join(root, `cfg${n++}.json`);
    writeFileSync(cfg, JSON.stringify({ checkpoint: { resume: 'latest' } }));
    const both = train(['--config', cfg, '--out', fresh(), '--overwrite']);
    expect(both.stderr).toMatch(
      /--overwrite and checkpoint\.resume \("latest", from the config file .*cfg\d+\.json\) contradict each other/,
    );
  });

  it('a config file that is not an object, or a section that is not, is refused naming the file (with flags too)', () => {
    for (const [content, what] of [
      ['null', 'null'],
      ['"x"', 'a string'],
      ['[1]', 'an array'],
      ['5', 'a number'],
    ] as const) {
      const cfg = join(root, `cfg${n++}.json`);
      writeFileSync(cfg, content);
      const r = train(['--config', cfg, '--steps', '2', '--out', fresh()]);
      expect(r.status, content).toBe(1);
      expect(r.stderr).toContain(`the config file ${cfg} must hold a JSON object`);
      expect(r.stderr).toContain(`it holds ${what}`);
    }
    const cfg = join(root, `cfg${n++}.json`);
    writeFileSync(cfg, JSON.stringify({ model: 5 }));
    const r = train(['--config', cfg, '--steps', '2', '--out', fresh()]); // `small` sets --model.experts
    expect(r.status).toBe(1);
    expect(r.stderr).toContain(`the config file ${cfg}: 'model' must be an object of model.* fields; received 5`);
  });

  it('--config=FILE is --config FILE; --overwrite=x and --no-progress=x take no value; --config twice is refused', () => {
    const cfg = join(root, `cfg${n++}.json`);
    writeFileSync(cfg, JSON.stringify({ train: { steps: 2 } }));
    const out = fresh();
    const r = train([`--config=${cfg}`, '--out', out]);
    expect(r.status, r.stderr).toBe(0);
    expect(JSON.parse(readFileSync(join(out, 'config.json'), 'utf8')).train.steps).toBe(2);
    expect(train(['--overwrite=yes', '--out', fresh()]).stderr).toMatch(/'--overwrite' takes no value; received '--overwrite=yes'/);
    expect(() => overridesFromArgs(['--no-progress=1'])).toThrow(/'--no-progress' takes no value; received '--no-progress=1'/);
    const twice = train(['--config', cfg, '--config', cfg, '--out', fresh()]);
    expect(twice.status).toBe(2);
    expect(twice.stderr).toMatch(/'--config' is given twice/);
  });

  it('ckpt inspect --no-verify reports a missing or resized shard (exit 1); ckpt reshard and hf inspect refuse a repeated flag by name', () => {
    const out = fresh();
    expect(train(['--steps', '2', '--out', out]).status).toBe(0);
    const step = join(out, 'checkpoints', 'step-00000002');
    const inspect = (...args: string[]) => spawnSync(process.execPath, [cli, 'ckpt', 'inspect', step, ...args], { encoding: 'utf8' });
    const ok = inspect('--no-verify');
    expect(ok.status, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(/files all present with their sizes \(checksums not read: --no-verify\)/);
    const file = join(root, `file${n++}`);
    writeFileSync(file, 'x');
    const under = spawnSync(process.execPath, [cli, 'ckpt', 'reshard', step, '--ep', '1', '--out', join(file, 'x')], { encoding: 'utf8' });
    expect(under.stderr).toContain(`moe-ep: --out ${join(file, 'x')}: ${file} is not a folder`);
    const shard = join(step, 'rank-0.safetensors');
    writeFileSync(shard, readFileSync(shard).subarray(0, 100));
    const cut = inspect('--no-verify');
    expect(cut.status).toBe(1);
    expect(cut.stdout).toMatch(/rank-0\.safetensors .*SIZE: rank-0\.safetensors has 100 bytes/);
    rmSync(shard);
    const gone = inspect('--no-verify');
    expect(gone.status).toBe(1);
    expect(gone.stdout).toMatch(/rank-0\.safetensors .*MISSING/);
    expect(gone.stdout).toMatch(/files NOT all OK/);
    const reshard = spawnSync(process.execPath, [cli, 'ckpt', 'reshard', step, '--ep', '2', '--ep', '4', '--out', fresh()], {
      encoding: 'utf8',
    });
    expect(reshard.status).toBe(2);
    expect(reshard.stderr).toMatch(/--ep is given 2 times: give it once/);
    const hf = spawnSync(process.execPath, [cli, 'hf', 'inspect', fresh(), '--ranks', '2', '--ranks=4'], { encoding: 'utf8' });
    expect(hf.status).toBe(2);
    expect(hf.stderr).toMatch(/--ranks is given 2 times: give it once/);
    const negative = spawnSync(process.execPath, [cli, 'hf', 'inspect', fresh(), '--ranks', '-2'], { encoding: 'utf8' });
    expect(negative.stderr).toMatch(/--ranks must be a positive integer; received -2/);
  });

  it('a file that cannot be written is named, not its temporary', () => {
    const dir = fresh();
    mkdirSync(dir);
    const target = join(dir, 'missing', 'x.json');
    expect(() => writeFileAtomic(target, '{}')).toThrow(new RegExp(`^cannot write ${target}: ENOENT \\(ENOENT\\)$`));
    try {
      writeFileAtomic(target, '{}');
    } catch (e) {
      expect((e as NodeJS.ErrnoException).code).toBe('ENOENT');
    }
  });
});
