#include "core/graph.h"

#include <algorithm>

#include "core/allocator.h"
#include "core/cuda_runtime.h"
#include "core/tensor.h"

#if MOE_EP_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace moe {

namespace {
constexpr const char* kCapture = "CudaGraph.capture";
}

#if MOE_EP_WITH_CUDA

CudaGraph::CudaGraph(const Device& device, void* stream) : device_(device), stream_(stream) {
  MOE_ARG_CHECK(device.is_cuda(), kCapture, "CUDA graphs capture work queued on a CUDA stream; 'stream' is on ", device.str());
  cuda::require_device(device, kCapture);
  MOE_ARG_CHECK(stream != nullptr, kCapture, "the legacy default stream cannot be captured: pass a Stream");
  MOE_ARG_CHECK(!cuda::capture_open_on_this_thread(), kCapture,
                "this thread is already capturing a CUDA graph (captures do not nest; end the open one first)");
  cuda::DeviceGuard guard(device.index);
  cudaStream_t s = cudaStream_t(stream);
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  cuda::check(cudaStreamIsCapturing(s, &status), kCapture, "cudaStreamIsCapturing");
  MOE_ARG_CHECK(status == cudaStreamCaptureStatusNone, kCapture, "the stream is already being captured");
  cuda::check(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal), kCapture, "cudaStreamBeginCapture");
  // From here until the pool exists, a failure must end the capture it began.
  auto end_begun_capture = [s] {
    cudaGraph_t g = nullptr;
    if (cudaStreamEndCapture(s, &g) != cudaSuccess) cudaGetLastError();
    if (g) cudaGraphDestroy(g);
  };
  unsigned long long id = 0;
  cudaError_t e = cudaStreamGetCaptureInfo(s, &status, &id);
  if (e != cudaSuccess) {
    cudaGetLastError();
    end_begun_capture();
    cuda::check(e, kCapture, "cudaStreamGetCaptureInfo");
  }
  try {
    pool_ = graph_pool_begin(device, id);
  } catch (...) {
    end_begun_capture();
    throw;
  }
  cuda::capture_opened(stream);
  state_ = State::Capturing;
}

