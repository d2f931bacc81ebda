// parallel_for: splits [0, n) into contiguous chunks over worker threads for the CPU paths. Each
// index is handled by exactly one thread, in the same order as the serial loop, so results are
// bit-identical to running serially. Small ranges (n·cost below a threshold) stay on the caller's
// thread. MOE_EP_CPU_THREADS caps the threads (default: the hardware's).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <thread>
#include <vector>

namespace moe {

inline int cpu_threads() {
  static const int n = [] {
    if (const char* v = std::getenv("MOE_EP_CPU_THREADS")) {
      int t = std::atoi(v);
      if (t > 0) return t;
    }
    unsigned hw = std::thread::hardware_concurrency();
    return hw > 0 ? int(std::min(hw, 64u)) : 1;
  }();
  return n;
}

// fn(begin, end) over disjoint chunks; `cost` is the rough work per index (multiply-adds), used to
// skip threading when the whole job is too small to pay for starting threads (~20 µs each).
template <typename Fn> void parallel_for(int64_t n, int64_t cost, Fn&& fn) {
  const int64_t kMinWorkPerThread = int64_t(1) << 18;
  int threads = int(std::min<int64_t>(cpu_threads(), std::max<int64_t>(1, n * std::max<int64_t>(cost, 1) / kMinWorkPerThread)));
  threads = int(std::min<int64_t>(threads, n));
  if (threads <= 1) {
    if (n > 0) fn(int64_t(0), n);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  const int64_t chunk = (n + threads - 1) / threads;
  for (int t = 1; t < threads; ++t) {
    pool.emplace_back([&, t] {
      try {
        int64_t b = t * chunk, e = std::min(n, b + chunk);
        if (b < e) fn(b, e);
      } catch (...) {
        errors[size_t(t)] = std::current_exception();
      }
    });
  }
  try {
    fn(int64_t(0), std::min(n, chunk));
  } catch (...) {
    errors[0] = std::current_exception();
  }
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace moe
