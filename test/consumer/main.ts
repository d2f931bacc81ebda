// ES module consumer: compiles against the installed .d.ts with nothing but typescript added.
import { info, MoELayer, mseLoss, ops, resolveConfig, Tensor, tidy, type TrainConfigInput } from 'moe-ep';

const x = Tensor.randn([4, 8], { seed: 1, device: 'cpu' });
const w = Tensor.randn([8, 2], { seed: 2, device: 'cpu' });
const y = ops.matmul(x, w);
const input: TrainConfigInput = { model: { experts: 4 }, train: { steps: 2 } };
const config = resolveConfig(input);

// Never called: these lines must fail type-checking (tsc reports an unused @ts-expect-error).
export function misspelt(): void {
  // @ts-expect-error: a misspelt config field
  resolveConfig({ model: { expert: 4 } });
  // @ts-expect-error: a misspelt option
  Tensor.zeros([2], { devise: 'cpu' });
}

// The README's quickstart as it stands there (README.md, "Use it from code"), type-checked here.
const layer = new MoELayer({ hidden: 64, ffn: 128, numExperts: 8, topK: 2 });
const { loss, load } = tidy(() => {
  const x = Tensor.randn([256, 64], { dtype: layer.config.dtype, device: layer.device, seed: 1 });
  const fwd = layer.forward(x);
  const { loss, grad } = mseLoss(fwd.y, x);
  layer.backward(fwd, grad);
  return { loss: loss.item(), load: fwd.tokensPerExpert.toNumbers() };
});
layer.dispose();

console.log(
  `esm ok: [${y.shape.join(', ')}], ${config.model.experts} experts, quickstart loss ${loss.toFixed(3)} over ${load.length} experts, backend ${info().addon.backend}`,
);
for (const t of [x, w, y]) t.dispose();
