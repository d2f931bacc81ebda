// Pinned (page-locked) host buffers for staging device data through host memory (the MPI
// backend). cudaMallocHost pins every page, which costs tens of milliseconds per 100 MB, and
// cudaFreeHost as much again: pinning afresh for each collective made a 470 MB dispatch on two
// ranks sharing an H200 take 1.7 s. Buffers are therefore kept and reused: acquire() hands out a
// cached buffer that is large enough (but not more than twice the request), else pins a new one;
// release() returns it. Freed buffers stay cached up to a limit (MOE_EP_PINNED_CACHE_MB, default
// 8192; the smallest go first when a new one needs room); emptyCache('cpu') returns them all, and a
// failed pinning frees the cache and tries once more.
#pragma once
#include <cstdint>
#include <string>

namespace moe::pinned {

// A pinned buffer of at least `bytes` bytes (named `op` in errors). CUDA builds only.
void* acquire(int64_t bytes, const std::string& op);
// Back to the cache (or freed, past the cache's limit).
void release(void* ptr);
// Frees every cached buffer (those handed out stay valid).
void empty();
// Bytes held in cached buffers now.
int64_t cached_bytes();

}  // namespace moe::pinned
