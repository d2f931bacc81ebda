/**
 * `moe-ep train [--config file.json] [--section.field value ...]`: the main job. With no arguments
 * it trains the embedded default on whatever is there (CPU without a GPU, the GPU when present,
 * under `mpirun -np N` with the experts spread over N ranks), shows a live progress bar, appends
 * metrics as JSON lines, saves config.json, and writes an HTML report (from the whole metrics file,
 * so a resumed run's report covers the run from its start) whose path it prints. A folder that
 * already holds a run is refused unless --resume or --overwrite says what to do with it. Ctrl-C,
 * SIGTERM, SIGHUP (or SIGUSR1, which mpirun forwards) and a closed stdout stop it cleanly after
 * the current step, every rank at the same step, with a checkpoint and the report, and it says how
 * to resume.
 */
import { accessSync, constants, existsSync, readdirSync, rmSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';

import cliProgress from 'cli-progress';

import { allGatherJson } from '../parallel/gather-json.js';
import { init } from '../parallel/init.js';
import { InvalidArgumentError } from '../errors.js';
import { overridesFromArgs, resolveConfig, trainHelp, type TrainConfig, type TrainConfigInput } from '../train/config.js';
import { LATEST_FILE, parseAsideDir, parseStepDir } from '../train/checkpoint-layout.js';
import { FILE_LIMITS, readJson, writeFileAtomic } from '../train/safe-files.js';
import { underFlag, UsageError } from './flags.js';
import { MetricsLog, readMetrics, type StepMetrics } from '../train/metrics.js';
import { writeReport } from '../train/report.js';
import { Trainer } from '../train/trainer.js';

/** What a run folder holds; one that has any of these already holds a run. */
const RUN_FILES = ['metrics.jsonl', 'report.html', 'config.json', 'checkpoints'];

/** The entries of a checkpoint folder that are saved checkpoints: `latest`, step-N, and a re-save's asides. */
function checkpointEntries(dir: string): string[] {
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return []; // missing (or not a folder: the write check below says so)
  }
  return names.filter((n) => n === LATEST_FILE || parseStepDir(n) !== undefined || parseAsideDir(n) !== undefined).sort();
}

/**
 * Why this run cannot write into `dir` (null: it can), found before any step is trained and without
 * creating anything: the folder, or the nearest of its parents that exists, must be a folder this
 * process may write (access(2): a read-only file system too). `flag` names the option.
 */
function unwritable(dir: string, flag: string): string | null {
  let p = dir;
  while (!existsSync(p) && dirname(p) !== p) p = dirname(p);
  try {
    if (!statSync(p).isDirectory())
      return `${flag} ${dir}: cannot write there (${p === dir ? 'it is a file' : `${p} is a file`}; it must be a folder)`;
    accessSync(p, constants.W_OK | constants.X_OK);
    return null;
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    const why =
      code === 'EACCES' || code === 'EPERM' ? 'permission denied' : code === 'EROFS' ? 'a read-only file system' : (e as Error).message;
    return `${flag} ${dir}: cannot write there (${p === dir ? '' : `${p}: `}${why})`;
  }
}

function loadConfig(args: string[]): { config: TrainConfig; overwrite: boolean; configFile: string | null } {
  let file: Record<string, unknown> = {};
  let configFile: string | null = null;
  let overwrite = false;
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const arg = args[i] as string;
    if (arg === '--overwrite') overwrite = true;
    else if (arg.startsWith('--overwrite=')) throw new UsageError(`'--overwrite' takes no value; received '${arg}'`);
    else if (arg === '--config' || arg.startsWith('--config=')) {
      if (configFile !== null) throw new UsageError(`'--config' is given twice (${configFile} and another): give one file`);
      const path = arg === '--config' ? args[++i] : arg.slice('--config='.length);
      if (!path) throw new UsageError(`'--config' needs a file`);
      // A regular file of at most 1 MiB (a FIFO or /dev/zero would hang the read), bounded JSON.
      const parsed = readJson(path, {
        what: `cannot read the config file ${path}`,
        maxBytes: FILE_LIMITS.config,
        error: InvalidArgumentError,
      });
      if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed))
        throw new InvalidArgumentError(
          `the config file ${path} must hold a JSON object ({ "model": { … }, "train": { … }, … }); it holds ${parsed === null ? 'null' : Array.isArray(parsed) ? 'an array' : `a ${typeof parsed}`}`,
          'train',
        );
      file = parsed as Record<string, unknown>;
      configFile = path;
    } else rest.push(arg);
  }
  let overrides: ReturnType<typeof overridesFromArgs>;
  try {
    overrides = overridesFromArgs(rest);
  } catch (e) {
    // A command line it cannot read (a stray argument, a flag with no value or no such field): exit 2.
    throw e instanceof InvalidArgumentError ? new UsageError(e.message) : e;
  }
  for (const [section, fields] of Object.entries(overrides)) {
    const base = file[section];
    // A section the file gives as something other than an object would be dropped by the merge: refused, as without flags.
    if (base !== undefined && (base === null || typeof base !== 'object' || Array.isArray(base)))
      throw new InvalidArgumentError(
        `the config file ${configFile}: '${section}' must be an object of ${section}.* fields; received ${JSON.stringify(base)}`,
        'train',
      );
    file[section] = { ...(base as object | undefined), ...fields };
  }
  // Checked against the schema at run time (a JSON file has no static type).
  return { config: resolveConfig(file as TrainConfigInput), overwrite, configFile };
}

