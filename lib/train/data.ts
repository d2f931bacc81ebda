/**
 * The default training task: synthetic, learnable, and one where experts matter.
 *
 * Inputs come from K clusters with Zipf-skewed frequencies (p_c ∝ 1/(c+1)^s), so routing starts
 * out skewed; each cluster has its own linear target map, so experts can specialise:
 *   c ~ Zipf(K, s),  x = μ_c + σ·ε  (ε ~ N(0, I)),  y = x·A_c  (A_c entries ~ N(0, 1/dim))
 * Everything derives from one seed (cluster ids from a host PRNG; centres, maps and noise from
 * Philox streams), so every rank of a data-parallel job can draw its own disjoint shard of a step.
 */
import { Device, type DeviceLike } from '../device.js';
import { invalidArgument } from '../errors.js';
import { checkKeys, checkNonNegativeInt, checkPositiveInt } from '../validate.js';
import { native } from '../native.js';
import { groupedGemm } from '../moe/grouped-gemm.js';
import { keep, Tensor, tidy } from '../tensor.js';

export interface ClusterTaskConfig {
  /** Input and target width (the model's hidden size). */
  dim: number;
  clusters: number;
  /** Zipf exponent of the cluster frequencies (0: uniform). */
  zipf: number;
  /** Within-cluster noise σ. */
  noise: number;
  seed: number;
  /**
   * Where batches are made (default the CPU, all f32). On a GPU: x there in f32 (the same draws as
   * the CPU's, within an ulp of the noise) and the targets y = x·A_c by a bf16 grouped GEMM, so y
   * differs from the CPU's in rounding; both are left on that device.
   */
  device?: DeviceLike;
}

export interface Batch extends Disposable {
  x: Tensor; // [T, dim] f32 on the task's device (the CPU by default)
  y: Tensor; // [T, dim] f32 on the CPU, or bf16 on the task's GPU
  clusters: Int32Array;
  dispose(): void;
}

function makeBatch(x: Tensor, y: Tensor, clusters: Int32Array): Batch {
  return {
    x,
    y,
    clusters,
    dispose() {
      x.dispose();
      y.dispose();
    },
    [Symbol.dispose]() {
      this.dispose();
    },
  };
}

/** splitmix64 host PRNG for cluster ids (tiny and reproducible). */
function splitmix(seed: number): () => number {
  let s = BigInt(seed) & 0xffffffffffffffffn;
  return () => {
    s = (s + 0x9e3779b97f4a7c15n) & 0xffffffffffffffffn;
    let z = s;
    z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & 0xffffffffffffffffn;
    z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & 0xffffffffffffffffn;
    return Number((z ^ (z >> 31n)) >> 11n) / 2 ** 53;
  };
}

/** The largest within-cluster σ ClusterTask takes (the train config's data.noise bound too). */
export const CLUSTER_NOISE_MAX = 1e6;
/** The train config's bound too: seed·1_000_003 + batch index (the batches' stream) stays an exact integer. */
const MAX_SEED = 2 ** 31 - 1;

export class ClusterTask implements Disposable {
  readonly config: ClusterTaskConfig;
  private readonly centres: Tensor; // [K, dim]
  private readonly maps: Tensor; // [K, dim, dim]: y = x · maps[c]
  /** The centres (f32) and maps (bf16) on the task's device, when batches are made there. */
  private readonly deviceCentres: Tensor | null;
  private readonly deviceMaps: Tensor | null;
  private readonly cumulative: number[];

  constructor(config: ClusterTaskConfig) {
    const op = 'ClusterTask';
    checkKeys(config, op, { dim: true, clusters: true, zipf: true, noise: true, seed: true, device: true });
    for (const f of ['dim', 'clusters'] as const) checkPositiveInt(config[f], op, f);
    if (!(config.zipf >= 0 && config.zipf < Infinity))
      invalidArgument(op, `'zipf' must be a finite number ≥ 0; received ${String(config.zipf)}`);
    // Centres and maps are unit-scale: a σ far past them drowns the clusters, and past ~1e19 the
    // squared errors of the f32 losses overflow (noise 1e308 made NaN batches).
    if (!(config.noise >= 0 && config.noise <= CLUSTER_NOISE_MAX))
      invalidArgument(op, `'noise' must be in [0, ${CLUSTER_NOISE_MAX}] (the clusters are unit-scale); received ${String(config.noise)}`);
    // splitmix takes an integer, and the seeds derived from it must stay exact (MAX_SEED).
    checkNonNegativeInt(config.seed, op, 'seed');
    if (config.seed > MAX_SEED) invalidArgument(op, `'seed' must be at most ${MAX_SEED}; received ${config.seed}`);
    this.config = { ...config };
    const { dim, clusters, seed } = config;
    this.centres = keep(Tensor.randn([clusters, dim], { seed: seed * 8 + 1, device: 'cpu' }));
    this.maps = keep(Tensor.randn([clusters, dim, dim], { seed: seed * 8 + 2, std: 1 / Math.sqrt(dim), device: 'cpu' }));
    const device = config.device === undefined ? null : Device.parse(config.device, op);
    const onGpu = device !== null && device.isCuda;
    this.deviceCentres = onGpu ? keep(this.centres.copyTo({ device })) : null;
    try {
      this.deviceMaps = onGpu ? keep(this.maps.copyTo({ device, dtype: 'bf16' })) : null;
    } catch (e) {
      for (const t of [this.centres, this.maps, this.deviceCentres]) t?.dispose();
      throw e;
    }
    const w = Array.from({ length: clusters }, (_, c) => 1 / (c + 1) ** config.zipf);
    const total = w.reduce((a, b) => a + b, 0);
    let acc = 0;
    this.cumulative = w.map((v) => (acc += v / total));
  }

