/**
 * Kernel switches: which CUDA kernel an op runs where it has more than one. The defaults are the
 * kernels that measured fastest (benchmarks/grouped-gemm.md, benchmarks/kernels-notes.md); turning
 * one off is for comparisons (benchmarks) and tests. Results differ only by floating-point summation
 * order. The addon reads them in one place per op (native/ops/moe/grouped_gemm/grouped_gemm.cc,
 * native/ops/moe/router/router.cc), at every call; the CPU paths ignore them.
 *
 *   groupedGemm.hopper   true   the TMA + wgmma kernel on compute capability 9.0 (H100, H200) for
 *                               the shapes it takes (K and N multiples of 8; dW from 32 rows per
 *                               group on average); false: the mma.sync kernel there too
 *   groupedGemm.bResident true  dW with bf16 results and 32-128 rows per group on average (E=256:
 *                               DeepSeek-V3's training step) on the Hopper kernel that keeps each
 *                               group's dC slice in shared memory and stores by TMA tensor stores;
 *                               false: the general Hopper kernel (needs hopper on)
 *   groupedGemm.trimTails true  dW (TN) on the Hopper kernel: a group's last k-tile runs only the
 *                               k16 steps that hold its rows (the rest would multiply zeroed rows).
 *                               The same results. The layer's dW13 2.7% and dW2 3.4% faster at the
 *                               power limit (H200, dc449a0); false: every k-tile's four steps
 *   groupedGemm.fewRows  true   dW with at most 8 rows per group on average (decode) streamed by
 *                               the few-rows kernel; false: the tensor-core kernels
 *   groupedGemm.decode   true   the forward (NN, Store or SwiGLU) with a handful of rows per group
 *                               (all rows ≤ 32, or ≤ 4 per group on average) on the decode kernel:
 *                               weights streamed once, split along K, for the groups of ≤ 16 or 32
 *                               rows (the tile kernels take any larger group). A layer's decode
 *                               step at T = 1: Mixtral 0.25 against 0.39 ms, DeepSeek-V3 0.28
 *                               against 0.38 (H200, 54297f7); false: the tile kernels for every group
 *   groupedGemm.skinny   true   the forward (NN, plain store) with one group and N ≤ 256 columns,
 *                               K and N multiples of 8 (the router's logits x·Wr) on the split-K
 *                               skinny kernel: every SM streams x, where the tile kernels give one
 *                               block per 128 rows; past 64 columns only up to 1024 rows. Sums in a
 *                               fixed order (the same bits every run on one GPU). The layer's x·Wr (T=4096,
 *                               H=7168, E=32): 24 against 73 µs (H200, 5b01f47); false: the tile
 *                               (or decode) kernels
 *   groupedGemm.splitRows true  dW (TN, plain store, f32 out) of one group with fewer output tiles
 *                               than half the SMs (the router's xᵀ·dLogits, [H, E] over T rows):
 *                               the rows cut into up to 16 ranges of at least 256, one fp32 partial
 *                               each on the tile kernels, added in split order (the same bits every
 *                               run on one GPU; other bits than unsplit); false: one range, its
 *                               tiles walking all the rows
 *   router.fast          true   the fast router forward for E ∈ {8, 16, …, 512} (groups a power of
 *                               two, groupTop ≤ 2); false: the generic kernel for every E
 *   router.pdl           true   the fast router forward launched as the count-zeroing kernel's
 *                               programmatic dependent (sm_90 and newer); false: a plain launch
 *
 * The environment sets the starting values, read once when this module loads; setKernelOptions
 * overrides them, and nothing else does. '0' turns a switch off, '1' on, any other value leaves
 * its default:
 *   MOE_EP_GG_HOPPER=0  MOE_EP_GG_B_RESIDENT=0  MOE_EP_GG_TRIM_TAILS=0  MOE_EP_GG_FEW_ROWS=0  MOE_EP_GG_DECODE=0
 *   MOE_EP_GG_SKINNY=0  MOE_EP_GG_SPLIT_ROWS=0  MOE_EP_ROUTER_FAST=0  MOE_EP_PDL=0
 * The switches are one set per process: they live in the addon, which a process loads once and
 * one thread at a time holds (a thread that exits hands it on; module.cc). A thread loading the
 * addon finds them either at the compiled defaults (no thread has set any): it applies its
 * environment's values; or not: an earlier thread set them, and it adopts them instead of resetting
 * them. (So a worker started with an environment of its own applies it when the process's switches
 * happen to equal the defaults.) kernelOptions() reads them back.
 * (MOE_EP_GG_TILE, MOE_EP_GG_HOPPER_STAGED and MOE_EP_GG_HOPPER_HANDOFF, and later
 * MOE_EP_GG_PINGPONG and MOE_EP_GG_FUSED_HANDOFF, switched variants that are no longer in the addon:
 * benchmarks/kernels/grouped_gemm/, steps 01 and 05-09. Set, they are named on stderr once and change
 * nothing. The switches groupedGemm.pingpong (the ping-pong kernel for fp32 results, measured slower)
 * and groupedGemm.fusedHandoff (the fused SwiGLU/dSwiGLU epilogues handed off, measured faster than
 * from registers and now the only way) went with them: setKernelOptions refuses them by name.)
 */
