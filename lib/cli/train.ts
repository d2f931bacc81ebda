/**
 * `moe-ep train [--config file.json] [--section.field value ...]`: the main job. With no arguments
 * it trains the embedded default on whatever is there (CPU without a GPU, the GPU when present,
 * under `mpirun -np N` with the experts spread over N ranks), shows a live progress bar, appends
 * metrics as JSON lines and writes an HTML report whose path it prints. Ctrl-C, SIGTERM, SIGHUP
 * (or SIGUSR1, which mpirun forwards) and a closed stdout stop it cleanly after the current step,
 * every rank at the same step, with a checkpoint and the report.
 */
import { join, resolve } from 'node:path';

import cliProgress from 'cli-progress';

import { allGatherJson } from '../dist/gather-json.js';
import { init } from '../dist/init.js';
import { InvalidArgumentError } from '../errors.js';
import { overridesFromArgs, resolveConfig, trainHelp, type TrainConfig } from '../train/config.js';
import { FILE_LIMITS, readJson } from '../train/safe-files.js';
import { MetricsLog, type StepMetrics } from '../train/metrics.js';
import { writeReport } from '../train/report.js';
import { Trainer } from '../train/trainer.js';

function loadConfig(args: string[]): TrainConfig {
  let file: Record<string, unknown> = {};
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--config') {
      const path = args[++i];
      if (!path) throw new InvalidArgumentError(`'--config' needs a file`, 'train');
      // A regular file of at most 1 MiB (a FIFO or /dev/zero would hang the read), bounded JSON.
      file = readJson(path, { what: `cannot read the config file ${path}`, maxBytes: FILE_LIMITS.config, error: InvalidArgumentError }) as Record<string, unknown>;
    } else rest.push(args[i] as string);
  }
  const overrides = overridesFromArgs(rest);
  for (const [section, fields] of Object.entries(overrides)) {
    const base = file[section];
    file[section] = base !== null && typeof base === 'object' ? { ...(base as object), ...fields } : fields;
  }
  return resolveConfig(file);
}

const fmt = (v: number, digits = 4): string => (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(2) : v.toFixed(digits));

