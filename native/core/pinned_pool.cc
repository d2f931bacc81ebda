#include "core/pinned_pool.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>

#include "core/cuda_runtime.h"
#include "core/error.h"

namespace moe::pinned {
namespace {

struct Pool {
  std::mutex mu;
  std::multimap<int64_t, void*> free_by_size;   // cached buffers, by size
  std::unordered_map<void*, int64_t> size_of;   // every buffer handed out or cached
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
  const int64_t size = rounded(bytes > 0 ? bytes : 1);
  void* ptr = cuda::host_alloc_pinned(size, op);
  std::lock_guard<std::mutex> lock(p.mu);
  p.size_of[ptr] = size;
  return ptr;
}

void release(void* ptr) {
  if (!ptr) return;
  Pool& p = pool();
  std::unique_lock<std::mutex> lock(p.mu);
  auto it = p.size_of.find(ptr);
  MOE_INTERNAL_CHECK(it != p.size_of.end(), "pinned::release of a buffer the pool did not hand out");
  const int64_t size = it->second;
  if (p.cached + size <= cache_limit()) {
    p.free_by_size.emplace(size, ptr);
    p.cached += size;
    return;
  }
  p.size_of.erase(it);
  lock.unlock();
  cuda::host_free_pinned(ptr);
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
