/**
 * The one place that loads the native addon, and the typed view of its raw binding.
 *
 * Load order: MOE_EP_ADDON (an explicit path to a .node file, and nothing else), else a local build
 * (build/Release/moe_ep.node: made by `npm install` when no prebuild fit, or in a clone), then the
 * prebuilt binary (prebuilds/<platform>-<arch>/moe-ep.node). One that fails to load is named on
 * stderr when a later one loads; when none loads, the failures are thrown as one error with
 * possible solutions.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import { errorClasses, UnavailableError } from './errors.js';
import { applyKernelOptions, type KernelOptions } from './kernel-options.js';

declare const brand: unique symbol;
type Branded<T, B extends string> = T & { readonly [brand]: B };

export interface TensorDescription {
  shape: number[];
  strides: number[];
  offset: number;
  dtype: number;
  deviceType: number;
  deviceIndex: number;
  contiguous: boolean;
}

export type TensorHandle = Branded<
  {
    describe(): TensorDescription;
    dispose(): void;
    isDisposed(): boolean;
    view(shape: number[]): TensorHandle;
    narrow(dim: number, start: number, length: number): TensorHandle;
    transpose(dim0: number, dim1: number): TensorHandle;
    toBuffer(): ArrayBuffer;
    sharesStorage(other: TensorHandle): boolean;
    recordStream(stream: StreamHandle | null): void;
  },
  'TensorHandle'
>;

export type StreamHandle = Branded<
  { synchronize(): void; query(): boolean; waitEvent(e: EventHandle): void; dispose(): void },
  'StreamHandle'
>;
export type EventHandle = Branded<
  {
    record(stream: StreamHandle | null): void;
    synchronize(): void;
    query(): boolean;
    elapsedTime(end: EventHandle): number;
    block(stream: StreamHandle | null): void;
    dispose(): void;
  },
  'EventHandle'
>;

/** A CUDA graph being captured, then captured (native/addon/graph_binding.cc, native/core/graph.h). */
export type GraphHandle = Branded<
  {
    endCapture(): void;
    /** Ends a capture whose work failed; returns what broke the capture ('' when nothing did). */
    abortCapture(): string;
    replay(stream: StreamHandle | null): void;
    retain(t: TensorHandle): void;
    poolBytes(): number;
    nodeCount(): number;
    replays(): number;
    dispose(): void;
  },
  'GraphHandle'
>;

export interface NativeMemoryStats {
  liveBytes: number;
  peakBytes: number;
  cachedBytes: number;
  reservedBytes: number;
  liveAllocations: number;
  allocations: number;
  cacheHits: number;
  deviceMallocs: number;
  outOfMemory: number;
  /** Bytes held by CUDA-graph memory pools (live or free blocks; part of reservedBytes). 0 on the CPU. */
  graphPoolBytes: number;
}

export interface BuildInfo {
  cuda: boolean;
  cudaArchitectures: string;
  cudaCompilerVersion: string;
  ncclAbiChecked: boolean;
  mpi: boolean;
  compiler: string;
}

export interface CudaStatus {
  builtWithCuda: boolean;
  deviceCount: number;
  unavailable: string;
  driverVersion: number;
  runtimeVersion: number;
}

export interface DeviceProperties {
  index: number;
  name: string;
  totalMemory: number;
  freeMemory: number;
  computeCapability: string;
  multiprocessors: number;
  l2Bytes: number;
  sharedMemoryPerBlockOptin: number;
  pciBusId: string;
}

export type CommHandle = Branded<
  {
    rank(): number;
    size(): number;
    backend(): 'single' | 'mpi' | 'nccl';
    timeoutMs(): number;
    setTimeoutMs(ms: number): void;
    isAborted(): boolean;
    allReduce(t: TensorHandle, op: number): void;
    allGather(input: TensorHandle, output: TensorHandle): void;
    broadcast(t: TensorHandle, root: number): void;
    barrier(): void;
    allToAll(send: TensorHandle, recv: TensorHandle): void;
    allToAllV(send: TensorHandle, sendRows: number[], recv: TensorHandle, recvRows: number[]): void;
    split(color: number, key: number): CommHandle | null;
    abort(): void;
    dispose(): void;
  },
  'CommHandle'
