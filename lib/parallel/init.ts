/**
 * Start-up from the launcher's environment, with no flags: `mpirun -np N node app.js` (OpenMPI or
 * MPICH/Hydra), `srun` (Slurm) or any launcher setting RANK/WORLD_SIZE/LOCAL_RANK plus
 * MASTER_ADDR/MASTER_PORT. The local rank picks the GPU; the backend is NCCL when every rank has a
 * GPU of its own and NCCL loads, else MPI (CPU, or ranks sharing a GPU); one rank gets the 'single'
 * communicator. options.backend or MOE_EP_BACKEND override the choice. With GPUs and several
 * ranks, rank 0 logs the choice and why to stderr (`log: false` silences it).
 */
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';

import { cuda, setDefaultDevice } from '../device.js';
import { invalidArgument, shown } from '../errors.js';
import { checkOptions } from '../validate.js';
import { native } from '../native.js';
import { Tensor } from '../tensor.js';
import { type Backend, Communicator, DEFAULT_TIMEOUT_MS } from './communicator.js';
import { allGatherJson } from './gather-json.js';
import { rendezvous } from './rendezvous.js';

export type Launcher = 'torchrun' | 'openmpi' | 'mpich' | 'slurm' | 'env' | 'none';

export interface LaunchEnv {
  launcher: Launcher;
  rank: number;
  size: number;
  localRank: number;
  /** Ranks on this node, when the launcher says (else undefined). */
  localSize: number | undefined;
}

/** A variable as a plain decimal integer (no '0x2', '1e1', ' 3 ' or '+2'), or undefined when unset. */
function int(env: NodeJS.ProcessEnv, name: string): number | undefined {
  const v = env[name];
  if (v === undefined || v === '') return undefined;
  const n = /^\d+$/.test(v) ? Number(v) : NaN;
  if (!Number.isSafeInteger(n)) invalidArgument('init', `environment variable ${name}=${JSON.stringify(v)} is not a non-negative integer`);
  return n;
}

/** Set to something: an empty value counts as unset. */
const isSet = (env: NodeJS.ProcessEnv, name: string): boolean => env[name] !== undefined && env[name] !== '';

/** The first of `names` that is set, as an integer. */
function firstInt(env: NodeJS.ProcessEnv, names: readonly string[]): number | undefined {
  for (const name of names) {
    const n = int(env, name);
    if (n !== undefined) return n;
  }
  return undefined;
}

/** A variable the launcher always sets: its absence means a broken or partial environment. */
function required(env: NodeJS.ProcessEnv, name: string, launcher: string, because: string): number {
  const n = int(env, name);
  if (n === undefined) invalidArgument('init', `${because} (launcher ${launcher}) but ${name} is not set`);
  return n;
}

/** Slurm's per-node task list, e.g. "2(x3),1": the count for node `nodeId`. */
function slurmTasksOnNode(spec: string | undefined, nodeId: number | undefined): number | undefined {
  if (!spec) return undefined;
  const counts: number[] = [];
  for (const part of spec.split(',')) {
    const m = /^(\d+)(?:\(x(\d+)\))?$/.exec(part.trim());
    if (!m) return undefined;
    for (let i = 0; i < Number(m[2] ?? 1); i++) counts.push(Number(m[1]));
  }
  return counts[nodeId ?? 0];
}

/**
 * Rank, size and local rank from the launcher's variables (a pure function of `env`), the innermost
 * launcher first (torchrun under srun or in an sbatch script inherits Slurm's variables, which then
 * describe torchrun's own task, not this process):
 *   torchrun (TORCHELASTIC_RUN_ID set): RANK/WORLD_SIZE/LOCAL_RANK(/LOCAL_WORLD_SIZE);
 *   OpenMPI: OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK(/LOCAL_SIZE);
 *   MPICH/Hydra, Intel MPI, Cray PALS, srun --mpi=pmi2: PMI_RANK/PMI_SIZE, MPI_LOCALRANKID or
 *     PMI_LOCAL_RANK or PALS_LOCAL_RANKID or SLURM_LOCALID (/MPI_LOCALNRANKS, PMI_LOCAL_SIZE,
 *     PALS_LOCAL_SIZE, Slurm's task list);
 *   Slurm: SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (SLURM_TASKS_PER_NODE, SLURM_NODEID);
 *   any other: RANK/WORLD_SIZE/LOCAL_RANK(/LOCAL_WORLD_SIZE).
 * No launcher: rank 0 of 1. A partial environment (a size without its rank; an MPI launcher's or
 * torchrun's ranks without their local rank) or an inconsistent one (a local rank past the local
 * size; Slurm's rank and RANK/WORLD_SIZE that differ) is refused, naming the variables, rather than
 * read as a world of one or a GPU shared by accident.
 */
