/**
 * The model `moe-ep train` trains: blocks of x ← x + MoE(RMSNorm(x)), then a linear head and the
 * loss (MSE against the task's targets). Forward and backward; the parameters, their gradients and
 * which of them are replicated (gradients averaged over data-parallel ranks) or expert-sharded
 * (each expert's gradient already holds every rank's tokens) are listed for the optimizer.
 */
import { type Device } from '../device.js';
import { type DType } from '../dtype.js';
import { invalidArgument } from '../errors.js';
import { checkApart, checkGradBuffer, checkPositiveInt } from '../validate.js';
import { type ExpertParallelGroup } from '../moe/dispatcher.js';
import { groupedGemm } from '../moe/grouped-gemm.js';
import { disposeSaved, type MoEForward, type MoEGradBuffers, MoELayer, type MoELayerConfig } from '../moe/layer.js';
import { keep, Tensor, tidy } from '../tensor.js';
import { crossEntropyLoss, mseLoss, rmsnorm, rmsnormBackward } from './dense-ops.js';

export interface ModelConfig extends Omit<MoELayerConfig, 'group' | 'device' | 'dtype' | 'seed'> {
  layers: number;
  /** 'mse' against target rows, or 'cross-entropy' against class ids (i32 [T]). Default 'mse'. */
  loss?: 'mse' | 'cross-entropy';
}

/**
 * A MoE layer's trained weights, by its `master` key (also backward's gradient and `out` keys): the
 * model's name for each (`layers.{i}.` + suffix), how its gradient is reduced, and whether AdamW's
 * weight decay applies. Optional ones (shared expert, gate, gpt-oss's biases) where the layer has them.
 */
const LAYER_WEIGHTS = {
  router: { suffix: 'router.weight', kind: 'replicated', decay: true },
  w13: { suffix: 'experts.w13', kind: 'expert', decay: true },
  w2: { suffix: 'experts.w2', kind: 'expert', decay: true },
  sharedW13: { suffix: 'shared.w13', kind: 'replicated', decay: true },
  sharedW2: { suffix: 'shared.w2', kind: 'replicated', decay: true },
  sharedGate: { suffix: 'shared.gate', kind: 'replicated', decay: true },
  routerBias: { suffix: 'router.bias', kind: 'replicated', decay: false },
  w13Bias: { suffix: 'experts.b13', kind: 'expert', decay: false },
  w2Bias: { suffix: 'experts.b2', kind: 'expert', decay: false },
} as const;
export type LayerWeightKey = keyof typeof LAYER_WEIGHTS;
export const LAYER_WEIGHT_KEYS = Object.keys(LAYER_WEIGHTS) as LayerWeightKey[];

/** The model's name of layer i's weight `key` (its parameter, gradient and checkpoint moment name). */
export function layerParamName(i: number, key: LayerWeightKey): string {
  return `layers.${i}.${LAYER_WEIGHTS[key].suffix}`;
}

/** The model's name of layer i's norm weight (not a MoE layer weight: the block's own). */
function normParamName(i: number): string {
  return `layers.${i}.norm.weight`;
}

/** One trainable tensor: fp32 master, its gradient after backward, and where it lives. */
export interface Param {
  name: string;
  master: Tensor;
  /** The compute copy refreshed after each step (bf16 training), or null when refreshed by copy. */
  computeBf16: Tensor | null;
  /** An f32 compute copy a bf16 model keeps beside the master (the router bias: the logits are f32), copied after each step. */
  computeF32?: Tensor;
  kind: 'replicated' | 'expert';
  /** AdamW's decoupled weight decay applies (not to norm weights and biases). */
  decay: boolean;
}

interface BlockSaved {
  h: Tensor; // block input
  rstd: Tensor;
  normed: Tensor;
  moe: MoEForward;
}

