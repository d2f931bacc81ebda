// Host side of the peer-memory transport (CUDA builds): the buffer, CUDA IPC, step counters, the
// launches and the host checks. Protocol and layout: peer_transport.h; kernels: peer_kernels.cuh.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <thread>

#include "comm/peer/peer_kernels.cuh"
#include "comm/peer/peer_transport.h"
#include "core/cuda_runtime.h"
#include "core/error.h"
#include "ops/basic/copy/copy.h"
#include "ops/common/checks.h"

namespace moe::comm {

namespace {

using peer::u64;
constexpr int kWorkThreads = 256;
constexpr int kPciIdBytes = 32;
constexpr int kExportBytes = kIpcHandleBytes + kPciIdBytes + 8;
constexpr unsigned kBumpDispatch = 1u << peer::kRegionDispatch, kBumpCombine = 1u << peer::kRegionCombine;

void cu(cudaError_t code, const char* op, const char* what) { cuda::check(int(code), op, what); }
int64_t round_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }

struct Layout {
  int64_t row_stride = 0, mail_stride = 0;
  int64_t off_mail = 0, off_scratch = 0, off_disp_rows = 0, off_disp_meta = 0, off_comb_rows = 0, off_comb_aux = 0, total = 0;
};

Layout layout_for(int P, const PeerCapacity& cap) {
  Layout l;
  l.row_stride = round_up(std::max<int64_t>(cap.row_bytes, 16), 16);
  l.mail_stride = round_up(peer::kMailCountsOffset + 4 * int64_t(cap.local_experts), 128);
  l.off_mail = 0;
  l.off_scratch = round_up(l.off_mail + P * l.mail_stride, 256);
  l.off_disp_rows = round_up(l.off_scratch + peer::kScratchSlots * 128, 256);
  l.off_disp_meta = round_up(l.off_disp_rows + P * cap.token_cap * l.row_stride, 256);
  l.off_comb_rows = round_up(l.off_disp_meta + P * cap.token_cap * cap.top_k * int64_t(sizeof(peer::Meta)), 256);
  l.off_comb_aux = round_up(l.off_comb_rows + P * cap.token_cap * l.row_stride, 256);
  l.total = round_up(l.off_comb_aux + P * cap.token_cap * cap.top_k * 4, 4096);
  return l;
}

const char* op_name(int op) {
  switch (op) {
    case peer::kOpDispatch: return "dispatch";
    case peer::kOpCombine: return "combine";
    case peer::kOpCombineBackward: return "combineBackward";
    case peer::kOpDispatchBackward: return "dispatchBackward";
  }
  return "exchange";
}

class CudaPeerTransport final : public PeerTransport {
 public:
  CudaPeerTransport(int rank, int size, int device, const PeerCapacity& cap, int64_t timeout_ms)
      : rank_(rank), size_(size), device_(device), cap_(cap), timeout_ms_(timeout_ms) {
    const char* op = "peerTransport";
    MOE_ARG_CHECK(size >= 1 && size <= kMaxPeers, op, "the peer-memory transport joins 1 to ", kMaxPeers, " ranks; the group has ", size);
    MOE_ARG_CHECK(rank >= 0 && rank < size, op, "rank ", rank, " is not in [0, ", size, ")");
    MOE_ARG_CHECK(cap.token_cap >= 1 && cap.token_cap < (int64_t(1) << 31), op, "'tokenCap' ", cap.token_cap, " must be in [1, 2^31)");
    MOE_ARG_CHECK(cap.row_bytes >= 4 && cap.row_bytes % 4 == 0 && cap.row_bytes < (int64_t(1) << 31), op, "'rowBytes' ", cap.row_bytes,
                  " must be a positive multiple of 4");
    MOE_ARG_CHECK(cap.top_k >= 1 && cap.top_k <= kMaxTopK, op, "'topK' ", cap.top_k, " must be in [1, ", kMaxTopK, "]");
    MOE_ARG_CHECK(cap.local_experts >= 1 && cap.local_experts <= 65536, op, "'localExperts' ", cap.local_experts, " must be in [1, 65536]");
    cuda::require_device(cuda_device(device), op);
    cuda::DeviceGuard guard(device);
    layout_ = layout_for(size, cap);
    cu(cudaMalloc(&buffer_, size_t(layout_.total)), op, "cudaMalloc of the transport buffer");
    try {
      // Zeroed: every step counter (the mail's and the device-side ones in the scratch) starts at 0
      // and nothing is aborted.
      cu(cudaMemset(buffer_, 0, size_t(layout_.off_disp_rows)), op, "cudaMemset");
      const size_t host_bytes = sizeof(peer::HostFault) + sizeof(peer::HostCounts) + 4 * size_t(cap.local_experts * size + size + 4);
      cu(cudaHostAlloc(&host_, host_bytes, cudaHostAllocMapped | cudaHostAllocPortable), op, "cudaHostAlloc of the status words");
      std::memset(host_, 0, host_bytes);
      static_cast<peer::HostFault*>(host_)->timeout_ns = timeout_ms * 1000000;
      void* dev_host = nullptr;
      cu(cudaHostGetDevicePointer(&dev_host, host_, 0), op, "cudaHostGetDevicePointer");
      fault_ = static_cast<peer::HostFault*>(host_);
      counts_ = reinterpret_cast<peer::HostCounts*>(static_cast<char*>(host_) + sizeof(peer::HostFault));
      dev_fault_ = static_cast<peer::HostFault*>(dev_host);
      dev_counts_ = reinterpret_cast<peer::HostCounts*>(static_cast<char*>(dev_host) + sizeof(peer::HostFault));
      cu(cudaStreamCreateWithFlags(&side_stream_, cudaStreamNonBlocking), op, "cudaStreamCreate");
      sm_count_ = cuda::multiprocessors(device);
      cu(cudaDeviceSynchronize(), op, "cudaDeviceSynchronize");
    } catch (...) {
      release();
      throw;
    }
    peers_.fill(nullptr);
    peers_[size_t(rank)] = static_cast<char*>(buffer_);
  }
  ~CudaPeerTransport() override { release(); }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const override { return device_; }
  const PeerCapacity& capacity() const override { return cap_; }
  bool aborted() const override { return aborted_; }
  // A plain store to pinned host memory, which the kernels' waits read (captured graphs included).
  void set_timeout_ms(int64_t ms) override {
    timeout_ms_ = ms;
    if (fault_) reinterpret_cast<volatile long long*>(&fault_->timeout_ns)[0] = ms * 1000000;
  }

