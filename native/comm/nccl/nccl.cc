// The NCCL communicator: one rank per GPU, collectives on the device's current stream
// (cuda::current_stream; withStream(commStream) in JS puts them on a communication stream), NCCL
// opened at run time through nccl_loader. all_to_all(_v) are grouped
// ncclSend/ncclRecv of bytes. Run on 1 and 2 H200s (test/gpu/20-comm, scripts/device-session.sh multi).
//
// Agreement: before each collective the ranks all-gather their call headers (agree(): a few int64
// per rank, ncclAllGather on the same stream through a pinned host buffer) and the host reads them
// (a deliberate host synchronisation per collective, whatever the timeout), so a rank passing other
// sizes gets InvalidArgument on every rank instead of NCCL moving mismatched buffers.
// Timeouts: with timeout_ms > 0 every collective waits on the host for its completion, polling the
// stream's event and ncclCommGetAsyncError; past the deadline it calls ncclCommAbort and throws
// Timeout (a second deliberate host synchronisation). With timeout_ms = 0 the data collective is
// only enqueued (stream-ordered) and the agreement waits without a deadline.
// ncclCommInitRank itself blocks until every rank has joined and is not under the timeout.
#include <chrono>
#include <cstring>
#include <thread>

#include "comm/communicator.h"
#include "comm/nccl/nccl_loader.h"
#include "core/cuda_runtime.h"

namespace moe::comm {

namespace {

nccl::DataType nccl_type(DType d) {
  switch (d) {
    case DType::f32: return nccl::Float32;
    case DType::bf16: return nccl::Bfloat16;
    case DType::f16: return nccl::Float16;
    case DType::i32: return nccl::Int32;
    case DType::i64: return nccl::Int64;
    case DType::u8: return nccl::Uint8;
    case DType::fp8e4m3: return nccl::Uint8;  // moved as bytes; never reduced (checked)
  }
  return nccl::Uint8;
}

nccl::RedOp nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return nccl::Sum;
    case ReduceOp::Max: return nccl::Max;
    case ReduceOp::Min: return nccl::Min;
    case ReduceOp::Avg: return nccl::Avg;
  }
  return nccl::Sum;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(const nccl::Api& api, nccl::Comm comm, int rank, int size, int device, int64_t timeout_ms)
      : api_(api), comm_(comm), rank_(rank), size_(size), device_(device) {
    timeout_ms_ = timeout_ms;
  }
  ~NcclCommunicator() override {
    if (comm_ && !aborted_) api_.commDestroy(comm_);
    if (event_) cuda::event_destroy(device_, event_);
    // After an abort a queued copy may still write the agreement buffer: it is then leaked.
    if (agree_host_ && !aborted_) cuda::host_free_pinned(agree_host_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "nccl"; }

  void all_reduce(const Tensor& t, ReduceOp op) override {
    const char* name = "allReduce";
    prepare(name, t, "tensor");
    check_all_reduce(t, op, name);
    agree(name, CallKind::AllReduce, &t, int64_t(op));
    cuda::DeviceGuard g(device_);
    check(api_.allReduce(t.raw(), t.raw(), size_t(t.numel()), nccl_type(t.dtype()), nccl_op(op), comm_, cstream()), name, "ncclAllReduce");
    wait(name);
  }
  void all_gather(const Tensor& in, const Tensor& out) override {
    const char* name = "allGather";
    prepare(name, in, "input");
    check_all_gather(in, out, size_, name);
    agree(name, CallKind::AllGather, &in, -1);
    cuda::DeviceGuard g(device_);
    check(api_.allGather(in.raw(), out.raw(), size_t(in.nbytes()), nccl::Uint8, comm_, cstream()), name, "ncclAllGather");
    wait(name);
  }
  void broadcast(const Tensor& t, int root) override {
    const char* name = "broadcast";
    prepare(name, t, "tensor");
    check_broadcast(t, root, size_, name);
    agree(name, CallKind::Broadcast, &t, root);
    cuda::DeviceGuard g(device_);
    check(api_.broadcast(t.raw(), t.raw(), size_t(t.nbytes()), nccl::Uint8, root, comm_, cstream()), name, "ncclBroadcast");
    wait(name);
  }
  void barrier() override {
    const char* name = "barrier";
    require_live(name);
    // NCCL has no barrier; the agreement is an all-gather the host waits for, which is one.
    agree(name, CallKind::Barrier, nullptr, -1);
  }
  void all_to_all(const Tensor& send, const Tensor& recv) override {
    const char* name = "allToAll";
    prepare(name, send, "send");
    check_all_to_all(send, recv, size_, name);
    agree(name, CallKind::AllToAll, &send, -1);
    std::vector<int64_t> bytes(size_t(size_), send.nbytes() / size_);
    exchange(name, send, bytes, recv, bytes);
  }
  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows, const Tensor& recv,
                    const std::vector<int64_t>& recv_rows) override {
    const char* name = "allToAllV";
    prepare(name, send, "send");
    check_all_to_all_v(send, send_rows, recv, recv_rows, size_, name);
    agree(name, CallKind::AllToAllV, &send, -1, &send_rows, &recv_rows);
    int64_t rb = row_bytes(send);
    std::vector<int64_t> sb(static_cast<size_t>(size_)), rbytes(static_cast<size_t>(size_));
    for (int p = 0; p < size_; ++p) {
      sb[size_t(p)] = send_rows[size_t(p)] * rb;
      rbytes[size_t(p)] = recv_rows[size_t(p)] * rb;
    }
    exchange(name, send, sb, recv, rbytes);
  }
  std::shared_ptr<Communicator> split(int color, int key) override {
    const char* name = "split";
    require_live(name);
    if (!api_.commSplit) throw_error(ErrorKind::Unavailable, name, "this NCCL has no ncclCommSplit (needs NCCL 2.18 or newer)");
    agree(name, CallKind::Split, nullptr, -1);
    cuda::DeviceGuard g(device_);
    nccl::Comm out = nullptr;
    check(api_.commSplit(comm_, color < 0 ? -1 : color, key, &out, nullptr), name, "ncclCommSplit");
    if (!out) return nullptr;
    int r = 0, n = 0;
    // ncclCommUserRank/Count are not in our ABI table: learn rank and size with two tiny collectives.
    auto c = std::make_shared<NcclCommunicator>(api_, out, 0, 0, device_, timeout_ms_);
    c->discover_rank_and_size(rank_, &r, &n);
    return c;
  }
  void abort() override {
    if (!aborted_ && comm_) api_.commAbort(comm_);
    aborted_ = true;
  }