>;

/** The peer-memory transport (native/comm/peer, native/addon/peer_binding.cc). */
export type PeerHandle = Branded<
  {
    exportHandle(): Uint8Array;
    /** null when every peer's buffer can be mapped here, else why not. */
    canReach(exports: Uint8Array[]): string | null;
    open(exports: Uint8Array[]): void;
    check(op: string): void;
    abort(): void;
    isAborted(): boolean;
    setTimeoutMs(ms: number): void;
    synchronize(): void;
    closePeers(): void;
    dispatchLayout(
      indices: TensorHandle,
      slot: TensorHandle,
      kept: TensorHandle,
      segment: number,
      align: number,
      sms: number,
      localExperts: number,
      pos: TensorHandle,
      dest: TensorHandle,
      offsets: TensorHandle | null,
      segStart: TensorHandle | null,
      fill: TensorHandle | null,
    ): { rows: number; maxTokens: number; segmentRows: number[]; tokensFrom: number[] };
    dispatchRows(
      payload: TensorHandle,
      indices: TensorHandle,
      slot: TensorHandle,
      weights: TensorHandle,
      pos: TensorHandle,
      dest: TensorHandle,
      segment: number,
      align: number,
      sms: number,
      localExperts: number,
      fp8: boolean,
      segStart: TensorHandle | null,
      fill: TensorHandle | null,
      offsets: TensorHandle | null,
      out: TensorHandle,
      outWeights: TensorHandle,
      rowSrc: TensorHandle,
      recvRowOf: TensorHandle,
      recvWeight: TensorHandle,
      recvTokens: TensorHandle,
      outScales: TensorHandle | null,
    ): void;
    combine(
      rows: TensorHandle,
      recvRowOf: TensorHandle,
      recvWeight: TensorHandle | null,
      recvTokens: TensorHandle,
      pos: TensorHandle,
      y: TensorHandle,
      sms: number,
    ): void;
    combineBackward(
      dy: TensorHandle,
      rows: TensorHandle,
      rowSrc: TensorHandle,
      recvWeight: TensorHandle,
      pos: TensorHandle,
      dest: TensorHandle,
      dRows: TensorHandle,
      dWeights: TensorHandle,
      sms: number,
    ): void;
    dispose(): void;
  },
  'PeerHandle'
>;

export interface MpiStatus {
  built: boolean;
  loaded: boolean;
  path: string;
  library: string;
  error: string;
}

export interface NcclStatus {
  loaded: boolean;
  path: string;
  version: number;
  error: string;
  attempts: { path: string; error: string }[];
}

