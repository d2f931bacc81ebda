/**
 * Learning-rate schedule: linear warm-up, then cosine decay to a floor. Steps count from 0 (the
 * first optimizer step is step 0 here; AdamW's bias-correction `step` is this + 1).
 *
 *   step < warmupSteps:                 lr = warmupStartLr + (maxLr − warmupStartLr)·(step + 1)/warmupSteps
 *                                       (the first step already moves; step warmupSteps−1 reaches maxLr)
 *   warmupSteps ≤ step ≤ totalSteps:    p = (step − warmupSteps)/(totalSteps − warmupSteps)
 *                                       lr = minLr + ½(maxLr − minLr)(1 + cos(π·p))
 *   step > totalSteps:                  lr = minLr
 *
 * The warm-up starts from 0 by default (warmupStartLr: 0); pass warmupStartLr: minLr to warm up from
 * the floor instead. totalSteps counts the warm-up too; totalSteps == warmupSteps gives maxLr at
 * that step and minLr after it.
 */
import { invalidArgument } from '../errors.js';
import { checkKeys, checkNonNegativeInt, checkNonNegativeNumber } from '../validate.js';

export interface CosineScheduleConfig {
  /** Steps of linear warm-up (0: none). */
  warmupSteps: number;
  /** The step at which the cosine reaches minLr (warm-up included); ≥ warmupSteps. */
  totalSteps: number;
  maxLr: number;
  /** Floor of the cosine. Default 0. */
  minLr?: number;
  /** Where the warm-up starts. Default 0. */
  warmupStartLr?: number;
}

/** Validates the config once and returns lr(step). */
export function cosineSchedule(config: CosineScheduleConfig): (step: number) => number {
  if (config === null || typeof config !== 'object') invalidArgument('cosineSchedule', 'the config must be an object');
  checkKeys(config, 'cosineSchedule', { warmupSteps: true, totalSteps: true, maxLr: true, minLr: true, warmupStartLr: true });
  const op = 'cosineSchedule';
  const warmupSteps = checkNonNegativeInt(config.warmupSteps, op, 'warmupSteps');
  const totalSteps = checkNonNegativeInt(config.totalSteps, op, 'totalSteps');
  const maxLr = checkNonNegativeNumber(config.maxLr, op, 'maxLr');
  const minLr = checkNonNegativeNumber(config.minLr ?? 0, op, 'minLr');
  const startLr = checkNonNegativeNumber(config.warmupStartLr ?? 0, op, 'warmupStartLr');
  if (totalSteps < warmupSteps)
    invalidArgument('cosineSchedule', `'totalSteps' = ${totalSteps} is less than 'warmupSteps' = ${warmupSteps}`);
  if (minLr > maxLr) invalidArgument('cosineSchedule', `'minLr' = ${minLr} is more than 'maxLr' = ${maxLr}`);
  return (step: number): number => {
    checkNonNegativeInt(step, op, 'step');
    if (step < warmupSteps) return startLr + ((maxLr - startLr) * (step + 1)) / warmupSteps;
    if (step > totalSteps) return minLr;
    const span = totalSteps - warmupSteps;
    const p = span === 0 ? 0 : (step - warmupSteps) / span;
    return minLr + 0.5 * (maxLr - minLr) * (1 + Math.cos(Math.PI * p));
  };
}

/** lr at one step (validates the config on every call; build cosineSchedule once in a loop). */
export function cosineLr(step: number, config: CosineScheduleConfig): number {
  return cosineSchedule(config)(step);
}