  std::vector<uint8_t> export_handle() const override {
    const char* op = "peerTransport";
    cuda::DeviceGuard guard(device_);
    std::vector<uint8_t> out(kExportBytes, 0);
    cudaIpcMemHandle_t h;
    cu(cudaIpcGetMemHandle(&h, buffer_), op, "cudaIpcGetMemHandle");
    static_assert(sizeof(h) == kIpcHandleBytes, "CUDA IPC handles are 64 bytes");
    std::memcpy(out.data(), &h, kIpcHandleBytes);
    char pci[kPciIdBytes] = {0};
    cu(cudaDeviceGetPCIBusId(pci, kPciIdBytes - 1, device_), op, "cudaDeviceGetPCIBusId");
    std::memcpy(out.data() + kIpcHandleBytes, pci, kPciIdBytes);
    const uint64_t total = uint64_t(layout_.total);
    std::memcpy(out.data() + kIpcHandleBytes + kPciIdBytes, &total, 8);
    return out;
  }

  bool can_reach(const std::vector<std::vector<uint8_t>>& exports, std::string* why) const override {
    cuda::DeviceGuard guard(device_);
    if (int(exports.size()) != size_) return fail(why, cat(exports.size(), " exports for ", size_, " ranks"));
    for (int q = 0; q < size_; ++q) {
      const auto& e = exports[size_t(q)];
      if (e.size() != size_t(kExportBytes)) return fail(why, cat("rank ", q, "'s export has ", e.size(), " bytes"));
      uint64_t total = 0;
      std::memcpy(&total, e.data() + kIpcHandleBytes + kPciIdBytes, 8);
      if (total != uint64_t(layout_.total))
        return fail(why, cat("rank ", q, "'s buffer has ", total, " bytes, this rank's ", layout_.total));
      if (q == rank_) continue;
      char pci[kPciIdBytes];
      std::memcpy(pci, e.data() + kIpcHandleBytes, kPciIdBytes);
      pci[kPciIdBytes - 1] = 0;
      int dev = -1;
      if (cudaDeviceGetByPCIBusId(&dev, pci) != cudaSuccess) {
        cudaGetLastError();
        return fail(why, cat("rank ", q, "'s GPU (", pci, ") is not visible to rank ", rank_));
      }
      if (dev == device_) continue;  // the same GPU: another process's memory through IPC
      int access = 0;
      if (cudaDeviceCanAccessPeer(&access, device_, dev) != cudaSuccess || !access) {
        cudaGetLastError();
        return fail(why, cat("cuda:", device_, " cannot access rank ", q, "'s GPU cuda:", dev, " (no peer access)"));
      }
    }
    return true;
  }

  void open(const std::vector<std::vector<uint8_t>>& exports) override {
    const char* op = "peerTransport";
    std::string why;
    MOE_ARG_CHECK(can_reach(exports, &why), op, "cannot open the peers' buffers: ", why);
    cuda::DeviceGuard guard(device_);
    for (int q = 0; q < size_; ++q) {
      if (q == rank_ || opened_[size_t(q)]) continue;
      cudaIpcMemHandle_t h;
      std::memcpy(&h, exports[size_t(q)].data(), kIpcHandleBytes);
      void* p = nullptr;
      cu(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess), op, "cudaIpcOpenMemHandle of a peer's buffer");
      peers_[size_t(q)] = static_cast<char*>(p);
      opened_[size_t(q)] = true;
    }
    open_ = true;
  }

