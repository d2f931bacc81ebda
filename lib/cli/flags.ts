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

/**
 * Takes `name VALUE` (or `name=VALUE`) out of args and returns the value (undefined: not given).
 * Given twice, or with no value (the end, or a next argument that is a `--` flag), it is a usage
 * error. A value such as -2 is returned for its flag's own check to refuse by name.
 */
export function takeValueFlag(args: string[], name: string, usage: string): string | undefined {
  const at = args.flatMap((a, i) => (a === name || a.startsWith(`${name}=`) ? [i] : []));
  if (at.length === 0) return undefined;
  if (at.length > 1) throw new UsageError(`${name} is given ${at.length} times: give it once\n\n${usage}`);
  const i = at[0] as number;
  const arg = args[i] as string;
  if (arg !== name) {
    args.splice(i, 1);
    return arg.slice(name.length + 1);
  }
  const v = args[i + 1];
  if (v === undefined || v.startsWith('--')) throw new UsageError(`${name} needs a value\n\n${usage}`);
  args.splice(i, 2);
  return v;
}

/**
 * Runs a write under the path a flag named; an error it throws is restated from the flag (`--out
 * PATH: …`) instead of the internal call's argument (`internal`: the prefix to drop, e.g.
 * "writeCheckpoint: 'root' "), keeping its class (the exit code follows it).
 */
export function underFlag<T>(flag: string, path: string, internal: RegExp, write: () => T): T {
  try {
    return write();
  } catch (e) {
    if (!(e instanceof Error)) throw e;
    const message = e.message.replace(internal, '');
    throw new (e.constructor as new (m: string) => Error)(`${flag} ${message.startsWith(path) ? '' : `${path}: `}${message}`);
  }
}