// lib/native.ts imports this module (to apply the switches as the addon loads), so it checks its
// argument with errors.ts alone: validate.ts imports tensor.ts and stream.ts, which import native.ts.
import { invalidArgument, unknownNames } from './errors.js';
import { native } from './native.js';

export interface GroupedGemmKernelOptions {
  /** The TMA + wgmma kernel on compute capability 9.0 where the shape allows (default true). */
  hopper: boolean;
  /** dW with at most 8 rows per group on average on the few-rows streaming kernel (default true). */
  fewRows: boolean;
  /** The forward with a handful of rows per group on the split-K decode kernel (default true). */
  decode: boolean;
  /** The forward with one group and at most 256 columns (the router's logits) on the split-K skinny kernel (default true). */
  skinny: boolean;
  /** dW (bf16 results) with 32-128 rows per group on average on the B-resident Hopper kernel (default true). */
  bResident: boolean;
  /** dW on the Hopper kernel skips the k16 steps past each group's last row (default true; the same results). */
  trimTails: boolean;
  /** dW (f32 out) of one group with few output tiles (the router's) split into row ranges, partials added in order (default true). */
  splitRows: boolean;
}

export interface RouterKernelOptions {
  /** The fast router forward for the shapes it has (default true). */
  fast: boolean;
  /** Programmatic dependent launch of the fast forward on sm_90 and newer (default true). */
  pdl: boolean;
}

export interface KernelOptions {
  groupedGemm: GroupedGemmKernelOptions;
  router: RouterKernelOptions;
}

/** What setKernelOptions takes: any subset of the switches. */
export type KernelOptionsUpdate = { [G in keyof KernelOptions]?: Partial<KernelOptions[G]> };

/** The defaults, before the environment. */
export const kernelOptionDefaults: Readonly<KernelOptions> = Object.freeze({
  groupedGemm: Object.freeze({
    hopper: true,
    fewRows: true,
    decode: true,
    skinny: true,
    bResident: true,
    trimTails: true,
    splitRows: true,
  }),
  router: Object.freeze({ fast: true, pdl: true }),
});

/** The environment variable behind each switch. */
const ENVIRONMENT = {
  groupedGemm: {
    hopper: 'MOE_EP_GG_HOPPER',
    fewRows: 'MOE_EP_GG_FEW_ROWS',
    decode: 'MOE_EP_GG_DECODE',
    skinny: 'MOE_EP_GG_SKINNY',
    bResident: 'MOE_EP_GG_B_RESIDENT',
    trimTails: 'MOE_EP_GG_TRIM_TAILS',
    splitRows: 'MOE_EP_GG_SPLIT_ROWS',
  },
  router: { fast: 'MOE_EP_ROUTER_FAST', pdl: 'MOE_EP_PDL' },
} as const satisfies { [G in keyof KernelOptions]: { [K in keyof KernelOptions[G]]: string } };

const RETIRED = ['MOE_EP_GG_TILE', 'MOE_EP_GG_HOPPER_STAGED', 'MOE_EP_GG_HOPPER_HANDOFF', 'MOE_EP_GG_PINGPONG', 'MOE_EP_GG_FUSED_HANDOFF'];
/** Switches that left with their kernels: setKernelOptions refuses them as unknown and says where they went. */
const RETIRED_OPTIONS: { readonly [G in keyof KernelOptions]?: readonly string[] } = { groupedGemm: ['pingpong', 'fusedHandoff'] };

function copy(o: KernelOptions): KernelOptions {
  return { groupedGemm: { ...o.groupedGemm }, router: { ...o.router } };
}

