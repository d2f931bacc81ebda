#include "core/cuda_runtime.h"

#include <algorithm>
#include <atomic>
#include <mutex>

#if MOE_EP_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace moe::cuda {

namespace {
std::atomic<int64_t> g_device_to_host{0}, g_synchronizations{0};
}
HostWaitCounts host_wait_counts() { return {g_device_to_host.load(), g_synchronizations.load()}; }

namespace {
thread_local void* g_current_stream[64] = {};

// This thread's open capture (see the header): at most one.
thread_local bool t_capture_open = false;
thread_local std::string t_capture_broken;
}  // namespace

void capture_opened(void*) {
  t_capture_open = true;
  t_capture_broken.clear();
}
std::string capture_closed() {
  t_capture_open = false;
  std::string broken;
  broken.swap(t_capture_broken);
  return broken;
}
bool capture_open_on_this_thread() { return t_capture_open; }
void note_capture_broken(const std::string& reason) {
  if (t_capture_open && t_capture_broken.empty()) t_capture_broken = reason;
}
void refuse_in_capture(const std::string& op, const std::string& what) {
  note_capture_broken(cat(op, ", which ", what));
  throw_error(ErrorKind::Cuda, op,
              cat("not allowed while a CUDA graph is being captured on this thread: it ", what,
                  ". Captured work runs only when the graph is replayed: read results after replay(), and copy host data "
                  "into device tensors before the capture or the replay"));
}

#if MOE_EP_WITH_CUDA

std::string error_string(int code) { return cat(cudaGetErrorName(cudaError_t(code)), " (", cudaGetErrorString(cudaError_t(code)), ")"); }

void check(int code, const std::string& op, const char* what) {
  if (code == cudaSuccess) return;
  // Clear a non-sticky error so the next call starts clean; a sticky one stays and will show again.
  cudaGetLastError();
  // Inside a capture any failed call leaves the graph without that work (or invalidates it): the
  // capture must fail at its end even if the caller catches this error.
  note_capture_broken(cat(op, ", whose ", what, " failed with ", error_string(code)));
  auto kind = code == cudaErrorMemoryAllocation ? ErrorKind::OutOfMemory : ErrorKind::Cuda;
  throw_error(kind, op, cat(what, " failed: ", error_string(code)));
}

void check_launch(const std::string& op) { check(cudaGetLastError(), op, "kernel launch"); }

const RuntimeStatus& status() {
  static RuntimeStatus s = [] {
    RuntimeStatus r{true, 0, "", 0, 0};
    cudaRuntimeGetVersion(&r.runtime_version);
    cudaDriverGetVersion(&r.driver_version);  // 0 when no driver is installed
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
      cudaGetLastError();
      if (e == cudaErrorNoDevice)
        r.unavailable = "no CUDA device is visible (cudaGetDeviceCount: cudaErrorNoDevice; check CUDA_VISIBLE_DEVICES)";
      else if (e == cudaErrorInsufficientDriver && r.driver_version == 0)
        r.unavailable = "no NVIDIA driver is installed (libcuda.so.1 could not be loaded)";
      else if (e == cudaErrorInsufficientDriver)
        r.unavailable =
            cat("the NVIDIA driver supports CUDA ", r.driver_version / 1000, ".", (r.driver_version % 1000) / 10,
                " but this addon's runtime is ", r.runtime_version / 1000, ".", (r.runtime_version % 1000) / 10, "; update the driver");
      else r.unavailable = cat("cudaGetDeviceCount failed: ", error_string(e));
    } else if (n == 0) {
      r.unavailable = "no CUDA device is visible";
    }
    r.device_count = r.unavailable.empty() ? n : 0;
    return r;
  }();
  return s;
}

bool available() { return status().device_count > 0; }