  void check(const char* op) override {
    MOE_ARG_CHECK(open_, op, "the peer-memory transport is not open");
    if (aborted_ && fault_->kind == 0)
      throw_error(ErrorKind::InvalidArgument, op,
                  cat("the peer-memory transport (rank ", rank_, " of ", size_, ") was aborted; create a new communicator"));
    const int kind = __atomic_load_n(&fault_->kind, __ATOMIC_ACQUIRE);
    if (kind == 0) return;
    const int wait_op = fault_->op;
    std::string who;
    for (int p = 0; p < size_; ++p)
      if (reinterpret_cast<volatile int*>(fault_->peer)[p]) who += cat(who.empty() ? "" : ", ", p);
    const bool first = !aborted_;
    abort();
    if (kind == int(PeerFault::TokenMismatch)) {
      std::string theirs;
      for (int p = 0; p < size_; ++p)
        if (reinterpret_cast<volatile int*>(fault_->mismatch)[p])
          theirs += cat(theirs.empty() ? "" : ", ", "rank ", p, " dispatched ", reinterpret_cast<volatile int*>(fault_->tokens_peer)[p]);
      throw_error(ErrorKind::InvalidArgument, op,
                  cat("rank ", rank_, " of ", size_, ": ", theirs, " tokens but this rank dispatched ",
                      *reinterpret_cast<volatile int*>(&fault_->tokens_mine),
                      "; with a capacity factor (fixed segments) every rank must dispatch the same number of tokens (pad to a "
                      "common T). Seen on the device after that dispatch ran: its results are not valid, and the peer-memory "
                      "transport was aborted (create a new communicator)"));
    }
    std::string msg = kind == int(PeerFault::PeerAborted)
                          ? cat("rank(s) ", who, " gave up (an error there) while rank ", rank_, " of ", size_, " waited in ",
                                op_name(wait_op), " (peer-memory transport)")
                          : cat("timed out after ", timeout_ms_, " ms on rank ", rank_, " of ", size_, " (peer-memory transport) in ",
                                op_name(wait_op), ", waiting for rank(s) ", who);
    if (!first) msg += "; the transport was aborted then";
    throw_error(ErrorKind::Timeout, op, msg);
  }

  void abort() override {
    if (aborted_) return;
    aborted_ = true;
    if (!open_) return;
    // Tell every peer to stop waiting for this rank: its waits on us end with PeerAborted. A copy
    // on a stream of its own, so it runs even while this rank's own waits still occupy the stream.
    cuda::DeviceGuard guard(device_);
    static const int one = 1;
    for (int q = 0; q < size_; ++q) {
      if (!peers_[size_t(q)]) continue;
      char* dst = peers_[size_t(q)] + layout_.off_mail + int64_t(rank_) * layout_.mail_stride + offsetof(peer::Mail, abort);
      cudaMemcpyAsync(dst, &one, sizeof(int), cudaMemcpyHostToDevice, side_stream_);
    }
    cudaStreamSynchronize(side_stream_);
    cudaGetLastError();
  }

  void close_peers() override {
    cuda::DeviceGuard guard(device_);
    cudaDeviceSynchronize();
    for (int q = 0; q < size_; ++q)
      if (opened_[size_t(q)]) cudaIpcCloseMemHandle(peers_[size_t(q)]);
    for (int q = 0; q < size_; ++q)
      if (q != rank_) peers_[size_t(q)] = nullptr;
    opened_.fill(false);
    open_ = false;
    cudaGetLastError();
  }

  void synchronize() override {
    cuda::DeviceGuard guard(device_);
    cu(cudaDeviceSynchronize(), "peerTransport", "cudaDeviceSynchronize");
  }

