/**
 * What this installation offers: package and addon build, GPUs, CUDA driver and runtime, NCCL
 * (version and where it was found, or why not), MPI. Behind `npx moe-ep info`.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

import { addonPath, type DeviceProperties, type MpiStatus, native, type NcclStatus, packageRoot } from './native.js';

export interface Info {
  version: string;
  node: string;
  addon: {
    path: string;
    backend: 'cuda' | 'cpu';
    cudaArchitectures: string[];
    cudaCompilerVersion: string;
    compiler: string;
    ncclAbiChecked: boolean;
  };
  cuda: { driverVersion: string | null; runtimeVersion: string | null; devices: DeviceProperties[]; unavailable: string };
  nccl: NcclStatus & { versionString: string | null };
  mpi: { built: boolean; available: boolean; path: string; library: string; reason: string };
  /** The expert-parallel transports ranks on this host can use (lib/moe/dispatcher.ts). */
  transport: { ipc: boolean; peerAccess: number[][]; summary: string };
}

function cudaVersion(v: number): string | null {
  return v > 0 ? `${Math.floor(v / 1000)}.${Math.floor((v % 1000) / 10)}` : null;
}

function ncclVersion(v: number): string | null {
  return v > 0 ? `${Math.floor(v / 10000)}.${Math.floor((v % 10000) / 100)}.${v % 100}` : null;
}

export function info(): Info {
  const b = native();
  const build = b.buildInfo();
  const status = b.cudaStatus();
  const devices: DeviceProperties[] = [];
  for (let i = 0; i < status.deviceCount; i++) devices.push(b.deviceProperties(i));
  const nccl = b.ncclStatus();
  const version = (JSON.parse(readFileSync(join(packageRoot(), 'package.json'), 'utf8')) as { version: string }).version;
  return {
    version,
    node: process.version,
    addon: {
      path: addonPath(),
      backend: build.cuda ? 'cuda' : 'cpu',
      cudaArchitectures: build.cudaArchitectures ? build.cudaArchitectures.split(',') : [],
      cudaCompilerVersion: build.cudaCompilerVersion,
      compiler: `g++ ${build.compiler}`,
      ncclAbiChecked: build.ncclAbiChecked,
    },
    cuda: {
      driverVersion: cudaVersion(status.driverVersion),
      runtimeVersion: cudaVersion(status.runtimeVersion),
      devices,
      unavailable: status.unavailable,
    },
    nccl: { ...nccl, versionString: ncclVersion(nccl.version) },
    mpi: mpiInfo(b.mpiStatus(true), build.mpi),
    transport: transportInfo(status.deviceCount, build.cuda ? b.peerAccess() : []),
  };
}

function transportInfo(gpus: number, access: number[][]): Info['transport'] {
  if (gpus === 0) return { ipc: false, peerAccess: [], summary: "nccl/mpi only: the peer-memory ('ipc') transport needs GPUs" };
  const pairs = access.flatMap((row, i) => row.map((ok, j) => (i !== j ? ok : 1)));
  const all = pairs.every((ok) => ok === 1);
  const what =
    gpus === 1
      ? 'ranks sharing GPU 0 (CUDA IPC between processes)'
      : all
        ? `ranks on GPUs 0-${gpus - 1} (peer access between every pair) or sharing one`
        : 'ranks sharing one GPU, or on GPUs with peer access (not every pair here)';
  return { ipc: true, peerAccess: access, summary: `ipc for ${what}; nccl across hosts or without peer access` };
}

function mpiInfo(s: MpiStatus, built: boolean): Info['mpi'] {
  // Loading the backend library does not initialise MPI (its version string needs no MPI_Init).
  return { built, available: s.loaded, path: s.path, library: s.library, reason: s.loaded ? '' : s.error };
}

/** The human-readable report printed by `moe-ep info`. */
export function formatInfo(i: Info): string {
  const gib = (n: number): string => `${(n / 2 ** 30).toFixed(1)} GiB`;
  const lines = [
    `moe-ep ${i.version} (node ${i.node})`,
    `addon      ${i.addon.path}`,
    `backend    ${i.addon.backend}${i.addon.backend === 'cuda' ? ` (CUDA ${i.addon.cudaCompilerVersion}, archs ${i.addon.cudaArchitectures.join(' ')})` : ' (built without CUDA)'}`,
    `driver     ${i.cuda.driverVersion ?? 'none'}   runtime ${i.cuda.runtimeVersion ?? 'none'}`,
  ];
  if (i.cuda.devices.length === 0) lines.push(`GPUs       none: ${i.cuda.unavailable}`);
  for (const d of i.cuda.devices) {
    lines.push(
      `GPU ${d.index}      ${d.name}, ${gib(d.totalMemory)} (${gib(d.freeMemory)} free), compute capability ${d.computeCapability}, ${d.multiprocessors} SMs`,
    );
  }
  if (i.nccl.loaded)
    lines.push(
      `NCCL       ${i.nccl.versionString} from ${i.nccl.path}${i.addon.ncclAbiChecked ? ' (ABI checked against nccl.h at build time)' : ''}`,
    );
  else if (i.cuda.devices.length === 0)
    // Without GPUs NCCL has nothing to do: one line, not every place the loader looked.
    lines.push(`NCCL       not loaded, not needed without GPUs (moe-ep info --json lists where the loader looked)`);
  else lines.push(`NCCL       not loaded: ${i.nccl.error.replace(/\n/g, '\n           ')}`);
  lines.push(`MPI        ${i.mpi.available ? `${i.mpi.library || 'loaded'} via ${i.mpi.path}` : `no: ${i.mpi.reason}`}`);
  lines.push(`transport  ${i.transport.summary}`);
  return lines.join('\n');
}
