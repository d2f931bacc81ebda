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
 * hostMs is when the host reached the mark; gpuMs is when the GPU reached it in its stream (a
 * CUDA event recorded on the current stream), both relative to the first mark. A GPU time far
 * behind the host's means queued work; the GPU time jumping with the host's means the GPU was idle,
 * waiting for the host. CPU marks have gpuMs null.
 */
import { Device, type DeviceLike } from './device.js';
import { Event } from './stream.js';

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
    const d = Device.parse(device, 'trace.mark');
    let event: Event | null = null;
    if (d.isCuda) {
      event = new Event(d, { timing: true });
      event.record();
    }
    marks.push({ name, host: performance.now(), event });
  },
  /** Waits for the marks' events and returns the timeline since the first mark; then starts afresh. */
  collect(): TraceRow[] {
    const taken = marks;
    marks = [];
    const first = taken[0];
    const firstGpu = taken.find((m) => m.event !== null)?.event ?? null;
    const rows = taken.map((m) => {
      if (m.event) m.event.synchronize();
      return {
        name: m.name,
        hostMs: m.host - (first?.host ?? 0),
        gpuMs: m.event && firstGpu ? firstGpu.elapsedTime(m.event) : null,
      };
    });
    for (const m of taken) m.event?.dispose();
    return rows;
  },
  reset(): void {
    for (const m of marks) m.event?.dispose();
    marks = [];
  },
};
