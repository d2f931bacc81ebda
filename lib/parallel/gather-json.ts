/** Small JSON values from every rank, for start-up checks and reports (not the hot path). */
import { Tensor } from '../tensor.js';
import { type Communicator } from './communicator.js';

/**
 * Every rank's `value`, in rank order: an allGather of the byte lengths, then of the bytes padded
 * to the longest. Collective: every rank calls it.
 */
export function allGatherJson<T>(comm: Communicator, value: T): T[] {
  if (comm.size === 1) return [value];
  const bytes = Buffer.from(JSON.stringify(value), 'utf8');
  using len = Tensor.fromArray([bytes.length], { dtype: 'i32', device: 'cpu' });
  using lens = comm.allGather(len);
  const lengths = lens.toNumbers();
  const max = Math.max(1, ...lengths);
  const padded = new Uint8Array(max);
  padded.set(bytes);
  using mine = Tensor.fromArray(padded, { dtype: 'u8', device: 'cpu' });
  using all = comm.allGather(mine);
  const buf = Buffer.from((all.toArray() as Uint8Array).buffer);
  return lengths.map((n, r) => JSON.parse(buf.subarray(r * max, r * max + n).toString('utf8')) as T);
}
