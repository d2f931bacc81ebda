import { closestName } from '../errors.js';

/**
 * A command line the command cannot read (a missing, unknown or stray argument, a flag without its
 * value): `moe-ep` exits 2, as getopt tools do. A value it reads but refuses is an ordinary error (1).
 */
export class UsageError extends Error {
  override name = 'UsageError';
}

/** Refusing what a subcommand does not know, so that a typo is an error rather than silently ignored. */
export function checkFlags(args: readonly string[], known: readonly string[], positionals: number, usage: string): void {
  const unknown = args.filter((a) => a.startsWith('-') && !known.includes(a));
  if (unknown.length > 0) {
    const named = unknown.map((a) => {
      const close = closestName(a, known);
      return close ? `${a} (did you mean ${close}?)` : a;
    });
    throw new UsageError(`unknown option${unknown.length > 1 ? 's' : ''} ${named.join(', ')}\n\n${usage}`);
  }
  const extra = args.filter((a) => !a.startsWith('-')).slice(positionals);
  if (extra.length > 0) throw new UsageError(`unexpected argument${extra.length > 1 ? 's' : ''} ${extra.join(', ')}\n\n${usage}`);
}