DeviceProps device_props(int index) {
  require_device(cuda_device(index), "cuda.deviceProperties");
  cudaDeviceProp p{};
  check(cudaGetDeviceProperties(&p, index), "cuda.deviceProperties", "cudaGetDeviceProperties");
  char bus[32] = {0};
  cudaDeviceGetPCIBusId(bus, sizeof bus, index);
  return DeviceProps{index,
                     p.name,
                     int64_t(p.totalGlobalMem),
                     p.major,
                     p.minor,
                     p.multiProcessorCount,
                     int64_t(p.l2CacheSize),
                     int64_t(p.sharedMemPerBlockOptin),
                     bus};
}

int multiprocessors(int index) {
  // require_device refuses indexes past 63, so every device is cached; the bound below keeps the
  // cache safe on its own.
  constexpr int kCached = 64;
  static std::atomic<int> cache[kCached];  // 0: not asked yet
  require_device(cuda_device(index), "cuda.multiprocessors");
  const bool cached = index >= 0 && index < kCached;
  int n = cached ? cache[index].load(std::memory_order_relaxed) : 0;
  if (n == 0) {
    check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, index), "cuda.multiprocessors", "cudaDeviceGetAttribute");
    n = std::max(n, 1);
    if (cached) cache[index].store(n, std::memory_order_relaxed);
  }
  return n;
}

void require_device(const Device& device, const char* op) {
  if (!device.is_cuda()) return;
  const auto& s = status();
  if (s.device_count == 0) throw_error(ErrorKind::Unavailable, op, cat("device ", device.str(), " is not usable: ", s.unavailable));
  if (device.index < 0 || device.index >= s.device_count || device.index >= 64)
    throw_error(ErrorKind::InvalidArgument, op,
                cat("device ", device.str(), " does not exist: ", s.device_count, " CUDA device(s) visible"));
}

DeviceGuard::DeviceGuard(int index) {
  cudaGetDevice(&previous_);
  if (previous_ != index) check(cudaSetDevice(index), "cuda.setDevice", "cudaSetDevice");
  else previous_ = -1;
}
DeviceGuard::~DeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

namespace {
struct StreamPool {
  std::mutex mu;
  std::vector<void*> idle[64];  // per device, last released first
};
StreamPool& stream_pool() {
  static auto* p = new StreamPool();  // never destroyed, like the streams in it
  return *p;
}
}  // namespace