  // After ncclCommSplit: count the members and find our position with all-reduces of one-hot
  // vectors indexed by the parent rank (small; only at split time).
  void discover_rank_and_size(int parent_rank, int* r, int* n) {
    (void)r;
    (void)n;
    const char* name = "split";
    // Each member contributes 1: the sum is the size. Our rank: members with a lower key/parent
    // rank are not known without the keys, so NCCL's own numbering is read by all-gathering parent
    // ranks and finding ours in the result (NCCL orders by key, then parent rank).
    Tensor one = Tensor::empty({1}, DType::i32, cpu_device(), name);
    *one.data<int32_t>() = 1;
    Tensor d_one = Tensor::empty({1}, DType::i32, cuda_device(device_), name);
    cuda::memcpy_async(d_one.raw(), one.raw(), 4, cuda::HostToDevice, stream(), name);
    check(api_.allReduce(d_one.raw(), d_one.raw(), 1, nccl::Int32, nccl::Sum, comm_, cstream()), name, "ncclAllReduce");
    cuda::memcpy_async(one.raw(), d_one.raw(), 4, cuda::DeviceToHost, stream(), name);
    wait(name, true);
    size_ = *one.data<int32_t>();
    Tensor mine = Tensor::empty({1}, DType::i32, cpu_device(), name);
    *mine.data<int32_t>() = parent_rank;
    Tensor d_mine = Tensor::empty({1}, DType::i32, cuda_device(device_), name);
    Tensor d_all = Tensor::empty({size_}, DType::i32, cuda_device(device_), name);
    Tensor all = Tensor::empty({size_}, DType::i32, cpu_device(), name);
    cuda::memcpy_async(d_mine.raw(), mine.raw(), 4, cuda::HostToDevice, stream(), name);
    check(api_.allGather(d_mine.raw(), d_all.raw(), 1, nccl::Int32, comm_, cstream()), name, "ncclAllGather");
    cuda::memcpy_async(all.raw(), d_all.raw(), 4 * size_, cuda::DeviceToHost, stream(), name);
    wait(name, true);
    // ncclAllGather places member i's value at i, i.e. in NCCL's rank order: find ours.
    for (int i = 0; i < size_; ++i)
      if (all.data<int32_t>()[i] == parent_rank) rank_ = i;
  }

