#include "core/allocator.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <unordered_map>
#include <vector>

#include "core/cuda_runtime.h"
#include "core/pinned_pool.h"

#if MOE_EP_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace moe {

namespace {

constexpr int64_t kHostAlignment = 64;
constexpr int64_t kSmallLimit = int64_t(1) << 20;  // blocks up to 1 MiB round to 512 bytes
constexpr int64_t kSmallRound = 512;
constexpr int64_t kLargeRound = int64_t(2) << 20;  // larger blocks round to 2 MiB

std::string mib(int64_t bytes) { return cat(double(bytes) / double(1 << 20), " MiB"); }

// ------------------------------------------------------------------------------------------ host
struct HostPool {
  std::mutex mu;
  MemoryStats stats;
  std::unordered_map<void*, int64_t> sizes;
};
HostPool& host_pool() {
  static HostPool* p = new HostPool();  // never destroyed: tensors may be freed during exit
  return *p;
}

void* host_allocate(int64_t bytes, const std::string& op) {
  auto& p = host_pool();
  int64_t rounded = (bytes + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
  void* ptr = nullptr;
  if (posix_memalign(&ptr, kHostAlignment, size_t(rounded)) != 0 || !ptr) {
    std::lock_guard<std::mutex> lock(p.mu);
    p.stats.out_of_memory++;
    throw_error(ErrorKind::OutOfMemory, op, cat("out of host memory allocating ", mib(bytes), " (live ", mib(p.stats.live_bytes), ")"));
  }
  std::lock_guard<std::mutex> lock(p.mu);
  p.sizes[ptr] = rounded;
  p.stats.live_bytes += rounded;
  p.stats.reserved_bytes += rounded;
  p.stats.peak_bytes = std::max(p.stats.peak_bytes, p.stats.live_bytes);
  p.stats.live_allocations++;
  p.stats.allocations++;
  p.stats.device_mallocs++;
  return ptr;
}

void host_deallocate(void* ptr) {
  auto& p = host_pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.sizes.find(ptr);
    MOE_INTERNAL_CHECK(it != p.sizes.end(), "freeing an unknown host pointer");
    p.stats.live_bytes -= it->second;
    p.stats.reserved_bytes -= it->second;
    p.stats.live_allocations--;
    p.sizes.erase(it);
  }
  std::free(ptr);
}

#if MOE_EP_WITH_CUDA
// ---------------------------------------------------------------------------------------- device
struct Block {
  void* ptr;
  int64_t size;
  // Stream handles stay valid for the life of the process (pooled, never destroyed), so both are
  // safe to key by and to record events on after the JS Stream was disposed.
  void* stream;                 // the stream it was allocated for; reuse happens on this stream
  std::vector<void*> used_on;   // other streams that used it (record_stream)
  std::vector<cudaEvent_t> pending;  // events those streams must pass before reuse
};

struct BlockOrder {
  bool operator()(const Block* a, const Block* b) const {
    if (a->stream != b->stream) return a->stream < b->stream;
    if (a->size != b->size) return a->size < b->size;
    return a->ptr < b->ptr;
  }
};

int64_t round_size(int64_t bytes) {
  if (bytes <= kSmallLimit) return (bytes + kSmallRound - 1) / kSmallRound * kSmallRound;
  return (bytes + kLargeRound - 1) / kLargeRound * kLargeRound;
}
// Without block splitting, a cached block serves a request only when the waste stays bounded.
bool fits(int64_t block, int64_t want) {
  if (want <= kSmallLimit) return block <= 2 * want;
  return block <= want + std::max(kLargeRound, want / 8);
}

struct DevicePool {
  int device;
  std::mutex mu;
  MemoryStats stats;
  std::unordered_map<void*, Block*> live;
  std::set<Block*, BlockOrder> free_blocks;
  std::vector<Block*> waiting;  // freed, but other streams may still be using them

  // Moves blocks whose events have all completed into the free set.
  void collect_waiting(bool block_until_done) {
    for (size_t i = 0; i < waiting.size();) {
      Block* b = waiting[i];
      bool done = true;
      for (auto e : b->pending) {
        if (block_until_done) cudaEventSynchronize(e);
        else if (cudaEventQuery(e) != cudaSuccess) { cudaGetLastError(); done = false; break; }
      }
      if (done) {
        for (auto e : b->pending) cudaEventDestroy(e);
        b->pending.clear();
        b->used_on.clear();
        stats.cached_bytes += b->size;
        free_blocks.insert(b);
        waiting[i] = waiting.back();
        waiting.pop_back();
      } else {
        ++i;
      }
    }
  }

  void release_cached() {
    collect_waiting(true);
    for (Block* b : free_blocks) {
      cudaFree(b->ptr);
      stats.cached_bytes -= b->size;
      stats.reserved_bytes -= b->size;
      delete b;
    }
    free_blocks.clear();
  }