export function launchEnv(env: NodeJS.ProcessEnv = process.env): LaunchEnv {
  let e: LaunchEnv;
  const world = (launcher: Launcher, rank: string, size: string, why: string): { rank: number; size: number } => {
    const n = required(env, size, launcher, why);
    return { rank: n > 1 ? required(env, rank, launcher, `${size}=${n}`) : (int(env, rank) ?? 0), size: n };
  };
  const local = (launcher: Launcher, names: readonly string[], size: number): number => {
    const n = firstInt(env, names);
    if (n === undefined && size > 1)
      invalidArgument(
        'init',
        `launcher ${launcher} started ${size} ranks but none of ${names.join(', ')} is set: which GPU is this rank's?`,
      );
    return n ?? 0;
  };
  if (isSet(env, 'TORCHELASTIC_RUN_ID')) {
    const w = world('torchrun', 'RANK', 'WORLD_SIZE', 'TORCHELASTIC_RUN_ID is set');
    e = { launcher: 'torchrun', ...w, localRank: local('torchrun', ['LOCAL_RANK'], w.size), localSize: int(env, 'LOCAL_WORLD_SIZE') };
  } else if (isSet(env, 'OMPI_COMM_WORLD_SIZE')) {
    const w = world('openmpi', 'OMPI_COMM_WORLD_RANK', 'OMPI_COMM_WORLD_SIZE', 'OMPI_COMM_WORLD_SIZE is set');
    e = {
      launcher: 'openmpi',
      ...w,
      localRank: local('openmpi', ['OMPI_COMM_WORLD_LOCAL_RANK'], w.size),
      localSize: int(env, 'OMPI_COMM_WORLD_LOCAL_SIZE'),
    };
  } else if (isSet(env, 'PMI_SIZE')) {
    const w = world('mpich', 'PMI_RANK', 'PMI_SIZE', 'PMI_SIZE is set');
    // srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE too, and only Slurm's local id; Slurm's variables
    // describe this process only when they name the same rank (an sbatch script's are inherited).
    const bySrun = int(env, 'SLURM_PROCID') === w.rank && int(env, 'SLURM_NTASKS') === w.size;
    e = {
      launcher: 'mpich',
      ...w,
      localRank: local('mpich', ['MPI_LOCALRANKID', 'PMI_LOCAL_RANK', 'PALS_LOCAL_RANKID', ...(bySrun ? ['SLURM_LOCALID'] : [])], w.size),
      localSize:
        firstInt(env, ['MPI_LOCALNRANKS', 'PMI_LOCAL_SIZE', 'PALS_LOCAL_SIZE']) ??
        (bySrun ? slurmTasksOnNode(env['SLURM_TASKS_PER_NODE'], int(env, 'SLURM_NODEID')) : undefined),
    };
  } else if (isSet(env, 'SLURM_PROCID') && isSet(env, 'SLURM_NTASKS')) {
    const w = world('slurm', 'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NTASKS is set');
    e = {
      launcher: 'slurm',
      ...w,
      localRank: local('slurm', ['SLURM_LOCALID'], w.size),
      localSize: slurmTasksOnNode(env['SLURM_TASKS_PER_NODE'], int(env, 'SLURM_NODEID')),
    };
    // A launcher of another kind inside srun sets RANK/WORLD_SIZE of its own: which to trust is
    // not ours to guess when they disagree.
    const rank = int(env, 'RANK'),
      size = int(env, 'WORLD_SIZE');
    if (size !== undefined && (size !== e.size || (rank !== undefined && rank !== e.rank)))
      invalidArgument(
        'init',
        `Slurm says rank ${e.rank} of ${e.size} (SLURM_PROCID, SLURM_NTASKS) but RANK=${rank ?? '(unset)'}, WORLD_SIZE=${size}: two launchers' variables disagree; unset the stale ones (torchrun sets TORCHELASTIC_RUN_ID, which makes its own win)`,
      );
  } else if (isSet(env, 'WORLD_SIZE') && (int(env, 'WORLD_SIZE') !== 1 || isSet(env, 'RANK'))) {
    const w = world('env', 'RANK', 'WORLD_SIZE', 'WORLD_SIZE is set');
    e = { launcher: 'env', ...w, localRank: int(env, 'LOCAL_RANK') ?? 0, localSize: int(env, 'LOCAL_WORLD_SIZE') };
  } else {
    e = { launcher: 'none', rank: 0, size: 1, localRank: 0, localSize: 1 };
  }
  if (e.size < 1 || e.rank >= e.size) invalidArgument('init', `launcher ${e.launcher}: rank ${e.rank} is not in [0, ${e.size})`);
  if (e.localSize !== undefined && (e.localSize < 1 || e.localRank >= e.localSize))
    invalidArgument('init', `launcher ${e.launcher}: local rank ${e.localRank} is not in [0, ${e.localSize}) (the ranks on this node)`);
  return e;
}