  Counts dispatch_layout(const Tensor& indices, const Tensor& slot, const Tensor& kept, const DispatchPlan& plan, const Tensor& pos,
                         const Tensor& dest, const Tensor& offsets, const Tensor& seg_start, const Tensor& fill) override {
    const char* op = "dispatch";
    check(op);
    need_2d(indices, op, "indices");
    const int64_t T = indices.size(0), k = indices.size(1), P = size_;
    need(indices, op, "indices", {DType::i32}, {T, k});
    need(slot, op, "slot", {DType::i32}, {T, k});
    const int El = plan.local_experts;
    MOE_ARG_CHECK(El >= 1 && El <= cap_.local_experts, op, El, " experts per rank exceed the transport's ", cap_.local_experts);
    need(kept, op, "kept", {DType::i32}, {int64_t(El) * P});
    need(pos, op, "pos", {DType::i32}, {T, P});
    need(dest, op, "dest", {DType::i32}, {T, k});
    need_dropless(plan, offsets, seg_start, fill, op);
    // Dropless: a source with more tokens than the capacity still sends its counts (the mail does
    // not depend on it); the caller grows the transport from max_tokens before any row moves.
    if (plan.segment >= 0)
      MOE_ARG_CHECK(T <= cap_.token_cap, op, T, " tokens exceed the peer-memory transport's capacity of ", cap_.token_cap, " per rank");
    MOE_ARG_CHECK(k <= cap_.top_k, op, "top-k ", k, " exceeds the transport's ", cap_.top_k);
    // Dropless: the host waits below for the counts, which a graph capture would never deliver.
    if (plan.segment < 0 && cuda::capture_open_on_this_thread())
      cuda::refuse_in_capture(op,
                              "wait on the host for the received row counts of a dropless dispatch (peer-memory transport); capacity "
                              "mode (fixed segments) waits for nothing and can be captured");
    cuda::DeviceGuard guard(device_);
    cudaStream_t stream = cudaStream_t(ops::op_stream(indices));
    // The step number lives on the device: the layout kernel advances it (peer_kernels.cuh).
    peer::layout_kernel<<<1, peer::kLayoutThreads, 0, stream>>>(view(El), indices.data<int>(), slot.data<int>(), kept.data<int>(), int(T),
                                                                int(k), pos.data<int>(), dest.data<int>());
    cuda::check_launch(op);
    Counts c;
    if (plan.segment >= 0) {
      c.rows = int64_t(El) * P * plan.segment;
      c.max_tokens = T;
      c.segment_rows.assign(size_t(El) * P, plan.segment);
      return c;
    }
    // The counts reach the host tagged with a host sequence number of their own (dropless calls
    // are never captured, so a host value is right here).
    const u64 seq = ++counts_seq_;
    peer::counts_kernel<<<1, peer::kCountsThreads, 0, stream>>>(view(El), int(plan.align), offsets.data<int>(), seg_start.data<int>(),
                                                                fill.data<int>(), dev_counts_, seq);
    cuda::check_launch(op);
    // The deliberate host wait of dropless dispatch: the received row count sizes the output. It
    // polls pinned memory the counts kernel writes (not a stream synchronisation).
    wait_host_counts(op, seq);
    c.rows = counts_->rows;
    c.max_tokens = counts_->max_tokens;
    c.segment_rows.resize(size_t(El) * P);
    c.tokens_from.resize(size_t(P));
    for (int i = 0; i < El * P; ++i) c.segment_rows[size_t(i)] = counts_->data[i];
    for (int s = 0; s < P; ++s) c.tokens_from[size_t(s)] = counts_->data[El * P + s];
    return c;
  }

