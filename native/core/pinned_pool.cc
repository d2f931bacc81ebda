#include "core/pinned_pool.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/cuda_runtime.h"
#include "core/error.h"

namespace moe::pinned {
namespace {

struct Pool {
  std::mutex mu;
  std::multimap<int64_t, void*> free_by_size;  // cached buffers, by size
  std::unordered_map<void*, int64_t> size_of;  // every buffer handed out or cached
  int64_t cached = 0;
};

Pool& pool() {
  static auto* p = new Pool();  // never destroyed: buffers may be released during exit
  return *p;
}

int64_t cache_limit() {
  static const int64_t limit = [] {
    const char* v = std::getenv("MOE_EP_PINNED_CACHE_MB");
    const long long mb = v ? std::atoll(v) : 8192;
    return int64_t(mb < 0 ? 0 : mb) << 20;
  }();
  return limit;
}

// Sizes are rounded up so that steps whose row counts differ slightly reuse the same buffers.
int64_t rounded(int64_t bytes) {
  const int64_t unit = bytes <= (int64_t(1) << 20) ? int64_t(64) << 10 : int64_t(2) << 20;
  return (bytes + unit - 1) / unit * unit;
}

}  // namespace

void* acquire(int64_t bytes, const std::string& op) {
  bytes = bytes > 0 ? bytes : 1;  // empty transfers share the smallest size class
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.free_by_size.lower_bound(bytes);
    if (it != p.free_by_size.end() && it->first <= 2 * rounded(bytes)) {
      void* ptr = it->second;
      p.cached -= it->first;
      p.free_by_size.erase(it);
      return ptr;
    }
  }
  const int64_t size = rounded(bytes);
  void* ptr = nullptr;
  try {
    ptr = cuda::host_alloc_pinned(size, op);
  } catch (const std::exception&) {
    empty();  // cached buffers of other sizes may be what stands in the way: free them, try once more
    ptr = cuda::host_alloc_pinned(size, op);
  }
  std::lock_guard<std::mutex> lock(p.mu);
  p.size_of[ptr] = size;
  return ptr;
}

void release(void* ptr) {
  if (!ptr) return;
  Pool& p = pool();
  std::vector<void*> evicted;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    auto it = p.size_of.find(ptr);
    MOE_INTERNAL_CHECK(it != p.size_of.end(), "pinned::release of a buffer the pool did not hand out");
    const int64_t size = it->second;
    if (size > cache_limit()) {
      p.size_of.erase(it);
      evicted.push_back(ptr);
    } else {
      // Make room by freeing the smallest cached buffers first: the sizes a job keeps asking for
      // are the large ones it just used.
      while (p.cached + size > cache_limit() && !p.free_by_size.empty()) {
        auto small = p.free_by_size.begin();
        p.cached -= small->first;
        p.size_of.erase(small->second);
        evicted.push_back(small->second);
        p.free_by_size.erase(small);
      }
      p.free_by_size.emplace(size, ptr);
      p.cached += size;
    }
  }
  for (void* e : evicted) cuda::host_free_pinned(e);
}

void empty() {
  Pool& p = pool();
  std::multimap<int64_t, void*> taken;
  {
    std::lock_guard<std::mutex> lock(p.mu);
    taken.swap(p.free_by_size);
    for (auto& [size, ptr] : taken) p.size_of.erase(ptr);
    p.cached = 0;
  }
  for (auto& [size, ptr] : taken) cuda::host_free_pinned(ptr);
}

int64_t cached_bytes() {
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mu);
  return p.cached;
}

}  // namespace moe::pinned
