// The CUDA runtime as the rest of the code sees it. In a CPU-only build every entry point exists
// and reports that CUDA is unavailable, so callers need no #ifdefs.
#pragma once
#include <cstdint>
#include <string>
#include <vector>
#include "core/device.h"

namespace moe::cuda {

struct DeviceProps {
  int index;
  std::string name;
  int64_t total_memory;
  int major, minor;
  int multiprocessors;
  int64_t l2_bytes;
  int64_t shared_memory_per_block_optin;
  std::string pci_bus_id;
};

struct RuntimeStatus {
  bool built_with_cuda;
  int device_count;         // 0 when unusable
  std::string unavailable;  // why no device is usable ("" when one is)
  int driver_version;       // e.g. 13000, 0 when no driver
  int runtime_version;      // of the statically linked runtime
};

// Cached after the first call; cheap.
const RuntimeStatus& status();
bool available();
DeviceProps device_props(int index);
// The device's SM count, cached per device after the first call: cheap enough for every launch
// that sizes its grid by it.
int multiprocessors(int index);

// Throws Unavailable with the reason when `device` cannot be used by this build or machine.
void require_device(const Device& device, const char* op);

// Make `index` current for the calling thread (cudaSetDevice), restoring the old one on scope exit.
class DeviceGuard {
 public:
  explicit DeviceGuard(int index);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Raises moe::Error(Cuda) for a non-success code, naming `op` and `what`. code is a cudaError_t.
void check(int code, const std::string& op, const char* what);
// Checks cudaGetLastError after a kernel launch.
void check_launch(const std::string& op);
std::string error_string(int code);

// ---- streams and events (handles are cudaStream_t / cudaEvent_t as void*) ----
// Streams come from a per-device pool and are never destroyed: stream_release hands a stream back
// for the next stream_acquire, with whatever work is still queued on it. So every stream handle
// the process ever saw stays a live stream: the caching allocator (blocks keyed by stream, events
// recorded on the streams a block was used on), the per-thread current stream and any communicator
// may hold one past the JS Stream's dispose or finalizer without using a destroyed CUDA stream
// (undefined behaviour: an error, a crash, or a silently recycled handle). A reused stream keeps
// stream order with its earlier work, so blocks cached for it are safe to hand out on it again.
void* stream_acquire(int device);
void stream_release(int device, void* stream);
void stream_synchronize(int device, void* stream, const char* op);
bool stream_query(int device, void* stream);
void* event_create(int device, bool timing);
void event_destroy(int device, void* event);
void event_record(int device, void* event, void* stream);
void event_synchronize(void* event);
bool event_query(void* event);
void stream_wait_event(int device, void* stream, void* event);
float event_elapsed_ms(void* start, void* end);
void device_synchronize(int device, const char* op);

// Per-thread current stream of a device; nullptr means the legacy default stream.
void* current_stream(int device);
void set_current_stream(int device, void* stream);

// Raw copies used by the tensor layer.
void memcpy_async(void* dst, const void* src, int64_t bytes, int kind, void* stream, const std::string& op);
enum CopyKind { HostToDevice = 1, DeviceToHost = 2, DeviceToDevice = 3 };
void memcpy_peer_async(void* dst, int dst_device, const void* src, int src_device, int64_t bytes, void* stream, const std::string& op);
void memset_async(void* dst, int value, int64_t bytes, void* stream, const std::string& op);
void mem_get_info(int device, int64_t* free_bytes, int64_t* total_bytes);

// How often the host waited for a device: device-to-host copies (memcpy_async) and stream, event
// or device synchronisations through this file, since the process started. For tests and
// benchmarks that check a step waits for nothing (0 and 0 in a CPU-only build).
struct HostWaitCounts {
  int64_t device_to_host;
  int64_t synchronizations;
};
HostWaitCounts host_wait_counts();

// ---- stream capture (core/graph.h opens and closes captures) ----
// A thread has at most one capture open (CudaGraph, core/graph.h), begun in thread-local mode.
// While it is open, the calls in this file that would make the host wait for the device (stream,
// event and device synchronisations) or move bytes between host and device memory refuse with a
// Cuda error naming the op instead of calling CUDA: captured work runs only when the graph is
// replayed, so a host read inside the capture would read nothing yet, and a host-to-device copy
// would be replayed from a host buffer long freed. Each refusal, and every capture error that
// check() sees, marks the capture broken, so that it fails at its end even when the caller
// swallowed the error.
void capture_opened(void* stream);
// Closes this thread's capture bookkeeping; returns what broke it ("" when nothing did).
std::string capture_closed();
bool capture_open_on_this_thread();
// Throws Cuda: `op` is not allowed while this thread captures; `what` says what it would do.
void refuse_in_capture(const std::string& op, const std::string& what);
// Records the first reason this thread's open capture broke (no-op when none is open).
void note_capture_broken(const std::string& reason);

// For the duration of a scope, this thread's stream-capture interaction mode is relaxed
// (cudaThreadExchangeStreamCaptureMode): for calls that are safe inside a capture although CUDA
// counts them as potentially unsafe, such as the caching allocator growing a graph's pool with
// cudaMalloc. Restores the previous mode on exit. Does nothing when `active` is false or in a
// CPU-only build.
class RelaxedCaptureMode {
 public:
  explicit RelaxedCaptureMode(bool active = true);
  ~RelaxedCaptureMode();
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;

 private:
  int previous_ = -1;
};

// Whether device `a` can address device `b`'s memory (cudaDeviceCanAccessPeer; a == b: true).
bool can_access_peer(int a, int b);

// Page-locked host memory (cudaMallocHost / cudaFreeHost), used to stage device buffers for MPI.
void* host_alloc_pinned(int64_t bytes, const std::string& op);
void host_free_pinned(void* ptr);

}  // namespace moe::cuda