void* stream_acquire(int device) {
  MOE_INTERNAL_CHECK(device >= 0 && device < 64, "stream_acquire: device index out of range");
  {
    auto& p = stream_pool();
    std::lock_guard<std::mutex> lock(p.mu);
    auto& idle = p.idle[device];
    if (!idle.empty()) {
      void* s = idle.back();
      idle.pop_back();
      return s;
    }
  }
  DeviceGuard g(device);
  cudaStream_t s = nullptr;
  check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "Stream", "cudaStreamCreateWithFlags");
  return s;
}
// Never cudaStreamDestroy (see the header): the stream goes back to its device's pool.
void stream_release(int device, void* stream) {
  if (!stream || device < 0 || device >= 64) return;
  auto& p = stream_pool();
  std::lock_guard<std::mutex> lock(p.mu);
  p.idle[device].push_back(stream);
}
namespace {
const char* kWaits = "waits for the device (a host synchronisation)";
}
void stream_synchronize(int device, void* stream, const char* op) {
  if (t_capture_open) refuse_in_capture(op, kWaits);
  ++g_synchronizations;
  DeviceGuard g(device);
  check(cudaStreamSynchronize(cudaStream_t(stream)), op, "cudaStreamSynchronize");
}
bool stream_query(int device, void* stream) {
  DeviceGuard g(device);
  cudaError_t e = cudaStreamQuery(cudaStream_t(stream));
  if (e == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  check(e, "Stream.query", "cudaStreamQuery");
  return true;
}
void* event_create(int device, bool timing) {
  DeviceGuard g(device);
  cudaEvent_t e = nullptr;
  check(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming), "Event", "cudaEventCreate");
  return e;
}
void event_destroy(int device, void* event) {
  DeviceGuard g(device);
  cudaEventDestroy(cudaEvent_t(event));
}
void event_record(int device, void* event, void* stream) {
  DeviceGuard g(device);
  check(cudaEventRecord(cudaEvent_t(event), cudaStream_t(stream)), "Event.record", "cudaEventRecord");
}
void event_synchronize(void* event) {
  if (t_capture_open) refuse_in_capture("Event.synchronize", kWaits);
  ++g_synchronizations;
  check(cudaEventSynchronize(cudaEvent_t(event)), "Event.synchronize", "cudaEventSynchronize");
}
bool event_query(void* event) {
  cudaError_t e = cudaEventQuery(cudaEvent_t(event));
  if (e == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  check(e, "Event.query", "cudaEventQuery");
  return true;
}
void stream_wait_event(int device, void* stream, void* event) {
  DeviceGuard g(device);
  check(cudaStreamWaitEvent(cudaStream_t(stream), cudaEvent_t(event), 0), "Stream.waitEvent", "cudaStreamWaitEvent");
}
float event_elapsed_ms(void* start, void* end) {
  float ms = 0;
  check(cudaEventElapsedTime(&ms, cudaEvent_t(start), cudaEvent_t(end)), "Event.elapsedTime", "cudaEventElapsedTime");
  return ms;
}
void device_synchronize(int device, const char* op) {
  if (t_capture_open) refuse_in_capture(op, kWaits);
  ++g_synchronizations;
  DeviceGuard g(device);
  check(cudaDeviceSynchronize(), op, "cudaDeviceSynchronize");
}

void memcpy_async(void* dst, const void* src, int64_t bytes, int kind, void* stream, const std::string& op) {
  if (bytes == 0) return;
  if (t_capture_open && kind == DeviceToHost) refuse_in_capture(op, "copies device memory to the host (the host would read it at once)");
  if (t_capture_open && kind == HostToDevice)
    refuse_in_capture(op, "copies host memory to the device (a graph would re-read that host buffer on every replay)");
  if (kind == DeviceToHost) ++g_device_to_host;
  cudaMemcpyKind k = kind == HostToDevice   ? cudaMemcpyHostToDevice
                     : kind == DeviceToHost ? cudaMemcpyDeviceToHost
                                            : cudaMemcpyDeviceToDevice;
  check(cudaMemcpyAsync(dst, src, size_t(bytes), k, cudaStream_t(stream)), op, "cudaMemcpyAsync");
}
void memcpy_peer_async(void* dst, int dst_device, const void* src, int src_device, int64_t bytes, void* stream, const std::string& op) {
  if (bytes == 0) return;
  check(cudaMemcpyPeerAsync(dst, dst_device, src, src_device, size_t(bytes), cudaStream_t(stream)), op, "cudaMemcpyPeerAsync");
}
void memset_async(void* dst, int value, int64_t bytes, void* stream, const std::string& op) {
  if (bytes == 0) return;
  check(cudaMemsetAsync(dst, value, size_t(bytes), cudaStream_t(stream)), op, "cudaMemsetAsync");
}
void mem_get_info(int device, int64_t* free_bytes, int64_t* total_bytes) {
  DeviceGuard g(device);
  size_t f = 0, t = 0;
  check(cudaMemGetInfo(&f, &t), "cuda.memGetInfo", "cudaMemGetInfo");
  *free_bytes = int64_t(f);
  *total_bytes = int64_t(t);
}

bool can_access_peer(int a, int b) {
  if (a == b) return true;
  int ok = 0;
  if (cudaDeviceCanAccessPeer(&ok, a, b) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return ok != 0;
}

RelaxedCaptureMode::RelaxedCaptureMode(bool active) {
  if (!active) return;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  if (cudaThreadExchangeStreamCaptureMode(&mode) == cudaSuccess) previous_ = int(mode);
  else cudaGetLastError();
}
RelaxedCaptureMode::~RelaxedCaptureMode() {
  if (previous_ < 0) return;
  cudaStreamCaptureMode mode = cudaStreamCaptureMode(previous_);
  cudaThreadExchangeStreamCaptureMode(&mode);
}

void* host_alloc_pinned(int64_t bytes, const std::string& op) {
  void* p = nullptr;
  check(cudaMallocHost(&p, size_t(bytes > 0 ? bytes : 1)), op, "cudaMallocHost");
  return p;
}
void host_free_pinned(void* ptr) {
  if (ptr) cudaFreeHost(ptr);
}

#else  // CPU-only build

namespace {
[[noreturn]] void not_built(const char* op) {
  throw_error(ErrorKind::Unavailable, op,
              "this moe-ep addon was built without CUDA (nvcc was not found or MOE_EP_CUDA=off at build time); "
              "install the CUDA toolkit and rebuild from source (MOE_EP_BUILD_FROM_SOURCE=1 npm rebuild moe-ep) or use device 'cpu'");
}
}  // namespace

std::string error_string(int code) { return cat("CUDA error ", code); }
void check(int code, const std::string& op, const char*) {
  if (code) not_built(op.c_str());
}
void check_launch(const std::string& op) { not_built(op.c_str()); }
const RuntimeStatus& status() {
  static RuntimeStatus s{false, 0, "this addon was built without CUDA (CPU-only build)", 0, 0};
  return s;
}
bool available() { return false; }
DeviceProps device_props(int) { not_built("cuda.deviceProperties"); }
int multiprocessors(int) { not_built("cuda.multiprocessors"); }
void require_device(const Device& device, const char* op) {
  if (device.is_cuda())
    throw_error(ErrorKind::Unavailable, op,
                cat("device ", device.str(),
                    " is not usable: this moe-ep addon was built without CUDA (nvcc was not found or "
                    "MOE_EP_CUDA=off at build time); install the CUDA toolkit and rebuild from source (MOE_EP_BUILD_FROM_SOURCE=1 npm "
                    "rebuild moe-ep) or use device 'cpu'"));
}
DeviceGuard::DeviceGuard(int) { not_built("cuda.setDevice"); }
DeviceGuard::~DeviceGuard() {}
void* stream_acquire(int) { not_built("Stream"); }
void stream_release(int, void*) {}
void stream_synchronize(int, void*, const char* op) { not_built(op); }
bool stream_query(int, void*) { not_built("Stream.query"); }
void* event_create(int, bool) { not_built("Event"); }
void event_destroy(int, void*) {}
void event_record(int, void*, void*) { not_built("Event.record"); }
void event_synchronize(void*) { not_built("Event.synchronize"); }
bool event_query(void*) { not_built("Event.query"); }
void stream_wait_event(int, void*, void*) { not_built("Stream.waitEvent"); }
float event_elapsed_ms(void*, void*) { not_built("Event.elapsedTime"); }
void device_synchronize(int, const char* op) { not_built(op); }
void memcpy_async(void*, const void*, int64_t, int, void*, const std::string& op) { not_built(op.c_str()); }
void memcpy_peer_async(void*, int, const void*, int, int64_t, void*, const std::string& op) { not_built(op.c_str()); }
void memset_async(void*, int, int64_t, void*, const std::string& op) { not_built(op.c_str()); }
void mem_get_info(int, int64_t*, int64_t*) { not_built("cuda.memGetInfo"); }
bool can_access_peer(int a, int b) { return a == b; }
void* host_alloc_pinned(int64_t, const std::string& op) { not_built(op.c_str()); }
void host_free_pinned(void*) {}
RelaxedCaptureMode::RelaxedCaptureMode(bool) {}
RelaxedCaptureMode::~RelaxedCaptureMode() {}

#endif

void* current_stream(int device) { return (device >= 0 && device < 64) ? g_current_stream[device] : nullptr; }
void set_current_stream(int device, void* stream) {
  if (device >= 0 && device < 64) g_current_stream[device] = stream;
}

}  // namespace moe::cuda