  void dispatch_rows(const Tensor& payload, const Tensor& indices, const Tensor& slot, const Tensor& weights, const Tensor& pos,
                     const Tensor& dest, const DispatchPlan& plan, const Tensor& seg_start, const Tensor& fill, const Tensor& offsets,
                     const Tensor& out, const Tensor& out_scales, const Tensor& out_weights, const Tensor& row_src,
                     const Tensor& recv_row_of, const Tensor& recv_weight, const Tensor& recv_tokens) override {
    const char* op = "dispatch";
    check(op);
    need_2d(payload, op, "payload");
    need_2d(indices, op, "indices");
    need_2d(out, op, "out");
    ops::require_defined(recv_row_of, op, "recvRowOf");
    MOE_ARG_CHECK(recv_row_of.dim() == 3, op, "'recvRowOf' must be [P, tokenCap, k]");
    const int64_t T = payload.size(0), k = indices.size(1), N = out.size(0), H = out.size(1), P = size_, mc = recv_row_of.size(1);
    need(payload, op, "payload", {DType::bf16, DType::f32}, {T, H});
    need(indices, op, "indices", {DType::i32}, {T, k});
    need(slot, op, "slot", {DType::i32}, {T, k});
    need(weights, op, "weights", {DType::f32}, {T, k});
    need(pos, op, "pos", {DType::i32}, {T, P});
    need(dest, op, "dest", {DType::i32}, {T, k});
    need_dropless(plan, offsets, seg_start, fill, op);
    // fp8 rows kept: out holds the e4m3 bytes as sent, out_scales their scales.
    const bool keep = out.dtype() == DType::fp8e4m3;
    need(out, op, "out", {DType::bf16, DType::f32, DType::fp8e4m3}, {N, H});
    if (keep) {
      MOE_ARG_CHECK(plan.fp8, op, "fp8 'out' rows need fp8 rows on the wire");
      need(out_scales, op, "outScales", {DType::f32}, {N, H / 128});
    } else {
      MOE_ARG_CHECK(!out_scales.defined(), op, "'outScales' goes with fp8 'out' rows only");
    }
    need(out_weights, op, "outWeights", {DType::f32}, {N});
    need(row_src, op, "rowSrc", {DType::i32}, {N});
    need(recv_row_of, op, "recvRowOf", {DType::i32}, {P, mc, k});
    need(recv_weight, op, "recvWeight", {DType::f32}, {P, mc, k});
    need(recv_tokens, op, "recvTokens", {DType::i32}, {P});
    MOE_ARG_CHECK(T <= cap_.token_cap && mc <= cap_.token_cap && k <= cap_.top_k, op, "the call (", T, " tokens, top-", k,
                  ") exceeds the transport's capacity (", cap_.token_cap, " tokens, top-", cap_.top_k, ")");
    MOE_ARG_CHECK(N < (int64_t(1) << 31) && P * mc * k < (int64_t(1) << 31), op, "too many rows for 32-bit row indices");
    const bool fp8 = plan.fp8;
    // fp8 rows on the wire: H e4m3 bytes, then H/128 fp32 scales at H rounded up to 16 bytes.
    const int64_t pay_bytes = fp8 ? round_up(H, 16) + H / 128 * 4 : payload.nbytes() / std::max<int64_t>(T, 1);
    MOE_ARG_CHECK(pay_bytes <= layout_.row_stride, op, "a row of ", pay_bytes, " bytes exceeds the transport's ", layout_.row_stride);
    MOE_ARG_CHECK(pay_bytes % 4 == 0, op, "row bytes must be multiples of 4 (an even hidden size for bf16)");
    if (fp8) MOE_ARG_CHECK(H % 128 == 0, op, "fp8 rows need a hidden size that is a multiple of 128");
    MOE_ARG_CHECK(keep || payload.dtype() == out.dtype(), op, "rows are ", dtype_name(payload.dtype()), " but 'out' is ",
                  dtype_name(out.dtype()));
    const int64_t map_cap = recv_row_of.size(1);
    cuda::DeviceGuard guard(device_);
    cudaStream_t stream = cudaStream_t(ops::op_stream(payload));
    MOE_ARG_CHECK(plan.local_experts >= 1 && plan.local_experts <= cap_.local_experts, op, plan.local_experts,
                  " experts per rank exceed the transport's ", cap_.local_experts);
    const peer::View v = view(plan.local_experts);
    const dim3 pg = grid(plan.sms, T * 32);
    auto push = [&](auto rows) {
      peer::push_kernel<<<pg, kWorkThreads, 0, stream>>>(v, rows, pos.data<int>(), int(T), indices.data<int>(), slot.data<int>(),
                                                         weights.data<float>(), dest.data<int>(), int(k));
    };
    need_aligned(out, op, "out");
    const Tensor src = aligned_rows(payload);
    if (!fp8) push(peer::CopyRows{static_cast<const char*>(src.raw()), pay_bytes, pay_bytes % 16 == 0});
    else if (src.dtype() == DType::bf16) push(peer::Fp8Rows<bf16>{src.data<bf16>(), int(H)});
    else push(peer::Fp8Rows<float>{src.data<float>(), int(H)});
    cuda::check_launch(op);
    wait(stream, 0, {offsetof(peer::Mail, rows_step), peer::kRegionDispatch, 0}, {}, peer::kOpDispatch);
    const dim3 g = grid(plan.sms, std::max<int64_t>(size_ * map_cap, N) * 32);
    const bool out_vec16 = (H * dtype_size(out.dtype())) % 16 == 0;
    const int* ss = seg_start.defined() ? seg_start.data<int>() : nullptr;
    const int* fl = fill.defined() ? fill.data<int>() : nullptr;
    const int* of = offsets.defined() ? offsets.data<int>() : nullptr;
#define MOE_EXPAND(OUT, FP8)                                                                                                             \
  peer::expand_kernel<OUT, FP8><<<g, kWorkThreads, 0, stream>>>(v, int(k), map_cap, plan.segment, int(T), ss, fl, of, N, int(H),         \
                                                                out_vec16, out.data<OUT>(), keep ? out_scales.data<float>() : nullptr,   \
                                                                out_weights.data<float>(), row_src.data<int>(), recv_row_of.data<int>(), \
                                                                recv_weight.data<float>(), recv_tokens.data<int>())
    if (keep) {
      MOE_EXPAND(fp8e4m3, false);  // a copy of the e4m3 bytes, and the scales beside
    } else if (out.dtype() == DType::bf16) {
      if (fp8) MOE_EXPAND(bf16, true);
      else MOE_EXPAND(bf16, false);
    } else {
      if (fp8) MOE_EXPAND(float, true);
      else MOE_EXPAND(float, false);
    }
#undef MOE_EXPAND
    cuda::check_launch(op);
  }

