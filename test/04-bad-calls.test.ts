// Bad calls, table-driven: each must throw a clear error of the right class that names the op and
// the argument, and none may take the process down.
import { existsSync, mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { describe, expect, it } from 'vitest';

import {
  balanceLoss,
  capacity,
  CheckpointError,
  ClusterTask,
  Communicator,
  defaultConfig,
  Device,
  Dispatcher,
  disposeSaved,
  DisposedError,
  Event,
  adamwStep,
  balanceBiasUpdate,
  expertsBackward,
  expertsForward,
  interleaveW13,
  joinExperts,
  quantizeFp8,
  dequantizeFp8,
  moeLayerState,
  groupedGemm,
  InvalidArgumentError,
  kernelOptionsFromEnvironment,
  listCheckpoints,
  loadMoELayer,
  loadCheckpoint,
  MoELayer,
  MoEInference,
  MoEModel,
  permute,
  pruneCheckpoints,
  SafetensorsFile,
  saveCheckpoint,
  singleRankGroup,
  stepDirName,
  Trainer,
  memoryStats,
  MoeError,
  ops,
  OutOfMemoryError,
  Stream,
  Tensor,
  tidy,
  trace,
  UnavailableError,
  unpermute,
  writeCheckpoint,
  writeSafetensors,
  mseLoss,
  rmsnorm,
  resolveConfig,
  routerForward,
} from '../lib/index.js';
import { native } from '../lib/native.js';
import { expectInvalidArgument } from './helpers.js';

const cpu = 'cpu' as const;
const f = (shape: number[], dtype: 'f32' | 'bf16' | 'i32' | 'u8' | 'fp8e4m3' = 'f32'): Tensor =>
  Tensor.zeros(shape, { dtype, device: cpu });
const disposed = (): Tensor => {
  const t = f([2, 2]);
  t.dispose();
  return t;
};

const i32 = (data: number[], shape: number[]): Tensor => Tensor.fromArray(data, { shape, dtype: 'i32', device: cpu });
const tmp = (): string => mkdtempSync(join(tmpdir(), 'moe-ep-bad-'));
/** One of writeCheckpoint's files: `name` holding a tensor 'w'. */
const file = (name: string) => ({ file: name, tensors: () => ({ w: f([2]) }) });
/** A checkpoint root holding step 1 (one tensor 'w'), its manifest passed through `edit`. */
const checkpoint = (edit: (m: Record<string, unknown>) => void = () => {}): string => {
  const root = tmp();
  const { dir } = saveCheckpoint(root, { step: 1, replicated: { w: Tensor.fromArray([1, 2], { device: cpu }) } });
  const manifest = JSON.parse(readFileSync(join(dir, 'manifest.json'), 'utf8')) as Record<string, unknown>;
  edit(manifest);
  writeFileSync(join(dir, 'manifest.json'), JSON.stringify(manifest));
  return root;
};
/** A small CPU layer's options (hidden 8; smallLayer4: hidden 4). */
const smallLayer = { hidden: 8, ffn: 4, numExperts: 4, topK: 2, dtype: 'f32', device: cpu } as const;
const smallLayer4 = { ...smallLayer, hidden: 4 } as const;
/** indices [2,2] over 4 experts and its dropless capacity result. */
const routed = () => {
  const indices = i32([0, 1, 2, 3], [2, 2]);
  return { indices, cap: capacity(indices, null, { numExperts: 4 }) };
};

type Case = [name: string, call: () => unknown, errorClass: typeof MoeError, message: RegExp];

const cases: Case[] = [
  // wrong dtype
  ['add of mixed dtypes', () => ops.add(f([2, 3]), f([2, 3], 'bf16')), InvalidArgumentError, /add: 'b' .* has dtype bf16 but 'a'/],
  ['add on u8', () => ops.add(f([2], 'u8'), f([2], 'u8')), InvalidArgumentError, /add: 'a' .* expected one of f32, bf16, f16, i32, i64/],
  ['matmul on i32', () => ops.matmul(f([2, 2], 'i32'), f([2, 2], 'i32')), InvalidArgumentError, /matmul: 'a' .*i32/],
  ['sum of fp8', () => ops.sum(f([4], 'fp8e4m3'), 0), InvalidArgumentError, /sum: 'a' .*fp8e4m3/],
  [
    'silu into a shifted view of its input',
    () => {
      const a = f([9]);
      return ops.silu(a.narrow(0, 0, 8), { out: a.narrow(0, 1, 8) });
    },
    InvalidArgumentError,
    /silu: 'out' overlaps 'x' in memory without being the same elements/,
  ],
  ['cat of no tensors', () => ops.cat([]), InvalidArgumentError, /cat: 'tensors' must be a non-empty array of tensors/],
  ['cat of a non-array', () => ops.cat(f([2]) as never), InvalidArgumentError, /cat: 'tensors' must be a non-empty array/],
  [
    'cat of mixed dtypes',
    () => ops.cat([f([2]), f([2], 'bf16')]),
    InvalidArgumentError,
    /cat: 'tensors\[1\]' is bf16 but 'tensors\[0\]' is f32/,
  ],
  [
    'cat of shapes that differ outside dim',
    () => ops.cat([f([2, 3]), f([3, 3])], 1),
    InvalidArgumentError,
    /cat: 'tensors\[1\]' has shape \[3,3\] but 'tensors\[0\]' has \[2,3\]; they may differ only in dim 1/,
  ],
  [
    'cat along a dim out of range',
    () => ops.cat([f([2, 3])], 2),
    InvalidArgumentError,
    /cat: 'dim' = 2 is out of range for tensors of rank 2/,
  ],
  [
    'cat into an out of the wrong shape',
    () => ops.cat([f([2]), f([3])], 0, { out: f([4]) }),
    InvalidArgumentError,
    /cat: 'out' must be f32 \[5\] on cpu; received f32 \[4\]/,
  ],
  [
    'cat into an out over one of its inputs',
    () => {
      const a = f([6]);
      return ops.cat([a.narrow(0, 0, 2), f([1])], 0, { out: a.narrow(0, 1, 3) });
    },
    InvalidArgumentError,
    /cat: 'out' overlaps 'tensors\[0\]' in memory/,
  ],
  ['cat given a non-tensor', () => ops.cat([f([2]), 3 as never]), InvalidArgumentError, /cat: 'tensors\[1\]' must be a Tensor/],
  [
    'cat of an array with a hole',
    () => ops.cat(Object.assign(new Array<Tensor>(3), { 0: f([2]), 2: f([2]) })),
    InvalidArgumentError,
    /cat: 'tensors\[1\]' must be a Tensor; received undefined/,
  ],
  [
    'cat into an out of another dtype',
    () => ops.cat([f([2]), f([3])], 0, { out: f([5], 'bf16') }),
    InvalidArgumentError,
    /cat: 'out' must be f32 \[5\] on cpu; received bf16 \[5\]/,
  ],
  [
    'cat along dim -3 of rank 2',
    () => ops.cat([f([2, 3])], -3),
    InvalidArgumentError,
    /cat: 'dim' = -3 is out of range for tensors of rank 2/,
  ],
  ['relu on i32', () => ops.relu(f([2], 'i32')), InvalidArgumentError, /relu: 'x' .*i32.* expected one of f32, bf16, f16/],
  [
    'geluBackward into an out of another dtype',
    () => ops.geluBackward(f([2]), f([2]), { out: f([2], 'bf16') }),
    InvalidArgumentError,
    /geluBackward: 'out' .* has dtype bf16 but 'x'/,
  ],
  [
    'gelu with an unknown approximation',
    () => ops.gelu(f([2]), { approximate: 'erf' as never }),
    InvalidArgumentError,
    /gelu: 'approximate' must be one of none, tanh; received erf/,
  ],
  [
    'siluBackward of different shapes',
    () => ops.siluBackward(f([3]), f([2])),
    InvalidArgumentError,
    /siluBackward: 'dy' has shape \[3\] but 'x' has shape \[2\]/,
  ],
  ['strided input to relu', () => ops.relu(f([3, 4]).transpose()), InvalidArgumentError, /relu: 'x' .* strided is not contiguous/],
  [
    'reluBackward given a non-tensor',
    () => ops.reluBackward(f([1]), 3 as never),
    InvalidArgumentError,
    /reluBackward: 'x' must be a Tensor/,
  ],
  ['unknown dtype name', () => Tensor.zeros([2], { dtype: 'f64' as never, device: cpu }), InvalidArgumentError, /'dtype' must be one of/],
  ['rand into an integer tensor', () => f([3], 'i32').random_(0, 0, 1, 1), InvalidArgumentError, /rand: 'out' .*i32/],
  // shape mismatch
  ['add of different shapes', () => ops.add(f([2, 3]), f([3, 2])), InvalidArgumentError, /add: 'b' shape \[3,2\] is neither/],
  ['matmul inner mismatch', () => ops.matmul(f([2, 3]), f([4, 5])), InvalidArgumentError, /matmul: inner dimensions differ/],
  ['matmul of 3-D', () => ops.matmul(f([2, 3, 4]), f([4, 5])), InvalidArgumentError, /matmul: expects 2-D/],
  [
    'out of the wrong shape',
    () => ops.scale(f([2, 3]), 2, { out: f([3, 2]) }),
    InvalidArgumentError,
    /scale: 'out' has shape \[3,2\] but 'a' has shape \[2,3\]/,
  ],
  ['copy between shapes', () => f([2, 3]).copy_(f([6])), InvalidArgumentError, /copy: 'src' has shape \[6\] but 'dst'/],
  ['view with a wrong count', () => f([2, 3]).view(4, 2), InvalidArgumentError, /view: 'shape' \[4,2\] has 8 elements but the tensor/],
  ['view with two -1', () => f([2, 3]).view(-1, -1), InvalidArgumentError, /more than one -1/],
  ['narrow past the end', () => f([2, 3]).narrow(1, 2, 5), InvalidArgumentError, /narrow: 'start' 2 and 'length' 5 do not fit/],
  ['sum over a missing dim', () => ops.sum(f([2, 3]), 2), InvalidArgumentError, /sum: 'dim' = 2 is out of range/],
  ['max of an empty dim', () => ops.max(f([0, 3]), 0), InvalidArgumentError, /max: cannot take the max over dimension 0/],
  [
    'fromArray count mismatch',
    () => Tensor.fromArray([1, 2, 3], { shape: [2, 2], device: cpu }),
    InvalidArgumentError,
    /fromArray: 'data' has 3 values/,
  ],
  [
    'fromArray non-integer into i32',
    () => Tensor.fromArray([1.5], { dtype: 'i32', device: cpu }),
    InvalidArgumentError,
    /'data'\[0\] = 1.5 is not an integer/,
  ],
  [
    'Uint16Array without a dtype',
    () => Tensor.fromArray(new Uint16Array(2), { device: cpu }),
    InvalidArgumentError,
    /Uint16Array holds raw bf16 or f16 bits/,
  ],
  ['fill i32 with a fraction', () => f([2], 'i32').fill_(0.5), InvalidArgumentError, /fill: 'value' 0.5 is not an integer/],
  ['fill u8 out of range', () => f([2], 'u8').fill_(300), InvalidArgumentError, /fill: 'value' 300 does not fit u8/],
  // disposed tensors
  ['disposed input', () => ops.add(disposed(), f([2, 2])), DisposedError, /disposed/],
  ['disposed out', () => ops.scale(f([2, 2]), 1, { out: disposed() }), DisposedError, /disposed/],
  [
    'disposed stream',
    () => {
      const s = new Stream(cpu);
      s.dispose();
      s.synchronize();
    },
    DisposedError,
    /disposed/,
  ],
  // negative or absurd sizes
  [
    'negative size',
    () => Tensor.empty([2, -1], { device: cpu }),
    InvalidArgumentError,
    /'shape' must be an array of non-negative integers/,
  ],
  ['fractional size', () => Tensor.empty([2.5], { device: cpu }), InvalidArgumentError, /non-negative integers/],
  ['absurd size', () => Tensor.empty([2 ** 30, 2 ** 30, 2 ** 30], { device: cpu }), InvalidArgumentError, /has too many elements|64 TiB/],
  ['too many dims', () => Tensor.empty([1, 1, 1, 1, 1, 1, 1, 1, 1], { device: cpu }), InvalidArgumentError, /at most 8/],
  [
    'allocation past the 64 TiB guard',
    () => Tensor.empty([2 ** 23, 2 ** 23 + 1], { dtype: 'u8', device: cpu }),
    InvalidArgumentError,
    /too many elements|64 TiB/,
  ],
  // wrong device
  [
    'bad device string',
    () => Tensor.zeros([2], { device: 'gpu' as never }),
    InvalidArgumentError,
    /'device' must be 'cpu', 'cuda' or 'cuda:N'/,
  ],
  ['a device that does not exist', () => Tensor.zeros([2], { device: 'cuda:63' }), MoeError, /cuda:63/],
  // unsupported layout
  ['strided input to add', () => ops.add(f([3, 4]).transpose(), f([4, 3])), InvalidArgumentError, /add: 'a' .* strided is not contiguous/],
  ['view of a strided tensor', () => f([3, 4]).transpose().view(12), InvalidArgumentError, /cannot view a non-contiguous tensor/],
  // wrong JS types reaching the raw binding
  ['raw: tensor expected', () => native().fill({} as never, 1), InvalidArgumentError, /fill: 'out' must be a tensor/],
  ['raw: number expected', () => native().fill(f([1]).handle, 'x' as never), InvalidArgumentError, /fill: 'value' must be a number/],
  ['raw: bad dtype code', () => native().tensorEmpty([1], 99, 0, 0), InvalidArgumentError, /not a dtype code/],
  // an int the op keeps in 32 bits: refused, not wrapped (2^32 would have become dim 0)
  [
    'raw: a dim past 32 bits',
    () => native().reduce(0, f([2, 3]).handle, 2 ** 32, f([3]).handle),
    InvalidArgumentError,
    /'dim' must fit in 32 bits/,
  ],
  ['raw: a narrow dim past 32 bits', () => f([2, 3]).handle.narrow(2 ** 32 + 1, 0, 1), InvalidArgumentError, /'dim' must fit in 32 bits/],
  ['raw: bad shape element', () => native().tensorEmpty([1, 'a' as never], 0, 0, 0), InvalidArgumentError, /element 1 is not a number/],
  ['ops given a non-tensor', () => ops.add(3 as never, f([1])), InvalidArgumentError, /add: 'a' must be a Tensor/],
  [
    'elapsed time of CPU events (created with timing: the CPU holds no times, said as such)',
    () => new Event(cpu, { timing: true }).elapsedTime(new Event(cpu, { timing: true })),
    InvalidArgumentError,
    /^Event\.elapsedTime: events on the CPU hold no times \(CPU work completes as it is queued\); time events on a CUDA device$/,
  ],
  ['Event timing not a boolean', () => new Event(cpu, { timing: 1 as never }), InvalidArgumentError, /Event: 'timing' must be a boolean/],
  ...(['item', 'toNumbers', 'toFloat32Array'] as const).map((method): [string, () => unknown, typeof DisposedError, RegExp] => [
    `${method}() of a disposed bf16 tensor of 4 elements names ${method}`,
    () => {
      const t = Tensor.zeros([4], { dtype: 'bf16', device: cpu });
      t.dispose();
      return t[method]();
    },
    DisposedError,
    new RegExp(`^${method}: the tensor was disposed`),
  ]),
  // found by fuzzing the public API: JS-side checks that named nothing or let garbage through
  [
    'fromArray value beyond i32',
    () => Tensor.fromArray([2 ** 40], { dtype: 'i32', device: cpu }),
    InvalidArgumentError,
    /fromArray: 'data'\[0\] = 1099511627776 does not fit i32/,
  ],
  [
    'fromArray value beyond u8',
    () => Tensor.fromArray([300], { dtype: 'u8', device: cpu }),
    InvalidArgumentError,
    /fromArray: 'data'\[0\] = 300 does not fit u8/,
  ],
  [
    'fromArray of undefined',
    () => Tensor.fromArray(undefined as never, { device: cpu }),
    InvalidArgumentError,
    /fromArray: 'data' must be an array/,
  ],
  ['copy_ from a non-tensor', () => f([2]).copy_(undefined as never), InvalidArgumentError, /copy: 'src' must be a Tensor/],
  ['add_ of null', () => f([2]).add_(null as never), InvalidArgumentError, /add: 'other' must be a Tensor; received null/],
  ['tidy without a function', () => tidy(3 as never), InvalidArgumentError, /tidy: 'fn' must be a function/],
  [
    'matmul into one of its inputs',
    () => {
      const a = f([2, 2]);
      return ops.matmul(a, f([2, 2]), { out: a });
    },
    InvalidArgumentError,
    /matmul: 'out' shares memory with 'a' or 'b'/,
  ],
  ['Device.cuda of a negative index', () => Device.cuda(-1), InvalidArgumentError, /'index' must be a non-negative integer; received -1/],
  [
    'event recorded on a non-stream',
    () => new Event(cpu).record('s' as never),
    InvalidArgumentError,
    /Event.record: 'stream' must be a Stream/,
  ],
  [
    'stream waiting on a non-event',
    () => new Stream(cpu).waitEvent(null as never),
    InvalidArgumentError,
    /Stream.waitEvent: 'event' must be an Event/,
  ],
  [
    'allReduce with an inherited op name',
    () => Communicator.single().allReduce(f([2]), 'toString' as never),
    InvalidArgumentError,
    /allReduce: 'op' must be sum, max, min or avg; received "toString"/,
  ],
  [
    'allToAllV of undefined',
    () => Communicator.single().allToAllV(undefined as never, [2], f([2, 3]), [2]),
    InvalidArgumentError,
    /allToAllV: 'send' must be a Tensor/,
  ],
  ['allGather of a scalar', () => Communicator.single().allGather(f([])), InvalidArgumentError, /allGather: 't' is a scalar/],
  [
    'groupedGemm with an inherited mode name',
    () => groupedGemm('toString' as never, f([4, 3]), f([2, 3, 5]), i32([0, 2, 4], [3])),
    InvalidArgumentError,
    /groupedGemm: 'mode' must be 'NN', 'NT' or 'TN'; received "toString"/,
  ],
  [
    'groupedGemm with empty offsets',
    () => groupedGemm('TN', f([4, 3]), f([4, 5]), i32([], [0])),
    InvalidArgumentError,
    /groupedGemm: 'offsets' must be \[E\+1\]/,
  ],
  [
    'expertsForward with an odd w13',
    () => expertsForward(f([4, 3]), f([2, 3, 7]), f([2, 4, 3]), i32([0, 2, 4], [3])),
    InvalidArgumentError,
    /expertsForward: 'w13' must be \[E,H,2F\]/,
  ],
  [
    'expertsForward of undefined',
    () => expertsForward(undefined as never, f([2, 3, 8]), f([2, 4, 3]), i32([0, 2, 4], [3])),
    InvalidArgumentError,
    /expertsForward: 'a' must be a Tensor/,
  ],
  [
    'permute with kept counts beyond T·k',
    () => {
      const { indices, cap } = routed();
      cap.keptPerExpert.fill_(2 ** 30);
      return permute(f([2, 3]), indices, f([2, 2]), cap);
    },
    InvalidArgumentError,
    /permute: 'cap.keptPerExpert'\[0\] = 1073741824 is outside \[0, 4\]/,
  ],
  [
    'permute with negative kept counts',
    () => {
      const { indices, cap } = routed();
      cap.keptPerExpert.fill_(-1);
      return permute(f([2, 3]), indices, f([2, 2]), cap);
    },
    InvalidArgumentError,
    /permute: 'cap.keptPerExpert'\[0\] = -1/,
  ],
  [
    'permute with a NaN capacity',
    () => {
      const { indices, cap } = routed();
      return permute(f([2, 3]), indices, f([2, 2]), { ...cap, capacity: NaN }, { padToCapacity: true });
    },
    InvalidArgumentError,
    /permute: 'cap.capacity' must be null or a non-negative integer/,
  ],
  [
    'permute padded to a capacity below the kept counts',
    () => {
      const { indices, cap } = routed();
      return permute(f([2, 3]), indices, f([2, 2]), { ...cap, capacity: 0 }, { padToCapacity: true });
    },
    InvalidArgumentError,
    /permute: 'cap.keptPerExpert'\[\d\] = [1-9]\d* is outside \[0, 0\] \('cap.capacity', padToCapacity\)/,
  ],
  [
    'permute with a wrong numExperts',
    () => {
      const { indices, cap } = routed();
      return permute(f([2, 3]), indices, f([2, 2]), { ...cap, numExperts: 8 });
    },
    InvalidArgumentError,
    /permute: 'cap.keptPerExpert' \[4\] must be \[8\]/,
  ],
  [
    'Dispatcher with rank >= size',
    () => new Dispatcher({ numExperts: 4, group: { rank: 3, size: 2, allToAll: () => 0, allToAllV: () => 0 } }),
    InvalidArgumentError,
    /Dispatcher: 'group' has rank 3 and size 2/,
  ],
  [
    'Dispatcher with a non-group',
    () => new Dispatcher({ numExperts: 4, group: 'g' as never }),
    InvalidArgumentError,
    /Dispatcher: 'group' must be an ExpertParallelGroup/,
  ],
  [
    'combine of the wrong number of rows',
    () => {
      const { indices, cap } = routed();
      const d = new Dispatcher({ numExperts: 4 });
      const r = d.dispatch(f([2, 3]), indices, f([2, 2]), cap);
      return d.combine(f([1, 3]), r.handle, f([2, 2]));
    },
    InvalidArgumentError,
    /combine: 'expertOut' \[1,3\] must be \[4, H\]/,
  ],
  [
    'MoELayer.backward of a non-forward',
    () => new MoELayer({ numExperts: 4, topK: 2, hidden: 8, ffn: 8, dtype: 'f32', device: cpu }).backward(null as never, f([2, 8])),
    InvalidArgumentError,
    /MoELayer.backward: 'fwd' must be what forward\(\) returned/,
  ],
  [
    'MoELayer.backward with dy of another shape',
    () => {
      const layer = new MoELayer({ numExperts: 4, topK: 2, hidden: 8, ffn: 8, dtype: 'f32', device: cpu });
      return layer.backward(layer.forward(Tensor.randn([2, 8], { device: cpu })), f([3, 8]));
    },
    InvalidArgumentError,
    /MoELayer.backward: 'dy' \[3,8\] must have the shape of the forward's 'x' \[2,8\]/,
  ],
  [
    'ClusterTask.batch of negative tokens',
    () => new ClusterTask({ dim: 8, clusters: 4, zipf: 1, noise: 0.1, seed: 1 }).batch(0, -1),
    InvalidArgumentError,
    /ClusterTask.batch: 'tokens' must be an integer in \[1, 2147483647\]; received -1/,
  ],
  ['Trainer of a non-config', () => new Trainer(null as never), InvalidArgumentError, /config: must be a JSON object/],
  ['stepDirName of NaN', () => stepDirName(NaN), InvalidArgumentError, /stepDirName: 'step' must be a non-negative integer; received NaN/],
  [
    'saveCheckpoint without a root',
    () => saveCheckpoint(undefined as never, { step: 1 }),
    InvalidArgumentError,
    /saveCheckpoint: 'root' must be a folder path/,
  ],
  [
    'loadCheckpoint of a non-path',
    () => loadCheckpoint(5 as never),
    InvalidArgumentError,
    /loadCheckpoint: 'path' must be a checkpoint folder/,
  ],
  [
    'CheckpointReader.get of a non-name',
    () => loadCheckpoint(checkpoint()).get(5 as never),
    InvalidArgumentError,
    /CheckpointReader: 'name' must be a string/,
  ],
  [
    'CheckpointReader.into a non-tensor',
    () => loadCheckpoint(checkpoint()).into('w', null as never),
    InvalidArgumentError,
    /CheckpointReader.into: 'dst' must be a Tensor/,
  ],
  [
    'manifest with tensors null',
    () =>
      loadCheckpoint(
        checkpoint((m) => {
          m.tensors = null;
        }),
      ),
    CheckpointError,
    /manifest\.json: tensors must be an object of tensor records; it has null/,
  ],
  [
    'manifest with a bad shape',
    () =>
      loadCheckpoint(
        checkpoint((m) => {
          (m.tensors as Record<string, { shape: unknown }>).w!.shape = 'x';
        }),
      ),
    CheckpointError,
    /manifest\.json: tensors\["w"\]\.shape must be an array of at most 64 non-negative integers; it has "x"/,
  ],
  ['safetensors open of a folder', () => SafetensorsFile.open(tmp()), CheckpointError, /is a directory; only regular files are read/],
  [
    'MoEModel with -1 layers',
    () => new MoEModel({ hidden: 8, ffn: 16, numExperts: 4, topK: 2, layers: -1 }, Device.parse('cpu'), 'f32', singleRankGroup, 1),
    InvalidArgumentError,
    /MoEModel: 'layers' must be a positive integer; received -1/,
  ],
  [
    "MoEModel.backward accumulating the experts' gradients in bf16",
    () => {
      using model = new MoEModel(
        { hidden: 8, ffn: 16, numExperts: 4, topK: 2, layers: 1, weightGradDtype: 'bf16' },
        Device.parse('cpu'),
        'f32',
        singleRankGroup,
        1,
      );
      using x = Tensor.randn([4, 8], { seed: 1 });
      using y = Tensor.randn([4, 8], { seed: 2 });
      return model.backward(model.forward(x, y), { accumulate: new Map() }); // the refusal releases the forward
    },
    InvalidArgumentError,
    /MoEModel\.backward: 'accumulate' adds into f32 gradients only; the model's weightGradDtype is 'bf16'/,
  ],
  [
    'manifest with world size 0',
    () =>
      loadCheckpoint(
        checkpoint((m) => {
          m.world = { size: 0 };
        }),
      ),
    CheckpointError,
    /world.size must be a positive integer/,
  ],
  // options that are not an object: named, not a TypeError from inside
  [
    'Tensor.zeros with options null',
    () => Tensor.zeros([2], null as never),
    InvalidArgumentError,
    /Tensor.zeros: 'options' must be an object; received null/,
  ],
  [
    'ops.add with options 5',
    () => ops.add(f([2]), f([2]), 5 as never),
    InvalidArgumentError,
    /add: 'options' must be an object; received number/,
  ],
  [
    'ops.matmul with options null',
    () => ops.matmul(f([2, 2]), f([2, 2]), null as never),
    InvalidArgumentError,
    /matmul: 'options' must be an object; received null/,
  ],
  [
    'permute with options null',
    () => permute(f([2, 4]), f([2, 1], 'i32'), f([2, 1]), null as never, null as never),
    InvalidArgumentError,
    /permute: 'options' must be an object; received null/,
  ],
  [
    'groupedGemm with options as an array',
    () => groupedGemm('NN', f([2, 4], 'bf16'), f([1, 4, 4], 'bf16'), f([2], 'i32'), [] as never),
    InvalidArgumentError,
    /groupedGemm: 'options' must be an object; received an array/,
  ],
  // unknown option names: refused, named, with the close match (plain JavaScript would otherwise ignore them)
  [
    'MoELayer with capacity_factor',
    () => new MoELayer({ hidden: 8, ffn: 4, numExperts: 4, topK: 2, capacity_factor: 1.25 } as never),
    InvalidArgumentError,
    /MoELayer: unknown option 'capacity_factor' \(did you mean 'capacityFactor'\?\)/,
  ],
  [
    'Tensor.randn with sed',
    () => Tensor.randn([2], { sed: 1 } as never),
    InvalidArgumentError,
    /Tensor.randn: unknown option 'sed' \(did you mean 'seed'\?\); expected 'dtype', 'device', 'seed', 'offset', 'mean', 'std'/,
  ],
  [
    'ops.matmul with two unknown options',
    () => ops.matmul(f([2, 2]), f([2, 2]), { acumulate: true, bogus: 1 } as never),
    InvalidArgumentError,
    /matmul: unknown options 'acumulate' \(did you mean 'accumulate'\?\), 'bogus'; expected/,
  ],
  [
    'capacity with drop_policy',
    () => capacity(f([2, 1], 'i32'), f([2, 1]), { numExperts: 2, drop_policy: 'position' } as never),
    InvalidArgumentError,
    /capacity: unknown option 'drop_policy' \(did you mean 'dropPolicy'\?\)/,
  ],
  [
    'Dispatcher with numexperts',
    () => new Dispatcher({ numexperts: 4 } as never),
    InvalidArgumentError,
    /Dispatcher: unknown option 'numexperts' \(did you mean 'numExperts'\?\)/,
  ],
  [
    'ClusterTask with cluster',
    () => new ClusterTask({ dim: 4, cluster: 2, zipf: 1, noise: 0, seed: 1 } as never),
    InvalidArgumentError,
    /ClusterTask: unknown option 'cluster' \(did you mean 'clusters'\?\)/,
  ],
  [
    'saveCheckpoint with kep',
    () => saveCheckpoint(tmp(), { step: 1, kep: 2 } as never),
    InvalidArgumentError,
    /saveCheckpoint: unknown option 'kep' \(did you mean 'keep'\?\)/,
  ],
  [
    'Trainer with wrld',
    () => new Trainer(defaultConfig, { wrld: null } as never),
    InvalidArgumentError,
    /Trainer: unknown option 'wrld' \(did you mean 'world'\?\)/,
  ],
  [
    'Event with an unrelated name: no suggestion',
    () => new Event(cpu, { colour: 1 } as never),
    InvalidArgumentError,
    /Event: unknown option 'colour'; expected 'timing'$/,
  ],
  // Found by an audit (session 20): each of these crashed the process, gave a wrong result or named no argument.
  [
    'narrow on dim 2^32 (wrapped to 0)',
    () => f([2, 3]).narrow(2 ** 32, 0, 1),
    InvalidArgumentError,
    /narrow: 'dim' must be an integer in \[-2, 2\)/,
  ],
  [
    'transpose of dim 2^32',
    () => f([2, 3]).transpose(2 ** 32, 1),
    InvalidArgumentError,
    /transpose: 'dim0' must be an integer in \[-2, 2\)/,
  ],
  [
    'fromArray of an empty array-like with a huge length (aborted node)',
    () => Tensor.fromArray({ length: 5e8 } as ArrayLike<number>, { device: cpu }),
    InvalidArgumentError,
    /fromArray: 'data'\[0\] = undefined is not a number/,
  ],
  [
    'groupedGemm into its own input',
    () => {
      const a = f([4, 4], 'bf16');
      return groupedGemm('TN', a, f([4, 4], 'bf16'), i32([0, 4], [2]), { out: a.view(1, 4, 4) });
    },
    InvalidArgumentError,
    /groupedGemm: 'out' overlaps 'a' in memory; the op needs a separate output/,
  ],
  [
    'groupedGemm with an unknown dtype',
    () => groupedGemm('NN', f([2, 4]), f([1, 4, 4]), i32([0, 2], [2]), { dtype: 'f64' as never }),
    InvalidArgumentError,
    /groupedGemm: 'dtype' must be one of/,
  ],
  [
    'unpermute into its rows',
    () => {
      const { indices, cap } = routed();
      const p = permute(f([2, 3]), indices, f([2, 2]), cap);
      return unpermute(p.rows, p.rowOf, f([2, 2]), { out: p.rows.narrow(0, 0, 2) });
    },
    InvalidArgumentError,
    /unpermute: 'out' overlaps 'rows' in memory/,
  ],
  [
    'permute into its input',
    () => {
      const { indices, cap } = routed();
      const x = f([4, 3]);
      return permute(x.narrow(0, 0, 2), indices, f([2, 2]), cap, { out: { rows: x } });
    },
    InvalidArgumentError,
    /permute: 'out\.rows' overlaps 'x' in memory/,
  ],
  [
    'adamwStep with one tensor for both moments',
    () => {
      const s = f([4]);
      return adamwStep(f([4]), f([4]), s, s, { lr: 1e-3, step: 1 });
    },
    InvalidArgumentError,
    /adamw: 'expAvg' overlaps 'expAvgSq' in memory/,
  ],
  [
    'adamwStep with an eps float32 rounds to 0',
    () => adamwStep(f([4]), f([4]), f([4]), f([4]), { lr: 1e-3, step: 1, eps: 1e-50 }),
    InvalidArgumentError,
    /adamw: 'eps' = 1e-50 is below float32's smallest normal/,
  ],
  [
    'adamwStep with lr beyond float32',
    () => adamwStep(f([4]), f([4]), f([4]), f([4]), { lr: 1e300, step: 1 }),
    InvalidArgumentError,
    /adamw: 'lr' = 1e\+300 is beyond float32's range/,
  ],
  [
    'MoELayer with a fractional seed (streams of another seed)',
    () => new MoELayer({ ...smallLayer, seed: 1.0625 }),
    InvalidArgumentError,
    /MoELayer: 'seed' must be a non-negative integer/,
  ],
  [
    'MoELayer with an infinite capacityFactor',
    () => new MoELayer({ ...smallLayer, capacityFactor: Infinity }),
    InvalidArgumentError,
    /MoELayer: 'capacityFactor' must be a finite positive number/,
  ],
  [
    'MoELayer with padToCapacity not a boolean',
    () => new MoELayer({ ...smallLayer, capacityFactor: 1, padToCapacity: 'yes' as never }),
    InvalidArgumentError,
    /MoELayer: 'padToCapacity' must be/,
  ],
  [
    'MoELayer with a zLossCoef beyond float32',
    () => new MoELayer({ ...smallLayer, zLossCoef: 1e39 }),
    InvalidArgumentError,
    /MoELayer: 'zLossCoef' = 1e\+39 is beyond float32's range/,
  ],
  [
    'randn with a NaN mean',
    () => Tensor.randn([2], { mean: NaN, device: cpu }),
    InvalidArgumentError,
    /randn: 'mean' must be a finite number/,
  ],
  [
    'rand with a high beyond float32',
    () => Tensor.rand([2], { high: 1e39, device: cpu }),
    InvalidArgumentError,
    /rand: 'high' = 1e\+39 is beyond float32's range/,
  ],
  [
    'a disposed offsets tensor, named',
    () => groupedGemm('NN', f([2, 4]), f([1, 4, 4]), disposed()),
    DisposedError,
    /groupedGemm: 'offsets' was disposed/,
  ],
  // A second audit (serving, the dispatcher, files; session 20).
  [
    'broadcast to root 2^32 (wrapped to rank 0)',
    () => Communicator.single().broadcast(f([2]), 2 ** 32),
    InvalidArgumentError,
    /broadcast: 'root' 4294967296 is not a rank of this communicator of size 1/,
  ],
  [
    'MoELayer with a group that is no group',
    () => new MoELayer({ ...smallLayer, group: 'world' as never }),
    InvalidArgumentError,
    /MoELayer: 'group' must be an ExpertParallelGroup/,
  ],
  [
    'Dispatcher with rank 5 of 1',
    () => new Dispatcher({ numExperts: 4, group: { ...singleRankGroup, rank: 5 } }),
    InvalidArgumentError,
    /Dispatcher: 'group' has rank 5 and size 1/,
  ],
  [
    'MoEInference.fromLayer(null)',
    () => MoEInference.fromLayer(null as never),
    InvalidArgumentError,
    /MoEInference\.fromLayer: 'layer' must be a MoELayer; received null/,
  ],
  [
    'saveCheckpoint of replicated: 5 (committed an empty checkpoint)',
    () => saveCheckpoint(tmp(), { step: 1, replicated: 5 as never }),
    InvalidArgumentError,
    /saveCheckpoint: 'replicated' must be an object of name → tensor; received number/,
  ],
  [
    'saveCheckpoint of replicated: [t] (saved a tensor named "0")',
    () => saveCheckpoint(tmp(), { step: 1, replicated: [f([2])] as never }),
    InvalidArgumentError,
    /'replicated' must be an object of name → tensor; received an array/,
  ],
  [
    'saveCheckpoint of a null tensor, named',
    () => saveCheckpoint(tmp(), { step: 1, replicated: { a: null as never } }),
    CheckpointError,
    /tensor 'a' must be a Tensor or \{ dtype, shape, data \}; received null/,
  ],
  [
    'loadCheckpoint with verify: "yes"',
    () => loadCheckpoint(checkpoint(), { verify: 'yes' as never }),
    InvalidArgumentError,
    /loadCheckpoint: 'verify' must be/,
  ],
  [
    'trace.mark with a number for a name',
    () => {
      trace.enable();
      try {
        trace.mark(42 as never, cpu);
      } finally {
        trace.disable();
      }
    },
    InvalidArgumentError,
    /trace\.mark: 'name' must be a string; received number/,
  ],
  [
    'singleRankGroup.allToAll(null)',
    () => singleRankGroup.allToAll(null as never, f([2])),
    InvalidArgumentError,
    /allToAll: 'send' must be a Tensor; received null/,
  ],
  [
    'singleRankGroup.allToAllV with row counts that are not the rows',
    () => singleRankGroup.allToAllV(f([2, 3]), [5], f([2, 3]), [5]),
    InvalidArgumentError,
    /allToAllV: 'sendRows' must be \[2\] \(one rank: the rows of its tensor\); received \[5\]/,
  ],
  [
    'MoEInference.forward of a transposed x, named',
    () => {
      using layer = new MoELayer(smallLayer4);
      using inf = MoEInference.fromLayer(layer);
      return inf.forward(f([4, 4]).transpose());
    },
    InvalidArgumentError,
    /MoEInference\.forward: 'x' must be contiguous/,
  ],
  [
    'MoEInference.forward of a disposed x, named',
    () => {
      using layer = new MoELayer(smallLayer4);
      using inf = MoEInference.fromLayer(layer);
      return inf.forward(disposed());
    },
    DisposedError,
    /MoEInference\.forward: 'x' was disposed/,
  ],
  [
    'writeSafetensors of a null entry',
    () => writeSafetensors(join(tmp(), 'x.safetensors'), [null as never]),
    InvalidArgumentError,
    /writeSafetensors: each entry must be \{ name, dtype, shape, data \}; received null/,
  ],
  [
    'writeSafetensors of an object for entries',
    () => writeSafetensors(join(tmp(), 'x.safetensors'), {} as never),
    InvalidArgumentError,
    /writeSafetensors: 'entries' must be an array/,
  ],
  [
    'writeSafetensors with null metadata',
    () => writeSafetensors(join(tmp(), 'x.safetensors'), [], null as never),
    InvalidArgumentError,
    /writeSafetensors: 'metadata' must be an object of strings/,
  ],
  [
    'a disposed Dispatcher (it worked on, caching maps nothing freed)',
    () => {
      const d = new Dispatcher({ numExperts: 4 });
      d.dispose();
      const { indices, cap } = routed();
      return d.dispatch(f([2, 3]), indices, f([2, 2]), cap);
    },
    DisposedError,
    /dispatch: the dispatcher was disposed and cannot be used/,
  ],
  ['copy_ from a disposed src, named', () => f([2, 2]).copy_(disposed()), DisposedError, /copy: 'src' was disposed/],
  // writeCheckpoint commits over the step's old checkpoint: what could not load is refused first.
  ...(
    [
      ['worldSize NaN', { worldSize: NaN }, /'worldSize' must be a positive integer; received NaN/],
      [
        'a file given twice',
        { files: [file('a.safetensors'), file('a.safetensors')] },
        /'files\[1\]\.file' "a\.safetensors" is given twice/,
      ],
      ['a file named manifest.json', { files: [file('manifest.json')] }, /'files\[0\]\.file' "manifest\.json" must end in \.safetensors/],
      [
        'a rank that is not a number',
        { files: [{ ...file('a.safetensors'), rank: 'x' }] },
        /'files\[0\]\.rank' must be a non-negative integer/,
      ],
      ['a rank past worldSize', { files: [{ ...file('a.safetensors'), rank: 1 }] }, /'files\[0\]\.rank' = 1 is not below worldSize 1/],
      ['files not an array', { files: 'a' }, /'files' must be an array/],
    ] as [string, object, RegExp][]
  ).map(([what, change, message]): Case => [
    `writeCheckpoint with ${what}, before anything is written`,
    () => writeCheckpoint(tmp(), { step: 1, worldSize: 1, files: [file('a.safetensors')], ...change } as never),
    InvalidArgumentError,
    message,
  ]),
  [
    'manifestExtras given as a string',
    () => saveCheckpoint(tmp(), { step: 1, replicated: { w: f([2]) }, manifestExtras: 'abc' as never }),
    InvalidArgumentError,
    /saveCheckpoint: 'manifestExtras' must be an object of JSON values; received string/,
  ],
  [
    'add into a shifted view of its input',
    () => {
      const a = f([9]);
      return ops.add(a.narrow(0, 0, 8), f([8]), { out: a.narrow(0, 1, 8) });
    },
    InvalidArgumentError,
    /add: 'out' overlaps 'a' in memory without being the same elements/,
  ],
  [
    'mseLoss writing its gradient over pred',
    () => {
      const s = f([4, 4]);
      return mseLoss(s.narrow(0, 0, 3), f([3, 4]), { out: { grad: s.narrow(0, 1, 3) } });
    },
    InvalidArgumentError,
    /mseLoss: 'out\.grad' overlaps 'pred' in memory/,
  ],
  [
    'rmsnorm writing y over x',
    () => {
      const x = f([3, 4]);
      return rmsnorm(x, f([4]), { out: { y: x } });
    },
    InvalidArgumentError,
    /rmsnorm: 'out\.y' overlaps 'x' in memory/,
  ],
  [
    'balanceBiasUpdate with gamma past float32',
    () => balanceBiasUpdate(f([4]), i32([1, 2, 2, 3], [4]), 1e39),
    InvalidArgumentError,
    /balanceBiasUpdate: 'gamma' = 1e\+39 is beyond float32's range/,
  ],
  [
    "expertsBackward with rows that are not the weights' H",
    () => {
      const w13 = f([2, 3, 8]);
      const w2 = f([2, 4, 3]);
      const offsets = i32([0, 2, 5], [3]);
      const a = f([5, 3]);
      const fwd = expertsForward(a, w13, w2, offsets);
      return expertsBackward(f([5, 3]), f([5, 7]), w13, w2, offsets, fwd);
    },
    InvalidArgumentError,
    /expertsBackward: 'a' must be \[M,3\] \(H from 'w13' \[2,3,8\]\); received \[5,7\]/,
  ],
  [
    "MoELayer.backward of another layer's forward",
    () => {
      using one = new MoELayer(smallLayer);
      using other = new MoELayer({ ...smallLayer, seed: 9 });
      const fwd = one.forward(f([3, 8]));
      return other.backward(fwd, f([3, 8]));
    },
    InvalidArgumentError,
    /MoELayer\.backward: 'fwd' came from another MoELayer's forward\(\)/,
  ],
  [
    'a config whose AdamW eps is below float32',
    () => resolveConfig({ optimizer: { eps: 1e-50 } }),
    InvalidArgumentError,
    /config\.optimizer\.eps: 1e-50 is below float32's smallest normal number/,
  ],
  [
    'a BigInt dtype, quoted in the message',
    () => Tensor.zeros([2], { dtype: 1n as never, device: cpu }),
    InvalidArgumentError,
    /^zeros: 'dtype' must be one of .*; received "1n"/,
  ],
  ['a Symbol for dim', () => ops.sum(f([2]), Symbol('d') as never), InvalidArgumentError, /sum: 'dim' = Symbol\(d\) is out of range/],
  [
    'an object without a prototype for alpha',
    () => ops.scale(f([2]), Object.create(null) as never),
    InvalidArgumentError,
    /scale: 'alpha' must be a number; received \[object Object\]/,
  ],
  [
    'MoELayer.forward of a transposed x, named as the layer',
    () => {
      using layer = new MoELayer(smallLayer);
      return layer.forward(f([8, 3]).transpose());
    },
    InvalidArgumentError,
    /MoELayer\.forward: 'x' must be contiguous/,
  ],
  [
    'MoELayer.forward of a disposed x, named as the layer',
    () => {
      using layer = new MoELayer(smallLayer);
      const x = f([3, 8]);
      x.dispose();
      return layer.forward(x);
    },
    DisposedError,
    /MoELayer\.forward: 'x' was disposed/,
  ],
  [
    'MoELayer.backward of a strided dy, named as the layer',
    () => {
      using layer = new MoELayer(smallLayer);
      const fwd = layer.forward(f([3, 8]));
      return layer.backward(fwd, f([8, 3]).transpose());
    },
    InvalidArgumentError,
    /MoELayer\.backward: 'dy' must be a contiguous f32 tensor on cpu, as the forward's 'x'; received a strided f32/,
  ],
  [
    'listCheckpoints of null',
    () => listCheckpoints(null as never),
    InvalidArgumentError,
    /listCheckpoints: 'root' must be a folder path \(a non-empty string\); received null/,
  ],
  [
    'pruneCheckpoints of an empty root',
    () => pruneCheckpoints('', 1),
    InvalidArgumentError,
    /pruneCheckpoints: 'root' must be a folder path/,
  ],
  [
    'a Dispatcher given padToCapacity as a string',
    () => new Dispatcher({ numExperts: 4, padToCapacity: 'no' as never }),
    InvalidArgumentError,
    /'padToCapacity' must be/,
  ],
  [
    'interleaveW13 of two dtypes',
    () => interleaveW13(f([1, 2, 3], 'i32'), f([1, 2, 3])),
    InvalidArgumentError,
    /interleaveW13: 'w1' and 'w3' must share dtype and device/,
  ],
  [
    'moeLayerState with index NaN',
    () => {
      using layer = new MoELayer(smallLayer);
      return moeLayerState(layer, NaN);
    },
    InvalidArgumentError,
    /moeLayerState: 'index' must be a non-negative integer/,
  ],
  [
    'disposeSaved of null',
    () => disposeSaved(null as never),
    InvalidArgumentError,
    /disposeSaved: 'fwd' must be what MoELayer\.forward\(\) returned/,
  ],
  [
    'a one-rank allToAll into another dtype',
    () => singleRankGroup.allToAll(f([2]), f([2], 'i32')),
    InvalidArgumentError,
    /allToAll: 'recv' is i32 but 'send' is f32/,
  ],
  ['a config whose lr is past float32', () => resolveConfig({ optimizer: { lr: 1e39 } }), InvalidArgumentError, /optimizer\.lr/],
  // From session 22's fuzzing: raw TypeErrors and errors that named an internal op
  [
    'writeSafetensors without a path',
    () => writeSafetensors(undefined as never, []),
    InvalidArgumentError,
    /writeSafetensors: 'path' must be a file path/,
  ],
  [
    'SafetensorsFile.open of an empty path',
    () => SafetensorsFile.open(''),
    InvalidArgumentError,
    /SafetensorsFile\.open: 'path' must be a file path/,
  ],
  [
    'saveCheckpoint with a comm that is not a Communicator',
    () => saveCheckpoint(tmp(), { step: 1, comm: 'x' as never }),
    InvalidArgumentError,
    /saveCheckpoint: 'comm' must be a Communicator .*; received "x"/,
  ],
  [
    'loadCheckpoint with a comm without an integer rank and size',
    () => loadCheckpoint(checkpoint(), { comm: 'x' as never }),
    InvalidArgumentError,
    /loadCheckpoint: 'comm' must have an integer rank in \[0, size\); received rank undefined and size undefined/,
  ],
  [
    'joinExperts of no experts',
    () => joinExperts(loadCheckpoint(checkpoint()), 0, 0, () => 'w'),
    InvalidArgumentError,
    /joinExperts: 'count' must be a positive integer/,
  ],
  [
    'joinExperts without a name function',
    () => joinExperts(loadCheckpoint(checkpoint()), 0, 1, 'w' as never),
    InvalidArgumentError,
    /joinExperts: 'name' must be a function/,
  ],
  [
    'ClusterTask with a fractional seed',
    () => new ClusterTask({ dim: 4, clusters: 2, zipf: 1, noise: 0.1, seed: 1.5 }),
    InvalidArgumentError,
    /ClusterTask: 'seed' must be a non-negative integer/,
  ],
  [
    'ClusterTask with noise that overflows f32 losses',
    () => new ClusterTask({ dim: 4, clusters: 2, zipf: 1, noise: 1e308, seed: 1 }),
    InvalidArgumentError,
    /ClusterTask: 'noise' must be in \[0, 1000000\]/,
  ],
  [
    'ClusterTask with an infinite zipf',
    () => new ClusterTask({ dim: 4, clusters: 2, zipf: Infinity, noise: 0.1, seed: 1 }),
    InvalidArgumentError,
    /ClusterTask: 'zipf' must be a finite number/,
  ],
  [
    "a train config with noise past ClusterTask's bound",
    () => resolveConfig({ data: { noise: 1e7 } }),
    InvalidArgumentError,
    /data\.noise/,
  ],
  [
    'a Tensor made from its prototype without the constructor',
    () => ops.add(Object.create(Tensor.prototype) as Tensor, f([1])),
    InvalidArgumentError,
    /add: 'a' must be a Tensor; received an object made from Tensor\.prototype/,
  ],
  [
    'MoELayer with routeScale past float32',
    () => new MoELayer({ ...smallLayer, routeScale: 1e39 }),
    InvalidArgumentError,
    /'routeScale' = 1e\+39 is beyond float32's range/,
  ],
  [
    'combine of a transposed expertOut',
    () => {
      const { indices, cap } = routed();
      const d = new Dispatcher({ numExperts: 4 });
      const r = d.dispatch(f([2, 3]), indices, f([2, 2]), cap);
      return d.combine(f([3, 4]).transpose(), r.handle, f([2, 2]));
    },
    InvalidArgumentError,
    /combine: 'expertOut' must be contiguous/,
  ],
  [
    'expertsForward with rows of another H than the weights',
    () => expertsForward(f([2, 5]), f([4, 8, 8]), f([4, 4, 8]), Tensor.fromArray([0, 1, 2, 2, 2], { dtype: 'i32', device: cpu })),
    InvalidArgumentError,
    /expertsForward: 'a' must be \[M,8\] \(H from 'w13'/,
  ],
  [
    'expertsForward with w2 of another F',
    () => expertsForward(f([2, 8]), f([4, 8, 8]), f([4, 3, 8]), Tensor.fromArray([0, 1, 2, 2, 2], { dtype: 'i32', device: cpu })),
    InvalidArgumentError,
    /expertsForward: 'w2' must be \[4,4,8\]/,
  ],
  [
    'zeros of an unknown dtype names zeros',
    () => Tensor.zeros([2], { dtype: 'f64' as never, device: cpu }),
    InvalidArgumentError,
    /^zeros: 'dtype' must be one of/,
  ],
  [
    'randn of an unknown dtype names randn',
    () => Tensor.randn([2], { dtype: 'f64' as never, device: cpu }),
    InvalidArgumentError,
    /^randn: 'dtype' must be one of/,
  ],
  ['view of a disposed tensor names view', () => disposed().view(4), DisposedError, /^view: the tensor was disposed/],
  ['toArray of a disposed tensor names toArray', () => disposed().toArray(), DisposedError, /^toArray: the tensor was disposed/],
  ['cast of a disposed tensor names cast', () => disposed().cast('bf16'), DisposedError, /^cast: the tensor was disposed/],
  ['clone of a disposed tensor names clone', () => disposed().clone(), DisposedError, /^clone: the tensor was disposed/],
  ['narrow of a disposed tensor names narrow', () => disposed().narrow(0, 0, 1), DisposedError, /^narrow: the tensor was disposed/],
  [
    'quantizeFp8 of a Tensor made from its prototype',
    () => quantizeFp8(Object.create(Tensor.prototype) as Tensor),
    InvalidArgumentError,
    /quantizeFp8: 'x' must be a Tensor; received an object made from Tensor\.prototype/,
  ],
  [
    'a Trainer whose world is not a Communicator',
    () => new Trainer(defaultConfig, { world: 'x' as never }),
    InvalidArgumentError,
    /Trainer: 'world' must be a Communicator/,
  ],
  [
    'joinExperts into an integer dtype, before reading',
    () => joinExperts(loadCheckpoint(checkpoint()), 0, 1, () => 'missing', { dtype: 'i32' as never }),
    InvalidArgumentError,
    /joinExperts: 'dtype' must be one of f32, bf16/,
  ],
  [
    'dispatchBackward of strided row gradients',
    () => {
      const { indices, cap } = routed();
      const d = new Dispatcher({ numExperts: 4 });
      const r = d.dispatch(f([2, 3]), indices, f([2, 2]), cap);
      return d.dispatchBackward(f([3, 4]).transpose(), r.handle);
    },
    InvalidArgumentError,
    /dispatchBackward: 'dRows' must be contiguous/,
  ],
  [
    'dispatch of a transposed x',
    () => {
      const { indices, cap } = routed();
      return new Dispatcher({ numExperts: 4 }).dispatch(f([3, 2]).transpose(), indices, f([2, 2]), cap);
    },
    InvalidArgumentError,
    /^dispatch: 'x' must be contiguous/,
  ],
  [
    'combine with strided weights',
    () => {
      const { indices, cap } = routed();
      const d = new Dispatcher({ numExperts: 4 });
      const r = d.dispatch(f([2, 3]), indices, f([2, 2]), cap);
      return d.combine(f([4, 3]), r.handle, f([2, 2]).transpose());
    },
    InvalidArgumentError,
    /^combine: 'weights' must be contiguous/,
  ],
  [
    'combineBackward of a strided dy',
    () => {
      const { indices, cap } = routed();
      const d = new Dispatcher({ numExperts: 4 });
      const r = d.dispatch(f([2, 3]), indices, f([2, 2]), cap);
      return d.combineBackward(f([3, 2]).transpose(), f([4, 3]), r.handle, f([2, 2]));
    },
    InvalidArgumentError,
    /combineBackward: 'dy' must be contiguous/,
  ],
  [
    'CheckpointReader.get into an unknown dtype names itself',
    () => loadCheckpoint(checkpoint()).get('w', { dtype: 'f64' as never }),
    InvalidArgumentError,
    /^CheckpointReader\.get: 'dtype' must be one of/,
  ],
  [
    'CheckpointReader.get onto a bad device names itself',
    () => loadCheckpoint(checkpoint()).get('w', { device: 'tpu:0' as never }),
    InvalidArgumentError,
    /^CheckpointReader\.get: /,
  ],
  [
    'fromArray where a getter changes its answer after the check',
    () => {
      let reads = 0;
      const data = {
        length: 1,
        get 0() {
          return reads++ === 0 ? 1 : 1.5;
        },
      };
      return Tensor.fromArray(data, { dtype: 'i32', device: cpu });
    },
    InvalidArgumentError,
    /fromArray: 'data'\[0\] = 1\.5 is not an integer/,
  ],
];

describe('bad calls give clear errors', () => {
  it.each(cases)('%s', (_name, call, errorClass, message) => {
    let caught: unknown;
    try {
      call();
    } catch (e) {
      caught = e;
    }
    expect(caught, 'expected an error').toBeInstanceOf(errorClass);
    expect((caught as Error).message).toMatch(message);
    expect(caught).toBeInstanceOf(MoeError);
  });

  // A real malloc failure needs a kernel that refuses to overcommit (mode 0 refuses a 16 TiB request;
  // mode 1 grants anything, as on some GPU machines).
  const overcommit = existsSync('/proc/sys/vm/overcommit_memory') ? readFileSync('/proc/sys/vm/overcommit_memory', 'utf8').trim() : '1';
  it.skipIf(overcommit === '1')('host out of memory is OutOfMemoryError and the allocator keeps working after it', () => {
    const before = memoryStats(cpu).liveBytes;
    expect(() => Tensor.empty([2 ** 22, 2 ** 22], { dtype: 'u8', device: cpu })).toThrow(/out of host memory allocating/);
    expect(() => Tensor.empty([2 ** 22, 2 ** 22], { dtype: 'u8', device: cpu })).toThrow(OutOfMemoryError);
    using t = Tensor.full([3], 1, { device: cpu });
    expect(t.toNumbers()).toEqual([1, 1, 1]);
    t.dispose();
    expect(memoryStats(cpu).liveBytes).toBe(before);
  });

  it('pruneCheckpoints refuses keep < 1 instead of deleting every checkpoint', () => {
    const root = checkpoint();
    for (const keep of [-1, 0, NaN, null])
      expect(() => pruneCheckpoints(root, keep as never)).toThrow(/pruneCheckpoints: 'keep' must be a positive integer/);
    expect(listCheckpoints(root)).toHaveLength(1);
  });

  it('outputs in the same allocation as inputs but apart from them are fine; outputs left undefined are made', () => {
    // One flat optimizer state carved into param, moments and gradient.
    const flat = Tensor.zeros([4, 4], { device: cpu });
    const [p, g, m, v] = [0, 1, 2, 3].map((i) => flat.narrow(0, i, 1).view(4)) as [Tensor, Tensor, Tensor, Tensor];
    g.fill_(1);
    adamwStep(p, g, m, v, { lr: 0.1, step: 1 });
    expect(p.toNumbers().every((x) => Math.abs(x + 0.1) < 1e-6)).toBe(true);
    // A workspace holding a GEMM's input and output side by side.
    const arena = Tensor.zeros([16], { device: cpu });
    const a = arena.narrow(0, 0, 8).view(2, 4).fill_(1);
    const out = groupedGemm('NN', a, Tensor.full([1, 4, 4], 1, { device: cpu }), i32([0, 2], [2]), {
      out: arena.narrow(0, 8, 8).view(2, 4),
    });
    expect(out.toNumbers()).toEqual(Array(8).fill(4));
    const { indices, cap } = routed();
    const q = permute(f([2, 3]), indices, f([2, 2]), cap, { out: { rows: undefined } as never });
    expect(q.rows.shape).toEqual([4, 3]);
  });

  it("a peer's row counts are checked before anything their size is made (a huge one got the process OOM-killed)", () => {
    for (const [counts, message] of [
      [[5, -3, 5, -3], /dispatch: rank 0 reported -3 rows for local expert 1/],
      [[2 ** 31 - 1, 5, 0, 0], /dispatch: the peers reported 2147483652 rows for this rank, more than i32 indexes/],
    ] as const) {
      // Two ranks, this one rank 0: its partner's allToAll answers with `counts`.
      const group = {
        rank: 0,
        size: 2,
        allToAll: (_send: Tensor, recv: Tensor) => recv.copy_(Tensor.fromArray([...counts], { dtype: 'i32', device: cpu })),
        allToAllV: () => {
          throw new Error('not reached');
        },
      };
      const d = new Dispatcher({ numExperts: 4, group });
      const { indices, cap } = routed();
      tidy(() => expect(() => d.dispatch(f([2, 3]), indices, f([2, 2]), cap)).toThrow(message));
    }
  });

  it('interleaveW13 takes transposed w1 and w3 as their contiguous copies (a view of them failed inside, naming view)', () => {
    const shape = [2, 3, 4];
    const w1 = Tensor.randn(shape, { seed: 11, device: cpu });
    const w3 = Tensor.randn(shape, { seed: 12, device: cpu });
    // [E, F, H] tensors transposed to [E, H, F] views: strided, as a checkpoint's [F, H] layout gives.
    const w1t = w1.transpose(1, 2).contiguous().transpose(1, 2);
    const w3t = w3.transpose(1, 2).contiguous().transpose(1, 2);
    expect(w1t.isContiguous).toBe(false);
    const live = memoryStats(cpu).liveBytes;
    using fromViews = interleaveW13(w1t, w3t);
    using fromCopies = interleaveW13(w1, w3);
    expect(fromViews.toNumbers()).toEqual(fromCopies.toNumbers());
    expect(memoryStats(cpu).liveBytes).toBe(live + 2 * fromViews.numel * 4); // the copies were freed
    for (const t of [w1, w3, w1t, w3t]) t.dispose();
  });

  it('MoEInference counts expert rows with a capacity factor; captureDecode names itself', () => {
    using layer = new MoELayer({ ...smallLayer, capacityFactor: 4 });
    using inf = MoEInference.fromLayer(layer);
    // C = ceil(4·T·2/4) = 2T rows an expert, 8T in all: past int32 from T = 2^28.
    expect(() => inf.workspaceBytes(2 ** 28)).toThrow(/MoEInference\.workspaceBytes: 268435456 tokens make 2147483648 expert rows/);
    expect(() => inf.captureDecode(-1)).toThrow(/MoEInference\.captureDecode: 'T' must be a positive integer/);
  });

  it('MoEInference: rowsFor checks T; workspaceBytes and weightBytes refuse a disposed layer (they allocated a workspace)', () => {
    using layer = new MoELayer(smallLayer);
    const inf = MoEInference.fromLayer(layer);
    expect(inf.rowsFor(3)).toBe(6);
    for (const T of [-3, 1.5, 'x'])
      expect(() => inf.rowsFor(T as never)).toThrow(/MoEInference\.rowsFor: 'T' must be a non-negative integer/);
    // T·topK rows past int32 (it failed inside fromArray)
    expect(() => inf.workspaceBytes(2 ** 31)).toThrow(/MoEInference\.workspaceBytes: 2147483648 tokens route 4294967296 rows \(topK 2\)/);
    inf.dispose();
    const live = memoryStats(cpu).liveBytes;
    expect(() => inf.workspaceBytes(65536)).toThrow(DisposedError);
    expect(() => inf.weightBytes).toThrow(DisposedError);
    expect(memoryStats(cpu).liveBytes).toBe(live);
  });

  it('safetensors: tensors named constructor, toString or __proto__ are written and read back; a checkpoint root that is a file is named', () => {
    const dir = tmp();
    const path = join(dir, 'x.safetensors');
    const entries = ['constructor', 'toString', '__proto__'].map((name, i) => ({
      name,
      dtype: 'F32',
      shape: [1],
      data: new Float32Array([i]),
    }));
    writeSafetensors(path, entries);
    using file = SafetensorsFile.open(path);
    expect([...file.names].sort()).toEqual(['__proto__', 'constructor', 'toString']);
    for (const position of [-5, 1e6, 1.5])
      expect(() => file.readAt(new Uint8Array(4), position)).toThrow(
        /SafetensorsFile\.readAt: 'position' must be an integer in \[0, \d+\]/,
      );
    expect(() => file.readAt([0, 0] as never, 0)).toThrow(/SafetensorsFile\.readAt: 'out' must be a Uint8Array/);
    // readRows: rows of the first dimension, inside the tensor only.
    expect(Array.from(new Float32Array(file.readRows('toString', 0, 1).buffer))).toEqual([1]);
    expect(file.readRows('toString', 1, 0).byteLength).toBe(0);
    for (const [first, count] of [
      [1, 1],
      [-1, 1],
      [0, 2],
      [0.5, 1],
    ])
      expect(() => file.readRows('toString', first as number, count as number)).toThrow(
        /SafetensorsFile\.readRows: rows \[.*\) are not among the 1 rows of tensor 'toString'/,
      );
    expect(() => file.readRows('nope', 0, 1)).toThrow(/tensor 'nope': no such tensor/);
    // And through a checkpoint: saved, listed in the manifest, read back, verified.
    const ckpt = join(dir, 'ckpt');
    saveCheckpoint(ckpt, {
      step: 1,
      replicated: { ['__proto__']: Tensor.fromArray([7], { device: cpu }), constructor: Tensor.fromArray([8], { device: cpu }) },
    });
    const reader = loadCheckpoint(ckpt);
    try {
      expect(reader.names().sort()).toEqual(['__proto__', 'constructor']);
      expect(reader.get('__proto__').toNumbers()).toEqual([7]);
      expect(reader.get('constructor').toNumbers()).toEqual([8]);
      reader.verifyAll();
    } finally {
      reader.close();
    }
    const root = join(dir, 'a-file');
    writeFileSync(root, 'x');
    expect(() => saveCheckpoint(root, { step: 1, replicated: { w: f([2]) } })).toThrow(CheckpointError);
    expect(() => saveCheckpoint(root, { step: 1, replicated: { w: f([2]) } })).toThrow(
      /saveCheckpoint failed, nothing was committed: rank 0: saveCheckpoint: 'root' .*a-file: .*a-file is not a folder/,
    );
  });

  // Found by probing the public API in session 30: each gave a hang, a wrong result, a raw error or
  // an error naming an argument the caller never passed.
  it("saveCheckpoint and writeCheckpoint under a folder the system will not create fail naming 'root' (Node's recursive mkdir looped forever on /proc/x)", () => {
    for (const save of [
      () => saveCheckpoint('/proc/moe-ep-nope/ckpt', { step: 1, replicated: { w: f([2]) } }),
      () => writeCheckpoint('/proc/moe-ep-nope/ckpt', { step: 1, worldSize: 1, files: [file('replicated.safetensors')] }),
    ])
      expect(save).toThrow(/'root' \/proc\/moe-ep-nope\/ckpt: cannot create the folder \/proc\/moe-ep-nope/);
  });

  it('manifestExtras that are not JSON (a cycle, a BigInt) are refused before anything is written', () => {
    const root = tmp();
    const cyclic: Record<string, unknown> = {};
    cyclic['self'] = cyclic;
    for (const extras of [cyclic, { n: 1n }]) {
      expectInvalidArgument(
        () => saveCheckpoint(root, { step: 1, replicated: { w: f([2]) }, manifestExtras: extras as never }),
        /saveCheckpoint: 'manifestExtras' must be JSON values/,
      );
      expectInvalidArgument(
        () => writeCheckpoint(root, { step: 1, worldSize: 1, files: [file('replicated.safetensors')], manifestExtras: extras as never }),
        /writeCheckpoint: 'manifestExtras' must be JSON values/,
      );
    }
    expect(listCheckpoints(root)).toEqual([]);
  });

  it('router and capacity refuse outputs that overlap each other or an input (they wrote one over another: wrong counts, a NaN row that was not there)', () => {
    const logits = Tensor.randn([3, 2], { seed: 1, device: cpu });
    const t = f([2], 'i32');
    expectInvalidArgument(
      () => routerForward(logits, { numExperts: 2, topK: 1 }, { out: { tokensPerExpert: t, nanRows: t } }),
      /router: 'out\.tokensPerExpert' overlaps 'out\.nanRows' in memory/,
    );
    const w = f([3, 1]);
    expectInvalidArgument(
      () => routerForward(logits, { numExperts: 2, topK: 1 }, { out: { weights: w, scores: logits } }),
      /router: 'out\.scores' overlaps 'logits' in memory/,
    );
    const { indices } = routed();
    const k = f([2], 'i32');
    expectInvalidArgument(
      () =>
        capacity(indices, f([2, 2]), {
          numExperts: 4,
          out: { keptPerExpert: f([4], 'i32'), invalid: k.narrow(0, 0, 1), dropped: k.narrow(0, 0, 1) },
        }),
      /capacity: 'out\.dropped' overlaps 'out\.invalid' in memory/,
    );
    expectInvalidArgument(
      () => capacity(indices, f([2, 2]), { numExperts: 4, out: { slot: indices } }),
      /capacity: 'out\.slot' overlaps 'indices'/,
    );
    // Apart, in one allocation: fine.
    const both = f([2], 'i32');
    const r = capacity(indices, f([2, 2]), { numExperts: 4, out: { invalid: both.narrow(0, 0, 1), dropped: both.narrow(0, 1, 1) } });
    expect(r.keptPerExpert.toNumbers().reduce((a, b) => a + b, 0)).toBe(4);
  });

  it("a result dtype an op cannot write is named 'dtype' (it was blamed on the 'out' the caller never passed)", () => {
    const a = f([4, 4]);
    expectInvalidArgument(() => ops.sum(a, 0, { dtype: 'i32' }), /sum: 'dtype' must be one of f32, bf16, f16; received "i32"/);
    // Integers sum into integers.
    const n = i32([1, 2, 3, 4], [2, 2]);
    expect(ops.sum(n, 0, { dtype: 'i64' }).toNumbers()).toEqual([4, 6]);
    expectInvalidArgument(() => ops.sum(n, 0, { dtype: 'f32' }), /sum: 'dtype' must be one of i32, i64; received "f32"/);
    expectInvalidArgument(() => ops.matmul(a, a, { dtype: 'fp8e4m3' }), /matmul: 'dtype' must be one of f32, bf16, f16/);
    const rowOf = i32([0, 1, 2, 3], [2, 2]);
    expectInvalidArgument(
      () => unpermute(a, rowOf, f([2, 2]), { dtype: 'f16' }),
      /unpermute: 'dtype' must be one of f32, bf16; received "f16"/,
    );
    const x = f([4, 8], 'bf16');
    expectInvalidArgument(
      () => groupedGemm('NN', x, f([1, 8, 8], 'bf16'), i32([0, 4], [2]), { dtype: 'i32' }),
      /groupedGemm: 'dtype' must be one of bf16, f32/,
    );
  });

  it('fromArray copies a TypedArray over a SharedArrayBuffer (the addon refused it with a bare "Invalid argument")', () => {
    const shared = new Float32Array(new SharedArrayBuffer(16));
    shared.set([1, 2, 3, 4]);
    expect(Tensor.fromArray(shared, { shape: [2, 2], device: cpu }).toNumbers()).toEqual([1, 2, 3, 4]);
    const bits = new Uint16Array(new SharedArrayBuffer(4));
    bits.set([0x3f80, 0x4000]); // bf16 1 and 2
    expect(Tensor.fromArray(bits, { dtype: 'bf16', device: cpu }).toNumbers()).toEqual([1, 2]);
  });

  it("safetensors: a dtype named like an Object method is unknown; writing where the folder is missing, or onto a folder, names 'path'", () => {
    const dir = tmp();
    expect(() =>
      writeSafetensors(join(dir, 'x.safetensors'), [{ name: 'a', dtype: 'toString', shape: [2], data: new Float32Array(2) }]),
    ).toThrow(/unknown dtype "toString"/);
    // A file whose header names dtype "__proto__" (written by hand).
    const header = Buffer.from(JSON.stringify({ a: { dtype: '__proto__', shape: [1], data_offsets: [0, 4] } }).padEnd(64, ' '));
    const bytes = Buffer.alloc(8 + header.length + 4);
    bytes.writeBigUInt64LE(BigInt(header.length), 0);
    header.copy(bytes, 8);
    writeFileSync(join(dir, 'proto.safetensors'), bytes);
    expect(() => SafetensorsFile.open(join(dir, 'proto.safetensors'))).toThrow(/unknown dtype "__proto__"/);
    const entry = [{ name: 'a', dtype: 'F32', shape: [1], data: new Float32Array(1) }];
    expectInvalidArgument(
      () => writeSafetensors(join(dir, 'missing', 'x.safetensors'), entry),
      /writeSafetensors: 'path' .*: its folder .*missing does not exist/,
    );
    expectInvalidArgument(() => writeSafetensors(dir, entry), /writeSafetensors: 'path' .* is a folder/);
    expectInvalidArgument(() => writeSafetensors(join(dir, 'new') + '/', entry), /writeSafetensors: 'path' .* ends in '\/'/);
    // A file in the middle of a checkpoint root is named, not a raw ENOTDIR.
    writeFileSync(join(dir, 'plain'), 'x');
    expect(() => saveCheckpoint(join(dir, 'plain', 'a', 'b'), { step: 1, replicated: { w: f([2]) } })).toThrow(
      /'root' .*: .*plain is not a folder/,
    );
  });

  it('fromArray names integers a number cannot hold exactly, and BigInts that do not fit; to() needs its device (it copied in place)', () => {
    expectInvalidArgument(
      () => Tensor.fromArray([2 ** 60], { dtype: 'i64', device: cpu }),
      /'data'\[0\] = .* is beyond 2\^53.*BigInt64Array/,
    );
    expectInvalidArgument(() => Tensor.fromArray([2 ** 60], { dtype: 'i32', device: cpu }), /'data'\[0\] = .* does not fit i32/);
    expectInvalidArgument(
      () => Tensor.fromArray(new BigInt64Array([2n ** 40n]), { dtype: 'i32', device: cpu }),
      /'data'\[0\] = 1099511627776 does not fit i32/,
    );
    expect(Tensor.fromArray(new BigInt64Array([5n, -3n]), { dtype: 'i32', device: cpu }).toNumbers()).toEqual([5, -3]);
    const t = f([2]);
    for (const device of [undefined, null]) expectInvalidArgument(() => t.to(device as never), /to: 'device' is required/);
  });

  it("an absurd 'align' or numExperts is refused with its bound (align 2^30 asked the host for 64 GiB)", () => {
    const { indices, cap } = routed();
    expectInvalidArgument(
      () => permute(f([2, 3]), indices, f([2, 2]), cap, { align: 2 ** 30 }),
      /permute: 'align' must be an integer in \[1, 65536\]/,
    );
    expect(permute(f([2, 3]), indices, f([2, 2]), cap, { align: 65536 }).numRows).toBe(4 * 65536);
    expectInvalidArgument(() => capacity(indices, null, { numExperts: 2 ** 30 }), /capacity: 'numExperts' must be an integer in \[1, /);
    expectInvalidArgument(() => new Dispatcher({ numExperts: 4, align: 100000 }), /Dispatcher: 'align' must be an integer in \[1, 65536\]/);
    // Arguments derived from a tensor's shape are named by the tensor.
    expectInvalidArgument(
      () => capacity(f([3, 0], 'i32'), null, { numExperts: 4, capacityFactor: 1, dropPolicy: 'position' }),
      /capacity: 'indices' \[3,0\] holds no assignment per token/,
    );
    expectInvalidArgument(
      () => balanceLoss(f([0, 4]), f([0, 2], 'i32'), { numExperts: 4, topK: 2 }, { coefficient: 0.01 }),
      /balanceLoss: 'scores' has no tokens/,
    );
  });

  it("quantizeFp8 names a disposed 'x'; dequantizeFp8 names 'rows.q' of the wrong shape (it blamed 'out')", () => {
    const x = f([2, 128]);
    x.dispose();
    expect(() => quantizeFp8(x)).toThrow(DisposedError);
    expect(() => quantizeFp8(x)).toThrow(/quantizeFp8: 'x' was disposed/);
    const rows = quantizeFp8(f([2, 256]));
    for (const q of [f([256], 'fp8e4m3'), f([2, 100], 'fp8e4m3')])
      expectInvalidArgument(
        () => dequantizeFp8({ q, scales: rows.scales }),
        /dequantizeFp8: 'rows\.q' must be \[R, H\] with H a multiple of 128/,
      );
  });

  it('loadMoELayer, moeLayerState and kernelOptionsFromEnvironment name a wrong argument (TypeErrors before)', () => {
    using layer = new MoELayer(smallLayer);
    expectInvalidArgument(() => loadMoELayer({} as never, layer, 0), /loadMoELayer: 'reader' must be a CheckpointReader/);
    expectInvalidArgument(() => moeLayerState({} as never, 0), /moeLayerState: 'layer' must be a MoELayer/);
    expectInvalidArgument(() => kernelOptionsFromEnvironment(null as never), /kernelOptionsFromEnvironment: 'env' must be an object/);
  });

  it('copy_ and add_ from another view of the same memory read the values as they were (they read overwritten ones)', () => {
    const t = Tensor.fromArray([0, 1, 2, 3, 4, 5, 6, 7, 8], { shape: [3, 3], device: cpu });
    t.copy_(t.transpose());
    expect(t.toNumbers()).toEqual([0, 3, 6, 1, 4, 7, 2, 5, 8]);
    const u = Tensor.fromArray([1, 2, 3, 4], { device: cpu });
    u.narrow(0, 1, 3).add_(u.narrow(0, 0, 3));
    expect(u.toNumbers()).toEqual([1, 3, 5, 7]);
    u.add_(u);
    expect(u.toNumbers()).toEqual([2, 6, 10, 14]);
  });

  it('an absurd capacityFactor pads no more than T·k rows (it asked for gigabytes), and expert choice takes it', () => {
    const { indices } = routed();
    const cap = capacity(indices, f([2, 2]), { numExperts: 4, capacityFactor: 2.7e8 });
    expect(cap.capacity).toBe(4);
    const p = permute(f([2, 3]), indices, f([2, 2]), cap, { padToCapacity: true });
    expect(p.numRows).toBe(16);
    // Expert choice: C = min(T, …) = 3 (it was refused as a capacity beyond i32).
    using layer = new MoELayer({ ...smallLayer, routing: 'expert-choice', capacityFactor: 1e12 });
    tidy(() => expect(layer.forward(Tensor.randn([3, 8], { device: cpu, seed: 1 })).tokensPerExpert.toNumbers()).toEqual([3, 3, 3, 3]));
  });

  it('a CUDA device on a machine without one is Unavailable, with the reason', () => {
    if (native().cudaStatus().deviceCount > 0) return;
    expect(() => Tensor.zeros([2], { device: 'cuda:0' })).toThrow(UnavailableError);
    expect(() => Tensor.zeros([2], { device: 'cuda:0' })).toThrow(/not usable: |built without CUDA/);
    // A rebuild from source is advised only to an addon built without CUDA: one with it needs a GPU.
    const layer = () => new MoELayer({ ...smallLayer, device: 'cuda:0' });
    if (native().cudaStatus().builtWithCuda) expect(layer).toThrow(/^MoELayer: device cuda:0 is not usable: [^]*Use device 'cpu'$/);
    else expect(layer).toThrow(/Use device 'cpu', or on a machine with a GPU and the CUDA toolkit rebuild from source/);
  });
});
