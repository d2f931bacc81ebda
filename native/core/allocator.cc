#include "core/allocator.h"

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <unordered_map>
#include <unordered_set>
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
struct GraphPool;

struct Block {
  void* ptr;
  int64_t size;
  // Stream handles stay valid for the life of the process (pooled, never destroyed), so both are
  // safe to key by and to record events on after the JS Stream was disposed.
  void* stream;                      // the stream it was allocated for; reuse happens on this stream
  std::vector<void*> used_on;        // other streams that used it (record_stream)
  std::vector<cudaEvent_t> pending;  // events those streams must pass before reuse
  GraphPool* pool = nullptr;         // the CUDA-graph pool that owns it, or null (the general cache)
  // Once freed, wait for its own stream too and then serve any stream (kAnyStream): a released
  // graph's memory, whose capture stream may never allocate again.
  bool any_stream_when_idle = false;
};

// The stream key of a free block no stream has work pending on: any stream may take it. Not
// nullptr, which is the legacy default stream's key (nor 0x1 or 0x2, cudaStreamLegacy and
// cudaStreamPerThread): an address no stream handle can have.
char any_stream_tag;
void* const kAnyStream = &any_stream_tag;

struct BlockOrder {
  bool operator()(const Block* a, const Block* b) const {
    if (a->stream != b->stream) return a->stream < b->stream;
    if (a->size != b->size) return a->size < b->size;
    return a->ptr < b->ptr;
  }
};

// The memory of one CUDA graph (see allocator.h).
struct GraphPool {
  uint64_t id;
  unsigned long long capture_id;
  bool capturing = true;
  std::unordered_set<Block*> blocks;         // every block it owns, live or free
  std::set<Block*, BlockOrder> free_blocks;  // freed during the capture: reusable in it
  int64_t bytes = 0;
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

// The best-fitting free block in `set` for `size` bytes keyed to `stream`, taken out of the set; null if none.
Block* take_fitting_keyed(std::set<Block*, BlockOrder>& set, int64_t size, void* stream) {
  Block key{nullptr, size, stream, {}, {}};
  auto it = set.lower_bound(&key);
  if (it == set.end() || (*it)->stream != stream || !fits((*it)->size, size)) return nullptr;
  Block* b = *it;
  set.erase(it);
  return b;
}

// The best-fitting free block for `size` bytes on `stream`: one of its own, else an idle one (which
// becomes the stream's); null if none.
Block* take_fitting(std::set<Block*, BlockOrder>& set, int64_t size, void* stream) {
  static const bool no_cache = std::getenv("MOE_EP_NO_CACHE") != nullptr;  // for compute-sanitizer runs
  if (no_cache) return nullptr;
  if (Block* b = take_fitting_keyed(set, size, stream)) return b;
  if (stream == kAnyStream) return nullptr;
  Block* b = take_fitting_keyed(set, size, kAnyStream);
  if (b) b->stream = stream;
  return b;
}

struct DevicePool {
  int device;
  std::mutex mu;
  MemoryStats stats;
  std::unordered_map<void*, Block*> live;
  std::set<Block*, BlockOrder> free_blocks;
  std::vector<Block*> waiting;   // freed, but other streams may still be using them
  std::vector<Block*> deferred;  // freed with cross-stream uses while a capture was open: no events yet
  std::unordered_map<uint64_t, GraphPool*> graph_pools;
  std::vector<GraphPool*> capturing;  // pools whose capture is open
  uint64_t next_pool_id = 1;

