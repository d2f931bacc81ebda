// The MPI communicator as the addon sees it: opens moe_ep_mpi.so (next to moe_ep.node, or
// MOE_EP_MPI_LIBRARY) on first use with RTLD_NOW | RTLD_GLOBAL — OpenMPI's plugins resolve libmpi's
// symbols globally — and calls it through the C table in mpi/mpi_api.h. CUDA tensors are staged
// through pinned host memory (cudaMallocHost); bf16/f16 reductions go through an f32 host copy.
#include <dlfcn.h>

#include <cstdlib>
#include <cstring>
#include <mutex>

#include "comm/communicator.h"
#include "comm/mpi/mpi_api.h"
#include "core/cuda_runtime.h"
#include "core/pinned_pool.h"
#include "ops/basic/copy/copy.h"

#ifndef MOE_EP_WITH_MPI
#define MOE_EP_WITH_MPI 0
#endif

namespace moe::comm {

namespace {

const moe_mpi_api* g_mpi = nullptr;
MpiStatus g_status;

std::string addon_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&addon_dir), &info) && info.dli_fname) {
    std::string p = info.dli_fname;
    auto slash = p.rfind('/');
    return slash == std::string::npos ? "." : p.substr(0, slash);
  }
  return ".";
}

void load() {
  g_status.built = MOE_EP_WITH_MPI != 0;
  const char* env = std::getenv("MOE_EP_MPI_LIBRARY");
  g_status.path = (env && *env) ? env : addon_dir() + "/moe_ep_mpi.so";
  if (!g_status.built && !(env && *env)) {
    g_status.error =
        "this addon was built without MPI (no MPI headers were found at build time: install an MPI such as "
        "OpenMPI's libopenmpi-dev, or set MOE_EP_MPI_LIBRARY to a moe_ep_mpi.so, then rebuild from source: MOE_EP_BUILD_FROM_SOURCE=1 npm "
        "rebuild moe-ep)";
    return;
  }
  void* lib = dlopen(g_status.path.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (!lib) {
    const char* e = dlerror();
    g_status.error = cat("the MPI backend library ", g_status.path, " could not be opened: ", e ? e : "dlopen failed",
                         " (is libmpi installed and on the library path? OpenMPI: apt-get install openmpi-bin libopenmpi-dev)");
    return;
  }
  auto fn = reinterpret_cast<moe_ep_mpi_api_fn>(dlsym(lib, "moe_ep_mpi_api"));
  const moe_mpi_api* api = fn ? fn() : nullptr;
  if (!api || api->abi_version != MOE_MPI_ABI_VERSION) {
    g_status.error = cat(g_status.path, " is not a moe-ep MPI backend of ABI version ", MOE_MPI_ABI_VERSION, "; rebuild the addon");
    return;
  }
  g_mpi = api;
  g_status.loaded = true;
}

const moe_mpi_api& mpi_api(const char* op) {
  static std::once_flag once;
  std::call_once(once, load);
  if (!g_mpi) throw_error(ErrorKind::Unavailable, op, "MPI is unavailable: " + g_status.error);
  return *g_mpi;
}

// Memory handed to a call that timed out or failed may still be written by MPI later; it is kept
// alive here for the life of the process instead of being freed.
std::vector<Tensor>& quarantine() {
  static auto* q = new std::vector<Tensor>();
  return *q;
}

// A host view of a tensor: the tensor itself on the CPU; a pinned staging copy for CUDA tensors.
class Host {
 public:
  Host(const Tensor& t, bool copy_in, const char* op) : t_(t), op_(op) {
    if (t.device().is_cpu()) {
      ptr_ = t.raw();
      return;
    }
#if MOE_EP_WITH_CUDA
    pinned_ = pinned::acquire(t.nbytes(), op);  // reused across calls: pinning is slow
    ptr_ = pinned_;
    if (copy_in && t.nbytes()) {
      void* s = cuda::current_stream(t.device().index);
      cuda::memcpy_async(pinned_, t.raw(), t.nbytes(), cuda::DeviceToHost, s, op);
      cuda::stream_synchronize(t.device().index, s, op);  // deliberate: MPI reads host memory
    }
#else
    (void)copy_in;
    throw_error(ErrorKind::Unavailable, op, "CUDA tensors need a CUDA build");
#endif
  }
  ~Host() {
#if MOE_EP_WITH_CUDA
    if (pinned_ && !leak_) pinned::release(pinned_);
#endif
  }
  Host(const Host&) = delete;
  Host& operator=(const Host&) = delete;
  void* ptr() const { return ptr_; }
  void copy_out() {
#if MOE_EP_WITH_CUDA
    if (pinned_ && t_.nbytes()) {
      void* s = cuda::current_stream(t_.device().index);
      cuda::memcpy_async(t_.raw(), pinned_, t_.nbytes(), cuda::HostToDevice, s, op_);
      cuda::stream_synchronize(t_.device().index, s, op_);  // the staging buffer is reused/freed next
    }
#endif
  }
  void leak() {
    leak_ = true;
    quarantine().push_back(t_);
  }

 private:
  Tensor t_;
  const char* op_;
  void* ptr_ = nullptr;
  void* pinned_ = nullptr;
  bool leak_ = false;
};

class MpiCommunicator final : public Communicator {
 public:
  MpiCommunicator(const moe_mpi_api& api, moe_mpi_comm* c, int64_t timeout_ms) : api_(api), c_(c) {
    timeout_ms_ = timeout_ms;
    rank_ = api.rank(c);
    size_ = api.size(c);
  }
  ~MpiCommunicator() override { api_.free(c_); }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const char* backend() const override { return "mpi"; }

  void all_reduce(const Tensor& t, ReduceOp op) override {
    const char* name = "allReduce";
    require_live(name);
    check_all_reduce(t, op, name);
    agree(name, CallKind::AllReduce, &t, int64_t(op));
    DType d = t.dtype();
    if (d == DType::bf16 || d == DType::f16) {  // no MPI type: reduce an f32 host copy
      Tensor tmp = Tensor::empty(t.shape(), DType::f32, cpu_device(), name);
      ops::copy(tmp, t);
      Host h(tmp, false, name);
      run(name, {&h},
          [&](moe_mpi_error* e) { return api_.all_reduce(c_, tmp.raw(), tmp.numel(), MOE_MPI_F32, int(op), timeout_ms_, name, e); });
      ops::copy(t, tmp);
      return;
    }
    Host h(t, true, name);
    run(name, {&h}, [&](moe_mpi_error* e) { return api_.all_reduce(c_, h.ptr(), t.numel(), int(d), int(op), timeout_ms_, name, e); });
    h.copy_out();
  }

  void all_gather(const Tensor& in, const Tensor& out) override {
    const char* name = "allGather";
    require_live(name);
    check_all_gather(in, out, size_, name);
    agree(name, CallKind::AllGather, &in, -1);
    Host hi(in, true, name), ho(out, false, name);
    run(name, {&hi, &ho}, [&](moe_mpi_error* e) { return api_.all_gather(c_, hi.ptr(), ho.ptr(), in.nbytes(), timeout_ms_, name, e); });
    ho.copy_out();
  }

  void broadcast(const Tensor& t, int root) override {
    const char* name = "broadcast";
    require_live(name);
    check_broadcast(t, root, size_, name);
    agree(name, CallKind::Broadcast, &t, root);
    Host h(t, rank_ == root, name);
    run(name, {&h}, [&](moe_mpi_error* e) { return api_.broadcast(c_, h.ptr(), t.nbytes(), root, timeout_ms_, name, e); });
    if (rank_ != root) h.copy_out();
  }

  // The agreement is itself a barrier: it completes once every rank has sent its header.
  void barrier() override {
    const char* name = "barrier";
    require_live(name);
    agree(name, CallKind::Barrier, nullptr, -1);
  }

  void all_to_all(const Tensor& send, const Tensor& recv) override {
    const char* name = "allToAll";
    require_live(name);
    check_all_to_all(send, recv, size_, name);
    agree(name, CallKind::AllToAll, &send, -1);
    std::vector<int64_t> bytes(size_t(size_), send.nbytes() / size_);
    exchange(name, send, bytes, recv, bytes);
  }

  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows, const Tensor& recv,
                    const std::vector<int64_t>& recv_rows) override {
    const char* name = "allToAllV";
    require_live(name);
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
    agree(name, CallKind::Split, nullptr, -1);  // every rank has arrived before the blocking MPI_Comm_split
    moe_mpi_error e{};
    moe_mpi_comm* c = api_.split(c_, color, key, &e);
    if (!c && e.code != MOE_MPI_OK) raise(name, e);
    if (!c) return nullptr;
    return std::make_shared<MpiCommunicator>(api_, c, timeout_ms_);
  }

  void abort() override {
    if (!aborted_) api_.abandon(c_);
    aborted_ = true;
  }

 protected:
  // Per-peer messages rather than MPI_Allgather, so that a timeout names the peers not heard from.
  void gather_words(const char* op, const int64_t* mine, int64_t* all, int64_t words) override {
    const size_t n = size_t(size_), w = size_t(words);
    // Raw arrays: after a timeout MPI may still write them, so they are then leaked on purpose.
    auto* send = new int64_t[n * w];
    auto* recv = new int64_t[n * w];
    for (size_t p = 0; p < n; ++p) std::memcpy(send + p * w, mine, w * sizeof(int64_t));
    std::vector<int64_t> bytes(n, int64_t(w * sizeof(int64_t)));
    moe_mpi_error e{};
    if (api_.exchange(c_, kAgreeTag, send, bytes.data(), recv, bytes.data(), timeout_ms_, op, &e) != MOE_MPI_OK) raise(op, e);
    std::memcpy(all, recv, n * w * sizeof(int64_t));
    delete[] send;
    delete[] recv;
  }

 private:
  // Message tags: agreement headers and the data of all_to_all(_v) never match each other's receives.
  static constexpr int kAgreeTag = 7101;
  static constexpr int kDataTag = 7102;

  void exchange(const char* name, const Tensor& send, const std::vector<int64_t>& sb, const Tensor& recv,
                const std::vector<int64_t>& rbytes) {
    Host hs(send, true, name), hr(recv, false, name);
    run(name, {&hs, &hr},
        [&](moe_mpi_error* e) { return api_.exchange(c_, kDataTag, hs.ptr(), sb.data(), hr.ptr(), rbytes.data(), timeout_ms_, name, e); });
    hr.copy_out();
  }

  template <typename Fn> void run(const char* name, std::initializer_list<Host*> buffers, Fn&& fn) {
    moe_mpi_error e{};
    if (fn(&e) == MOE_MPI_OK) return;
    for (Host* h : buffers) h->leak();
    raise(name, e);
  }

  [[noreturn]] void raise(const char* name, const moe_mpi_error& e) {
    // Any failure once messages are in flight leaves the ranks out of step: abort.
    aborted_ = true;
    ErrorKind k = e.code == MOE_MPI_TIMEOUT       ? ErrorKind::Timeout
                  : e.code == MOE_MPI_INVALID     ? ErrorKind::InvalidArgument
                  : e.code == MOE_MPI_UNAVAILABLE ? ErrorKind::Unavailable
                                                  : ErrorKind::Internal;
    throw_error(k, name, cat(e.message, "; the communicator is now aborted"));
  }

  const moe_mpi_api& api_;
  moe_mpi_comm* c_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

std::shared_ptr<Communicator> make_mpi_world(int64_t timeout_ms) {
  const char* op = "commMpi";
  MOE_ARG_CHECK(timeout_ms >= 0, op, "'timeoutMs' ", timeout_ms, " is negative (0 means no timeout)");
  const moe_mpi_api& api = mpi_api(op);
  moe_mpi_error e{};
  moe_mpi_comm* c = api.world(timeout_ms, &e);
  if (!c) {
    ErrorKind k = e.code == MOE_MPI_TIMEOUT       ? ErrorKind::Timeout
                  : e.code == MOE_MPI_UNAVAILABLE ? ErrorKind::Unavailable
                                                  : ErrorKind::Internal;
    throw_error(k, op, e.message);
  }
  return std::make_shared<MpiCommunicator>(api, c, timeout_ms);
}

MpiStatus mpi_status(bool try_load) {
  if (try_load) {
    try {
      mpi_api("mpiStatus");
      g_status.library = g_mpi->library_version();
    } catch (const Error&) {}
  } else if (!g_status.built && g_status.path.empty()) {
    g_status.built = MOE_EP_WITH_MPI != 0;
    g_status.path = addon_dir() + "/moe_ep_mpi.so";
  }
  return g_status;
}

}  // namespace moe::comm
