#!/usr/bin/env node
/** The `moe-ep` command: one file per subcommand in this folder. */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

import { packageRoot } from '../native.js';
import { helpTable } from '../train/config.js';
import { runCkpt } from './ckpt.js';
import { runHf } from './hf.js';
import { UsageError } from './flags.js';
import { runInfo } from './info.js';
import { runTrain } from './train.js';

const commands: [string, string][] = [
  ['train [options]', 'train the MoE model: the embedded synthetic task on the CPU, the GPU, or under mpirun'],
  ['info [--json]', 'package, addon, GPUs, CUDA, NCCL and MPI as this machine sees them'],
  ['ckpt inspect <dir>', "a checkpoint's tensors, expert-parallel layout and per-file checksum status"],
  ['ckpt reshard <dir>', "rewrite a checkpoint's expert shards for another expert-parallel size (offline)"],
  ['hf inspect <dir>', 'a Hugging Face MoE checkpoint as the serving loader reads it, checked from its headers'],
  ['--version', 'the version of moe-ep'],
  ['--help', 'this help; `moe-ep <command> --help` for each command'],
];
const usage = [
  'usage: moe-ep <command> [options]',
  '',
  'commands:',
  ...helpTable(commands, 18),
  '',
  'exit status: 0 done, 1 failed (or a bad value), 2 a missing, unknown or stray argument',
].join('\n');

function version(): string {
  return (JSON.parse(readFileSync(join(packageRoot(), 'package.json'), 'utf8')) as { version: string }).version;
}

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'train':
      return runTrain(rest);
    case 'info':
      return runInfo(rest);
    case 'ckpt':
      return runCkpt(rest);
    case 'hf':
      return runHf(rest);
    case '-v':
    case '--version':
    case 'version':
      console.log(version());
      return 0;
    case undefined:
      // No command is a usage error (exit 2, usage on stderr); asking for help is not.
      console.error(usage);
      return 2;
    case '-h':
    case '--help':
    case 'help':
      console.log(usage);
      return 0;
    default:
      console.error(`moe-ep: unknown command '${command}'\n\n${usage}`);
      return 2;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    const message = (e as Error).message;
    // Some errors name moe-ep themselves (the addon loader's): not twice.
    console.error(message.startsWith('moe-ep') ? message : `moe-ep: ${message}`);
    process.exitCode = e instanceof UsageError ? 2 : 1;
  },
);
