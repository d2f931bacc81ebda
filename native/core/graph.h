// CUDA graphs: the work queued on one stream, captured once and replayed as one launch.
//
// Capture runs in thread-local mode (cudaStreamCaptureModeThreadLocal): potentially unsafe CUDA
// calls (a synchronous cudaMemcpy, a synchronisation, a cudaMalloc outside the allocator's relaxed
// scope) fail on the capturing thread, where every op of this process is queued, and break the
// capture, while other threads (NCCL's and MPI's helpers, other libraries) keep working: global
// mode would make their cudaMalloc and synchronisations fail for as long as a capture is open.
// Relaxed mode would let those calls through silently. The caching allocator switches to relaxed
// mode only around its own cudaMalloc (growing the graph's pool is deliberate). On top of what CUDA
// refuses, core/cuda_runtime.h refuses host waits and host<->device copies while this thread
// captures, naming the op.
//
// Memory: allocations during the capture come from a pool private to the graph (allocator.h),
// released when the graph is destroyed. Tensors made before the capture that the graph reads or
// writes are the caller's to keep alive; retain() hands their storage to the graph, which then
// frees it only once it is destroyed and its replays are done.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/device.h"

namespace moe {

class Storage;

class CudaGraph {
 public:
  // Begins capturing `stream` (a stream of the process's pool, not the legacy default stream) on
  // `device`. Throws Unavailable in a CPU-only build, InvalidArgument when this thread already has
  // a capture open or the stream is already capturing.
  CudaGraph(const Device& device, void* stream);
  ~CudaGraph();
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  // Ends the capture and instantiates the graph. The capture is closed whatever happens; when
  // something broke it (a refused op, a failed CUDA call, a rule of stream capture), throws Cuda
  // naming what did, and the graph holds nothing (its pool is released).
  void end_capture();
  // Ends the capture and discards it (the work that was to be captured failed). Never throws;
  // returns what broke the capture, "" when nothing did.
  std::string abort_capture();
  // Launches the graph on `stream` (nullptr: the legacy default stream). Ordered after the work
  // queued there before, and after earlier launches of this graph.
  void replay(void* stream);
  // The graph keeps `storage` alive until destroyed, then frees it ordered after its replays.
  void retain(std::shared_ptr<Storage> storage);
  // Frees the executable graph, its pool and what it retains (idempotent). Replays still queued
  // finish first: the driver frees an executable graph in flight once it completes, and the
  // memory is reused only after the streams it was replayed on pass that point.
  void destroy();

  bool capturing() const { return state_ == State::Capturing; }
  bool ready() const { return state_ == State::Ready; }
  const Device& device() const { return device_; }
  int64_t pool_bytes() const;
  int64_t node_count() const { return nodes_; }
  int64_t replays() const { return replays_; }

 private:
  enum class State { Capturing, Ready, Failed, Destroyed };
  void close(bool keep);  // ends the capture; keep: instantiate, else discard

  Device device_;
  void* stream_ = nullptr;
  void* graph_ = nullptr;  // cudaGraph_t
  void* exec_ = nullptr;   // cudaGraphExec_t
  uint64_t pool_ = 0;
  State state_ = State::Failed;
  std::string broken_;
  int64_t nodes_ = 0;
  int64_t replays_ = 0;
  std::vector<void*> replay_streams_;
  std::vector<std::shared_ptr<Storage>> retained_;
};

}  // namespace moe