  /** Cluster frequencies (for reports). */
  frequencies(): number[] {
    return this.cumulative.map((c, i) => c - (i ? (this.cumulative[i - 1] as number) : 0));
  }

  /**
   * Global batch `index` of `tokens` samples, or shard `rank` of `ranks` of it (rows
   * [rank·tokens/ranks, (rank+1)·tokens/ranks)): any number of ranks sees the same global batches,
   * so runs at different expert-parallel sizes follow the same data.
   */
  batch(index: number, tokens: number, rank = 0, ranks = 1): Batch {
    const op = 'ClusterTask.batch';
    checkNonNegativeInt(index, op, 'index');
    checkPositiveInt(tokens, op, 'tokens', { below: 2 ** 31 });
    if (!Number.isSafeInteger(rank) || rank < 0 || rank >= ranks)
      invalidArgument(op, `'rank' ${String(rank)} must be an integer in [0, ranks = ${String(ranks)})`);
    if (!Number.isSafeInteger(ranks) || ranks < 1 || tokens % ranks !== 0) {
      invalidArgument('ClusterTask.batch', `'tokens' ${tokens} must divide evenly over ${ranks} ranks`);
    }
    const full = this.globalBatch(index, tokens);
    if (ranks === 1) return full;
    const per = tokens / ranks;
    const x = full.x.narrow(0, rank * per, per).contiguous();
    const y = full.y.narrow(0, rank * per, per).contiguous();
    const ids = full.clusters.slice(rank * per, (rank + 1) * per);
    full.dispose();
    return makeBatch(x, y, ids);
  }

  private globalBatch(index: number, tokens: number): Batch {
    const { dim, clusters, noise, seed } = this.config;
    const rnd = splitmix(seed * 1_000_003 + index);
    // Samples sorted by cluster so the per-cluster maps are one grouped GEMM.
    const ids = new Int32Array(tokens);
    const counts = new Array<number>(clusters).fill(0);
    for (let t = 0; t < tokens; t++) {
      const u = rnd();
      let c = this.cumulative.findIndex((v) => u < v);
      if (c < 0) c = clusters - 1;
      ids[t] = c;
      counts[c] = (counts[c] as number) + 1;
    }
    ids.sort();
    const offsets = [0];
    for (let c = 0; c < clusters; c++) offsets.push((offsets[c] as number) + (counts[c] as number));
    // On a GPU (config.device) the whole batch is made there: the same counter-based draws (Philox,
    // element offset + i) as on the CPU, equal to its values within an ulp of the noise, and no
    // 8192×1024 normals drawn on the host (H200 wide run at 250fecf: 332 ms of 'data' per step with
    // only the targets on the GPU).
    const device = this.deviceMaps?.device ?? Device.cpu;
    const [x, y] = tidy(() => {
      const idx = Tensor.fromArray(ids, { device });
      const x = Tensor.empty([tokens, dim], { device });
      native().permuteRows((this.deviceCentres ?? this.centres).handle, idx.handle, x.handle); // x[t] = μ_{c(t)}
      const offset = index * tokens * dim;
      x.add_(Tensor.randn([tokens, dim], { seed: seed * 8 + 3, offset, device }), noise);
      const off = Tensor.fromArray(offsets, { dtype: 'i32', device });
      const y = this.deviceMaps ? groupedGemm('NN', x.cast('bf16'), this.deviceMaps, off) : groupedGemm('NN', x, this.maps, off);
      return [x, y] as const;
    });
    return makeBatch(x, y, ids);
  }

  /** The class of each sample for the classification task: the argmax of its target row (i32 [T], CPU). */
  static labels(batch: Batch): Tensor {
    const [T, D] = batch.y.shape as [number, number];
    const y = batch.y.toFloat32Array();
    const labels = new Int32Array(T);
    for (let t = 0; t < T; t++) {
      let best = 0;
      for (let d = 1; d < D; d++) if ((y[t * D + d] as number) > (y[t * D + best] as number)) best = d;
      labels[t] = best;
    }
    return Tensor.fromArray(labels, { device: 'cpu' });
  }

  /** Moves a batch's tensors to where the model runs, in its dtype. */
  static to(batch: Batch, device: Device, dtype: 'f32' | 'bf16'): { x: Tensor; y: Tensor } {
    return { x: batch.x.copyTo({ device, dtype }), y: batch.y.copyTo({ device, dtype }) };
  }

  dispose(): void {
    this.centres.dispose();
    this.maps.dispose();
    this.deviceMaps?.dispose();
    this.deviceCentres?.dispose();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
