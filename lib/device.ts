/**
 * Devices: 'cpu' or 'cuda:N'. The default device is cuda:0 when a GPU is usable, else cpu;
 * MOE_EP_DEVICE or setDefaultDevice() override it.
 */
import { invalidArgument, UnavailableError, shown } from './errors.js';
import { native } from './native.js';
import { DEVICE_TYPE } from './native-codes.js';
import { checkNonNegativeInt } from './validate.js';

export class Device {
  private constructor(
    readonly type: 'cpu' | 'cuda',
    readonly index: number,
  ) {}

  static readonly cpu = new Device('cpu', 0);
  static cuda(index = 0): Device {
    checkNonNegativeInt(index, 'device', 'index');
    return new Device('cuda', index);
  }

  /** Parses 'cpu', 'cuda' (device 0) or 'cuda:N'. */
  static parse(spec: DeviceLike, op = 'device'): Device {
    if (spec instanceof Device) return spec;
    if (typeof spec === 'string') {
      if (spec === 'cpu') return Device.cpu;
      const m = /^cuda(?::(\d+))?$/.exec(spec);
      if (m) return Device.cuda(m[1] === undefined ? 0 : Number(m[1]));
    }
    return invalidArgument(op, `'device' must be 'cpu', 'cuda' or 'cuda:N'; received ${shown(spec)}`);
  }

  get isCuda(): boolean {
    return this.type === 'cuda';
  }
  /** The (type, index) pair the addon takes. */
  get code(): [number, number] {
    return [DEVICE_TYPE[this.type], this.index];
  }
  equals(other: Device): boolean {
    return this.type === other.type && (this.type === 'cpu' || this.index === other.index);
  }
  toString(): string {
    return this.type === 'cpu' ? 'cpu' : `cuda:${this.index}`;
  }
}

export type DeviceLike = Device | 'cpu' | 'cuda' | `cuda:${number}`;

/** The addon's CUDA status, asked once: it is fixed for the process (the addon caches it too), and every GPU allocation checks it. */
let cudaStatusOnce: ReturnType<ReturnType<typeof native>['cudaStatus']> | undefined;
const cudaStatus = () => (cudaStatusOnce ??= native().cudaStatus());

export const cuda = {
  /** True when this build has CUDA and a usable GPU is visible. */
  isAvailable(): boolean {
    return cudaStatus().deviceCount > 0;
  },
  deviceCount(): number {
    return cudaStatus().deviceCount;
  },
  /** Why no GPU is usable ('' when one is). */
  unavailableReason(): string {
    return cudaStatus().unavailable;
  },
  /**
   * How often this process has made the host wait for a GPU so far: device-to-host copies and
   * stream/event/device synchronisations. The difference around a step says whether it waited
   * (capacity mode through the 'ipc' transport waits for nothing). Zeros without CUDA.
   */
  hostWaitCounts(): { deviceToHost: number; synchronizations: number } {
    return native().hostWaitCounts();
  },
};

/**
 * Throws an UnavailableError naming `op` when `device` is a GPU this process cannot use (no CUDA in
 * this build, no GPU visible, or an index past the visible ones), so that an object made for it
 * fails where it is made, with what to do, rather than in its first allocation.
 */
export function checkDeviceUsable(device: Device, op: string): void {
  if (!device.isCuda) return;
  const { builtWithCuda, deviceCount, unavailable } = cudaStatus();
  // A rebuild helps only an addon built without CUDA; one with CUDA needs a GPU it can see.
  if (deviceCount === 0)
    throw new UnavailableError(
      `${op}: device ${device.toString()} is not usable: ${unavailable}. Use device 'cpu'` +
        (builtWithCuda
          ? ''
          : `, or on a machine with a GPU and the CUDA toolkit rebuild from source (MOE_EP_BUILD_FROM_SOURCE=1 npm rebuild moe-ep)`),
      op,
    );
  if (device.index >= deviceCount)
    throw new UnavailableError(`${op}: device ${device.toString()} is not usable: ${deviceCount} CUDA device(s) visible`, op);
}

let defaultDevice: Device | undefined;

export function getDefaultDevice(): Device {
  if (defaultDevice === undefined) {
    const env = process.env['MOE_EP_DEVICE'];
    defaultDevice = env ? Device.parse(env as DeviceLike, 'MOE_EP_DEVICE') : cuda.isAvailable() ? Device.cuda(0) : Device.cpu;
  }
  return defaultDevice;
}

export function setDefaultDevice(device: DeviceLike): void {
  defaultDevice = Device.parse(device, 'setDefaultDevice');
}

/** Waits for all work queued on a device. */
export function synchronize(device: DeviceLike = getDefaultDevice()): void {
  const d = Device.parse(device, 'synchronize');
  native().deviceSynchronize(...d.code);
}