/** The switches as the environment sets them: '0' is off, '1' on, unset or anything else the default. */
export function kernelOptionsFromEnvironment(env: NodeJS.ProcessEnv = process.env): KernelOptions {
  if (env === null || typeof env !== 'object')
    invalidArgument('kernelOptionsFromEnvironment', `'env' must be an object of variables (process.env)`);
  const o = copy(kernelOptionDefaults);
  for (const g of Object.keys(ENVIRONMENT) as (keyof KernelOptions)[]) {
    const vars: Record<string, string> = ENVIRONMENT[g];
    const group = o[g] as unknown as Record<string, boolean>;
    for (const [key, name] of Object.entries(vars)) {
      if (env[name] === '0') group[key] = false;
      else if (env[name] === '1') group[key] = true;
    }
  }
  return o;
}

// Read once, at load: the starting values.
const fromEnvironment = kernelOptionsFromEnvironment();
const retired = RETIRED.filter((name) => process.env[name] !== undefined);
if (retired.length) {
  process.stderr.write(
    `moe-ep: ${retired.join(', ')} no longer switch${retired.length > 1 ? '' : 'es'} anything: those kernel variants left the addon (benchmarks/kernels/grouped_gemm/ in the repository)\n`,
  );
}
/** The switches in force (a copy), as the addon holds them for the process (loading it if this thread has not). */
export function kernelOptions(): KernelOptions {
  return copy(native().kernelOptions());
}

/**
 * Refuses a non-object and names unknown keys, as validate.ts's checkKeys does; retired ones (a
 * switch whose kernel left the addon) are also said to be so.
 */
function checkKeys(o: unknown, op: string, known: readonly string[], retired: readonly string[] = []): Record<string, unknown> {
  if (o === null || typeof o !== 'object' || Array.isArray(o)) {
    invalidArgument(op, `'options' must be an object; received ${o === null ? 'null' : Array.isArray(o) ? 'an array' : typeof o}`);
  }
  const names = Object.keys(o);
  if (names.some((n) => !known.includes(n))) {
    const gone = names.filter((n) => retired.includes(n));
    const note = gone.length
      ? `; ${gone.map((n) => `'${n}'`).join(', ')} chose between kernel variants until the slower one left the addon (benchmarks/kernels/grouped_gemm/ in the repository)`
      : '';
    invalidArgument(op, unknownNames(names, known) + note);
  }
  return o as Record<string, unknown>;
}

/**
 * Sets some switches, keeping the others; returns the switches as they were before, so a caller
 * can put them back: `const before = setKernelOptions({ groupedGemm: { hopper: false } }); …;
 * setKernelOptions(before)`. Unknown names and values other than booleans are refused.
 */
export function setKernelOptions(update: KernelOptionsUpdate): KernelOptions {
  const op = 'setKernelOptions';
  const groups = checkKeys(update, op, Object.keys(ENVIRONMENT));
  const before = kernelOptions();
  const next = copy(before);
  for (const g of Object.keys(groups) as (keyof KernelOptions)[]) {
    if (groups[g] === undefined) continue;
    const given = checkKeys(groups[g], `${op}: ${g}`, Object.keys(ENVIRONMENT[g]), RETIRED_OPTIONS[g]);
    for (const [key, value] of Object.entries(given)) {
      if (value === undefined) continue;
      // validate.ts's checkBoolean wording
      if (typeof value !== 'boolean') invalidArgument(op, `'${g}.${key}' must be a boolean; received ${String(value)}`);
      (next[g] as unknown as Record<string, boolean>)[key] = value;
    }
  }
  native().setKernelOptions(next);
  return before;
}

/** Back to the starting values: the defaults as the environment set them at load. */
export function resetKernelOptions(): KernelOptions {
  return setKernelOptions(fromEnvironment);
}

/** Whether two sets of switches are the same. */
function sameOptions(a: KernelOptions, b: KernelOptions): boolean {
  return (Object.keys(ENVIRONMENT) as (keyof KernelOptions)[]).every((g) =>
    Object.keys(ENVIRONMENT[g]).every(
      (k) => (a[g] as unknown as Record<string, boolean>)[k] === (b[g] as unknown as Record<string, boolean>)[k],
    ),
  );
}

/**
 * Called by lib/native.ts on the addon as this thread loads it, before any op runs. The addon's
 * switches still at the compiled defaults: no thread has applied an environment or set any, so this
 * thread's environment values go in. Otherwise another thread of the process got there first (the
 * main thread, before this worker): they are adopted, not reset. This relies on the addon's compiled
 * defaults (GroupedGemmOptions, RouterOptions) being kernelOptionDefaults: test 09's fresh-process
 * case fails if they drift apart (the environment would then be ignored).
 */
export function applyKernelOptions(raw: { setKernelOptions(o: KernelOptions): void; kernelOptions(): KernelOptions }): void {
  if (sameOptions(raw.kernelOptions(), kernelOptionDefaults)) raw.setKernelOptions(fromEnvironment);
}