export async function runTrain(args: string[]): Promise<number> {
  if (args.includes('--help') || args.includes('-h')) {
    console.log(trainHelp());
    return 0;
  }
  const config = loadConfig(args);
  const world = await init({ timeoutMs: config.train.timeoutMs });
  const lead = world.rank === 0;
  // Rank 0's timestamp names the default run folder on every rank (each rank's own clock would
  // scatter the checkpoint's shards over several folders). Gathered on every rank, --out or not,
  // so that the ranks make the same collectives.
  const stamp = allGatherJson(world, new Date().toISOString().replace(/[:.]/g, '-'))[0] as string;
  const out = resolve(config.train.out ?? join('runs', stamp));
  const trainer = new Trainer(config, world.size > 1 ? { world } : {});
  const ckptDir = resolve(config.checkpoint.dir ?? join(out, 'checkpoints'));
  if (config.checkpoint.resume !== null) {
    const from = config.checkpoint.resume === 'latest' ? ckptDir : resolve(config.checkpoint.resume);
    const step = trainer.resume(from);
    if (lead) console.log(`resumed from ${from} at step ${step}`);
    for (const s of trainer.resumedFrom?.skipped ?? []) if (lead) console.error(`moe-ep: passed over ${s.dir}: ${s.reason}`);
  }
  const save = (): void => {
    const saved = trainer.saveCheckpoint(ckptDir, config.checkpoint.keep);
    if (lead && !config.train.progress) console.log(`checkpoint: ${saved.dir} (${(saved.bytes / 2 ** 20).toFixed(1)} MiB in ${saved.ms} ms)`);
  };
  // A resumed run continues the same metrics file.
  const log = lead ? new MetricsLog(join(out, 'metrics.jsonl'), { append: config.checkpoint.resume !== null }) : null;
  const control = { stop: false, by: '' };
  // Ctrl-C (SIGINT), SIGTERM (kill, schedulers) and SIGHUP (a closed terminal) stop after the current
  // step with a checkpoint and the report; a second one leaves at once. Under mpirun, which aborts the
  // whole job on SIGINT, send SIGUSR1 to mpirun instead: OpenMPI forwards it to every rank.
  const signals = { SIGINT: 130, SIGTERM: 143, SIGHUP: 129, SIGUSR1: 138 } as const;
  const stopBy = (by: string, again: number): void => {
    if (control.stop) process.exit(again);
    control.stop = true;
    control.by = by;
    if (lead) process.stderr.write(`\nmoe-ep: ${by}: stopping after the current step (again to quit at once)\n`);
  };
  const handlers = Object.entries(signals).map(([sig, code]) => [sig, () => stopBy(sig === 'SIGINT' ? 'Ctrl-C' : sig, code)] as const);
  for (const [sig, h] of handlers) process.on(sig, h);
  // A closed stdout (`| head`): writes fail with EPIPE, emitted asynchronously; unhandled, it would
  // end the process mid-run. Stop as on a signal; later output to the closed stream is dropped.
  const onOutputError = (e: NodeJS.ErrnoException): void => {
    if (!control.stop) stopBy(`output closed (${e.code ?? e.message})`, 1);
  };
  process.stdout.on('error', onOutputError);
  process.stderr.on('error', onOutputError);

  const m = config.model;
  if (lead) {
    console.log(
      `moe-ep train: ${m.layers} MoE layers, ${m.experts} experts (${m.routing === 'expert-choice' ? `expert choice, ${m.capacityFactor ?? m.topK} experts per token on average` : `top-${m.topK}`}, ${m.scoreFunction}${m.routing === 'expert-choice' ? '' : m.capacityFactor === null ? ', dropless' : `, capacity ${m.capacityFactor}`}), ` +
        `hidden ${m.hidden}, ffn ${m.ffn}; ${world.size} rank(s) [${world.backend}] on ${trainer.device.toString()}; ${config.train.steps} steps of ${config.data.tokensPerStep} tokens`,
    );
  }
  const bar =
    lead && config.train.progress && process.stdout.isTTY
      ? new cliProgress.SingleBar(
          { format: 'step {value}/{total} |{bar}| loss {loss}{acc} | MaxVio {maxvio} | dropped {dropped} | {tps} tok/s', hideCursor: true },
          cliProgress.Presets.shades_classic,
        )
      : null;
  bar?.start(config.train.steps, trainer.step, { loss: '-', acc: '', maxvio: '-', dropped: '-', tps: '-' });
  const steps: StepMetrics[] = [];
  const started = Date.now();
  const onStep = (s: StepMetrics): void => {
        if (!lead) return;
        steps.push(s);
        if (s.step % config.train.logEvery === 0) log?.append(s);
        const maxVio = Math.max(...s.layers.map((l) => l.maxVio));
        const dropped = s.layers.reduce((a, l) => a + l.dropped, 0) / s.layers.length;
        const acc = s.accuracy === undefined ? '' : ` acc ${fmt(s.accuracy, 3)}`;
        if (bar) bar.update(s.step + 1, { loss: fmt(s.loss), acc, maxvio: fmt(maxVio, 3), dropped: fmt(dropped, 3), tps: Math.round(s.tokensPerSecond) });
        else if (s.step % Math.max(1, Math.floor(config.train.steps / 20)) === 0 || s.step === config.train.steps - 1) {
          console.log(`step ${s.step + 1}/${config.train.steps}  loss ${fmt(s.loss)}${acc}  MaxVio ${fmt(maxVio, 3)}  dropped ${fmt(dropped, 3)}  ${Math.round(s.tokensPerSecond)} tok/s`);
        }
  };
  try {
    while (trainer.step < config.train.steps && !trainer.agreeToStop(control.stop)) {
      onStep(trainer.trainStep());
      if (config.checkpoint.every > 0 && trainer.step % config.checkpoint.every === 0 && trainer.step < config.train.steps) save();
      // Let the event loop run between steps, so a Ctrl-C (SIGINT) handler gets its turn.
      await new Promise((r) => setImmediate(r));
    }
    save(); // at the end, and after a stop signal
  } finally {
    bar?.stop();
    for (const [sig, h] of handlers) process.off(sig, h);
  }
  if (lead) {
    const last = steps[steps.length - 1];
    const first = steps[0];
    const report = join(out, 'report.html');
    writeReport(report, {
      title: `moe-ep training run (${new Date().toISOString().slice(0, 19)}Z)`,
      config,
      steps,
      summary: {
        steps: steps.length,
        ranks: world.size,
        device: trainer.device.toString(),
        'first loss': first ? fmt(first.loss) : '-',
        'final loss': last ? fmt(last.loss) : '-',
        'final MaxVio': last ? fmt(Math.max(...last.layers.map((l) => l.maxVio)), 3) : '-',
        'wall time (s)': ((Date.now() - started) / 1000).toFixed(1),
        stopped: control.stop ? `by ${control.by}` : 'at the configured step count',
      },
    });
    console.log(`final loss ${last ? fmt(last.loss) : '-'} after ${steps.length} steps in ${((Date.now() - started) / 1000).toFixed(1)} s`);
    // Where a step's time goes (host ms; exact with --train.profile true), skipping the first step's warm-up.
    const timed = steps.slice(1).filter((s) => s.phaseMs);
    if (timed.length) {
      const keys = Object.keys(timed[0]?.phaseMs ?? {}) as (keyof NonNullable<StepMetrics['phaseMs']>)[];
      const mean = keys.map((k) => `${k} ${(timed.reduce((a, s) => a + (s.phaseMs?.[k] ?? 0), 0) / timed.length).toFixed(1)}`);
      console.log(`per step (ms, mean${config.train.profile ? ', device-synchronised' : ''}): ${mean.join(', ')}`);
    }
    console.log(`metrics: ${join(out, 'metrics.jsonl')}`);
    console.log(`checkpoints: ${ckptDir}`);
    console.log(`report:  ${report}`);
  }
  trainer.dispose();
  world.dispose();
  return 0;
}