/** The raw binding, exactly as native/addon registers it. Only lib/ uses this. */
export interface RawBinding {
  abiVersion: number;
  setErrorClasses(classes: Record<string, unknown>): void;
  tensorEmpty(shape: number[], dtype: number, deviceType: number, deviceIndex: number): TensorHandle;
  tensorFromBuffer(
    data: ArrayBufferView | ArrayBuffer,
    shape: number[],
    dtype: number,
    deviceType: number,
    deviceIndex: number,
  ): TensorHandle;
  StreamHandle: new (deviceType: number, deviceIndex: number) => StreamHandle;
  EventHandle: new (deviceType: number, deviceIndex: number, timing: boolean) => EventHandle;
  setCurrentStream(deviceIndex: number, stream: StreamHandle | null): void;
  /** Begins capturing `stream` into a CUDA graph. */
  GraphHandle: new (stream: StreamHandle) => GraphHandle;
  deviceSynchronize(deviceType: number, deviceIndex: number): void;
  fill(out: TensorHandle, value: number): void;
  copy(dst: TensorHandle, src: TensorHandle): void;
  binary(kind: number, a: TensorHandle, b: TensorHandle, out: TensorHandle, alpha: number): void;
  scale(a: TensorHandle, alpha: number, out: TensorHandle): void;
  reduce(kind: number, a: TensorHandle, dim: number, out: TensorHandle): void;
  activation(kind: number, x: TensorHandle, out: TensorHandle): void;
  activationBackward(kind: number, dy: TensorHandle, x: TensorHandle, dx: TensorHandle): void;
  matmul(a: TensorHandle, b: TensorHandle, out: TensorHandle, accumulate: boolean): void;
  random(out: TensorHandle, kind: number, p0: number, p1: number, seed: number, offset: number): void;
  // mean row entropy of router scores (a metric)
  routerEntropy(scores: TensorHandle, out: TensorHandle): void;
  // fp8 rows for dispatch
  quantizeFp8(x: TensorHandle, q: TensorHandle, scales: TensorHandle): void;
  dequantizeFp8(q: TensorHandle, scales: TensorHandle, out: TensorHandle): void;
  // experts' biases and gpt-oss's gated activation
  expertBias(rows: TensorHandle, bias: TensorHandle, offsets: TensorHandle): void;
  clampedSwiglu(h13: TensorHandle, out: TensorHandle, alpha: number, limit: number): void;
  expertBiasBackward(dRows: TensorHandle, offsets: TensorHandle, out: TensorHandle, accumulate: boolean): void;
  clampedSwigluBackward(dh: TensorHandle, h13: TensorHandle, out: TensorHandle, alpha: number, limit: number): void;
  // grouped GEMM (experts)
  groupedGemm(
    mode: number,
    epilogue: number,
    a: TensorHandle,
    b: TensorHandle,
    offsets: TensorHandle,
    out: TensorHandle,
    g: TensorHandle | null,
    accumulate: boolean,
    aScales: TensorHandle | null,
  ): void;
  // capacity and permute
  capacity(
    indices: TensorHandle,
    weights: TensorHandle | null,
    numExperts: number,
    capacity: number,
    policy: number,
    slot: TensorHandle,
    kept: TensorHandle,
    dropped: TensorHandle,
    invalid: TensorHandle,
  ): void;
  permuteLayout(
    indices: TensorHandle,
    slot: TensorHandle,
    kept: TensorHandle,
    weights: TensorHandle,
    capacity: number,
    align: number,
    offsets: TensorHandle,
    rowOf: TensorHandle,
    rowToken: TensorHandle,
    rowWeight: TensorHandle,
    invalid: TensorHandle,
  ): void;
  /** rows[r] = x[rowToken[r]]; with rowOf (the layout's [T,k] rows) the CUDA path copies in token order, reading x once. */
  permuteRows(x: TensorHandle, rowToken: TensorHandle, rows: TensorHandle, rowOf?: TensorHandle | null): void;
  unpermute(rows: TensorHandle, rowOf: TensorHandle, weights: TensorHandle, out: TensorHandle): void;
  unpermuteBackward(
    dy: TensorHandle,
    rows: TensorHandle,
    weights: TensorHandle,
    rowOf: TensorHandle,
    rowToken: TensorHandle,
    dRows: TensorHandle,
    dWeights: TensorHandle,
  ): void;
  permuteBackward(dRows: TensorHandle, rowOf: TensorHandle, dx: TensorHandle, add?: TensorHandle | null): void;
  // router (native/ops/moe/router): scoreFn 0 = softmax, 1 = sigmoid
  routerForward(
    logits: TensorHandle,
    bias: TensorHandle | null,
    scoreFn: number,
    k: number,
    groups: number,
    topkGroups: number,
    normalize: boolean,
    routeScale: number,
    indices: TensorHandle,
    weights: TensorHandle,
    tokensPerExpert: TensorHandle,
    scores: TensorHandle,
    nanRows: TensorHandle,
    groupTop: number,
  ): void;
  routerBackward(
    dWeights: TensorHandle,
    scores: TensorHandle,
    indices: TensorHandle,
    scoreFn: number,
    normalize: boolean,
    routeScale: number,
    dLogits: TensorHandle,
    accumulate: boolean,
  ): void;
  routerBalanceLoss(
    scores: TensorHandle,
    indices: TensorHandle,
    scoreFn: number,
    seqLen: number,
    coefficient: number,
    loss: TensorHandle,
    dLogits: TensorHandle | null,
  ): void;
  routerZLoss(logits: TensorHandle, coefficient: number, loss: TensorHandle, dLogits: TensorHandle | null): void;
  // expert choice (native/ops/moe/router/expert_choice*): every expert takes its top-`capacity` tokens
  routerExpertChoice(
    logits: TensorHandle,
    scoreFn: number,
    capacity: number,
    routeScale: number,
    scores: TensorHandle,
    slot: TensorHandle,
    weights: TensorHandle,
    indices: TensorHandle | null,
    tokensPerExpert: TensorHandle,
    expertsPerToken: TensorHandle,
    nanRows: TensorHandle,
  ): void;
  routerExpertChoiceBackward(
    dWeights: TensorHandle,
    scores: TensorHandle,
    slot: TensorHandle,
    scoreFn: number,
    routeScale: number,
    dLogits: TensorHandle,
    accumulate: boolean,
  ): void;
  // training ops (native/ops/train/rmsnorm, loss, adamw, sqnorm, balance)
  rmsnormForward(x: TensorHandle, weight: TensorHandle, eps: number, y: TensorHandle, rstd: TensorHandle): void;
  rmsnormBackward(
    dy: TensorHandle,
    x: TensorHandle,
    weight: TensorHandle,
    rstd: TensorHandle,
    dx: TensorHandle,
    dWeight: TensorHandle,
    accumulate: boolean,
  ): void;
  mseLoss(pred: TensorHandle, target: TensorHandle, loss: TensorHandle, grad: TensorHandle | null): void;
  crossEntropyLoss(
    pred: TensorHandle,
    target: TensorHandle,
    ignoreIndex: number,
    loss: TensorHandle,
    grad: TensorHandle | null,
    correct: TensorHandle,
  ): void;
  adamwStep(
    param: TensorHandle,
    grad: TensorHandle,
    expAvg: TensorHandle,
    expAvgSq: TensorHandle,
    paramBf16: TensorHandle | null,
    lr: number,
    beta1: number,
    beta2: number,
    eps: number,
    weightDecay: number,
    step: number,
    gradScale: number,
  ): void;
  sumOfSquares(x: TensorHandle, out: TensorHandle, accumulate: boolean): void;
  balanceBiasUpdate(bias: TensorHandle, load: TensorHandle, gamma: number): void;
  memoryStats(deviceType: number, deviceIndex: number): NativeMemoryStats;
  resetPeakMemory(deviceType: number, deviceIndex: number): void;
  emptyCache(deviceType: number, deviceIndex: number): void;
  buildInfo(): BuildInfo;
  cudaStatus(): CudaStatus;
  deviceProperties(index: number): DeviceProperties;
  ncclStatus(): NcclStatus;
  requireNccl(): void;
  hostWaitCounts(): { deviceToHost: number; synchronizations: number };
  peerAccess(): number[][];
  // communicators (native/comm, native/addon/comm_binding.cc); reduce op: 0 sum, 1 max, 2 min, 3 avg
  commSingle(): CommHandle;
  commMpi(timeoutMs: number): CommHandle;
  commNccl(rank: number, size: number, uniqueId: Uint8Array, device: number, timeoutMs: number): CommHandle;
  ncclUniqueId(): Uint8Array;
  mpiStatus(tryLoad: boolean): MpiStatus;
  // kernel switches (native/addon/kernel_options_binding.cc; lib/kernel-options.ts decides them)
  setKernelOptions(options: KernelOptions): void;
  kernelOptions(): KernelOptions;
  // the peer-memory transport
  peerCreate(
    rank: number,
    size: number,
    device: number,
    tokenCap: number,
    rowBytes: number,
    topK: number,
    localExperts: number,
    timeoutMs: number,
  ): PeerHandle;
}

