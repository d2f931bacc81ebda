/**
 * Allocator statistics. Device memory goes through a caching allocator (freed blocks are kept for
 * reuse on the same stream); host memory is counted the same way without caching.
 */
import { Device, type DeviceLike, getDefaultDevice } from './device.js';
import { native, type NativeMemoryStats } from './native.js';

export type MemoryStats = NativeMemoryStats;

export function memoryStats(device: DeviceLike = getDefaultDevice()): MemoryStats {
  return native().memoryStats(...Device.parse(device, 'memoryStats').code);
}

/** Resets peakBytes to the current liveBytes. */
export function resetPeakMemory(device: DeviceLike = getDefaultDevice()): void {
  native().resetPeakMemory(...Device.parse(device, 'resetPeakMemory').code);
}

/** Returns cached (free) device blocks to the driver. Synchronises the device. */
export function emptyCache(device: DeviceLike = getDefaultDevice()): void {
  native().emptyCache(...Device.parse(device, 'emptyCache').code);
}