/**
 * The id every party of the TCP rendezvous presents, so that two jobs given the same MASTER_PORT
 * refuse each other rather than swap NCCL ids: MOE_EP_JOB_ID when set, else the launcher's own job
 * id (TORCHELASTIC_RUN_ID from torchrun, SLURM_JOB_ID.SLURM_STEP_ID from srun, PMIX_NAMESPACE from
 * OpenMPI's mpirun), else '' (jobs launched by hand without MOE_EP_JOB_ID cannot be told apart).
 */
export function jobId(env: NodeJS.ProcessEnv = process.env): string {
  const own = env['MOE_EP_JOB_ID'];
  if (own) return own;
  if (env['TORCHELASTIC_RUN_ID']) return `torchelastic:${env['TORCHELASTIC_RUN_ID']}`;
  if (env['SLURM_JOB_ID']) return `slurm:${env['SLURM_JOB_ID']}.${env['SLURM_STEP_ID'] ?? ''}`;
  if (env['PMIX_NAMESPACE']) return `pmix:${env['PMIX_NAMESPACE']}`;
  return '';
}

export interface InitOptions {
  /** 'auto' (default) | 'single' | 'mpi' | 'nccl'; MOE_EP_BACKEND sets it too (the option wins). */
  backend?: Backend | 'auto';
  /** Per-communicator collective timeout (default 300 000 ms; 0 = none). */
  timeoutMs?: number;
  /** Pick and set the default device from the local rank (default true). */
  setDevice?: boolean;
  /** For NCCL without MPI: rank 0's address and port (default MASTER_ADDR / MASTER_PORT). */
  masterAddr?: string;
  masterPort?: number;
  /** The environment to read (default process.env); for tests. */
  env?: NodeJS.ProcessEnv;
  /**
   * Where rank 0 reports the backend chosen and why, when there are GPUs and several ranks
   * (default: a line on stderr); false: nowhere.
   */
  log?: boolean | ((line: string) => void);
}

export interface BackendChoice {
  backend: Backend;
  device: string; // 'cpu' or 'cuda:N'
  reason: string;
}

/** What init() knows of GPU sharing on this node, beyond the counts. */
export interface GpuSharing {
  /** The ranks' own answer (host and PCI bus id of each rank's GPU), when init asked them. */
  sharesGpu?: boolean;
  /**
   * CUDA_VISIBLE_DEVICES is set: each rank may see only its own GPUs, so a count of more ranks than
   * GPUs visible does not prove sharing. Counting still decides 'auto', but a requested 'nccl' is
   * let through (NCCL refuses a duplicate GPU itself).
   */
  visibleDevicesSet?: boolean;
}

/**
 * The backend and device init() would choose (pure apart from probing NCCL). Sharing is the ranks'
 * answer when init asked them (`sharing.sharesGpu`), else counted: more ranks on this node than
 * GPUs visible to each. Ranks per node unknown (no local size) counts as a GPU each: NCCL itself
 * refuses two ranks on one GPU.
 */