const EXPECTED_ABI = 12;

/** The package root: the nearest folder above this file whose package.json names moe-ep. */
export function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg) && (JSON.parse(readFileSync(pkg, 'utf8')) as { name?: string }).name === 'moe-ep') return dir;
    const up = dirname(dir);
    if (up === dir) throw new Error('moe-ep: cannot find the package root (no package.json named moe-ep above lib/)');
    dir = up;
  }
}

let binding: RawBinding | undefined;
let loadedFrom = '';

function load(): RawBinding {
  const require = createRequire(import.meta.url);
  const root = packageRoot();
  const failures: string[] = [];
  let raw: RawBinding | undefined;
  const explicit = process.env['MOE_EP_ADDON'];
  const candidates = explicit
    ? [explicit]
    : [join(root, 'build', 'Release', 'moe_ep.node'), join(root, 'prebuilds', `${process.platform}-${process.arch}`, 'moe-ep.node')].filter(
        (p) => existsSync(p),
      );
  for (const path of candidates) {
    try {
      raw = require(path) as RawBinding;
      loadedFrom = path;
      break;
    } catch (e) {
      // Another thread of this process holds the addon (module.cc): no other build would load either.
      // An UnavailableError, as for a missing GPU: this thread may call again once the holder has exited.
      if (/already in use by another JavaScript thread/.test((e as Error).message)) {
        const refused = new UnavailableError((e as Error).message, 'native');
        refused.cause = e;
        throw refused;
      }
      const message = ((e as Error).message.split('\n')[0] ?? '').replace(`${path}: `, '');
      failures.push(`${explicit ? 'MOE_EP_ADDON=' : ''}${path}: ${message}`);
    }
  }
  if (raw && failures.length) process.stderr.write(`moe-ep: could not load ${failures.join('; ')}; using ${loadedFrom} instead\n`);
  if (!raw) {
    if (candidates.length === 0)
      failures.push(`no addon in ${root}: neither build/Release/moe_ep.node nor prebuilds/${process.platform}-${process.arch}/moe-ep.node`);
    throw new Error(
      [
        'moe-ep: the native addon could not be loaded.',
        ...failures.map((f) => `  - ${f}`),
        'Possible solutions:',
        '  - Compile it here: MOE_EP_BUILD_FROM_SOURCE=1 npm rebuild moe-ep (or, in a clone, npm run build:native);',
        '    if npm skips install scripts it has not been told to allow: npm install-scripts approve moe-ep first.',
        '  - Without the CUDA toolkit, or to build in minutes: MOE_EP_CUDA=off MOE_EP_BUILD_FROM_SOURCE=1 npm rebuild moe-ep.',
        '  - Point MOE_EP_ADDON at a moe_ep.node built for this platform.',
      ].join('\n'),
    );
  }
  if (raw.abiVersion !== EXPECTED_ABI) {
    throw new Error(
      `moe-ep: the addon at ${loadedFrom} has binding ABI ${raw.abiVersion} but this library expects ${EXPECTED_ABI}; rebuild it from source (MOE_EP_BUILD_FROM_SOURCE=1 npm rebuild moe-ep).`,
    );
  }
  raw.setErrorClasses(errorClasses);
  applyKernelOptions(raw);
  return raw;
}

/** The loaded binding (loaded on first use). */
export function native(): RawBinding {
  binding ??= load();
  return binding;
}

/** Where the addon was loaded from. */
export function addonPath(): string {
  native();
  return loadedFrom;
}
