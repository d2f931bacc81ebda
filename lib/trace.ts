/**
 * An opt-in timeline of named phases, on the host and on the GPU at once: where a step's time goes
 * when the GPU waits for the host (launch gaps, host reads, JavaScript work) and where the host
 * waits for the GPU. Off by default (one boolean test per mark); MOE_EP_TRACE=1 or trace.enable()
 * turns it on.
 *
 *   trace.enable();
 *   trace.mark('dispatch', x.device);   // … the library marks its own phases (dispatch: permute, counts, …)
 *   const rows = trace.collect();       // synchronises, then [{ name, hostMs, gpuMs }] since the first mark
 *
 * hostMs is when the host reached the mark, from the first mark; gpuMs is when the GPU reached it
 * in its stream (a CUDA event recorded on the current stream), from the first mark on the same
 * GPU. A GPU time far behind the host's means queued work; the GPU time jumping with the host's
 * means the GPU was idle, waiting for the host. CPU marks have gpuMs null. At most MAX_MARKS are
 * kept between collects (the oldest go first), so a trace left on does not grow without bound.
 */
import { Device, type DeviceLike } from './device.js';
import { Event } from './stream.js';
import { invalidArgument } from './errors.js';

export interface TraceRow {
  name: string;
  hostMs: number;
  gpuMs: number | null;
}

interface Mark {
  name: string;
  host: number;
  event: Event | null;
}

const MAX_MARKS = 10_000;
let enabled = process.env.MOE_EP_TRACE === '1';
let marks: Mark[] = [];

export const trace = {
  get enabled(): boolean {
    return enabled;
  },
  enable(): void {
    enabled = true;
  },
  disable(): void {
    enabled = false;
    trace.reset();
  },
  /** Notes that the host reached `name` now, and (on a GPU) when the device's current stream does. */
  mark(name: string, device: DeviceLike): void {
    if (!enabled) return;
    if (typeof name !== 'string') invalidArgument('trace.mark', `'name' must be a string; received ${typeof name}`);
    const d = Device.parse(device, 'trace.mark');
    let event: Event | null = null;
    if (d.isCuda) {
      event = new Event(d, { timing: true });
      event.record();
    }
    marks.push({ name, host: performance.now(), event });
    if (marks.length > MAX_MARKS) marks.shift()?.event?.dispose();
  },
  /** Waits for the marks' events and returns the timeline since the first mark; then starts afresh. */
  collect(): TraceRow[] {
    const taken = marks;
    marks = [];
    try {
      const first = taken[0];
      const firstOnDevice = new Map<string, Event>(); // GPU times count from the first mark on each GPU
      for (const m of taken)
        if (m.event && !firstOnDevice.has(m.event.device.toString())) firstOnDevice.set(m.event.device.toString(), m.event);
      return taken.map((m) => {
        m.event?.synchronize();
        const origin = m.event ? firstOnDevice.get(m.event.device.toString()) : undefined;
        return { name: m.name, hostMs: m.host - (first?.host ?? 0), gpuMs: m.event && origin ? origin.elapsedTime(m.event) : null };
      });
    } finally {
      for (const m of taken) m.event?.dispose();
    }
  },
  reset(): void {
    for (const m of marks) m.event?.dispose();
    marks = [];
  },
};