export interface ModelForward {
  loss: Tensor; // f32 [1]
  /** Cross-entropy only: rows whose argmax is the target (i32 [1]). */
  correct: Tensor | null;
  auxLoss: Tensor; // f32 [1], summed over layers
  /** Per layer: tokens per global expert routed by this rank, dropped assignments, router entropy; expert choice: experts per token. */
  routing: { tokensPerExpert: Tensor; dropped: Tensor; entropy: Tensor; expertsPerToken: Tensor | null }[];
  saved: { blocks: BlockSaved[]; last: Tensor; dPred: Tensor };
}

export class MoEModel implements Disposable {
  readonly layers: MoELayer[];
  readonly norms: Tensor[]; // [H] f32
  readonly head: Tensor; // [H, H] f32 master
  private readonly headCompute: Tensor; // [1, H, H]
  readonly dtype: DType;
  private readonly offsets = new Map<number, Tensor>();
  private readonly computeViews = new Map<string, Tensor>();

  constructor(
    readonly config: ModelConfig,
    readonly device: Device,
    dtype: DType,
    group: ExpertParallelGroup,
    seed: number,
  ) {
    this.dtype = dtype;
    const { layers, loss: _loss, ...layerConfig } = config;
    checkPositiveInt(layers, 'MoEModel', 'layers');
    this.layers = Array.from({ length: layers }, (_, i) => new MoELayer({ ...layerConfig, group, device, dtype, seed: seed * 101 + i }));
    this.norms = Array.from({ length: layers }, () => Tensor.full([config.hidden], 1, { device }));
    this.head = Tensor.randn([config.hidden, config.hidden], { std: 1 / Math.sqrt(config.hidden), seed: seed * 101 + 99, device });
    this.headCompute = Tensor.empty([1, config.hidden, config.hidden], { dtype, device });
    this.refreshComputeWeights();
  }

  refreshComputeWeights(): void {
    for (const l of this.layers) l.refreshComputeWeights();
    tidy(() => this.headCompute.copy_(this.head.view(1, this.config.hidden, this.config.hidden)));
  }

  params(): Param[] {
    const bf16 = this.dtype === 'bf16';
    const H = this.config.hidden;
    const out: Param[] = [];
    // The [H,E] and [H,H] views of the [1,H,E] and [1,H,H] compute copies, made once and owned by
    // the model (a view holds its storage: one made per call outlived the model).
    const view = (name: string, of: Tensor, ...shape: number[]): Tensor => {
      let v = this.computeViews.get(name);
      if (!v) {
        v = keep(of.view(...shape));
        this.computeViews.set(name, v);
      }
      return v;
    };
    this.layers.forEach((l, i) => {
      out.push({ name: normParamName(i), master: this.norms[i] as Tensor, computeBf16: null, kind: 'replicated', decay: false });
      for (const key of LAYER_WEIGHT_KEYS) {
        const master = l.master[key];
        if (!master) continue;
        const name = layerParamName(i, key);
        const { kind, decay } = LAYER_WEIGHTS[key];
        // The compute copies: the router's [1,H,E] and the gate's [1,H,1] seen as their masters'
        // shapes; the router bias's is f32 (the logits are), copied after each step.
        const compute = l.compute[key] as Tensor;
        if (key === 'routerBias') out.push({ name, master, computeBf16: null, ...(bf16 ? { computeF32: compute } : {}), kind, decay });
        else {
          const shaped = key === 'router' || key === 'sharedGate';
          out.push({ name, master, computeBf16: !bf16 ? null : shaped ? view(name, compute, ...master.shape) : compute, kind, decay });
        }
      }
    });
    out.push({
      name: 'head.weight',
      master: this.head,
      computeBf16: bf16 ? view('head.weight', this.headCompute, H, H) : null,
      kind: 'replicated',
      decay: true,
    });
    return out;
  }

  private all(T: number): Tensor {
    let t = this.offsets.get(T);
    if (!t) {
      t = keep(Tensor.fromArray([0, T], { dtype: 'i32', device: this.device }));
      this.offsets.set(T, t);
    }
    return t;
  }

