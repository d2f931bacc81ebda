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
import { disposeSaved, type MoEForward, MoELayer, type MoELayerConfig } from '../moe/layer.js';
import { keep, Tensor, tidy } from '../tensor.js';
import { crossEntropyLoss, mseLoss, rmsnorm, rmsnormBackward } from './dense-ops.js';

export interface ModelConfig extends Omit<MoELayerConfig, 'group' | 'device' | 'dtype' | 'seed'> {
  layers: number;
  /** 'mse' against target rows, or 'cross-entropy' against class ids (i32 [T]). Default 'mse'. */
  loss?: 'mse' | 'cross-entropy';
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
      out.push({ name: `layers.${i}.norm.weight`, master: this.norms[i] as Tensor, computeBf16: null, kind: 'replicated', decay: false });
      out.push({
        name: `layers.${i}.router.weight`,
        master: l.master.router,
        computeBf16: bf16 ? view(`layers.${i}.router.weight`, l.compute.router, H, l.config.numExperts) : null,
        kind: 'replicated',
        decay: true,
      });
      // The weights whose compute copy has the master's shape (bf16 training: refreshed by AdamW);
      // the shared expert and gpt-oss's expert biases where the layer has them.
      const plain: [string, Tensor | null, Tensor | null, Param['kind'], boolean][] = [
        [`layers.${i}.experts.w13`, l.master.w13, l.compute.w13, 'expert', true],
        [`layers.${i}.experts.w2`, l.master.w2, l.compute.w2, 'expert', true],
        [`layers.${i}.shared.w13`, l.master.sharedW13, l.compute.sharedW13, 'replicated', true],
        [`layers.${i}.shared.w2`, l.master.sharedW2, l.compute.sharedW2, 'replicated', true],
        [`layers.${i}.experts.b13`, l.master.w13Bias, l.compute.w13Bias, 'expert', false],
        [`layers.${i}.experts.b2`, l.master.w2Bias, l.compute.w2Bias, 'expert', false],
      ];
      for (const [name, master, compute, kind, decay] of plain)
        if (master) out.push({ name, master, computeBf16: bf16 ? compute : null, kind, decay });
      if (l.master.sharedGate && l.compute.sharedGate)
        out.push({
          name: `layers.${i}.shared.gate`,
          master: l.master.sharedGate,
          computeBf16: bf16 ? view(`layers.${i}.shared.gate`, l.compute.sharedGate, H) : null,
          kind: 'replicated',
          decay: true,
        });
      // gpt-oss's router bias: its compute copy is f32 (the logits are), copied after each step.
      if (l.master.routerBias && l.compute.routerBias)
        out.push({
          name: `layers.${i}.router.bias`,
          master: l.master.routerBias,
          computeBf16: null,
          ...(bf16 ? { computeF32: l.compute.routerBias } : {}),
          kind: 'replicated',
          decay: false,
        });
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
          const names = {
            norm: `layers.${i}.norm.weight`,
            router: `layers.${i}.router.weight`,
            w13: `layers.${i}.experts.w13`,
            w2: `layers.${i}.experts.w2`,
            sharedW13: `layers.${i}.shared.w13`,
            sharedW2: `layers.${i}.shared.w2`,
            sharedGate: `layers.${i}.shared.gate`,
            routerBias: `layers.${i}.router.bias`,
            w13Bias: `layers.${i}.experts.b13`,
            w2Bias: `layers.${i}.experts.b2`,
          };
          const shared = layer.master.sharedW13 !== null;
          const gated = layer.master.sharedGate !== null;
          const routerBiased = layer.master.routerBias !== null;
          const expertBiased = layer.master.w13Bias !== null;
          const g = layer.backward(
            b.moe,
            dh,
            into
              ? {
                  out: {
                    router: buffer(names.router),
                    w13: buffer(names.w13),
                    w2: buffer(names.w2),
                    ...(shared ? { sharedW13: buffer(names.sharedW13), sharedW2: buffer(names.sharedW2) } : {}),
                    ...(gated ? { sharedGate: buffer(names.sharedGate) } : {}),
                    ...(routerBiased ? { routerBias: buffer(names.routerBias) } : {}),
                    ...(expertBiased ? { w13Bias: buffer(names.w13Bias), w2Bias: buffer(names.w2Bias) } : {}),
                  },
                  accumulate: true,
                }
              : {},
          );
          const n = rmsnormBackward(
            g.dx,
            b.h,
            this.norms[i] as Tensor,
            b.rstd,
            into ? { accumulate: true, out: { dWeight: buffer(names.norm) } } : {},
          );
          dh = dh.clone().add_(n.dx);
          grads.set(names.norm, into ? n.dWeight : keep(n.dWeight));
          grads.set(names.router, into ? g.router : keep(g.router));
          grads.set(names.w13, into ? g.w13 : keep(g.w13));
          grads.set(names.w2, into ? g.w2 : keep(g.w2));
          if (g.sharedW13 && g.sharedW2) {
            grads.set(names.sharedW13, into ? g.sharedW13 : keep(g.sharedW13));
            grads.set(names.sharedW2, into ? g.sharedW2 : keep(g.sharedW2));
          }
          if (g.sharedGate) grads.set(names.sharedGate, into ? g.sharedGate : keep(g.sharedGate));
          if (g.routerBias) grads.set(names.routerBias, into ? g.routerBias : keep(g.routerBias));
          if (g.w13Bias && g.w2Bias) {
            grads.set(names.w13Bias, into ? g.w13Bias : keep(g.w13Bias));
            grads.set(names.w2Bias, into ? g.w2Bias : keep(g.w2Bias));
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
      const own: Record<string, Tensor | null> = { [`layers.${i}.norm.weight`]: this.norms[i] as Tensor, [`layers.${i} bias`]: l.bias };
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