  // Moves blocks whose events have all completed into the free set.
  void collect_waiting(bool block_until_done) {
    for (size_t i = 0; i < waiting.size();) {
      Block* b = waiting[i];
      bool done = true;
      for (auto e : b->pending) {
        if (block_until_done) cudaEventSynchronize(e);
        else if (cudaEventQuery(e) != cudaSuccess) {
          cudaGetLastError();
          done = false;
          break;
        }
      }
      if (done) {
        for (auto e : b->pending) cudaEventDestroy(e);
        b->pending.clear();
        b->used_on.clear();
        if (b->any_stream_when_idle) {  // its own stream passed too: no stream has work on it
          b->stream = kAnyStream;
          b->any_stream_when_idle = false;
        }
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

  // The open graph pool that allocations on `stream` belong to: the one whose capture the stream
  // takes part in, or null when the stream is not capturing. Cheap when no capture is open.
  // Sets *foreign when the stream is capturing for someone else (a capture not begun here).
  GraphPool* pool_for(void* stream, bool* foreign) {
    *foreign = false;
    if (capturing.empty()) return nullptr;
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    unsigned long long id = 0;
    if (cudaStreamGetCaptureInfo(cudaStream_t(stream), &status, &id) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    if (status == cudaStreamCaptureStatusNone) return nullptr;
    // Active, or invalidated by a broken rule: the capture will fail, but until it ends its memory
    // stays private all the same (released with the pool when the capture is aborted).
    for (GraphPool* p : capturing)
      if (p->capture_id == id) return p;
    *foreign = true;
    return nullptr;
  }

  // cudaMalloc of `size` bytes (rounded from `bytes`), retried once after releasing the cache when
  // no capture is open. Relaxed capture mode while one is: growing a graph's pool is deliberate.
  void* device_malloc(int64_t size, int64_t bytes, const std::string& op) {
    const bool in_capture = !capturing.empty();
    cuda::DeviceGuard guard(device);
    cuda::RelaxedCaptureMode relaxed(in_capture);
    void* ptr = nullptr;
    cudaError_t e = cudaMalloc(&ptr, size_t(size));
    if (e == cudaErrorMemoryAllocation && !in_capture) {
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
      throw_error(
          ErrorKind::OutOfMemory, op,
          cat("CUDA out of memory on cuda:", device, " allocating ", mib(bytes), ": ", mib(stats.live_bytes), " live in moe-ep tensors, ",
              in_capture ? "cache kept (a CUDA graph is being captured on this device)" : "cache released and retried",
              "; the device reports ", mib(int64_t(free_b)), " free of ", mib(int64_t(total_b))));
    }
    stats.device_mallocs++;
    stats.reserved_bytes += size;
    return ptr;
  }

  void* allocate(int64_t bytes, void* stream, const std::string& op) {
    std::lock_guard<std::mutex> lock(mu);
    int64_t size = round_size(bytes);
    bool foreign = false;
    GraphPool* gp = pool_for(stream, &foreign);
    if (foreign) {
      throw_error(ErrorKind::InvalidArgument, op,
                  "allocating on a stream that is being captured into a CUDA graph outside CudaGraph.capture: the graph's memory "
                  "would not be kept for it; capture with CudaGraph.capture");
    }
    Block* b = nullptr;
    if (gp) {
      b = take_fitting(gp->free_blocks, size, stream);
      if (b) {
        stats.cache_hits++;
      } else {
        void* ptr = device_malloc(size, bytes, op);
        b = new Block{ptr, size, stream, {}, {}};
        b->pool = gp;
        gp->blocks.insert(b);
        gp->bytes += size;
        stats.graph_pool_bytes += size;
      }
    } else {
      // Event queries are not allowed on a capturing stream: while a capture is open, blocks freed
      // across streams wait until it ends.
      if (!waiting.empty() && capturing.empty()) collect_waiting(false);
      b = take_fitting(free_blocks, size, stream);
      if (b) {
        stats.cached_bytes -= b->size;
        stats.cache_hits++;
      } else {
        void* ptr = device_malloc(size, bytes, op);
        b = new Block{ptr, size, stream, {}, {}};
      }
    }
    live[b->ptr] = b;
    stats.live_bytes += b->size;
    stats.peak_bytes = std::max(stats.peak_bytes, stats.live_bytes);
    stats.live_allocations++;
    stats.allocations++;
    return b->ptr;
  }

  // Events on the other streams that used b, then into `waiting` (or straight into the free set).
  void retire(Block* b) {
    if (b->any_stream_when_idle && std::find(b->used_on.begin(), b->used_on.end(), b->stream) == b->used_on.end())
      b->used_on.push_back(b->stream);
    if (b->used_on.empty()) {
      stats.cached_bytes += b->size;
      free_blocks.insert(b);
      return;
    }
    if (!capturing.empty()) {  // an event recorded on a capturing stream would be captured
      deferred.push_back(b);
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

  void adopt(GraphPool* gp, Block* b) {
    b->pool = gp;
    gp->blocks.insert(b);
    gp->bytes += b->size;
    stats.graph_pool_bytes += b->size;
  }

  void deallocate(void* ptr) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = live.find(ptr);
    MOE_INTERNAL_CHECK(it != live.end(), "freeing an unknown device pointer");
    Block* b = it->second;
    live.erase(it);
    stats.live_bytes -= b->size;
    stats.live_allocations--;
    if (b->pool) {
      // Reusable inside its capture, on its stream, in stream order; otherwise it waits for the
      // pool's release (the graph may still use it on every replay).
      if (b->pool->capturing && b->used_on.empty()) b->pool->free_blocks.insert(b);
      return;
    }
    if (!capturing.empty()) {
      bool foreign = false;
      if (GraphPool* gp = pool_for(b->stream, &foreign)) {
        // Made before the capture on a stream now capturing, freed during it: the graph may read
        // it on every replay, so it stays the graph's (and is not reused: work queued before the
        // capture may still be using it when a replay runs on another stream).
        adopt(gp, b);
        return;
      }
    }
    retire(b);
  }

  void record_stream(void* ptr, void* stream) {
    std::lock_guard<std::mutex> lock(mu);
    auto it = live.find(ptr);
    if (it == live.end()) return;
    Block* b = it->second;
    if (stream == b->stream) return;
    for (void* s : b->used_on)
      if (s == stream) return;
    b->used_on.push_back(stream);
  }

  uint64_t pool_begin(unsigned long long capture_id) {
    std::lock_guard<std::mutex> lock(mu);
    auto* gp = new GraphPool();
    gp->id = next_pool_id++;
    gp->capture_id = capture_id;
    graph_pools[gp->id] = gp;
    capturing.push_back(gp);
    return gp->id;
  }

  GraphPool* find_pool(uint64_t id) {
    auto it = graph_pools.find(id);
    MOE_INTERNAL_CHECK(it != graph_pools.end(), "unknown graph pool ", id);
    return it->second;
  }

  void pool_end(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu);
    GraphPool* gp = find_pool(id);
    if (!gp->capturing) return;
    gp->capturing = false;
    gp->free_blocks.clear();  // still the pool's (gp->blocks); never handed out again
    for (size_t i = 0; i < capturing.size(); ++i) {
      if (capturing[i] == gp) {
        capturing.erase(capturing.begin() + long(i));
        break;
      }
    }
    if (capturing.empty()) {
      std::vector<Block*> later;
      later.swap(deferred);
      for (Block* b : later) retire(b);
    }
  }

  int64_t pool_bytes(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu);
    return find_pool(id)->bytes;
  }

  void pool_release(uint64_t id, const std::vector<void*>& streams) {
    std::lock_guard<std::mutex> lock(mu);
    GraphPool* gp = find_pool(id);
    MOE_INTERNAL_CHECK(!gp->capturing, "releasing the pool of a capture still open");
    for (Block* b : gp->blocks) {
      b->pool = nullptr;
      b->any_stream_when_idle = true;
      stats.graph_pool_bytes -= b->size;
      for (void* s : streams) {
        if (s == b->stream) continue;
        bool known = false;
        for (void* u : b->used_on) known = known || u == s;
        if (!known) b->used_on.push_back(s);
      }
      // A live block belongs to a tensor the caller kept: the general path frees it later.
      if (live.find(b->ptr) == live.end()) retire(b);
    }
    graph_pools.erase(id);
    delete gp;
  }
};

DevicePool& device_pool(int device) {
  static std::mutex mu;
  static std::map<int, DevicePool*>* pools = new std::map<int, DevicePool*>();  // never destroyed
  std::lock_guard<std::mutex> lock(mu);
  auto& p = (*pools)[device];
  if (!p) {
    p = new DevicePool();
    p->device = device;
  }
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
  MOE_ARG_CHECK(p.capturing.empty(), "emptyCache", "a CUDA graph is being captured on ", device.str(),
                ": releasing the cache synchronises the device, which a capture does not allow; call it before or after the capture");
  cuda::DeviceGuard guard(device.index);
  p.release_cached();
#endif
}

uint64_t graph_pool_begin(const Device& device, unsigned long long capture_id) {
  MOE_INTERNAL_CHECK(device.is_cuda(), "graph pools are for CUDA devices");
#if MOE_EP_WITH_CUDA
  return device_pool(device.index).pool_begin(capture_id);
#else
  (void)capture_id;
  return 0;
#endif
}

void graph_pool_end(const Device& device, uint64_t pool) {
#if MOE_EP_WITH_CUDA
  if (pool) device_pool(device.index).pool_end(pool);
#endif
}

int64_t graph_pool_bytes(const Device& device, uint64_t pool) {
#if MOE_EP_WITH_CUDA
  if (pool) return device_pool(device.index).pool_bytes(pool);
#endif
  return 0;
}

void graph_pool_release(const Device& device, uint64_t pool, const std::vector<void*>& streams) {
#if MOE_EP_WITH_CUDA
  if (pool) device_pool(device.index).pool_release(pool, streams);
#endif
}

}  // namespace moe