void CudaGraph::close(bool keep) {
  MOE_INTERNAL_CHECK(state_ == State::Capturing, "CudaGraph: no capture is open");
  cudaGraph_t graph = nullptr;
  cudaError_t e = cudaStreamEndCapture(cudaStream_t(stream_), &graph);
  if (e != cudaSuccess) cudaGetLastError();
  std::string broken = cuda::capture_closed();
  graph_pool_end(device_, pool_);
  if (!keep || e != cudaSuccess || graph == nullptr || !broken.empty()) {
    if (graph) cudaGraphDestroy(graph);
    state_ = State::Failed;
    graph_pool_release(device_, pool_, {});
    pool_ = 0;
    if (broken.empty() && e != cudaSuccess) broken = cat("cudaStreamEndCapture, which failed with ", cuda::error_string(e));
    broken_ = broken;
    if (!keep) return;
    if (!broken.empty()) {
      throw_error(ErrorKind::Cuda, kCapture,
                  cat("the capture was broken by ", broken,
                      ". Nothing was captured and the stream is no longer capturing. A captured step must not wait for the "
                      "host (synchronize, toArray, item, counts read on the host), copy between host and device, or work on "
                      "the legacy default stream; allocations are fine (they come from the graph's pool)"));
    }
    throw_error(ErrorKind::Cuda, kCapture, "cudaStreamEndCapture returned no graph; nothing was captured");
  }
  size_t n = 0;
  if (cudaGraphGetNodes(graph, nullptr, &n) != cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  nodes_ = int64_t(n);
  cudaGraphExec_t exec = nullptr;
  e = cudaGraphInstantiateWithFlags(&exec, graph, 0);
  if (e != cudaSuccess) {
    cudaGetLastError();
    cudaGraphDestroy(graph);
    state_ = State::Failed;
    graph_pool_release(device_, pool_, {});
    pool_ = 0;
    throw_error(ErrorKind::Cuda, kCapture, cat("cudaGraphInstantiate failed: ", cuda::error_string(e)));
  }
  graph_ = graph;
  exec_ = exec;
  state_ = State::Ready;
}

void CudaGraph::end_capture() { close(true); }

std::string CudaGraph::abort_capture() {
  if (state_ != State::Capturing) return broken_;
  try {
    close(false);
  } catch (const std::exception&) {
    // close(false) throws only on a broken invariant; the capture bookkeeping is closed already.
    state_ = State::Failed;
  }
  return broken_;
}

void CudaGraph::replay(void* stream) {
  const char* op = "CudaGraph.replay";
  if (state_ == State::Destroyed) throw_error(ErrorKind::Disposed, op, "the graph was disposed");
  MOE_ARG_CHECK(state_ == State::Ready, op, "the graph was not captured successfully");
  MOE_ARG_CHECK(!cuda::capture_open_on_this_thread(), op, "cannot replay a graph while this thread is capturing one");
  cuda::DeviceGuard guard(device_.index);
  cuda::check(cudaGraphLaunch(cudaGraphExec_t(exec_), cudaStream_t(stream)), op, "cudaGraphLaunch");
  ++replays_;
  if (std::find(replay_streams_.begin(), replay_streams_.end(), stream) == replay_streams_.end()) replay_streams_.push_back(stream);
}

void CudaGraph::destroy() {
  if (state_ == State::Destroyed) return;
  if (state_ == State::Capturing) abort_capture();
  {
    // Not a stream operation: allowed even if another capture is open on this thread.
    cuda::RelaxedCaptureMode relaxed(cuda::capture_open_on_this_thread());
    if (exec_ && cudaGraphExecDestroy(cudaGraphExec_t(exec_)) != cudaSuccess) cudaGetLastError();
    if (graph_ && cudaGraphDestroy(cudaGraph_t(graph_)) != cudaSuccess) cudaGetLastError();
  }
  exec_ = nullptr;
  graph_ = nullptr;
  state_ = State::Destroyed;
  if (pool_) {
    uint64_t pool = pool_;
    pool_ = 0;
    graph_pool_release(device_, pool, replay_streams_);
  }
  // Retained tensors: reused only once the streams the graph ran on have passed its replays.
  for (auto& storage : retained_) {
    if (storage && storage->data())
      for (void* s : replay_streams_) record_stream(storage->device(), storage->data(), s);
  }
  retained_.clear();
}

#else  // CPU-only build

CudaGraph::CudaGraph(const Device& device, void* stream) : device_(device), stream_(stream) {
  throw_error(ErrorKind::Unavailable, kCapture,
              "CUDA graphs need CUDA, and this moe-ep addon was built without it (nvcc was not found or MOE_EP_CUDA=off at "
              "build time); install the CUDA toolkit and rebuild from source (MOE_EP_BUILD_FROM_SOURCE=1 npm rebuild moe-ep)");
}
void CudaGraph::close(bool) {}
void CudaGraph::end_capture() {}
std::string CudaGraph::abort_capture() { return broken_; }
void CudaGraph::replay(void*) { throw_error(ErrorKind::Unavailable, "CudaGraph.replay", "this moe-ep addon was built without CUDA"); }
void CudaGraph::destroy() {
  retained_.clear();
  state_ = State::Destroyed;
}

#endif

CudaGraph::~CudaGraph() {
  try {
    destroy();
  } catch (...) {
    // Never from a destructor (finalizers run it); the failure was a broken invariant.
  }
}

void CudaGraph::retain(std::shared_ptr<Storage> storage) {
  MOE_ARG_CHECK(state_ == State::Capturing || state_ == State::Ready, "CudaGraph.retain", "the graph was disposed or failed");
  MOE_ARG_CHECK(!storage || storage->device() == device_, "CudaGraph.retain", "the tensor is on ", storage->device().str(),
                " but the graph is on ", device_.str());
  retained_.push_back(std::move(storage));
}

int64_t CudaGraph::pool_bytes() const { return graph_pool_bytes(device_, pool_); }

}  // namespace moe