  /** x [T, H] and target ([T, H] for MSE, i32 [T] classes for cross-entropy) → loss and what backward needs. */
  forward(x: Tensor, target: Tensor): ModelForward {
    return tidy(() => {
      const blocks: BlockSaved[] = [];
      const routing: ModelForward['routing'] = [];
      const auxLoss = Tensor.zeros([1], { device: this.device });
      let h = x;
      this.layers.forEach((layer, i) => {
        const { y: normed, rstd } = rmsnorm(h, this.norms[i] as Tensor);
        const moe = layer.forward(normed);
        auxLoss.add_(moe.auxLoss);
        blocks.push({ h, rstd, normed, moe });
        routing.push({
          tokensPerExpert: moe.tokensPerExpert,
          dropped: moe.dropped,
          entropy: moe.routerEntropy,
          expertsPerToken: moe.expertsPerToken,
        });
        h = h.clone().add_(moe.y);
      });
      const pred = groupedGemm('NN', h, this.headCompute, this.all(x.shape[0] as number), { dtype: this.dtype });
      if (this.config.loss === 'cross-entropy') {
        const { loss, grad, correct } = crossEntropyLoss(pred, target);
        return { loss, correct, auxLoss, routing, saved: { blocks, last: h, dPred: grad as Tensor } };
      }
      const { loss, grad } = mseLoss(pred, target);
      return { loss, correct: null, auxLoss, routing, saved: { blocks, last: h, dPred: grad as Tensor } };
    });
  }

  /**
   * Gradients by parameter name (fp32; the experts' weights' in the layers' weightGradDtype).
   * Releases the forward's saved tensors, also when it refuses its arguments. With `accumulate`
   * (a map from every parameter name to an f32 buffer of its shape, as `backward` returns; f32
   * weight gradients only) the gradients are added into those buffers by the kernels themselves,
   * and the map comes back.
   */
  backward(fwd: ModelForward, options: { accumulate?: ReadonlyMap<string, Tensor> } = {}): Map<string, Tensor> {
    let into: ReadonlyMap<string, Tensor> | undefined;
    try {
      const gradDtype = this.layers[0]?.config.weightGradDtype ?? 'f32';
      if (options.accumulate !== undefined && gradDtype !== 'f32')
        invalidArgument(
          'MoEModel.backward',
          `'accumulate' adds into f32 gradients only; the model's weightGradDtype is '${gradDtype}' (build it with 'f32' to accumulate over micro-batches)`,
        );
      into = options.accumulate === undefined ? undefined : this.checkGradBuffers(options.accumulate);
    } catch (e) {
      releaseForward(fwd); // refused before any product: the forward is released all the same
      throw e;
    }
    const buffer = (name: string): Tensor => into?.get(name) as Tensor;
    const grads = new Map<string, Tensor>();
    const s = fwd.saved;
    try {
      tidy(() => {
        const H = this.config.hidden;
        const all = this.all(s.last.shape[0] as number);
        if (into) {
          using head = buffer('head.weight').view(1, H, H);
          groupedGemm('TN', s.last, s.dPred, all, { out: head, accumulate: true });
          grads.set('head.weight', buffer('head.weight'));
        } else grads.set('head.weight', keep(groupedGemm('TN', s.last, s.dPred, all, { dtype: 'f32' }).view(H, H)));
        let dh = groupedGemm('NT', s.dPred, this.headCompute, all, { dtype: this.dtype });
        for (let i = this.layers.length - 1; i >= 0; i--) {
          const b = s.blocks[i] as BlockSaved;
          const layer = this.layers[i] as MoELayer;
          const keys = LAYER_WEIGHT_KEYS.filter((k) => layer.master[k] !== null);
          const normName = normParamName(i);
          const g = layer.backward(
            b.moe,
            dh,
            into
              ? {
                  out: Object.fromEntries(keys.map((k) => [k, buffer(layerParamName(i, k))])) as unknown as MoEGradBuffers,
                  accumulate: true,
                }
              : {},
          );
          const n = rmsnormBackward(
            g.dx,
            b.h,
            this.norms[i] as Tensor,
            b.rstd,
            into ? { accumulate: true, out: { dWeight: buffer(normName) } } : {},
          );
          dh = dh.clone().add_(n.dx);
          grads.set(normName, into ? n.dWeight : keep(n.dWeight));
          for (const k of keys) {
            const t = g[k] as Tensor; // present for every weight the layer has
            grads.set(layerParamName(i, k), into ? t : keep(t));
          }
        }
      });
    } catch (e) {
      // The gradients kept so far left the tidy: free them (accumulate's buffers are the caller's).
      if (!into) for (const g of grads.values()) g.dispose();
      throw e;
    } finally {
      releaseForward(fwd);
    }
    return grads;
  }

