/** `moe-ep info [--json]`: what this installation can do. */
import { formatInfo, info } from '../info.js';

export function runInfo(args: string[]): number {
  const i = info();
  console.log(args.includes('--json') ? JSON.stringify(i, null, 2) : formatInfo(i));
  return 0;
}