const fmt = (v: number, digits = 4): string =>
  Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : v.toFixed(digits);
const duration = (seconds: number): string =>
  !Number.isFinite(seconds)
    ? '--'
    : seconds < 60
      ? `${Math.round(seconds)}s`
      : seconds < 3600
        ? `${Math.floor(seconds / 60)}m${String(Math.round(seconds % 60)).padStart(2, '0')}s`
        : `${Math.floor(seconds / 3600)}h${String(Math.floor((seconds % 3600) / 60)).padStart(2, '0')}m`;
const rate = (tps: number): string =>
  tps >= 1e6 ? `${(tps / 1e6).toFixed(1)}M` : tps >= 1e4 ? `${(tps / 1e3).toFixed(0)}k` : String(Math.round(tps));

export async function runTrain(args: string[]): Promise<number> {
  if (args.includes('--help') || args.includes('-h')) {
    console.log(trainHelp());
    return 0;
  }
  const { config, overwrite, configFile } = loadConfig(args);
  const resuming = config.checkpoint.resume !== null;
  if (overwrite && resuming) {
    const fromFlag = args.some((a) => /^--(resume|checkpoint\.resume)(=|$)/.test(a));
    throw new InvalidArgumentError(
      `--overwrite and ${fromFlag ? '--resume' : `checkpoint.resume (${JSON.stringify(config.checkpoint.resume)}, from the config file ${configFile})`} contradict each other: one replaces the run in --out, the other continues it`,
      'train',
    );
  }
  const world = await init({ timeoutMs: config.train.timeoutMs });
  const lead = world.rank === 0;
  // Rank 0's timestamp names the default run folder on every rank (each rank's own clock would
  // scatter the checkpoint's shards over several folders). Gathered on every rank, --out or not,
  // so that the ranks make the same collectives.
  const stamp = allGatherJson(world, new Date().toISOString().replace(/[:.]/g, '-'))[0] as string;
  const out = resolve(config.train.out ?? join('runs', stamp));
  // What each rank sees there (checkpoints need one shared file system, which each save checks), gathered so that every rank
  // refuses together, and every rank has looked before rank 0 deletes or writes anything.
  const found = [
    ...new Set(
      allGatherJson(
        world,
        RUN_FILES.filter((f) => existsSync(join(out, f))),
      ).flat(),
    ),
  ];
  if (found.length > 0 && !resuming && !overwrite) {
    throw new InvalidArgumentError(
      `${out} already holds a run (${found.join(', ')}): --resume continues it, --overwrite replaces it, or choose another --out`,
      'train',
    );
  }
  const ckptDir = resolve(config.checkpoint.dir ?? join(out, 'checkpoints'));
  // A checkpoint folder of its own (--checkpoint.dir) may hold another run's checkpoints: saving over
  // them would replace that run's steps and prune the rest. The same choice as for --out.
  // Gathered on every rank whatever its config says (ranks given different configs are refused by
  // the Trainer's check below, and must reach it through the same collectives).
  const held = [...new Set(allGatherJson(world, config.checkpoint.dir === null ? [] : checkpointEntries(ckptDir)).flat())].sort();
  if (config.checkpoint.dir !== null) {
    if (held.length > 0 && !resuming && !overwrite) {
      throw new InvalidArgumentError(
        `--checkpoint.dir ${ckptDir} already holds checkpoints (${held.slice(0, 4).join(', ')}${held.length > 4 ? ', …' : ''}): --resume continues from them, --overwrite replaces them, or choose another folder`,
        'train',
      );
    }
  }
  // Every folder the run writes, checked on every rank before training: a run that could not save
  // would otherwise find out at its first checkpoint, or at the end.
  // An old run's `checkpoints` entry that --overwrite deletes (a file, a link) is not what the run
  // writes into: its folder is made afresh in --out.
  const ckptReplaced = overwrite && config.checkpoint.dir === null && found.includes('checkpoints');
  const problems = allGatherJson(
    world,
    [
      lead ? unwritable(out, '--out') : null,
      unwritable(ckptReplaced ? out : ckptDir, config.checkpoint.dir === null ? '--out' : '--checkpoint.dir'),
    ].filter((p): p is string => p !== null),
  ).flat();
  if (problems.length > 0) throw new InvalidArgumentError([...new Set(problems)].join('; '), 'train');
  // Every rank's Trainer, agreed on before rank 0 deletes anything: a rank that cannot build its own
  // (a node with less memory, no usable GPU) stops every rank, with the old run untouched.
  let trainer: Trainer | null = null;
  let failure: unknown = null;
  try {
    trainer = new Trainer(config, world.size > 1 ? { world } : {});
  } catch (e) {
    failure = e;
  }
  const failed = allGatherJson(world, failure === null ? null : failure instanceof Error ? failure.message : String(failure));
  if (failure !== null) throw failure;
  const firstFailed = failed.findIndex((f) => f !== null);
  if (firstFailed >= 0 || trainer === null) {
    trainer?.dispose();
    throw new InvalidArgumentError(`rank ${firstFailed} could not build the model: ${String(failed[firstFailed])}`, 'train');
  }
  // --overwrite deletes the old run only now: a command refused above (a bad option, a folder it
  // cannot write, a layer a rank's Trainer cannot build) leaves it as it was.
  if (overwrite && lead) {
    for (const f of found) rmSync(join(out, f), { recursive: true, force: true });
    if (config.checkpoint.dir !== null) for (const f of held) rmSync(join(ckptDir, f), { recursive: true, force: true });
  }
  let resumedAt: number | null = null;
  if (resuming) {
    const from = config.checkpoint.resume === 'latest' ? ckptDir : resolve(config.checkpoint.resume as string);
    resumedAt = trainer.resume(from);
    // Nothing left to train: refused before anything in the run folder is rewritten.
    if (resumedAt >= config.train.steps)
      throw new InvalidArgumentError(
        `the checkpoint in ${from} is at step ${resumedAt} and --steps ${config.train.steps} leaves nothing to train: give --steps above ${resumedAt} to continue the run`,
        'train',
      );
    if (lead) console.log(`resumed from ${from} at step ${resumedAt}`);
    const was = trainer.resumedFrom?.savedSteps ?? null;
    if (lead && was !== null && was !== config.train.steps)
      console.log(
        `note: the saved run was set for ${was} steps and this one for ${config.train.steps}: the learning rate follows the ${config.train.steps}-step schedule from step ${resumedAt} (${trainer.lrAt(resumedAt).toExponential(2)} there)`,
      );
    for (const s of trainer.resumedFrom?.skipped ?? []) if (lead) console.error(`moe-ep: passed over ${s.dir}: ${s.reason}`);
  }
  const save = (): string => {
    const saved = trainer.saveCheckpoint(ckptDir, config.checkpoint.keep);
    if (lead && !config.train.progress)
      console.log(`checkpoint: ${saved.dir} (${(saved.bytes / 2 ** 20).toFixed(1)} MiB in ${saved.ms} ms)`);
    return saved.dir;
  };
  const metricsPath = join(out, 'metrics.jsonl');
  const configPath = join(out, 'config.json');
  // A resumed run continues the same metrics file (from its checkpoint's step).
  // A file the run folder refuses (a folder the checks above could not foresee: /sys, a full disk) is
  // named by the flag the user gave, not by the internal call that met it.
  const inOut = <T>(write: () => T): T => underFlag('--out', out, /^MetricsLog: 'path' /, write);
  const log = lead ? inOut(() => new MetricsLog(metricsPath, resumedAt === null ? {} : { resumeAt: resumedAt })) : null;
  // The configuration as run, with the folder spelled out: `--config <out>/config.json --resume` continues it.
  // Without checkpoint.resume: a fresh run started from this file must not quietly continue an old checkpoint.
  const asRun = { ...config, train: { ...config.train, out }, checkpoint: { ...config.checkpoint, resume: null } };
  if (lead) inOut(() => writeFileAtomic(configPath, JSON.stringify(asRun, null, 2) + '\n'));
  const resumeCommand = `npx moe-ep train --config ${relative(process.cwd(), configPath) || configPath} --resume`;
  let bar: cliProgress.SingleBar | null = null;
  const control = { stop: false, by: '' };
  // Ctrl-C (SIGINT), SIGTERM (kill, schedulers) and SIGHUP (a closed terminal) stop after the current
  // step with a checkpoint and the report; a second one leaves at once. Under mpirun, which aborts the
  // whole job on SIGINT, send SIGUSR1 to mpirun instead: OpenMPI forwards it to every rank.
  const signals = { SIGINT: 130, SIGTERM: 143, SIGHUP: 129, SIGUSR1: 138 } as const;
  const stopBy = (by: string, again: number, how: string): void => {
    if (control.stop) process.exit(again);
    control.stop = true;
    control.by = by;
    if (!lead) return;
    bar?.stop(); // ends the bar's line, so the message starts on its own
    bar = null;
    process.stderr.write(`moe-ep: ${by}: stopping after the current step and saving a checkpoint${how}\n`);
  };
  const handlers = Object.entries(signals).map(([sig, code]) => {
    const by = sig === 'SIGINT' ? 'Ctrl-C' : sig;
    return [sig, () => stopBy(by, code, ` (${by} again to quit at once, without one)`)] as const;
  });
  for (const [sig, h] of handlers) process.on(sig, h);
  // A closed stdout (`| head`): writes fail with EPIPE, emitted asynchronously; unhandled, it would
  // end the process mid-run. Stop as on a signal; later output to the closed stream is dropped.
  const onOutputError = (e: NodeJS.ErrnoException): void => {
    if (!control.stop) stopBy(`output closed (${e.code ?? e.message})`, 1, '');
  };
  process.stdout.on('error', onOutputError);
  process.stderr.on('error', onOutputError);

  const m = config.model;
  if (lead) {
    console.log(
      `moe-ep train: ${m.layers} MoE layers, ${m.experts} experts (${m.routing === 'expert-choice' ? `expert choice, ${m.capacityFactor ?? m.topK} experts per token on average` : `top-${m.topK}`}, ${m.scoreFunction}${m.routing === 'expert-choice' ? '' : m.capacityFactor === null ? ', dropless' : `, capacity ${m.capacityFactor}`}${m.fp8Dispatch === false ? '' : `, fp8 dispatch${m.fp8Dispatch === 'keep' ? " 'keep'" : ''}`}), ` +
        `hidden ${m.hidden}, ffn ${m.ffn}; ${world.size} rank(s) [${world.backend}] on ${trainer.device.toString()}; ${config.train.steps} steps of ${config.data.tokensPerStep} tokens`,
    );
    console.log(`run folder: ${out}`);
  }
  // Nothing to drop: dropless token choice, and expert choice (every expert takes exactly its C tokens).
  const dropless = m.capacityFactor === null || m.routing === 'expert-choice';
  if (lead && config.train.progress && process.stdout.isTTY) {
    // The bar takes what the terminal's width leaves after the numbers (about 64 columns).
    const barsize = Math.max(
      10,
      Math.min(40, (process.stdout.columns || 80) - 66 - (dropless ? 0 : 14) - (m.loss === 'cross-entropy' ? 10 : 0)),
    );
    bar = new cliProgress.SingleBar(
      {
        format: `{bar} {value}/{total} ETA {remaining} | loss {loss}{acc} | MaxVio {maxvio}${dropless ? '' : ' | drop {dropped}'} | {tps} tok/s`,
        hideCursor: true,
        barsize,
      },
      cliProgress.Presets.shades_classic,
    );
    bar.start(config.train.steps, trainer.step, { remaining: '--', loss: '-', acc: '', maxvio: '-', dropped: '-', tps: '-' });
  }
  const steps: StepMetrics[] = [];
  const started = Date.now();
  let stepSeconds = NaN; // a moving average of the step time, for the ETA
  const onStep = (s: StepMetrics): void => {
    if (!lead) return;
    steps.push(s);
    if (s.step % config.train.logEvery === 0) log?.append(s);
    const seconds = config.data.tokensPerStep / s.tokensPerSecond;
    // The first step of a session carries its warm-up; the average starts after it.
    if (steps.length === 2) stepSeconds = seconds;
    else if (steps.length > 2) stepSeconds = 0.95 * stepSeconds + 0.05 * seconds;
    const eta = duration(stepSeconds * (config.train.steps - s.step - 1));
    const maxVio = Math.max(...s.layers.map((l) => l.maxVio));
    const dropped = s.layers.reduce((a, l) => a + l.dropped, 0) / s.layers.length;
    const acc = s.accuracy === undefined ? '' : ` acc ${fmt(s.accuracy, 3)}`;
    if (bar)
      bar.update(s.step + 1, {
        remaining: eta,
        loss: fmt(s.loss),
        acc,
        maxvio: fmt(maxVio, 3),
        dropped: fmt(dropped, 3),
        tps: rate(s.tokensPerSecond),
      });
    else if (!control.stop && (s.step % Math.max(1, Math.floor(config.train.steps / 20)) === 0 || s.step === config.train.steps - 1)) {
      console.log(
        `step ${s.step + 1}/${config.train.steps}  loss ${fmt(s.loss)}${acc}  MaxVio ${fmt(maxVio, 3)}  dropped ${fmt(dropped, 3)}  ${Math.round(s.tokensPerSecond)} tok/s  ETA ${eta}`,
      );
    }
  };
  let savedDir: string;
  try {
    while (trainer.step < config.train.steps && !trainer.agreeToStop(control.stop)) {
      onStep(trainer.trainStep());
      if (config.checkpoint.every > 0 && trainer.step % config.checkpoint.every === 0 && trainer.step < config.train.steps) save();
      // Let the event loop run between steps, so a Ctrl-C (SIGINT) handler gets its turn.
      await new Promise((r) => setImmediate(r));
    }
    savedDir = save(); // at the end, and after a stop signal
  } finally {
    bar?.stop();
    for (const [sig, h] of handlers) process.off(sig, h);
  }
  if (lead) {
    // The report covers the whole run: metrics.jsonl holds the steps before a resume too.
    const history = readMetrics(metricsPath);
    const first = history[0];
    const last = steps[steps.length - 1];
    const seconds = (Date.now() - started) / 1000;
    const report = join(out, 'report.html');
    writeReport(report, {
      title: `moe-ep training run (${new Date().toISOString().slice(0, 19)}Z)`,
      config,
      steps: history,
      summary: {
        steps: `${trainer.step} of ${config.train.steps}${resumedAt === null ? '' : ` (resumed at step ${resumedAt})`}`,
        ranks: world.size,
        device: trainer.device.toString(),
        'first loss': first ? fmt(first.loss) : '-',
        'final loss': last ? fmt(last.loss) : '-',
        'final MaxVio': last ? fmt(Math.max(...last.layers.map((l) => l.maxVio)), 3) : '-',
        [resumedAt === null ? 'wall time (s)' : 'wall time since the resume (s)']: seconds.toFixed(1),
        stopped: control.stop ? `by ${control.by}` : 'at the configured step count',
      },
    });
    console.log(`final loss ${last ? fmt(last.loss) : '-'} after ${steps.length} steps in ${seconds.toFixed(1)} s`);
    // Where a step's time goes (host ms; exact with --train.profile true), skipping the first step's warm-up.
    const timed = steps.slice(1).filter((s) => s.phaseMs);
    if (timed.length) {
      const keys = Object.keys(timed[0]?.phaseMs ?? {}) as (keyof NonNullable<StepMetrics['phaseMs']>)[];
      const mean = keys.map((k) => `${k} ${(timed.reduce((a, s) => a + (s.phaseMs?.[k] ?? 0), 0) / timed.length).toFixed(1)}`);
      console.log(`per step (ms, mean${config.train.profile ? ', device-synchronised' : ''}): ${mean.join(', ')}`);
    }
    console.log(`metrics: ${metricsPath}`);
    console.log(`config:  ${configPath}`);
    console.log(`checkpoints: ${ckptDir}`);
    console.log(`report:  ${report}`);
    if (control.stop)
      console.log(
        `moe-ep: stopped by ${control.by} after step ${trainer.step} of ${config.train.steps}; checkpoint ${savedDir}\nto resume: ${resumeCommand}`,
      );
  }
  trainer.dispose();
  world.dispose();
  return 0;
}