export function chooseBackend(
  le: LaunchEnv,
  requested: Backend | 'auto',
  gpus: number,
  ncclLoads: () => boolean,
  sharing: GpuSharing = {},
): BackendChoice {
  const device = gpus > 0 ? `cuda:${le.localRank % gpus}` : 'cpu';
  const asked = sharing.sharesGpu;
  const counted = le.localSize !== undefined && le.localSize > gpus;
  const shares = gpus > 0 && le.size > 1 && (asked ?? counted);
  const shared =
    asked === undefined
      ? `${le.localSize ?? le.size} ranks on this node share ${gpus} GPU(s)`
      : 'ranks on this node share a GPU (the same PCI bus id)';
  // Counted with CUDA_VISIBLE_DEVICES set, the sharing may not be real: say how to take NCCL anyway.
  const unsure = asked === undefined && sharing.visibleDevicesSet === true;
  if (requested === 'nccl' && shares && !unsure) {
    // NCCL would fail later in ncclCommInitRank ("duplicate GPU"); say why now.
    invalidArgument(
      'init',
      `backend 'nccl' was requested but ${shared}; NCCL refuses two ranks on one GPU: use 'mpi' (or 'auto'), which stages device buffers through pinned host memory, or start one rank per GPU`,
    );
  }
  const choice = ((): BackendChoice => {
    if (requested !== 'auto') return { backend: requested, device, reason: 'requested' };
    if (le.size === 1) return { backend: 'single', device, reason: 'one rank' };
    if (gpus === 0) return { backend: 'mpi', device, reason: 'no usable GPU' };
    if (shares)
      return {
        backend: 'mpi',
        device,
        reason: `${shared}; NCCL refuses two ranks on one GPU, so MPI carries the data, staging device buffers through pinned host memory${unsure ? ' (counted: where CUDA_VISIBLE_DEVICES gives each rank a GPU of its own, MOE_EP_BACKEND=nccl takes NCCL)' : ''}`,
      };
    if (!ncclLoads()) return { backend: 'mpi', device, reason: 'NCCL does not load' };
    return { backend: 'nccl', device, reason: 'one GPU per rank and NCCL loads' };
  })();
  // Ranks started from RANK/WORLD_SIZE alone are separate programs to MPI: each would be rank 0 of a
  // world of 1 (MPI_Init as a singleton), silently. Only NCCL (TCP rendezvous) joins them.
  if (choice.backend === 'mpi' && le.size > 1 && (le.launcher === 'env' || le.launcher === 'torchrun')) {
    invalidArgument(
      'init',
      `rank ${le.rank} of ${le.size} was started from RANK/WORLD_SIZE (${le.launcher}), not by mpirun, mpiexec or srun, so the MPI backend cannot join the ranks (${choice.reason}); start them with mpirun, or give each rank its own GPU with NCCL loadable`,
    );
  }
  return choice;
}

/**
 * The launchers whose ranks MPI joins without asking anything of the job: OpenMPI's mpirun and the
 * MPICH-style ones (mpiexec, srun --mpi=pmi2, which set PMI_RANK). There init shares the NCCL id and
 * asks about GPU sharing over MPI. Not plain srun: MPI_Init there needs Slurm's PMI support in the
 * MPI library, and aborts without it.
 */
function mpiJoins(le: LaunchEnv): boolean {
  return le.launcher === 'openmpi' || le.launcher === 'mpich';
}

/** This machine, as two processes on it agree and two machines do not (containers share a boot id). */
function machineId(): string {
  let boot = '';
  try {
    boot = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  } catch {
    // not Linux, or no /proc: the host name alone
  }
  return `${hostname()} ${boot}`;
}

/**
 * Whether ranks on a node share a GPU, asked of the ranks where counting cannot tell:
 * CUDA_VISIBLE_DEVICES set (a wrapper or scheduler showing each rank only its own GPUs) under a
 * launcher MPI joins. Collective over MPI: every rank of such a launch takes part, whatever its own
 * view (a rank without GPUs or without CUDA_VISIBLE_DEVICES sends null), and all decide from the
 * same gathered list, so no rank waits in a collective the others skipped. Undefined: counting
 * decides (some rank has no such view, or nothing to ask over).
 */
function askGpuSharing(
  le: LaunchEnv,
  env: NodeJS.ProcessEnv,
  gpus: number,
  requested: Backend | 'auto',
  timeoutMs: number,
): boolean | undefined {
  if (le.size === 1 || !mpiJoins(le) || (requested !== 'auto' && requested !== 'nccl') || !native().mpiStatus(true).loaded)
    return undefined;
  using world = Communicator.mpi({ timeoutMs });
  if (world.size !== le.size || world.rank !== le.rank) return undefined; // every rank alone alike; the 'mpi' path reports it
  let mine: string | null = null;
  if (gpus > 0 && isSet(env, 'CUDA_VISIBLE_DEVICES')) {
    try {
      mine = `${machineId()} ${native().deviceProperties(le.localRank % gpus).pciBusId}`;
    } catch {
      mine = null; // its GPU failed: this rank's own errors come later, after the collective
    }
  }
  const all = allGatherJson(world, mine);
  if (all.some((g) => g === null)) return undefined;
  return new Set(all).size < all.length;
}

