/**
 * Argument helpers shared by the TypeScript wrappers of native ops: a tensor check whose error
 * names the op and the argument, and the allocation of outputs the caller did not pass.
 */
import { invalidArgument } from './errors.js';
import { Tensor } from './tensor.js';

export function checkTensor(t: unknown, op: string, arg: string): Tensor {
  if (!(t instanceof Tensor)) invalidArgument(op, `'${arg}' must be a Tensor; received ${t === null ? 'null' : typeof t}`);
  return t;
}

/**
 * Takes each output from `given` (checked) or allocates it with `make`, runs `fn`, and disposes the
 * tensors allocated here again if `fn` throws.
 */
export function withOutputs<T extends { [K in keyof T]: Tensor }>(
  op: string,
  given: object | undefined,
  make: { [K in keyof T]: () => Tensor },
  fn: (o: T) => void,
): T {
  if (given !== undefined && (given === null || typeof given !== 'object')) invalidArgument(op, `'out' must be an object of tensors`);
  const made: Tensor[] = [];
  const o = {} as T;
  try {
    for (const key of Object.keys(make) as (keyof T)[]) {
      const g = (given as Record<string, unknown> | undefined)?.[key as string];
      if (g !== undefined) o[key] = checkTensor(g, op, `out.${String(key)}`) as T[keyof T];
      else {
        const t = make[key]();
        made.push(t);
        o[key] = t as T[keyof T];
      }
    }
    fn(o);
  } catch (e) {
    for (const t of made) t.dispose();
    throw e;
  }
  return o;
}
