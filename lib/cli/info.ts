/** `moe-ep info [--json]`: what this installation can do. */
import { formatInfo, info } from '../info.js';
import { checkFlags } from './flags.js';

export function runInfo(args: string[]): number {
  checkFlags(args, ['--json'], 0, 'usage: moe-ep info [--json]');
  const i = info();
  console.log(args.includes('--json') ? JSON.stringify(i, null, 2) : formatInfo(i));
  return 0;
}