 protected:
  void gather_words(const char* op, const int64_t* mine, int64_t* all, int64_t words) override {
    cuda::DeviceGuard g(device_);
    const int64_t n = size_, bytes = words * int64_t(sizeof(int64_t));
    // Pinned: a copy into pageable memory would block the host until the all-gather ends, outside
    // the timeout. Slot 0 holds ours, slots 1..n everyone's. Grown only for the rare second round.
    if (agree_words_ < (n + 1) * words) {
      if (agree_host_) cuda::host_free_pinned(agree_host_);  // idle: every earlier use was waited for
      agree_host_ = static_cast<int64_t*>(cuda::host_alloc_pinned((n + 1) * bytes, op));
      agree_dev_ = Tensor::empty({(n + 1) * words}, DType::i64, cuda_device(device_), op);
      agree_words_ = (n + 1) * words;
    }
    std::memcpy(agree_host_, mine, size_t(bytes));
    auto* dev = static_cast<int64_t*>(agree_dev_.raw());
    cuda::memcpy_async(dev, agree_host_, bytes, cuda::HostToDevice, stream(), op);
    check(api_.allGather(dev, dev + words, size_t(words), nccl::Int64, comm_, cstream()), op, "ncclAllGather");
    cuda::memcpy_async(agree_host_ + words, dev + words, n * bytes, cuda::DeviceToHost, stream(), op);
    wait(op, true);
    std::memcpy(all, agree_host_ + words, size_t(n * bytes));
  }

 private:
  void prepare(const char* name, const Tensor& t, const char* arg) {
    require_live(name);
    check_tensor(t, name, arg);
    MOE_ARG_CHECK(t.device().is_cuda() && t.device().index == device_, name, "'", arg, "' ", t.describe(), " must be on cuda:", device_,
                  ", this NCCL communicator's device");
  }
  void* stream() { return cuda::current_stream(device_); }
  nccl::CudaStream cstream() { return static_cast<nccl::CudaStream>(stream()); }

  void exchange(const char* name, const Tensor& send, const std::vector<int64_t>& sb, const Tensor& recv,
                const std::vector<int64_t>& rbytes) {
    cuda::DeviceGuard g(device_);
    int64_t so = 0, ro = 0;
    check(api_.groupStart(), name, "ncclGroupStart");
    for (int p = 0; p < size_; ++p) {
      if (sb[size_t(p)] > 0)
        check(api_.send(static_cast<const char*>(send.raw()) + so, size_t(sb[size_t(p)]), nccl::Uint8, p, comm_, cstream()), name,
              "ncclSend");
      if (rbytes[size_t(p)] > 0)
        check(api_.recv(static_cast<char*>(recv.raw()) + ro, size_t(rbytes[size_t(p)]), nccl::Uint8, p, comm_, cstream()), name,
              "ncclRecv");
      so += sb[size_t(p)];
      ro += rbytes[size_t(p)];
    }
    check(api_.groupEnd(), name, "ncclGroupEnd");
    wait(name);
  }

  // Overload taking a raw stream for the API calls that want nccl::CudaStream.
  nccl::Result check(nccl::Result r, const char* name, const char* what) {
    if (r != nccl::Success && r != nccl::InProgress) {
      const char* last = api_.getLastError ? api_.getLastError(comm_) : "";
      throw_error(ErrorKind::Nccl, name,
                  cat(what, " failed on rank ", rank_, ": ", api_.getErrorString(r), (last && *last) ? cat(" (", last, ")") : ""));
    }
    return r;
  }