  void combine(const Tensor& rows, const Tensor& recv_row_of, const Tensor& recv_weight, const Tensor& recv_tokens, const Tensor& pos,
               const Tensor& y, int64_t sms) override {
    const char* op = recv_weight.defined() ? "combine" : "dispatchBackward";
    const int wop = recv_weight.defined() ? peer::kOpCombine : peer::kOpDispatchBackward;
    check(op);
    need_2d(rows, op, "rows");
    need_2d(y, op, "y");
    ops::require_defined(recv_row_of, op, "recvRowOf");
    MOE_ARG_CHECK(recv_row_of.dim() == 3, op, "'recvRowOf' must be [P, tokenCap, k]");
    const int64_t N = rows.size(0), H = rows.size(1), T = y.size(0), k = recv_row_of.size(2), map_cap = recv_row_of.size(1), P = size_;
    need(rows, op, "rows", {DType::bf16, DType::f32}, {N, H});
    need(y, op, "y", {rows.dtype()}, {T, H});
    need(recv_row_of, op, "recvRowOf", {DType::i32}, {P, map_cap, k});
    if (recv_weight.defined()) need(recv_weight, op, "recvWeight", {DType::f32}, {P, map_cap, k});
    need(recv_tokens, op, "recvTokens", {DType::i32}, {P});
    need(pos, op, "pos", {DType::i32}, {T, P});
    MOE_ARG_CHECK(T <= cap_.token_cap && map_cap <= cap_.token_cap, op, T, " tokens exceed the transport's capacity of ", cap_.token_cap);
    MOE_ARG_CHECK(H * int64_t(dtype_size(rows.dtype())) <= layout_.row_stride, op, "rows of ", H, " ", dtype_name(rows.dtype()),
                  " exceed the transport's ", layout_.row_stride, " bytes");
    cuda::DeviceGuard guard(device_);
    cudaStream_t stream = cudaStream_t(ops::op_stream(rows));
    need_aligned(y, op, "y");
    const Tensor in = aligned_rows(rows);
    const peer::View v = view();
    // The first kernel advances the combine step on the device, then waits for the owners'
    // acknowledgement of the previous one.
    wait(stream, kBumpCombine, {offsetof(peer::Mail, comb_ack), peer::kRegionCombine, 1}, {}, wop);
    const float* w = recv_weight.defined() ? recv_weight.data<float>() : nullptr;
    if (rows.dtype() == DType::bf16)
      peer::combine_push_kernel<bf16><<<grid(sms, size_ * map_cap * 32), kWorkThreads, 0, stream>>>(
          v, in.data<bf16>(), N, int(H), int(k), map_cap, recv_row_of.data<int>(), w, recv_tokens.data<int>());
    else
      peer::combine_push_kernel<float><<<grid(sms, size_ * map_cap * 32), kWorkThreads, 0, stream>>>(
          v, in.data<float>(), N, int(H), int(k), map_cap, recv_row_of.data<int>(), w, recv_tokens.data<int>());
    cuda::check_launch(op);
    wait(stream, 0, {offsetof(peer::Mail, comb_step), peer::kRegionCombine, 0}, {}, wop);
    if (y.dtype() == DType::bf16)
      peer::combine_reduce_kernel<bf16><<<grid(sms, T * 32), kWorkThreads, 0, stream>>>(v, pos.data<int>(), int(T), int(H), y.data<bf16>());
    else
      peer::combine_reduce_kernel<float>
          <<<grid(sms, T * 32), kWorkThreads, 0, stream>>>(v, pos.data<int>(), int(T), int(H), y.data<float>());
    cuda::check_launch(op);
  }