function parseBackend(v: unknown, where: string): Backend | 'auto' {
  if (v === 'auto' || v === 'single' || v === 'mpi' || v === 'nccl') return v;
  return invalidArgument('init', `${where} must be auto, single, mpi or nccl; received ${shown(v)}`);
}

/**
 * The world communicator for this process, from the launcher's environment. Sets the default
 * device to cuda:(localRank % deviceCount) when GPUs are usable (unless setDevice is false).
 */
export async function init(options: InitOptions = {}): Promise<Communicator> {
  options = checkOptions(options, 'init', {
    backend: true,
    timeoutMs: true,
    setDevice: true,
    masterAddr: true,
    masterPort: true,
    env: true,
    log: true,
  });
  const env = options.env ?? process.env;
  const le = launchEnv(env);
  const requested =
    options.backend !== undefined
      ? parseBackend(options.backend, "'backend'")
      : env['MOE_EP_BACKEND']
        ? parseBackend(env['MOE_EP_BACKEND'], 'MOE_EP_BACKEND')
        : 'auto';
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const gpus = cuda.deviceCount();
  const sharesGpu = askGpuSharing(le, env, gpus, requested, timeoutMs);
  const choice = chooseBackend(le, requested, gpus, () => native().ncclStatus().loaded, {
    ...(sharesGpu === undefined ? {} : { sharesGpu }),
    visibleDevicesSet: isSet(env, 'CUDA_VISIBLE_DEVICES'),
  });
  if (options.setDevice !== false && choice.device !== 'cpu') setDefaultDevice(choice.device as `cuda:${number}`);
  const log = options.log ?? true;
  if (typeof log !== 'boolean' && typeof log !== 'function')
    invalidArgument('init', `'log' must be a boolean or a function; received ${String(log)}`);
  if (log !== false && le.rank === 0 && le.size > 1 && gpus > 0) {
    const line = `moe-ep init: ${le.size} ranks (${le.launcher}), backend ${choice.backend}, rank 0 on ${choice.device}: ${choice.reason}`;
    if (typeof log === 'function') log(line);
    else process.stderr.write(`${line}\n`);
  }
  switch (choice.backend) {
    case 'single': {
      if (le.size > 1) invalidArgument('init', `backend 'single' was requested but the launcher (${le.launcher}) started ${le.size} ranks`);
      const c = Communicator.single();
      c.timeoutMs = timeoutMs;
      return c;
    }
    case 'mpi': {
      const c = Communicator.mpi({ timeoutMs });
      try {
        checkMpiWorld(le, c);
      } catch (e) {
        c.dispose();
        throw e;
      }
      return c;
    }
    case 'nccl': {
      if (choice.device === 'cpu') invalidArgument('init', `backend 'nccl' needs a GPU: ${cuda.unavailableReason()}`);
      const device = le.localRank % gpus;
      const id = await shareNcclId(le, env, options, timeoutMs);
      const c = Communicator.nccl(le.rank, le.size, id, device, { timeoutMs });
      if (le.size > 1) connectPeers(c, device);
      return c;
    }
  }
}

/**
 * NCCL connects a pair of ranks for point-to-point traffic lazily, on the host, at their first
 * exchange, and no timeout covers that (a peer dead by then hangs it). One all-to-all of a value per
 * peer here makes every connection before the first step, so that later collectives' timeouts hold.
 */
function connectPeers(c: Communicator, device: number): void {
  try {
    using send = Tensor.zeros([c.size, 1], { device: `cuda:${device}` });
    using recv = Tensor.zeros([c.size, 1], { device: `cuda:${device}` });
    c.allToAll(send, recv);
  } catch (e) {
    c.dispose();
    throw e;
  }
}

