/**
 * Sparse upcycling (Komatsuzaki et al., 2022; Megatron-Core's --moe-use-upcycling): an MoE layer
 * started from a trained dense SwiGLU FFN, every expert a copy of it, the router as initialised.
 * With weights that sum to 1 per token (normalize on, routeScale 1) and no token dropped, the
 * layer then computes the dense FFN exactly; training moves the experts apart from there.
 */
import { invalidArgument, usedAfterDispose } from '../errors.js';
import { checkKeys, checkTensor } from '../validate.js';
import { Tensor, tidy } from '../tensor.js';
import { MoELayer } from './layer.js';

/** A dense SwiGLU FFN, y = (silu(x·w1) ⊙ (x·w3))·w2: w1 and w3 [H,F], w2 [F,H] (any dtype, device, layout). */
export interface DenseFfn {
  w1: Tensor;
  w3: Tensor;
  w2: Tensor;
}

/**
 * Copies `dense` into every expert of `layer` this rank holds (the fp32 masters, then the compute
 * copies). The shapes must be the layer's: w1 and w3 [hidden, ffn], w2 [ffn, hidden]. A Hugging
 * Face dense MLP stores gate_proj, up_proj [F,H] and down_proj [H,F]: pass their transposes.
 */
export function upcycleExperts(layer: MoELayer, dense: DenseFfn): void {
  const op = 'upcycleExperts';
  if (!(layer instanceof MoELayer)) invalidArgument(op, `'layer' must be a MoELayer`);
  if (layer.disposed) usedAfterDispose(op, 'the layer');
  if (dense === null || typeof dense !== 'object') invalidArgument(op, `'dense' must be { w1, w3, w2 }`);
  checkKeys(dense, op, { w1: true, w3: true, w2: true });
  const { hidden: H, ffn: F } = layer.config;
  for (const [name, want] of [
    ['w1', [H, F]],
    ['w3', [H, F]],
    ['w2', [F, H]],
  ] as const) {
    const t = checkTensor(dense[name], op, `dense.${name}`);
    if (t.shape.join() !== want.join())
      invalidArgument(
        op,
        `'dense.${name}' is [${t.shape.join(',')}]; the layer's experts need [${want.join(',')}] (hidden ${H}, ffn ${F})`,
      );
    if (t.dtype !== 'f32' && t.dtype !== 'bf16' && t.dtype !== 'f16')
      invalidArgument(op, `'dense.${name}' is ${t.dtype}; expected a float tensor (f32, bf16 or f16)`);
  }
  const El = layer.localExperts;
  tidy(() => {
    // The masters' [El,H,2F] as [El,H,F,2]: slot 0 takes W1, slot 1 takes W3 (experts.ts's layout).
    const pairs = layer.master.w13.view(El, H, F, 2);
    const w2 = layer.master.w2;
    // A strided matrix (a transposed checkpoint tensor) is made dense first: view needs the layout.
    const shaped = (t: Tensor, ...shape: number[]): Tensor => (t.isContiguous ? t : t.contiguous()).view(...shape);
    const [w1, w3, d2] = [shaped(dense.w1, 1, H, F, 1), shaped(dense.w3, 1, H, F, 1), shaped(dense.w2, 1, F, H)];
    for (let e = 0; e < El; e++) {
      pairs.narrow(0, e, 1).narrow(3, 0, 1).copy_(w1);
      pairs.narrow(0, e, 1).narrow(3, 1, 1).copy_(w3);
      w2.narrow(0, e, 1).copy_(d2);
    }
  });
  layer.refreshComputeWeights();
}
