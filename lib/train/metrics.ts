/**
 * Per-step, per-layer routing metrics and the JSON-lines log.
 *   tokensPerExpert  assignments the router sent each expert this step, before capacity drops
 *                    (all-reduced over ranks by the caller)
 *   maxVio           max_e load_e / mean_load − 1 (DeepSeek-V3's balance measure; 0 is perfect)
 *   dropped          fraction of the T·k assignments dropped for capacity
 *   loadEntropy      entropy of the load distribution, normalised by ln E (1: uniform loads)
 *   routerEntropy    mean per-token entropy of the routing distribution, normalised by ln E
 *                    (1: the router cannot tell experts apart; low: confident routing)
 *   bias             each expert's balancing bias after this step's update (token choice only: expert
 *                    choice has no bias)
 *   expertsPerToken  expert choice only: tokens of the step that got 0, 1, 2, … experts (trailing
 *                    zeros dropped)
 */
import { closeSync, constants, existsSync, lstatSync, openSync, readSync } from 'node:fs';
import { dirname } from 'node:path';

import { InvalidArgumentError } from '../errors.js';
import { checkOptions } from '../validate.js';
import { makeDirs, openRegular, restateFileError, writeAll, writeFileAtomic } from './safe-files.js';

export interface LayerMetrics {
  tokensPerExpert: number[];
  maxVio: number;
  dropped: number;
  loadEntropy: number;
  routerEntropy: number;
  /** The auxiliary-loss-free balancing bias per expert after the step (absent in logs from before it was recorded). */
  bias?: number[];
  /** Expert choice only: tokens of the step that got 0, 1, 2, … experts (trailing zeros dropped). */
  expertsPerToken?: number[];
}

export interface StepMetrics {
  step: number;
  loss: number;
  /** Cross-entropy runs: the fraction of tokens classified correctly. */
  accuracy?: number;
  auxLoss: number;
  lr: number;
  gradNorm: number;
  tokensPerSecond: number;
  layers: LayerMetrics[];
  /**
   * Host milliseconds per phase of the step (data, forward, backward, optimizer, metrics). Device
   * work is attributed to the phase that waits for it, exactly so with `train.profile`.
   */
  phaseMs?: { data: number; forward: number; backward: number; optimizer: number; metrics: number };
}

/** routerEntropyNats: the mean per-token routing entropy in nats (averaged over ranks). */
export function layerMetrics(
  tokensPerExpert: ArrayLike<number>,
  dropped: number,
  assignments: number,
  routerEntropyNats = 0,
  expertsPerToken?: ArrayLike<number>,
): LayerMetrics {
  const load = Array.from(tokensPerExpert);
  const total = load.reduce((a, b) => a + b, 0);
  const mean = total / load.length;
  const maxVio = mean > 0 ? Math.max(...load) / mean - 1 : 0;
  let entropy = 0;
  for (const l of load) if (l > 0) entropy -= (l / total) * Math.log(l / total);
  return {
    tokensPerExpert: load,
    maxVio,
    dropped: assignments > 0 ? dropped / assignments : 0,
    loadEntropy: load.length > 1 && total > 0 ? entropy / Math.log(load.length) : 1,
    routerEntropy: load.length > 1 ? routerEntropyNats / Math.log(load.length) : 0,
    ...(expertsPerToken ? { expertsPerToken: trimZeros(Array.from(expertsPerToken)) } : {}),
  };
}

function trimZeros(v: number[]): number[] {
  let n = v.length;
  while (n > 1 && v[n - 1] === 0) n--;
  return v.slice(0, n);
}

/** Appends: to a regular file only, never through a link planted at the path (which fails: ELOOP). */
const APPEND_FLAGS = constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT | constants.O_NOFOLLOW;

/**
 * Appends one JSON object per line. The file (and its folder) is created afresh, or with
 * `resumeAt` continued: lines of steps from `resumeAt` on (logged after the checkpoint a run
 * resumes from) are dropped, so the file holds each step once. Either way the new file is written
 * beside the old one and renamed over it: a run killed meanwhile leaves the old file whole, and a
 * link at the path is replaced, never written through.
 */
export class MetricsLog {
  constructor(
    readonly path: string,
    options: { resumeAt?: number } = {},
  ) {
    options = checkOptions(options, 'MetricsLog', { resumeAt: true });
    makeDirs(dirname(path), 'MetricsLog', 'path', InvalidArgumentError);
    const resumeAt = options.resumeAt;
    writeFileAtomic(path, (fd) => {
      if (resumeAt === undefined) return;
      // The kept lines in batches of about 1 MiB (writeAll loops over short writes).
      let batch: string[] = [];
      let bytes = 0;
      const flush = (): void => {
        writeAll(fd, Buffer.from(batch.join('')));
        batch = [];
        bytes = 0;
      };
      forEachLine(path, (line, m) => {
        if (m.step >= resumeAt) return;
        batch.push(line + '\n');
        bytes += line.length + 1;
        if (bytes >= 1 << 20) flush();
      });
      flush();
    });
  }
  append(m: StepMetrics): void {
    try {
      const fd = openSync(this.path, APPEND_FLAGS, 0o644);
      try {
        writeAll(fd, Buffer.from(JSON.stringify(m) + '\n'));
      } finally {
        closeSync(fd);
      }
    } catch (e) {
      throw restateFileError(this.path, e);
    }
  }
}

/**
 * Each whole line of a metrics log with its parsed object, read in chunks (a long run's file may be
 * larger than one string can hold); a line that does not parse (an unfinished line written as a
 * process died) is skipped. Nothing when there is no file; only a regular file is read (a FIFO would
 * block), and a link at the path is refused.
 */
function forEachLine(path: string, visit: (line: string, m: StepMetrics) => void): void {
  if (isLink(path))
    throw new InvalidArgumentError(`the metrics log ${path}: is a symbolic link; only regular files are read`, 'MetricsLog');
  if (!existsSync(path)) return;
  const { fd } = openRegular(path, { what: `the metrics log ${path}`, error: InvalidArgumentError });
  try {
    const chunk = Buffer.alloc(1 << 20);
    let pending: Buffer[] = [];
    const line = (bytes: Buffer): void => {
      const text = bytes.toString('utf8');
      if (!text.trim()) return;
      let m: unknown;
      try {
        m = JSON.parse(text);
      } catch {
        return;
      }
      // A line that parses but is not a step's record (null, a number: written by something else) is skipped as a torn one is.
      if (m === null || typeof m !== 'object' || !Number.isSafeInteger((m as { step?: unknown }).step)) return;
      visit(text, m as StepMetrics);
    };
    for (let n; (n = readSync(fd, chunk, 0, chunk.length, null)) > 0;) {
      let start = 0;
      for (let nl = chunk.indexOf(0x0a, 0); nl >= 0 && nl < n; nl = chunk.indexOf(0x0a, start)) {
        line(Buffer.concat([...pending, chunk.subarray(start, nl)]));
        pending = [];
        start = nl + 1;
      }
      if (start < n) pending.push(Buffer.from(chunk.subarray(start, n)));
    }
    if (pending.length) line(Buffer.concat(pending));
  } finally {
    closeSync(fd);
  }
}

function isLink(path: string): boolean {
  try {
    return lstatSync(path).isSymbolicLink();
  } catch {
    return false;
  }
}

/** The steps a metrics.jsonl holds ([] when there is no file); a torn last line (a killed run) is skipped. */
export function readMetrics(path: string): StepMetrics[] {
  const out: StepMetrics[] = [];
  forEachLine(path, (_line, m) => out.push(m));
  return out;
}
