/**
 * `moe-ep hf inspect <dir> [--json] [--ranks P]`: a Hugging Face MoE checkpoint as the serving
 * loader sees it, before any GPU job: the family and its MoE block in the package's terms, the MoE
 * layers, and every tensor those layers read checked from the files' headers alone (present, a
 * readable dtype, the config's shape; FP8 weights with their block scales). Exit 1 when a layer would
 * not load, each problem named.
 */
import { HfMoECheckpoint, INSPECT_PROBLEMS_KEPT } from '../serve/hf-checkpoint.js';
import { type HfMoEBlock } from '../serve/hf-config.js';
import { helpTable } from '../train/config.js';
import { checkFlags, takeValueFlag, UsageError } from './flags.js';
import { fmtBytes } from './format.js';

const inspectUsage = [
  'usage: moe-ep hf inspect <dir> [--json] [--ranks P]',
  '',
  "A Hugging Face MoE checkpoint as MoEInference.fromHf reads it: config.json's family mapped onto the",
  "layer's options, the MoE layers, and every tensor they read checked from the safetensors headers",
  "alone (no weights read): present, a readable dtype, the config's shape. Exits 1 unless every MoE",
  'layer would load.',
  '',
  ...helpTable(
    [
      ['<dir>', 'the folder with config.json and model.safetensors(.index.json)'],
      ['--ranks P', 'the expert weights of one MoE layer each of P ranks reads (default 1)'],
      ['--json', 'the same as JSON'],
      ['-h, --help', 'this help'],
    ],
    11,
  ),
].join('\n');
/** Problems printed before the rest are counted (a checkpoint of another layout fails every tensor). */
const SHOWN_PROBLEMS = 12;

const usage = ['usage: moe-ep hf inspect <dir> ...', '', '`moe-ep hf inspect --help` describes it.'].join('\n');

/** Layer indices as ranges: 3–60, or 1, 3, 5. */
function ranges(layers: readonly number[]): string {
  const parts: string[] = [];
  for (let i = 0; i < layers.length;) {
    let j = i;
    while (j + 1 < layers.length && layers[j + 1] === (layers[j] as number) + 1) j++;
    parts.push(j > i + 1 ? `${layers[i]}–${layers[j]}` : layers.slice(i, j + 1).join(', '));
    i = j + 1;
  }
  return parts.join(', ');
}

/** The block's routing in words. */
function routing(b: HfMoEBlock): string {
  const parts: string[] = [b.scoreFunction];
  if (b.routerBias) parts.push('router bias');
  if (b.selectionBias) parts.push('selection bias');
  if (b.groups > 1) {
    const top = b.groupTop ?? b.topK / b.topkGroups;
    parts.push(`${b.groups} groups keep ${b.topkGroups} (a group scored by ${top === 1 ? 'its best' : `its top ${top}`})`);
  }
  parts.push(`top-${b.topK}`);
  parts.push(b.normalize ? 'weights renormalised' : 'weights as scored');
  if (b.routeScale !== 1) parts.push(`× ${b.routeScale}`);
  if (b.routeWeightsOn === 'input') parts.push("weights scale the experts' input");
  return parts.join(', ');
}

export function runHf(args: string[]): number {
  const [command, ...rest] = args;
  if (command === undefined) {
    console.error(usage);
    return 2;
  }
  if (command === '-h' || command === '--help') {
    console.log(usage);
    return 0;
  }
  if (command !== 'inspect') throw new UsageError(`unknown hf command '${command}'\n\n${usage}`);
  if (rest.includes('--help') || rest.includes('-h')) {
    console.log(inspectUsage);
    return 0;
  }
  const v = takeValueFlag(rest, '--ranks', inspectUsage);
  let ranks = 1;
  if (v !== undefined) {
    ranks = Number(v);
    if (!/^\d+$/.test(v) || !Number.isSafeInteger(ranks) || ranks < 1) throw new Error(`--ranks must be a positive integer; received ${v}`);
  }
  checkFlags(rest, ['--json'], 1, inspectUsage);
  const dir = rest.find((a) => !a.startsWith('-'));
  if (dir === undefined) throw new UsageError(`hf inspect needs the checkpoint folder\n\n${inspectUsage}`);
  using ckpt = HfMoECheckpoint.open(dir);
  const { block, numLayers, moeLayers } = ckpt.model;
  if (block.numExperts % ranks !== 0)
    throw new Error(`--ranks ${ranks} does not divide the ${block.numExperts} experts (each rank holds E/P of them)`);
  const layers = moeLayers.map((l) => ckpt.inspectLayer(l));
  // No MoE layer is nothing to serve: MoEInference.fromHf refuses it too.
  const ok = moeLayers.length > 0 && layers.every((l) => l.problems.length === 0);
  // The routed experts' bytes of one MoE layer (the first: every MoE layer has the same sizes).
  const expertBytes = layers[0] && layers[0].problems.length === 0 ? layers[0].expertBytes : null;
  if (rest.includes('--json')) {
    console.log(
      JSON.stringify(
        { dir, family: block.family, block, numLayers, moeLayers, files: ckpt.files.length, ranks, layers, ok, stats: ckpt.stats },
        null,
        2,
      ),
    );
    return ok ? 0 : 1;
  }
  const total = layers.reduce((s, l) => s + l.bytes, 0);
  const lines = [
    `hf checkpoint ${dir}: ${block.family}, ${numLayers} layers, ${moeLayers.length} with an MoE block (${ranges(moeLayers)})`,
    `block: hidden ${block.hidden}, ${block.numExperts} experts of width ${block.ffn}; ${routing(block)}` +
      (block.activation.kind === 'clamped-swiglu'
        ? `; clamped SwiGLU (alpha ${block.activation.alpha}, limit ${block.activation.limit})${block.expertBias ? ' with expert biases' : ''}`
        : '') +
      (block.sharedFfn > 0 ? `; shared expert of width ${block.sharedFfn}${block.sharedGate ? ', gated' : ''}` : '; no shared expert'),
    `files: ${ckpt.files.length}, headers read ${fmtBytes(ckpt.stats.headerBytes)}; MoE tensors ${layers.reduce((s, l) => s + l.tensors, 0)}, ${fmtBytes(total)}`,
  ];
  if (expertBytes !== null)
    lines.push(
      `per MoE layer and rank at ${ranks} rank${ranks > 1 ? 's' : ''}: ${block.numExperts / ranks} experts, ${fmtBytes(expertBytes / ranks)} as stored`,
    );
  // The first problems, without the folder each message repeats; --json has more.
  const problems = layers.flatMap((l) => l.problems.map((p) => `layer ${l.layer}: ${p.replace(`hf checkpoint ${dir}: `, '')}`));
  const more = layers.reduce((s, l) => s + l.moreProblems, 0) + Math.max(0, problems.length - SHOWN_PROBLEMS);
  lines.push(...problems.slice(0, SHOWN_PROBLEMS));
  if (more > 0) lines.push(`… and ${more} more problems (--json lists the first ${INSPECT_PROBLEMS_KEPT} of each layer)`);
  if (moeLayers.length === 0) lines.push('FAILED: the config declares no layer with an MoE block');
  else
    lines.push(
      ok
        ? `ok: every MoE layer loads`
        : `FAILED: ${layers.filter((l) => l.problems.length).length} of ${layers.length} MoE layers would not load`,
    );
  console.log(lines.join('\n'));
  return ok ? 0 : 1;
}