  void* allocate(int64_t bytes, void* stream, const std::string& op) {
    std::lock_guard<std::mutex> lock(mu);
    int64_t size = round_size(bytes);
    if (!waiting.empty()) collect_waiting(false);
    static const bool no_cache = std::getenv("MOE_EP_NO_CACHE") != nullptr;  // for compute-sanitizer runs
    Block key{nullptr, size, stream, {}, {}};
    auto it = free_blocks.lower_bound(&key);
    Block* b = nullptr;
    if (!no_cache && it != free_blocks.end() && (*it)->stream == stream && fits((*it)->size, size)) {
      b = *it;
      free_blocks.erase(it);
      stats.cached_bytes -= b->size;
      stats.cache_hits++;
    } else {
      cuda::DeviceGuard guard(device);
      void* ptr = nullptr;
      cudaError_t e = cudaMalloc(&ptr, size_t(size));
      if (e == cudaErrorMemoryAllocation) {
        cudaGetLastError();
        release_cached();  // give the cache back to the driver, then try once more
        e = cudaMalloc(&ptr, size_t(size));
      }
      if (e != cudaSuccess) {
        cudaGetLastError();
        if (e != cudaErrorMemoryAllocation) cuda::check(e, op, "cudaMalloc");
        stats.out_of_memory++;
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        cudaGetLastError();
        throw_error(ErrorKind::OutOfMemory, op,
                    cat("CUDA out of memory on cuda:", device, " allocating ", mib(bytes), ": ", mib(stats.live_bytes),
                        " live in moe-ep tensors, cache released and retried; the device reports ", mib(int64_t(free_b)),
                        " free of ", mib(int64_t(total_b))));
      }
      b = new Block{ptr, size, stream, {}, {}};
      stats.device_mallocs++;
      stats.reserved_bytes += size;
    }
    live[b->ptr] = b;
    stats.live_bytes += b->size;
    stats.peak_bytes = std::max(stats.peak_bytes, stats.live_bytes);
    stats.live_allocations++;
    stats.allocations++;
    return b->ptr;
  }

  void deallocate(void* ptr) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = live.find(ptr);
    MOE_INTERNAL_CHECK(it != live.end(), "freeing an unknown device pointer");
    Block* b = it->second;
    live.erase(it);
    stats.live_bytes -= b->size;
    stats.live_allocations--;
    if (b->used_on.empty()) {
      stats.cached_bytes += b->size;
      free_blocks.insert(b);
      return;
    }
    cuda::DeviceGuard guard(device);
    for (void* s : b->used_on) {
      cudaEvent_t e = nullptr;
      if (cudaEventCreateWithFlags(&e, cudaEventDisableTiming) != cudaSuccess || cudaEventRecord(e, cudaStream_t(s)) != cudaSuccess) {
        // Cannot track the other stream: wait for the whole device instead of risking reuse too early.
        cudaGetLastError();
        if (e) cudaEventDestroy(e);
        cudaDeviceSynchronize();
        continue;
      }
      b->pending.push_back(e);
    }
    waiting.push_back(b);
  }

  void record_stream(void* ptr, void* stream) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = live.find(ptr);
    if (it == live.end()) return;
    Block* b = it->second;
    if (stream == b->stream) return;
    for (void* s : b->used_on) if (s == stream) return;
    b->used_on.push_back(stream);
  }
};

DevicePool& device_pool(int device) {
  static std::mutex mu;
  static std::map<int, DevicePool*>* pools = new std::map<int, DevicePool*>();  // never destroyed
  std::lock_guard<std::mutex> lock(mu);
  auto& p = (*pools)[device];
  if (!p) { p = new DevicePool(); p->device = device; }
  return *p;
}
#endif

}  // namespace

void* allocate(const Device& device, int64_t bytes, void* stream, const std::string& op) {
  MOE_ARG_CHECK(bytes >= 0, op, "cannot allocate a negative number of bytes (", bytes, ")");
  if (bytes > kMaxAllocationBytes) {
    throw_error(ErrorKind::OutOfMemory, op, cat("refusing to allocate ", mib(bytes), " on ", device.str(), ": more than the 64 TiB limit"));
  }
  if (bytes == 0) return nullptr;
  if (device.is_cpu()) return host_allocate(bytes, op);
  cuda::require_device(device, op.c_str());
#if MOE_EP_WITH_CUDA
  return device_pool(device.index).allocate(bytes, stream, op);
#else
  return nullptr;
#endif
}

void deallocate(const Device& device, void* ptr) {
  if (!ptr) return;
  if (device.is_cpu()) return host_deallocate(ptr);
#if MOE_EP_WITH_CUDA
  device_pool(device.index).deallocate(ptr);
#endif
}

void record_stream(const Device& device, void* ptr, void* stream) {
  if (!ptr || device.is_cpu()) return;
#if MOE_EP_WITH_CUDA
  device_pool(device.index).record_stream(ptr, stream);
#endif
}

MemoryStats memory_stats(const Device& device) {
  if (device.is_cpu()) {
    std::lock_guard<std::mutex> lock(host_pool().mu);
    MemoryStats s = host_pool().stats;
    s.cached_bytes = pinned::cached_bytes();  // pinned staging buffers kept for reuse
    s.reserved_bytes += s.cached_bytes;
    return s;
  }
  cuda::require_device(device, "memoryStats");
#if MOE_EP_WITH_CUDA
  auto& p = device_pool(device.index);
  std::lock_guard<std::mutex> lock(p.mu);
  return p.stats;
#else
  return {};
#endif
}

void reset_peak_memory(const Device& device) {
  if (device.is_cpu()) {
    std::lock_guard<std::mutex> lock(host_pool().mu);
    host_pool().stats.peak_bytes = host_pool().stats.live_bytes;
    return;
  }
  cuda::require_device(device, "resetPeakMemory");
#if MOE_EP_WITH_CUDA
  auto& p = device_pool(device.index);
  std::lock_guard<std::mutex> lock(p.mu);
  p.stats.peak_bytes = p.stats.live_bytes;
#endif
}

void empty_cache(const Device& device) {
  if (device.is_cpu()) {
    pinned::empty();  // the host side's only cache: pinned staging buffers
    return;
  }
  cuda::require_device(device, "emptyCache");
#if MOE_EP_WITH_CUDA
  auto& p = device_pool(device.index);
  std::lock_guard<std::mutex> lock(p.mu);
  cuda::DeviceGuard guard(device.index);
  p.release_cached();
#endif
}

}  // namespace moe