  /**
   * backward's accumulate buffers, all checked before any product runs (a late refusal would leave
   * some buffers added into): one for every parameter, an f32 buffer of its master's shape,
   * contiguous, on the model's device. Overlaps are looked for within each owner (the head; a layer
   * with its norm): a buffer over that owner's weights or another of its buffers. Across owners a
   * tensor given twice is caught by identity; pairs across every parameter would be O(parameters²)
   * native calls a micro-batch.
   */
  private checkGradBuffers(given: unknown): ReadonlyMap<string, Tensor> {
    const op = 'MoEModel.backward';
    if (!(given instanceof Map))
      invalidArgument(op, `'accumulate' must be a Map from parameter name to an f32 buffer (as backward returns)`);
    const buffers = given as ReadonlyMap<string, unknown>;
    const owners = new Map<string, { named: Record<string, Tensor>; own: Record<string, Tensor | null> }>();
    owners.set('head', { named: {}, own: { 'head.weight': this.head, 'head compute': this.headCompute } });
    this.layers.forEach((l, i) => {
      const own: Record<string, Tensor | null> = { [normParamName(i)]: this.norms[i] as Tensor, [`layers.${i} bias`]: l.bias };
      for (const [k, t] of Object.entries(l.master)) own[`layers.${i} master ${k}`] = t;
      for (const [k, t] of Object.entries(l.compute)) own[`layers.${i} compute ${k}`] = t;
      owners.set(`layers.${i}`, { named: {}, own });
    });
    const seen = new Set<unknown>();
    const masters = this.params().map((p): [string, Tensor] => [p.name, p.master]);
    for (const [name, master] of masters) {
      const buf = buffers.get(name);
      if (buf === undefined) invalidArgument(op, `'accumulate' has no buffer for '${name}'`);
      if (seen.has(buf)) invalidArgument(op, `'accumulate' gives '${name}' a tensor already given to another parameter`);
      seen.add(buf);
      const owner = owners.get(name.startsWith('layers.') ? name.split('.', 2).join('.') : 'head');
      (owner as { named: Record<string, Tensor> }).named[`accumulate '${name}'`] = checkGradBuffer(op, `accumulate '${name}'`, buf, master);
    }
    for (const { named, own } of owners.values()) checkApart(op, named, own);
    return buffers as ReadonlyMap<string, Tensor>;
  }

  dispose(): void {
    for (const l of this.layers) l.dispose();
    for (const t of [...this.norms, this.head, this.headCompute, ...this.offsets.values(), ...this.computeViews.values()]) t.dispose();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** Frees what forward kept (backward does this itself; call it when a forward is not followed by backward). */
export function releaseForward(fwd: ModelForward): void {
  for (const b of fwd.saved.blocks) {
    for (const t of [b.rstd, b.normed, b.moe.y, b.moe.auxLoss, b.moe.routerEntropy]) t.dispose();
    disposeSaved(b.moe); // idempotent: backward already released it
    if (b.h !== fwd.saved.blocks[0]?.h) b.h.dispose();
  }
  fwd.saved.last.dispose();
  fwd.saved.dPred.dispose();
  fwd.correct?.dispose();
}
