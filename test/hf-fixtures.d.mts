// Types for hf-fixtures.mjs (plain JavaScript, so that the MPI programs in test/mpi/ can import it
// too); what each function does is described there.
export type FileDType = 'bf16' | 'f16' | 'f32';
/** A Hugging Face config.json (the fields each family uses; others pass through). */
export type HfTestConfig = { model_type: string; [field: string]: unknown };

export interface SafetensorsEntry {
  name: string;
  dtype: string;
  shape: number[];
  bytes: Uint8Array;
}
/** One expert's matrices as the file holds them (HF layout [out, in]), decoded to float64. */
export interface MlpWeights {
  gate: Float64Array;
  up: Float64Array;
  down: Float64Array;
  /** gpt-oss's biases. */
  gateBias?: Float64Array;
  upBias?: Float64Array;
  downBias?: Float64Array;
}
export interface MoEBlockWeights {
  gate: Float64Array;
  bias: Float64Array | null;
  experts: MlpWeights[];
  shared: MlpWeights | null;
  sharedGate: Float64Array | null;
  /** gpt-oss: the router's bias [E]. */
  routerBias?: Float64Array;
}
export interface BuiltCheckpoint {
  cfg: HfTestConfig;
  layers: Map<number, MoEBlockWeights>;
  weightMap: Record<string, string>;
  files: string[];
  entries: SafetensorsEntry[];
}
export interface BuildOptions {
  dtype?: FileDType;
  shards?: number;
  seed?: number;
  biasScale?: number;
  biasDtype?: FileDType;
  writeConfig?: boolean;
  write?: boolean;
  fp8?: boolean;
}

export function toBf16Bits(v: number): number;
export function fromBf16Bits(b: number): number;
export function toF16Bits(v: number): number;
export function fromF16Bits(b: number): number;
export function toE4m3Bits(v: number): number;
export function fromE4m3Bits(b: number): number;
export function encodeFp8Blocks(
  values: ArrayLike<number>,
  R: number,
  C: number,
): { q: Uint8Array; scales: Float32Array; decoded: Float64Array; scaleShape: [number, number] };
export function encode(values: ArrayLike<number>, dtype: FileDType): { bytes: Uint8Array; decoded: Float64Array };
export function normals(seed: number): (n: number, std?: number) => Float64Array;
export function writeSafetensorsFile(path: string, entries: SafetensorsEntry[], metadata?: Record<string, string>): number;
export function readHeader(path: string): {
  dataStart: number;
  tensors: Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>;
};
export function poisonTensors(dir: string, weightMap: Record<string, string>, names: string[]): void;
export function randomMxfp4(
  rows: number,
  cols: number,
  seed: number,
  minExp?: number,
): { blocks: Uint8Array; scales: Uint8Array; values: Float64Array };
export function poisonRows(dir: string, weightMap: Record<string, string>, name: string, keep: (row: number) => boolean): void;
export function blockNames(
  cfg: HfTestConfig,
  layer: number,
): {
  gate: string;
  bias: string | null;
  /** Expert j's tensor of projection x, where each expert has its own. */
  expert?: (j: number, x: string) => string;
  /** The experts' fused tensors: 'xW' gate_up [E,H,2F], down [E,F,H]; 'linear' [E,2F,H], [E,H,F]; split 'interleaved' for gpt-oss. */
  fused?: { gateUp: string; down: string; layout: 'xW' | 'linear'; split?: 'interleaved' };
  /** DBRX: the experts stacked by rows, [E·F,H] each. */
  stacked?: { gate: string; up: string; down: string };
  /** gpt-oss: the router's bias and the experts' biases. */
  routerBias?: string;
  expertBias?: { gateUp: string; down: string };
  /** The shared MLP: projection x's name, or Granite's two tensors. */
  shared: ((x: string) => string) | { gateUp: string; down: string } | null;
  sharedGate: string | null;
};
export function buildHfCheckpoint(dir: string, cfg: HfTestConfig, options?: BuildOptions): BuiltCheckpoint;
export const testConfigs: Record<
  | 'mixtral'
  | 'deepseek_v2'
  | 'deepseek_v2_lite'
  | 'deepseek_v3'
  | 'deepseek_v3_top6'
  | 'jamba'
  | 'dbrx'
  | 'deepseek'
  | 'bailing_moe_v2'
  | 'bailing_moe'
  | 'qwen2_moe'
  | 'qwen3_moe'
  | 'kimi_k2'
  | 'glm4_moe'
  | 'dots1'
  | 'qwen3_next'
  | 'olmoe'
  | 'ernie4_5_moe'
  | 'minimax_m2'
  | 'hunyuan_v1_moe'
  | 'qwen3_vl_moe'
  | 'granitemoe'
  | 'granitemoeshared'
  | 'granitemoehybrid'
  | 'llama4'
  | 'gpt_oss',
  HfTestConfig
>;
