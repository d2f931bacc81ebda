// HF MoE checkpoints served across ranks under a real mpirun (CPU, MPI backend): each rank reads only
// its experts and the layer's output on every rank matches the family reference. Skipped without mpirun.
import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

import { afterAll, describe, expect, it } from 'vitest';

import { buildHfCheckpoint, testConfigs } from '../hf-fixtures.mjs';
import { hasMpirun, mpirun } from './mpirun.js';

const root = fs.mkdtempSync(join(tmpdir(), 'moe-serve-mpi-'));
afterAll(() => fs.rmSync(root, { recursive: true, force: true }));

describe.skipIf(!hasMpirun)('serving HF checkpoints under mpirun (CPU, MPI backend)', () => {
  it.each([2, 4])(
    'EP = %i: Mixtral, DeepSeek-V3, GLM-4.5, Qwen2-MoE, Qwen3-Next, ERNIE 4.5, MiniMax-M2, Hunyuan, Qwen3-VL-MoE, Granite 4.0, Llama 4, gpt-oss (MXFP4), DeepSeek-V2 (groups by their maximum), Jamba, DBRX (experts stacked by rows), Ling v1 and 2.0 and DeepSeekMoE layouts, dropless and fixed-capacity, each rank its own experts, served and as training layers (moeLayerFromHf), against the family references',
    (np) => {
      for (const [family, seed] of [
        ['mixtral', 5],
        ['deepseek_v3', 6],
        ['glm4_moe', 8],
        ['qwen2_moe', 7],
        ['qwen3_next', 9],
        ['ernie4_5_moe', 10],
        ['minimax_m2', 11],
        ['hunyuan_v1_moe', 12],
        ['qwen3_vl_moe', 13],
        ['granitemoehybrid', 14],
        ['llama4', 15],
        ['gpt_oss', 16],
        ['deepseek_v2', 17],
        ['jamba', 18],
        ['dbrx', 19],
        ['bailing_moe_v2', 20],
        ['bailing_moe', 22],
        ['deepseek', 21],
      ] as const) {
        const dir = join(root, `${family}-${np}`);
        buildHfCheckpoint(dir, testConfigs[family], { dtype: 'bf16', shards: 3, seed });
        const r = mpirun(np, 'serve-hf.mjs', 60_000, [dir, family, String(seed), 'bf16']);
        expect(r.status, r.out).toBe(0);
        for (let k = 0; k < np; k++) expect(r.out).toContain(`ok rank ${k} of ${np} (${family})`);
      }
    },
  );
});
