#!/usr/bin/env node
/** The `moe-ep` command: one file per subcommand in this folder. */
import { runCkpt } from './ckpt.js';
import { runInfo } from './info.js';
import { runTrain } from './train.js';

const usage = `usage: moe-ep <command>

commands:
  train [--config file.json] [--section.field value ...]
                  train the MoE model (default: the embedded synthetic task; CPU, GPU or under mpirun)
  info [--json]   package, addon backend, GPUs, CUDA, NCCL and MPI as this machine sees them
  ckpt inspect <dir> [--json] [--no-verify]
                  a checkpoint's tensors, EP layout and per-file checksum status
  ckpt reshard <dir> --ep N --out <root>
                  rewrite a checkpoint's expert shards for expert-parallel size N (offline)`;

async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'train':
      return runTrain(rest);
    case 'info':
      return runInfo(rest);
    case 'ckpt':
      return runCkpt(rest);
    case undefined:
    case '-h':
    case '--help':
    case 'help':
      console.log(usage);
      return command === undefined ? 1 : 0;
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
    console.error(`moe-ep: ${(e as Error).message}`);
    process.exitCode = 1;
  },
);