  void combine_backward(const Tensor& dy, const Tensor& rows, const Tensor& row_src, const Tensor& recv_weight, const Tensor& pos,
                        const Tensor& dest, const Tensor& d_rows, const Tensor& d_weights, int64_t sms) override {
    const char* op = "combineBackward";
    check(op);
    need_2d(dy, op, "dy");
    need_2d(rows, op, "rows");
    need_2d(dest, op, "dest");
    ops::require_defined(recv_weight, op, "recvWeight");
    MOE_ARG_CHECK(recv_weight.dim() == 3, op, "'recvWeight' must be [P, tokenCap, k]");
    const int64_t T = dy.size(0), H = dy.size(1), N = rows.size(0), k = dest.size(1), map_cap = recv_weight.size(1), P = size_;
    need(dy, op, "dy", {DType::bf16, DType::f32}, {T, H});
    need(rows, op, "rows", {DType::bf16, DType::f32}, {N, H});
    need(row_src, op, "rowSrc", {DType::i32}, {N});
    need(recv_weight, op, "recvWeight", {DType::f32}, {P, map_cap, k});
    need(pos, op, "pos", {DType::i32}, {T, P});
    need(dest, op, "dest", {DType::i32}, {T, k});
    need(d_rows, op, "dRows", {rows.dtype()}, {N, H});
    need(d_weights, op, "dWeights", {DType::f32}, {T, k});
    MOE_ARG_CHECK(T <= cap_.token_cap && map_cap <= cap_.token_cap, op, T, " tokens exceed the transport's capacity of ", cap_.token_cap);
    const int64_t pay_bytes = H * int64_t(dtype_size(dy.dtype()));
    MOE_ARG_CHECK(pay_bytes <= layout_.row_stride, op, "rows of ", pay_bytes, " bytes exceed the transport's ", layout_.row_stride);
    cuda::DeviceGuard guard(device_);
    cudaStream_t stream = cudaStream_t(ops::op_stream(dy));
    need_aligned(d_rows, op, "dRows");
    const Tensor dy_in = aligned_rows(dy), rows_in = aligned_rows(rows);
    const peer::View v = view();
    // Both steps advanced on the device by the first kernel; dy to every rank its token went to,
    // into their dispatch regions (once acknowledged).
    wait(stream, kBumpDispatch | kBumpCombine, {offsetof(peer::Mail, disp_ack), peer::kRegionDispatch, 1}, {}, peer::kOpCombineBackward);
    peer::push_kernel<<<grid(sms, T * 32), kWorkThreads, 0, stream>>>(
        v, peer::CopyRows{static_cast<const char*>(dy_in.raw()), pay_bytes, pay_bytes % 16 == 0}, pos.data<int>(), int(T), nullptr, nullptr,
        nullptr, nullptr, 0);
    cuda::check_launch(op);
    wait(stream, 0, {offsetof(peer::Mail, rows_step), peer::kRegionDispatch, 0}, {offsetof(peer::Mail, comb_ack), peer::kRegionCombine, 1},
         peer::kOpCombineBackward);
    const dim3 g = grid(sms, N * 32);
#define MOE_CB(D, R)                                                                                                                    \
  peer::cb_expert_kernel<D, R><<<g, kWorkThreads, 0, stream>>>(v, row_src.data<int>(), N, rows_in.data<R>(), recv_weight.data<float>(), \
                                                               int(H), int(k), map_cap, d_rows.data<R>())
    const bool dbf = dy.dtype() == DType::bf16, rbf = rows.dtype() == DType::bf16;
    if (dbf && rbf) MOE_CB(bf16, bf16);
    else if (dbf) MOE_CB(bf16, float);
    else if (rbf) MOE_CB(float, bf16);
    else MOE_CB(float, float);
#undef MOE_CB
    cuda::check_launch(op);
    wait(stream, 0, {offsetof(peer::Mail, comb_step), peer::kRegionCombine, 0}, {}, peer::kOpCombineBackward);
    peer::cb_owner_kernel<<<grid(sms, T * k), kWorkThreads, 0, stream>>>(v, pos.data<int>(), dest.data<int>(), int(T), int(k),
                                                                         d_weights.data<float>());
    cuda::check_launch(op);
  }

