/**
 * Start-up from the launcher's environment, with no flags: `mpirun -np N node app.js` (OpenMPI or
 * MPICH/Hydra), `srun` (Slurm) or any launcher setting RANK/WORLD_SIZE/LOCAL_RANK plus
 * MASTER_ADDR/MASTER_PORT. The local rank picks the GPU; the backend is NCCL when every rank has a
 * GPU of its own and NCCL loads, else MPI (CPU, or ranks sharing a GPU); one rank gets the 'single'
 * communicator. options.backend or MOE_EP_BACKEND override the choice. With GPUs and several
 * ranks, rank 0 logs the choice and why to stderr (`log: false` silences it).
 */
import { cuda, setDefaultDevice } from '../device.js';
import { invalidArgument } from '../errors.js';
import { checkOptions } from '../validate.js';
import { native } from '../native.js';
import { Tensor } from '../tensor.js';
import { type Backend, Communicator, DEFAULT_TIMEOUT_MS } from './communicator.js';
import { rendezvous } from './rendezvous.js';

export type Launcher = 'openmpi' | 'mpich' | 'slurm' | 'env' | 'none';

export interface LaunchEnv {
  launcher: Launcher;
  rank: number;
  size: number;
  localRank: number;
  /** Ranks on this node, when the launcher says (else undefined). */
  localSize: number | undefined;
}

function int(env: NodeJS.ProcessEnv, name: string): number | undefined {
  const v = env[name];
  if (v === undefined || v === '') return undefined;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 0)
    invalidArgument('init', `environment variable ${name}=${JSON.stringify(v)} is not a non-negative integer`);
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
 * Rank, size and local rank from the launcher's variables (a pure function of `env`):
 * OpenMPI OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK(/LOCAL_SIZE); MPICH/Hydra PMI_RANK/PMI_SIZE,
 * MPI_LOCALRANKID(/MPI_LOCALNRANKS); Slurm SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
 * (SLURM_TASKS_PER_NODE, SLURM_NODEID); generic RANK/WORLD_SIZE/LOCAL_RANK(/LOCAL_WORLD_SIZE).
 * No launcher: rank 0 of 1.
 */
export function launchEnv(env: NodeJS.ProcessEnv = process.env): LaunchEnv {
  let e: LaunchEnv;
  if (env['OMPI_COMM_WORLD_SIZE'] !== undefined) {
    e = {
      launcher: 'openmpi',
      rank: int(env, 'OMPI_COMM_WORLD_RANK') ?? 0,
      size: int(env, 'OMPI_COMM_WORLD_SIZE') ?? 1,
      localRank: int(env, 'OMPI_COMM_WORLD_LOCAL_RANK') ?? 0,
      localSize: int(env, 'OMPI_COMM_WORLD_LOCAL_SIZE'),
    };
  } else if (env['PMI_SIZE'] !== undefined && env['PMI_RANK'] !== undefined) {
    e = {
      launcher: 'mpich',
      rank: int(env, 'PMI_RANK') ?? 0,
      size: int(env, 'PMI_SIZE') ?? 1,
      localRank: int(env, 'MPI_LOCALRANKID') ?? 0,
      localSize: int(env, 'MPI_LOCALNRANKS'),
    };
  } else if (env['SLURM_PROCID'] !== undefined && env['SLURM_NTASKS'] !== undefined) {
    e = {
      launcher: 'slurm',
      rank: int(env, 'SLURM_PROCID') ?? 0,
      size: int(env, 'SLURM_NTASKS') ?? 1,
      localRank: int(env, 'SLURM_LOCALID') ?? 0,
      localSize: slurmTasksOnNode(env['SLURM_TASKS_PER_NODE'], int(env, 'SLURM_NODEID')),
    };
  } else if (env['WORLD_SIZE'] !== undefined && env['RANK'] !== undefined) {
    e = {
      launcher: 'env',
      rank: int(env, 'RANK') ?? 0,
      size: int(env, 'WORLD_SIZE') ?? 1,
      localRank: int(env, 'LOCAL_RANK') ?? 0,
      localSize: int(env, 'LOCAL_WORLD_SIZE'),
    };
  } else {
    e = { launcher: 'none', rank: 0, size: 1, localRank: 0, localSize: 1 };
  }
  if (e.size < 1 || e.rank >= e.size) invalidArgument('init', `launcher ${e.launcher}: rank ${e.rank} is not in [0, ${e.size})`);
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

/** The backend and device init() would choose (pure apart from probing GPUs and NCCL). */
export function chooseBackend(le: LaunchEnv, requested: Backend | 'auto', gpus: number, ncclLoads: () => boolean): BackendChoice {
  const device = gpus > 0 ? `cuda:${le.localRank % gpus}` : 'cpu';
  const perNode = le.localSize ?? le.size;
  const shared = `${perNode} ranks on this node share ${gpus} GPU(s)`;
  if (requested === 'nccl' && gpus > 0 && perNode > gpus) {
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
    if (perNode > gpus)
      return {
        backend: 'mpi',
        device,
        reason: `${shared}; NCCL refuses two ranks on one GPU, so MPI carries the data, staging device buffers through pinned host memory`,
      };
    if (!ncclLoads()) return { backend: 'mpi', device, reason: 'NCCL does not load' };
    return { backend: 'nccl', device, reason: 'one GPU per rank and NCCL loads' };
  })();
  // Ranks started from RANK/WORLD_SIZE alone are separate programs to MPI: each would be rank 0 of a
  // world of 1 (MPI_Init as a singleton), silently. Only NCCL (TCP rendezvous) joins them.
  if (choice.backend === 'mpi' && le.size > 1 && le.launcher === 'env') {
    invalidArgument(
      'init',
      `rank ${le.rank} of ${le.size} was started from RANK/WORLD_SIZE, not by mpirun, mpiexec or srun, so the MPI backend cannot join the ranks (${choice.reason}); start them with mpirun, or give each rank its own GPU with NCCL loadable`,
    );
  }
  return choice;
}

function parseBackend(v: unknown, where: string): Backend | 'auto' {
  if (v === 'auto' || v === 'single' || v === 'mpi' || v === 'nccl') return v;
  return invalidArgument('init', `${where} must be auto, single, mpi or nccl; received ${JSON.stringify(v)}`);
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
  const choice = chooseBackend(le, requested, gpus, () => native().ncclStatus().loaded);
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
      if (c.size !== le.size || c.rank !== le.rank) {
        c.dispose();
        invalidArgument(
          'init',
          `the launcher (${le.launcher}) says rank ${le.rank} of ${le.size} but MPI sees rank ${c.rank} of ${c.size}: MPI was not started with these ranks (under srun, give it --mpi=pmix or pmi2)`,
        );
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
  const mpiLaunched = le.launcher === 'openmpi' || le.launcher === 'mpich';
  if (mpiLaunched && native().mpiStatus(true).loaded) {
    using world = Communicator.mpi({ timeoutMs });
    const id = le.rank === 0 ? Communicator.ncclUniqueId() : new Uint8Array(128);
    using t = Tensor.fromArray(id, { dtype: 'u8', device: 'cpu' });
    world.broadcast(t, 0);
    return t.toArray() as Uint8Array;
  }
  const addr = options.masterAddr ?? env['MASTER_ADDR'];
  const port = options.masterPort ?? (env['MASTER_PORT'] ? Number(env['MASTER_PORT']) : undefined);
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
    addr: le.rank === 0 && addr !== 'localhost' ? '0.0.0.0' : addr,
    port,
    ...(blob ? { blob } : {}),
    timeoutMs,
    jobId: jobId(env),
  });
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
