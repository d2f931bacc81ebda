/**
 * Allocator statistics. Device memory goes through a caching allocator (freed blocks are kept for
 * reuse on the same stream); host memory is counted the same way without caching, except that
 * memoryStats('cpu').cachedBytes counts the pinned buffers the MPI backend keeps for staging CUDA
 * tensors (reused across collectives; emptyCache('cpu') frees them).
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

/** Returns cached (free) device blocks to the driver (synchronises the device); on 'cpu', the MPI backend's cached pinned staging buffers. */
export function emptyCache(device: DeviceLike = getDefaultDevice()): void {
  native().emptyCache(...Device.parse(device, 'emptyCache').code);
}