  void wait(const char* name, bool force = false) {
    if (timeout_ms_ <= 0 && !force) return;
    if (!event_) event_ = cuda::event_create(device_, false);
    cuda::event_record(device_, event_, stream());
    auto start = std::chrono::steady_clock::now();
    int64_t spins = 0;
    while (!cuda::event_query(event_)) {
      // Busy-poll for the first few milliseconds (a dispatch's exchanges take ~0.1-1 ms, and a
      // sleep on a VM can overshoot by a tenth of a millisecond each time), then sleep in growing
      // steps: 20 us up to 100 ms, then 1 ms.
      const auto waited = std::chrono::steady_clock::now() - start;
      ++spins;
      if (waited < std::chrono::milliseconds(5) && spins % 64 != 0) continue;
      nccl::Result async = nccl::Success;
      api_.commGetAsyncError(comm_, &async);
      if (async != nccl::Success && async != nccl::InProgress) {
        abort();
        throw_error(ErrorKind::Nccl, name,
                    cat("NCCL reported an asynchronous error on rank ", rank_, ": ", api_.getErrorString(async),
                        "; the communicator is now aborted"));
      }
      if (timeout_ms_ > 0 && std::chrono::steady_clock::now() - start > std::chrono::milliseconds(timeout_ms_)) {
        abort();
        throw_error(ErrorKind::Timeout, name,
                    cat("timed out after ", timeout_ms_, " ms on rank ", rank_, " of ", size_,
                        " (nccl); peers not heard from: unknown (NCCL does not say); the communicator is now aborted"));
      }
      if (waited >= std::chrono::milliseconds(5))
        std::this_thread::sleep_for(std::chrono::microseconds(waited < std::chrono::milliseconds(100) ? 20 : 1000));
    }
  }

  const nccl::Api& api_;
  nccl::Comm comm_;
  int rank_, size_, device_;
  void* event_ = nullptr;
  int64_t* agree_host_ = nullptr;  // pinned
  Tensor agree_dev_;
  int64_t agree_words_ = 0;
};

}  // namespace

std::shared_ptr<Communicator> make_nccl(int rank, int size, const std::string& unique_id, int device, int64_t timeout_ms) {
  const char* op = "commNccl";
  MOE_ARG_CHECK(size >= 1, op, "'size' ", size, " must be at least 1");
  MOE_ARG_CHECK(rank >= 0 && rank < size, op, "'rank' ", rank, " is not in [0, ", size, ")");
  MOE_ARG_CHECK(unique_id.size() == sizeof(nccl::UniqueId), op, "'uniqueId' has ", unique_id.size(), " bytes; an NCCL unique id has ",
                sizeof(nccl::UniqueId), " (from ncclUniqueId() on rank 0)");
  MOE_ARG_CHECK(timeout_ms >= 0, op, "'timeoutMs' ", timeout_ms, " is negative (0 means no timeout)");
  cuda::require_device(cuda_device(device), op);
  const nccl::Api& api = nccl::api(op);
  nccl::UniqueId id;
  std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
  cuda::DeviceGuard g(device);
  nccl::Comm comm = nullptr;
  nccl::Result r = api.commInitRank(&comm, size, id, rank);
  if (r != nccl::Success)
    throw_error(ErrorKind::Nccl, op,
                cat("ncclCommInitRank(rank ", rank, " of ", size, ", cuda:", device, ") failed: ", api.getErrorString(r)));
  return std::make_shared<NcclCommunicator>(api, comm, rank, size, device, timeout_ms);
}

std::string nccl_unique_id() {
  const nccl::Api& api = nccl::api("ncclUniqueId");
  nccl::UniqueId id;
  nccl::Result r = api.getUniqueId(&id);
  if (r != nccl::Success) throw_error(ErrorKind::Nccl, "ncclUniqueId", cat("ncclGetUniqueId failed: ", api.getErrorString(r)));
  return std::string(id.internal, sizeof(id.internal));
}

}  // namespace moe::comm
