/**
 * A Hugging Face checkpoint's MoE block as a trainable MoELayer: the serving loader's weights
 * (lib/serve/hf-checkpoint.ts, this rank's experts only) read in f32 straight into the layer's fp32 masters,
 * with the block's router, shared expert and gate as its configuration. For fine-tuning, or for
 * continuing to train, Mixtral, DeepSeek-V3, Qwen-MoE and the other families the loader reads.
 *
 *   router [1,H,E] → master.router [H,E]        w13, w2 → master.w13, master.w2 (the layer's layout)
 *   e_score_correction_bias → bias [E]          (selection only in both; balancing then moves it)
 *   shared expert → master.sharedW13/W2          shared_expert_gate [1,H,1] → master.sharedGate [H]
 *   gpt-oss's router.bias → master.routerBias    gate_up_proj_bias, down_proj_bias → master.w13Bias, master.w2Bias
 */
import { getDefaultDevice } from '../device.js';
import { CheckpointError, invalidArgument } from '../errors.js';
import { MoELayer, type MoELayerConfig } from '../moe/layer.js';
import { checkGroup } from '../moe/dispatcher.js';
import { type HfMoECheckpoint, type HfWeightName } from '../serve/hf-checkpoint.js';
import { HF_ACTIVATION_FIELDS, HF_LAYER_FIELDS, layerFieldsOf } from '../serve/hf-config.js';
import { type Tensor, tidy } from '../tensor.js';

/** What the checkpoint fixes: the block's fields, token choice, and the weights (so no seed). */
const FROM_CHECKPOINT = [...HF_LAYER_FIELDS, ...HF_ACTIVATION_FIELDS, 'routing', 'seed'] as const;
/** The rest of MoELayerConfig may be given. */
export type HfMoELayerOptions = Omit<MoELayerConfig, (typeof FROM_CHECKPOINT)[number]>;

/**
 * MoE layer `layer` of `ckpt` (default: the first with an MoE block) as a MoELayer whose masters
 * hold the checkpoint's weights (converted exactly to f32) and whose compute copies are refreshed
 * from them. With `group`, each rank reads only the experts it owns. The layer's outputs equal the
 * family's block (dropless; with `capacityFactor`, tokens over an expert's capacity are dropped).
 */
export function moeLayerFromHf(ckpt: HfMoECheckpoint, layer?: number, options: HfMoELayerOptions = {}): MoELayer {
  const op = 'moeLayerFromHf';
  // The other keys MoELayer's constructor checks itself.
  if (options === null || typeof options !== 'object') invalidArgument(op, `'options' must be an object`);
  const fixed = FROM_CHECKPOINT.filter((k) => (options as Record<string, unknown>)[k] !== undefined);
  if (fixed.length > 0)
    invalidArgument(op, `${fixed.map((k) => `'${k}'`).join(', ')}: set by the checkpoint (its config.json and weights), not an option`);
  const index = layer ?? ckpt.model.moeLayers[0];
  if (index === undefined) invalidArgument(op, `the checkpoint ${ckpt.dir} has no layer with an MoE block`);
  // The layer is named, and its tensors checked from the files' headers, before the MoELayer draws its
  // (then replaced) initial weights: a config.json with absurd sizes would otherwise allocate them first.
  const { problems, moreProblems } = ckpt.inspectLayer(index);
  if (problems.length > 0)
    throw new CheckpointError(
      `${op}: layer ${index} cannot be read: ${problems[0]}${problems.length + moreProblems > 1 ? ` (and ${problems.length + moreProblems - 1} more problems: 'moe-ep hf inspect' lists them)` : ''}`,
    );
  const b = ckpt.block;
  const group = checkGroup(options.group, op);
  const device = options.device ?? getDefaultDevice();
  const moe = new MoELayer({ ...options, device, ...layerFieldsOf(b) });
  try {
    // Read straight into the masters (the router and gate through views of their layer shapes): no second copy.
    const m = moe.master;
    tidy(() => {
      const into: Partial<Record<HfWeightName, Tensor>> = {
        router: m.router.view(1, b.hidden, b.numExperts),
        w13: m.w13,
        w2: m.w2,
        ...(b.selectionBias ? { bias: moe.bias } : {}),
        ...(m.sharedW13 && m.sharedW2 ? { sharedW13: m.sharedW13, sharedW2: m.sharedW2 } : {}),
        ...(m.sharedGate ? { sharedGate: m.sharedGate.view(1, b.hidden, 1) } : {}),
        // gpt-oss: the router's and the experts' biases.
        ...(m.routerBias ? { routerBias: m.routerBias } : {}),
        ...(m.w13Bias && m.w2Bias ? { w13Bias: m.w13Bias, w2Bias: m.w2Bias } : {}),
      };
      ckpt.readLayer(index, { rank: group.rank, worldSize: group.size, dtype: 'f32', device, into }).dispose();
    });
    moe.refreshComputeWeights();
    return moe;
  } catch (e) {
    moe.dispose();
    throw e;
  }
}
