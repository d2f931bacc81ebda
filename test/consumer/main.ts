// ES module consumer: compiles against the installed .d.ts with nothing but typescript added.
import { info, ops, resolveConfig, Tensor, type TrainConfigInput } from 'moe-ep';

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

console.log(`esm ok: [${y.shape.join(', ')}], ${config.model.experts} experts, backend ${info().addon.backend}`);
for (const t of [x, w, y]) t.dispose();
