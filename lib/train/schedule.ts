/**
 * Learning-rate schedule: linear warm-up, then cosine decay to a floor. Steps count from 0 (the
 * first optimizer step is step 0 here; AdamW's bias-correction `step` is this + 1). maxLr comes on
 * one step, the peak P (the warm-up's last step, or step 0 without warm-up), and the last step of a
 * totalSteps run takes minLr:
 *
 *   step < warmupSteps:                  lr = warmupStartLr + (maxLr − warmupStartLr)·(step + 1)/warmupSteps
 *   P ≤ step ≤ L (L = totalSteps − 1):   p = (step − P)/(L − P)   (0 when L = P)
 *                                        lr = minLr + ½(maxLr − minLr)(1 + cos(π·p))
 *   step > L:                            lr = minLr
 *
 * The warm-up line starts at warmupStartLr (default 0) one step before step 0, so the first step
 * already moves; pass warmupStartLr: minLr to warm up from the floor. totalSteps counts the warm-up
 * too; totalSteps == warmupSteps warms up to maxLr at the last step and holds minLr after it.
 */
import { invalidArgument } from '../errors.js';
import { checkKeys, checkNonNegativeInt, checkNonNegativeNumber } from '../validate.js';

export interface CosineScheduleConfig {
  /** Steps of linear warm-up (0: none). */
  warmupSteps: number;
  /** Steps of the run, warm-up included (≥ warmupSteps): its last step, totalSteps − 1, takes minLr. */
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
    const peak = Math.max(warmupSteps - 1, 0);
    const last = totalSteps - 1;
    if (step > last) return minLr;
    const p = last === peak ? 0 : (step - peak) / (last - peak);
    return minLr + 0.5 * (maxLr - minLr) * (1 + Math.cos(Math.PI * p));
  };
}

/** lr at one step (validates the config on every call; build cosineSchedule once in a loop). */
export function cosineLr(step: number, config: CosineScheduleConfig): number {
  return cosineSchedule(config)(step);
}
