// Types for hf-moe-reference.mjs (plain JavaScript, so that the MPI programs in test/mpi/ can
// import it too): the float64 references of the families' MoE blocks, described there.
import type { HfTestConfig, MoEBlockWeights } from './hf-fixtures.mjs';

export function moeLayersOf(cfg: HfTestConfig): number[];
export function moeSizes(cfg: HfTestConfig): { H: number; F: number; E: number; k: number; Fs: number };
/** y [T,H] for x [T,H]; margin: the smallest gap at a routing decision; minChoice: the smallest biased score. */
export function hfMoEReference(
  cfg: HfTestConfig,
  w: MoEBlockWeights,
  x: Float64Array,
): { y: Float64Array; margin: number; minChoice: number };
