/** moe-ep: Mixture-of-Experts training with expert parallelism, from TypeScript. */
// Kept in the emitted index.d.ts: the declarations use Node's types (NodeJS.ProcessEnv, node:crypto)
// and Disposable, which @types/node (a dependency) brings to a consumer whose tsconfig lists no types.
/// <reference types="node" preserve="true" />
export { Device, type DeviceLike, cuda, getDefaultDevice, setDefaultDevice, synchronize } from './device.js';
export { DTYPES, type DType, dtypeSize, type StorageArray } from './dtype.js';
export {
  CudaError,
  DisposedError,
  type ErrorKind,
  InternalError,
  InvalidArgumentError,
  MoeError,
  NcclError,
  OutOfMemoryError,
  TimeoutError,
  UnavailableError,
} from './errors.js';
export {
  balanceLoss,
  expertChoiceCapacity,
  expertChoiceForward,
  type ExpertChoiceOutputs,
  type LossOptions,
  type ResolvedRouterConfig,
  resolveRouterConfig,
  ROUTE_WEIGHTS_ON,
  type RouteWeightsOn,
  Router,
  routerBackward,
  type RouterBackwardOptions,
  type RouterConfig,
  routerForward,
  type RouterForwardOptions,
  type RouterOutputs,
  type Routing,
  type ScoreFunction,
  sequenceBalanceLoss,
  zLoss,
  routerEntropy,
} from './moe/router.js';
export { formatInfo, type Info, info } from './installation.js';
export {
  type GroupedGemmKernelOptions,
  kernelOptionDefaults,
  type KernelOptions,
  kernelOptions,
  kernelOptionsFromEnvironment,
  type KernelOptionsUpdate,
  resetKernelOptions,
  type RouterKernelOptions,
  setKernelOptions,
} from './kernel-options.js';
export { emptyCache, type MemoryStats, memoryStats, resetPeakMemory } from './memory.js';
export * as ops from './basic-ops.js';
export { currentStream, Event, Stream, withStream } from './stream.js';
export { type CaptureOptions, CudaGraph, GraphCaptureError } from './graph.js';
export { trace, type TraceRow } from './trace.js';
export { CommWork, type CommWorkOptions, runOnStream, type RunOnStreamOptions } from './parallel/overlap.js';
export { type CreateOptions, keep, manualSeed, type RandomOptions, Tensor, tidy } from './tensor.js';
export {
  capacity,
  type CapacityOptions,
  type CapacityOutputs,
  type CapacityResult,
  DROP_POLICIES,
  type DropPolicy,
  expertCapacity,
} from './moe/capacity.js';
export {
  permute,
  permuteBackward,
  type PermuteBackwardOptions,
  permutedRowCount,
  type PermuteOptions,
  type PermuteOutputs,
  type PermuteResult,
  unpermute,
  unpermuteBackward,
  type UnpermuteGradients,
  type UnpermuteOptions,
} from './moe/permute.js';
export { type Backend, Communicator, DEFAULT_TIMEOUT_MS, type ReduceOp } from './parallel/communicator.js';
export {
  type BackendChoice,
  chooseBackend,
  expertGroups,
  init,
  type InitOptions,
  jobId,
  type LaunchEnv,
  type Launcher,
  launchEnv,
} from './parallel/init.js';
export { rendezvous, type RendezvousOptions } from './parallel/rendezvous.js';
export {
  adamwStep,
  type AdamWOptions,
  balanceBiasUpdate,
  type CrossEntropyOptions,
  type CrossEntropyResult,
  crossEntropyLoss,
  type LossOutputs,
  type LossResult,
  mseLoss,
  type MseLossOptions,
  rmsnorm,
  rmsnormBackward,
  type RmsNormBackwardOptions,
  type RmsNormGradients,
  type RmsNormOptions,
  type RmsNormOutputs,
  sumOfSquares,
  type SumOfSquaresOptions,
} from './train/dense-ops.js';
export { cosineLr, cosineSchedule, type CosineScheduleConfig } from './train/schedule.js';
export {
  type DispatchBackwardOptions,
  type Dispatched,
  type DispatchHandle,
  Dispatcher,
  type DispatcherConfig,
  type DispatchLayout,
  type ExchangeDispatchHandle,
  type ExpertParallelGroup,
  type PeerDispatchHandle,
  singleRankGroup,
  type TransportChoice,
  type TransportKind,
} from './moe/dispatcher.js';
export {
  expertsActivations,
  expertsBackward,
  type ExpertsBackwardOptions,
  expertsForward,
  interleaveW13,
  WEIGHT_GRAD_DTYPES,
  type WeightGradDType,
} from './moe/experts.js';
export { dequantizeFp8, FP8_BLOCK, type Fp8Rows, quantizeFp8 } from './moe/fp8.js';
export { type DenseFfn, upcycleExperts } from './moe/upcycle.js';
export { type HfMoELayerOptions, moeLayerFromHf } from './train/from-hf.js';
export { type GemmMode, groupedGemm, type GroupedGemmOptions } from './moe/grouped-gemm.js';
export {
  disposeSaved,
  type MoEBackwardOptions,
  type MoEForward,
  type MoEGradBuffers,
  type MoEGrads,
  MoELayer,
  type MoELayerConfig,
  type Recompute,
  RECOMPUTE_MODES,
} from './moe/layer.js';
export { CheckpointError } from './errors.js';
export {
  MAX_HEADER_BYTES,
  readSafetensors,
  SAFETENSORS_DTYPE,
  type SafetensorsEntry,
  SafetensorsFile,
  type TensorInfo as SafetensorsTensorInfo,
  toDType,
  writeSafetensors,
  type WrittenFile,
} from './train/safetensors.js';
export {
  CHECKPOINT_FORMAT,
  CHECKPOINT_FORMAT_VERSION,
  type CheckpointManifest,
  CheckpointReader,
  type EpLayout,
  type GetOptions,
  latestCheckpoint,
  listCheckpoints,
  loadCheckpoint,
  type LoadOptions,
  type ManifestExtras,
  pruneCheckpoints,
  type RawTensor,
  readManifest,
  saveCheckpoint,
  type SavedCheckpoint,
  type SaveOptions,
  type SkippedCheckpoint,
  stepDirName,
  writeCheckpoint,
} from './train/checkpoint.js';
export {
  ckptNames,
  disposeState,
  expertIndexOf,
  type ExpertWeight,
  joinExperts,
  loadMoELayer,
  type MoELayerMoments,
  moeLayerState,
  ownedExperts,
  routerWeighting,
  type RouterWeighting,
  splitExperts,
} from './train/moe-state.js';
export { type Batch, ClusterTask, type ClusterTaskConfig } from './train/data.js';
export {
  type DeepPartial,
  defaultConfig,
  resolveConfig,
  type TrainConfig,
  type TrainConfigInput,
  trainConfigSchema,
} from './train/config.js';
export { type LayerMetrics, type StepMetrics } from './train/metrics.js';
export { MoEModel } from './train/model.js';
export { Trainer } from './train/trainer.js';
export {
  clampedSwiglu,
  clampedSwigluBackward,
  type ClampedSwigluOptions,
  expertBias,
  expertBiasBackward,
  type ExpertBiasBackwardOptions,
  GPT_OSS_ALPHA,
  GPT_OSS_LIMIT,
} from './moe/expert-bias-activation.js';
export { HF_MOE_FAMILIES, type HfMoEBlock, type HfMoEFamily, type HfMoEModel, hfMoEModel } from './serve/hf-config.js';
export {
  HF_CONFIG_FILE,
  HF_FP8_SCALE_SUFFIX,
  HF_INDEX_FILE,
  HF_SINGLE_FILE,
  type HfFusedExpertNames,
  type HfLayerInspection,
  type HfMlpNames,
  HfMoECheckpoint,
  type HfMoENames,
  hfMoENames,
  type HfMoEWeights,
  type HfOpenOptions,
  type HfReadOptions,
  type HfReadStats,
  type HfWeightName,
} from './serve/hf-checkpoint.js';
export { MoEInference, type MoEInferenceConfig, type MoEInferenceForwardOptions, type MoEInferenceWeights } from './serve/inference.js';
