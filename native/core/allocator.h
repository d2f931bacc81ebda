// Memory for tensors. Host memory is plain aligned malloc with counters. Device memory goes through
// a caching allocator: freed blocks stay reserved and are reused by later allocations on the same
// stream, so the hot path makes no cudaMalloc/cudaFree calls (both synchronise the device).
#pragma once
#include <cstdint>
#include <string>
#include <vector>
#include "core/device.h"

namespace moe {

struct MemoryStats {
  int64_t live_bytes = 0;        // bytes in blocks handed out and not yet freed (rounded sizes)
  int64_t peak_bytes = 0;        // high-water mark of live_bytes since the last reset
  int64_t cached_bytes = 0;      // bytes held in free blocks, ready for reuse (host: pinned staging buffers)
  int64_t reserved_bytes = 0;    // live + cached + blocks waiting on other streams
  int64_t live_allocations = 0;  // blocks handed out now
  int64_t allocations = 0;       // allocate() calls that returned memory, ever
  int64_t cache_hits = 0;        // of those, served from the cache
  int64_t device_mallocs = 0;    // cudaMalloc calls (or malloc on the host)
  int64_t out_of_memory = 0;     // allocation failures raised to the caller
  int64_t graph_pool_bytes = 0;  // bytes in blocks owned by CUDA-graph memory pools, live or free (part of reserved)
};

// Bytes are requested for `op` (named in errors). On a CUDA device `stream` is the stream the
// memory will first be used on; the block is only reused on that stream unless record_stream()
// says otherwise, in which case reuse waits until the other streams' work has completed.
// JavaScript reaches record_stream as Tensor.recordStream; lib/parallel/overlap.ts calls it for every
// tensor that crosses between the compute stream and a communication stream. The pool keeps the
// raw stream handles and records events on them when such a block is freed, possibly long after
// the JS Stream was disposed or collected: that is safe because streams are pooled and never
// destroyed (cuda::stream_acquire / stream_release in core/cuda_runtime.h).
void* allocate(const Device& device, int64_t bytes, void* stream, const std::string& op);
void deallocate(const Device& device, void* ptr);
void record_stream(const Device& device, void* ptr, void* stream);

MemoryStats memory_stats(const Device& device);
void reset_peak_memory(const Device& device);
// Returns every cached device block to the driver (a device synchronisation).
void empty_cache(const Device& device);

// ---- CUDA-graph memory pools (core/graph.h drives them; docs/serving.md describes them) ----
// While a capture is open, allocations on any stream taking part in it (cudaStreamGetCaptureInfo
// gives the same capture id) come from a pool private to that capture, never from the general
// cache: the graph bakes their addresses in, and its replays write there, so no one else may own
// that memory while the graph lives. The pool grows by cudaMalloc, in relaxed capture mode (a
// cudaMalloc is not a stream operation, so the capture does not record it; the memory simply
// stays the graph's). A block freed during the capture goes back to its pool and may be handed
// out again in the same capture, on the same stream (stream order holds on every replay); a
// block used on other streams too (record_stream) is not reused. A block of the general cache
// allocated on a capturing stream before the capture and freed during it joins the pool (the
// graph may read it) without being reused there. After the capture, nothing is allocated from
// the pool: its blocks, live ones (the graph's outputs the caller keeps) included, stay the
// graph's until graph_pool_release, which hands the free ones to the general cache, marked as
// used on `streams` (the streams the graph was replayed on) so that no one gets them before
// those replays finish, and leaves live ones with their tensors (marked the same way). Once
// those streams and the capture stream have passed what was queued on them, a released block
// serves any stream (it would otherwise wait for its capture stream, which may never allocate
// again); so does a live one, freed later.
// While any capture is open on a device, the allocator records no events and queries none there
// (illegal on a capturing stream): cross-stream frees are deferred until the last capture ends,
// and the cache is not released to retry a failed cudaMalloc.
uint64_t graph_pool_begin(const Device& device, unsigned long long capture_id);
// The capture is over (ended or aborted): nothing more is allocated from the pool.
void graph_pool_end(const Device& device, uint64_t pool);
// Bytes the pool holds (its blocks, live or free).
int64_t graph_pool_bytes(const Device& device, uint64_t pool);
void graph_pool_release(const Device& device, uint64_t pool, const std::vector<void*>& streams);

// The largest single allocation accepted before even trying (guards overflowing size arithmetic).
constexpr int64_t kMaxAllocationBytes = int64_t(1) << 46;  // 64 TiB

}  // namespace moe