 private:
  // The kernels move rows in 16-byte vectors (peer_kernels.cuh: CopyRows, Fp8Rows, Chunk8), which
  // fault on an address off a 16-byte boundary, as a view narrowed at an odd element is. Such an input
  // is copied first, on this call's stream (the copy is freed after the launch; the caching allocator
  // reuses it only on that stream, after the kernels). Outputs are the caller's fresh tensors: refused.
  static bool on16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.raw()) % 16 == 0; }
  static Tensor aligned_rows(const Tensor& t) {
    if (on16(t)) return t;
    Tensor copy = Tensor::empty(t.shape(), t.dtype(), t.device(), "peer transport: aligned copy");
    ops::copy(copy, t);
    return copy;
  }
  static void need_aligned(const Tensor& t, const char* op, const char* name) {
    MOE_ARG_CHECK(on16(t), op, "'", name, "' ", t.describe(),
                  " must start at a 16-byte boundary (the rows are written in 16-byte vectors): pass a fresh tensor, not a view");
  }

  // Every tensor a call takes: contiguous, on this transport's GPU, of these dtypes and this shape.
  void need(const Tensor& t, const char* op, const char* name, std::initializer_list<DType> dtypes, const Shape& shape) const {
    ops::require_defined(t, op, name);
    ops::require_contiguous(t, op, name);
    ops::require_dtype(t, dtypes, op, name);
    MOE_ARG_CHECK(t.device().is_cuda() && t.device().index == device_, op, "'", name, "' ", t.describe(), " must be on cuda:", device_,
                  " (the peer transport's GPU)");
    MOE_ARG_CHECK(t.shape() == shape, op, "'", name, "' has shape ", shape_str(t.shape()), "; expected ", shape_str(shape));
  }
  void need_2d(const Tensor& t, const char* op, const char* name) const {
    ops::require_defined(t, op, name);
    MOE_ARG_CHECK(t.dim() == 2, op, "'", name, "' ", t.describe(), " must be 2-D");
  }
  // The dropless layout tensors (capacity mode takes none).
  void need_dropless(const DispatchPlan& plan, const Tensor& offsets, const Tensor& seg_start, const Tensor& fill, const char* op) const {
    if (plan.segment >= 0) return;
    const int64_t El = plan.local_experts;
    need(offsets, op, "offsets", {DType::i32}, {El + 1});
    need(seg_start, op, "segStart", {DType::i32}, {El * size_});
    need(fill, op, "fill", {DType::i32}, {El});
  }

  static bool fail(std::string* why, const std::string& msg) {
    if (why) *why = msg;
    return false;
  }

  // El: the call's experts per rank (the mail's counts are sized for the capacity's).
  peer::View view(int El = 1) const {
    peer::View v{};
    for (int p = 0; p < kMaxPeers; ++p) v.base[p] = peers_[size_t(p)];
    v.P = size_;
    v.me = rank_;
    v.El = El;
    v.k_cap = cap_.top_k;
    v.t_cap = cap_.token_cap;
    v.row_stride = layout_.row_stride;
    v.mail_stride = layout_.mail_stride;
    v.off_mail = layout_.off_mail;
    v.off_scratch = layout_.off_scratch;
    v.off_disp_rows = layout_.off_disp_rows;
    v.off_disp_meta = layout_.off_disp_meta;
    v.off_comb_rows = layout_.off_comb_rows;
    v.off_comb_aux = layout_.off_comb_aux;
    v.fault = dev_fault_;
    return v;
  }

  // Blocks for a grid-stride loop over `threads` threads, at most 4 per allowed SM.
  dim3 grid(int64_t sms, int64_t threads) const {
    const int64_t allowed = sms > 0 ? std::min<int64_t>(sms, sm_count_) : sm_count_;
    const int64_t need = (threads + kWorkThreads - 1) / kWorkThreads;
    return dim3(unsigned(std::max<int64_t>(1, std::min<int64_t>(need, allowed * 4))));
  }

  // A one-warp wait kernel: advances the regions in `bump` first, then waits for `a` and `b`.
  void wait(cudaStream_t stream, unsigned bump, peer::Await a, peer::Await b, int op) {
    peer::wait_kernel<<<1, 32, 0, stream>>>(view(), bump, a, b, op);
    cuda::check_launch(op_name(op));
  }

  // Polls the pinned word the counts kernel writes last: busy for the first 50 µs, then 20 µs
  // sleeps. Bounded by the timeout (plus a second, so the kernel's own timeout reports first).
  void wait_host_counts(const char* op, u64 step) {
    const auto start = std::chrono::steady_clock::now();
    for (unsigned spins = 0;; ++spins) {
      if (__atomic_load_n(&counts_->step, __ATOMIC_ACQUIRE) >= step) return;
      if (__atomic_load_n(&fault_->kind, __ATOMIC_ACQUIRE) != 0) check(op);
      const auto waited = std::chrono::steady_clock::now() - start;
      if (timeout_ms_ > 0 && waited > std::chrono::milliseconds(timeout_ms_ + 1000)) {
        abort();
        throw_error(ErrorKind::Timeout, op,
                    cat("timed out after ", timeout_ms_, " ms on rank ", rank_, " of ", size_,
                        " (peer-memory transport) waiting for the counts of the dispatch (the device never reported)"));
      }
      if (waited > std::chrono::microseconds(50)) std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }

  void release() {
    if (device_ < 0) return;
    cudaSetDevice(device_);
    cudaDeviceSynchronize();
    for (int q = 0; q < size_; ++q)
      if (opened_[size_t(q)]) cudaIpcCloseMemHandle(peers_[size_t(q)]);
    opened_.fill(false);
    if (buffer_) cudaFree(buffer_);
    if (host_) cudaFreeHost(host_);
    if (side_stream_) cudaStreamDestroy(side_stream_);
    buffer_ = host_ = nullptr;
    side_stream_ = nullptr;
    cudaGetLastError();
  }

  int rank_, size_, device_;
  PeerCapacity cap_;
  int64_t timeout_ms_;
  Layout layout_;
  void* buffer_ = nullptr;
  void* host_ = nullptr;
  peer::HostFault* fault_ = nullptr;
  peer::HostCounts* counts_ = nullptr;
  peer::HostFault* dev_fault_ = nullptr;
  peer::HostCounts* dev_counts_ = nullptr;
  cudaStream_t side_stream_ = nullptr;
  int sm_count_ = 1;
  std::array<char*, kMaxPeers> peers_{};
  std::array<bool, kMaxPeers> opened_{};
  bool open_ = false;
  bool aborted_ = false;
  u64 counts_seq_ = 0;  // dropless dispatches so far (tags the counts the host polls for)
};

}  // namespace

std::unique_ptr<PeerTransport> make_peer_transport(int rank, int size, int device, const PeerCapacity& cap, int64_t timeout_ms) {
  return std::make_unique<CudaPeerTransport>(rank, size, device, cap, timeout_ms);
}

}  // namespace moe::comm
