/** `moe-ep info [--json]`: what this installation can do. */
import { formatInfo, info } from '../installation.js';
import { helpTable } from '../train/config.js';
import { checkFlags } from './flags.js';

const usage = [
  'usage: moe-ep info [--json]',
  '',
  'What this installation can do: the package and Node versions, where the addon was loaded from and',
  'whether it has CUDA kernels (and for which GPUs), the GPUs, driver and CUDA runtime, NCCL (version',
  'and path, or every place looked), and the MPI backend.',
  '',
  'options:',
  ...helpTable(
    [
      ['--json', 'the same facts as JSON'],
      ['-h, --help', 'this help'],
    ],
    10,
  ),
].join('\n');

export function runInfo(args: string[]): number {
  if (args.includes('--help') || args.includes('-h')) {
    console.log(usage);
    return 0;
  }
  checkFlags(args, ['--json'], 0, usage);
  const i = info();
  console.log(args.includes('--json') ? JSON.stringify(i, null, 2) : formatInfo(i));
  return 0;
}
