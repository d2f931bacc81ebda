/**
 * Per-step, per-layer routing metrics and the JSON-lines log.
 *   tokensPerExpert  assignments each expert received this step (all-reduced over ranks by the caller)
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
import { appendFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { checkOptions } from '../validate.js';

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

/**
 * Appends one JSON object per line. The file (and its folder) is created afresh, or with
 * `resumeAt` continued: lines of steps from `resumeAt` on (logged after the checkpoint a run
 * resumes from) are dropped, so the file holds each step once.
 */
export class MetricsLog {
  constructor(
    readonly path: string,
    options: { resumeAt?: number } = {},
  ) {
    options = checkOptions(options, 'MetricsLog', { resumeAt: true });
    mkdirSync(dirname(path), { recursive: true });
    const resumeAt = options.resumeAt;
    const kept = resumeAt === undefined ? [] : readMetrics(path).filter((m) => m.step < resumeAt);
    writeFileSync(path, kept.map((m) => JSON.stringify(m) + '\n').join(''));
  }
  append(m: StepMetrics): void {
    appendFileSync(this.path, JSON.stringify(m) + '\n');
  }
}

/** The steps a metrics.jsonl holds ([] when there is no file); a torn last line (a killed run) is skipped. */
export function readMetrics(path: string): StepMetrics[] {
  if (!existsSync(path)) return [];
  const out: StepMetrics[] = [];
  for (const line of readFileSync(path, 'utf8').split('\n')) {
    if (!line.trim()) continue;
    try {
      out.push(JSON.parse(line) as StepMetrics);
    } catch {
      // an unfinished line written as the process died
    }
  }
  return out;
}