/** Rank 0's NCCL unique id on every rank: over MPI under an MPI launcher, else the TCP rendezvous. */
async function shareNcclId(le: LaunchEnv, env: NodeJS.ProcessEnv, options: InitOptions, timeoutMs: number): Promise<Uint8Array> {
  if (le.size === 1) return Communicator.ncclUniqueId();
  if (mpiJoins(le) && native().mpiStatus(true).loaded) {
    using world = Communicator.mpi({ timeoutMs });
    // An MPI library of another kind than the launcher starts as a world of one: each rank would
    // keep its own (zero) id and NCCL would hang or fail obscurely.
    checkMpiWorld(le, world);
    const id = le.rank === 0 ? Communicator.ncclUniqueId() : new Uint8Array(128);
    using t = Tensor.fromArray(id, { dtype: 'u8', device: 'cpu' });
    world.broadcast(t, 0);
    return t.toArray() as Uint8Array;
  }
  const addr = options.masterAddr ?? env['MASTER_ADDR'];
  const port = rendezvousPort(le, env, options);
  if (!addr || port === undefined) {
    invalidArgument(
      'init',
      `NCCL needs rank 0's unique id on every rank: run under mpirun with the MPI backend built, or set MASTER_ADDR and MASTER_PORT (launcher: ${le.launcher})`,
    );
  }
  const blob = le.rank === 0 ? Communicator.ncclUniqueId() : undefined;
  return rendezvous({
    rank: le.rank,
    size: le.size,
    // Rank 0 listens on a loopback address itself (the job stays on this host), else on every
    // interface, IPv4 and IPv6 (MASTER_ADDR names it as the others reach it, which may not be an
    // address of its own: a NAT, a service name).
    addr: le.rank === 0 && !isLoopback(addr) ? '::' : addr,
    port,
    ...(blob ? { blob } : {}),
    timeoutMs,
    jobId: jobId(env),
  });
}

function isLoopback(addr: string): boolean {
  return addr === 'localhost' || addr === '::1' || /^127\.\d+\.\d+\.\d+$/.test(addr);
}

/**
 * Rank 0's rendezvous port: the masterPort option, else MOE_EP_MASTER_PORT, else MASTER_PORT, but
 * MASTER_PORT + 1 under torchrun, whose own store already listens on MASTER_PORT.
 */
export function rendezvousPort(le: LaunchEnv, env: NodeJS.ProcessEnv, options: InitOptions): number | undefined {
  const checked = (port: number, from: string): number => {
    if (!Number.isSafeInteger(port) || port < 1 || port > 65535)
      invalidArgument('init', `the rendezvous port ${port} (${from}) must be 1..65535; MOE_EP_MASTER_PORT sets another`);
    return port;
  };
  if (options.masterPort !== undefined) return checked(options.masterPort, "the 'masterPort' option");
  const own = int(env, 'MOE_EP_MASTER_PORT');
  if (own !== undefined) return checked(own, 'MOE_EP_MASTER_PORT');
  const master = int(env, 'MASTER_PORT');
  if (master === undefined) return undefined;
  return le.launcher === 'torchrun' ? checked(master + 1, 'MASTER_PORT + 1 under torchrun') : checked(master, 'MASTER_PORT');
}

function checkMpiWorld(le: LaunchEnv, world: Communicator): void {
  if (world.size !== le.size || world.rank !== le.rank)
    invalidArgument(
      'init',
      `the launcher (${le.launcher}) says rank ${le.rank} of ${le.size} but MPI sees rank ${world.rank} of ${world.size}: MPI was not started with these ranks (the MPI library is of another kind than the launcher; under srun, give it --mpi=pmix or pmi2)`,
    );
}

/**
 * Expert-parallel groups: `ep` holds epSize consecutive ranks (rank r is in group floor(r/epSize),
 * position r % epSize); `edp` holds the ranks with the same position in their EP group (they
 * replicate the same experts). Collective: every rank of `world` calls it.
 */
export function expertGroups(world: Communicator, epSize: number): { ep: Communicator; edp: Communicator } {
  if (!Number.isSafeInteger(epSize) || epSize < 1 || world.size % epSize !== 0) {
    invalidArgument('expertGroups', `'epSize' ${epSize} must be a positive divisor of the world size ${world.size}`);
  }
  const ep = world.split(Math.floor(world.rank / epSize), world.rank % epSize);
  const edp = world.split(world.rank % epSize, Math.floor(world.rank / epSize));
  if (!ep || !edp) throw new Error('expertGroups: split returned no communicator');
  return { ep, edp };
}
