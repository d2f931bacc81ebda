/**
 * A layer's configuration compared across its expert-parallel group, once, before its first
 * exchange: ranks built with another topK, capacity or dtype would otherwise route and exchange
 * inconsistently without an error, or wait for each other forever. One small all-to-all on the
 * group's own transport (the layer's device), so it needs nothing the layer does not already use.
 */
import { type Device } from '../device.js';
import { invalidArgument } from '../errors.js';
import { Tensor, tidy } from '../tensor.js';

/** What the helper needs of a group: its place and an all-to-all (ExpertParallelGroup has them). */
export interface AgreeingGroup {
  readonly rank: number;
  readonly size: number;
  allToAll(send: Tensor, recv: Tensor): unknown;
}

/**
 * One compared field: its name, its value as a number (compared exactly, as float64 bits), and how
 * to show it: `of` maps an index back to the option it stands for, `none` shows -1 as 'none'.
 */
export interface AgreedField {
  name: string;
  value: number;
  of?: readonly unknown[];
  none?: boolean;
}

/** A numeric field, compared exactly. */
export function numberField(name: string, value: number): AgreedField {
  return { name, value };
}

/** A field of a few choices, compared as the index of `value` in `of`. */
export function choiceField<T>(name: string, value: T, of: readonly T[]): AgreedField {
  return { name, value: of.indexOf(value), of };
}

/** A field that may be absent (undefined compares and shows as 'none'). */
export function optionalField(name: string, value: number | undefined): AgreedField {
  return { name, value: value ?? -1, none: true };
}

function shownValue(v: number, f: AgreedField): string {
  if (f.of) return JSON.stringify(f.of[v]);
  return f.none && v === -1 ? 'none' : String(v);
}

/**
 * Throws an InvalidArgumentError on every rank together when any field differs between any two
 * ranks (every rank sees every rank's values), naming up to four differences with their ranks.
 * Collective: every rank of the group calls it with the same field names in the same order.
 */
export function checkGroupAgrees(group: AgreeingGroup, device: Device, op: string, what: string, fields: readonly AgreedField[]): void {
  const P = group.size;
  if (P === 1) return;
  // Exact values, floats included: each as its float64 bits in an i64.
  const bits = new DataView(new ArrayBuffer(8));
  const asBits = (v: number): bigint => {
    bits.setFloat64(0, v);
    return bits.getBigInt64(0);
  };
  const n = fields.length;
  const mine = fields.map((f) => asBits(f.value));
  const all = tidy(() => {
    const send = Tensor.fromArray(
      BigInt64Array.from({ length: P * n }, (_, i) => mine[i % n] as bigint),
      { dtype: 'i64', device },
    );
    const recv = Tensor.empty([P * n], { dtype: 'i64', device });
    group.allToAll(send, recv);
    return recv.toArray() as BigInt64Array;
  });
  const differ: string[] = [];
  for (let p = 0; p < P; p++)
    fields.forEach((f, i) => {
      const theirs = all[p * n + i] as bigint;
      if (theirs === mine[i]) return;
      bits.setBigInt64(0, theirs);
      differ.push(`${f.name} ${shownValue(f.value, f)} on rank ${group.rank} but ${shownValue(bits.getFloat64(0), f)} on rank ${p}`);
    });
  if (differ.length)
    invalidArgument(
      op,
      `the expert-parallel group's ${what} differ (${differ.slice(0, 4).join('; ')}${differ.length > 4 ? `; and ${differ.length - 4} more` : ''}): build every rank's ${what.replace(/s$/, '')} with the same configuration`,
    );
}
