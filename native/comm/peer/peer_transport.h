// The peer-memory expert-parallel transport: ranks whose GPUs can address each other's memory (one
// host: NVLink peer access, or several processes on the same GPU) push token rows straight into
// each other's buffers, one row per (token, destination rank), with the layout and the counts on
// the device. The NCCL all-to-all path (lib/moe/dispatcher.ts) stays the fallback.
//
// Memory. Every rank allocates one device buffer with the same layout (PeerLayout) and exports it
// with CUDA IPC; TypeScript all-gathers the exports through the communicator and hands them to
// open(), which maps the peers' buffers. Each buffer holds, per source rank s:
//   mail[s]        flags and counts that rank s writes here (step-numbered, never cleared)
//   dispatch rows  [P][tokenCap][rowStride]   rows rank s pushed to me, at the token's position
//   dispatch meta  [P][tokenCap][kCap]        per row: (local expert, slot, gate weight) per top-k entry
//   combine rows   [P][tokenCap][rowStride]   partial outputs rank s (an expert rank) returns to me
//   combine aux    [P][tokenCap][kCap] f32    the gate-weight gradients of combineBackward
//
// Protocol. Two step counters, one per region (dispatch, combine), advanced by every call on
// every rank in the same order (the calls are collective). A writer into region R of rank p waits
// until p acknowledged R's previous step, writes, then release-stores R's step number into p's
// mail; the reader acquire-waits for that number, reads, then acknowledges into the writer's
// mail. Waits run in one-block kernels (so a waiting rank never holds the SMs a peer sharing the
// GPU needs), are bounded by the communicator's timeout (%globaltimer) and stop early when the
// awaited peer set its abort flag; a failed wait is recorded in pinned host memory, which the host
// checks at every call (PeerTransport::check) and while it waits for dropless counts.
//
// The step counters live on the device, in this rank's own buffer (peers never read them): the
// first kernel of a call advances its region's counter (the layout kernel of a dispatch, the first
// wait kernel of a combine or combineBackward) and the call's later kernels read it; no step number
// is a kernel argument. So capacity-mode calls can be captured in a CUDA graph: each replay
// advances the protocol exactly like an eager call, and eager calls and replays interleave freely
// (in the same collective order on every rank). The timeout is read from pinned host memory too,
// so a replay waits with the timeout set at replay time. A wait that fails inside a replay is
// recorded like any other and thrown by the next host call into the transport (check(); for
// MoEInference, its next forward). Dropless dispatch waits on the host for the counts and refuses
// to be captured.
//
// Layout of the received rows (the experts' input): local expert major, then source rank, then the
// source's slot order (capacity()'s slot: token order). Capacity mode: every (expert, source)
// segment is exactly `capacity` rows (rounded up to `align`), so nothing is read on the host.
// Dropless: segment sizes come from the counts the sources sent; the host waits for one pinned
// word (the received row count) to size the output.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace moe::comm {

constexpr int kMaxPeers = 8;  // ranks in one peer-memory group (one NVLink domain / host)
constexpr int kMaxTopK = 32;  // top-k entries per token (one warp lane each)
constexpr int kIpcHandleBytes = 64;

// Sizes every rank agreed on (TypeScript all-gathers the needs and takes the maximum).
struct PeerCapacity {
  int64_t token_cap = 0;  // tokens per source rank
  int64_t row_bytes = 0;  // largest row payload (bf16 row, f32 row, or fp8 row + scales)
  int top_k = 0;          // meta entries per row
  int local_experts = 0;  // experts per rank
};

// Why a wait failed (recorded by kernels in pinned host memory).
// TokenMismatch: in capacity mode a source dispatched another number of tokens than this rank.
enum class PeerFault : int { None = 0, Timeout = 1, PeerAborted = 2, TokenMismatch = 3 };

class PeerTransport {
 public:
  virtual ~PeerTransport() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual int device() const = 0;
  virtual const PeerCapacity& capacity() const = 0;

  // This rank's export: the IPC handle of its buffer and its device's PCI bus id (for the
  // reachability check), as bytes for the all-gather.
  virtual std::vector<uint8_t> export_handle() const = 0;
  // Whether this rank can map every peer's buffer (same device, or peer access between devices).
  // exports: every rank's export_handle(), in rank order.
  virtual bool can_reach(const std::vector<std::vector<uint8_t>>& exports, std::string* why) const = 0;
  // Maps the peers' buffers (after every rank agreed they are reachable).
  virtual void open(const std::vector<std::vector<uint8_t>>& exports) = 0;

  // Throws Timeout / Nccl-kind errors recorded by a failed wait (naming op, rank and the peers),
  // marking the transport aborted. Every call starts with it.
  virtual void check(const char* op) = 0;
  // Tells every peer to stop waiting for this rank (their waits end with PeerAborted) and refuses
  // further calls. Local state only otherwise.
  virtual void abort() = 0;
  virtual bool aborted() const = 0;
  virtual void set_timeout_ms(int64_t ms) = 0;
  // Waits for this rank's transport work on the device to finish (before a collective regrowth).
  virtual void synchronize() = 0;
  // Unmaps the peers' buffers (after synchronizing). An exporter may free its buffer only once every
  // importer closed it, so a collective teardown is: close_peers everywhere, a barrier, dispose.
  virtual void close_peers() = 0;

  // ---- dispatch ----------------------------------------------------------------------------
  struct DispatchPlan {
    // Capacity mode: segment = roundUp(capacity, align) rows per (local expert, source); -1: dropless.
    int64_t segment = -1;
    int64_t align = 1;
    int64_t sms = 0;        // blocks are sized for this many SMs (0: all)
    int local_experts = 0;  // El of this call (E / P); at most the transport's capacity
    bool fp8 = false;       // rows travel as fp8 e4m3 with one fp32 scale per 128 values (dispatch_rows)
  };
  // Phase 1: layout on the device (positions of each token at each destination rank, destination
  // rank per top-k entry) and the counts sent to every peer. In dropless mode also waits on the
  // host for the counts every peer sent here (the one deliberate wait) and returns them; in
  // capacity mode returns at once with the static sizes.
  struct Counts {
    int64_t rows = 0;                   // rows this rank receives, padding included
    int64_t max_tokens = 0;             // largest T among the sources (dropless; else this rank's T)
    std::vector<int64_t> segment_rows;  // [El·P] rows per (local expert, source), padding included
    std::vector<int64_t> tokens_from;   // [P] token rows each source sends here (dropless only)
  };
  virtual Counts dispatch_layout(const Tensor& indices, const Tensor& slot, const Tensor& kept, const DispatchPlan& plan, const Tensor& pos,
                                 const Tensor& dest, const Tensor& offsets, const Tensor& seg_start, const Tensor& fill) = 0;
  // Phase 2: push the token rows (payload [T, H], bf16 or f32; with plan.fp8 quantised on the way
  // out, as quantizeFp8 does), then expand what arrived into expert-major rows `out` (payload's
  // dtype: a copy, or the fp8 rows dequantised; fp8e4m3: the fp8 rows kept, their scales in
  // out_scales [N, H/128]), with their gate weights, the source of each row, and for each received
  // (source, token, entry) its row.
  virtual void dispatch_rows(const Tensor& payload, const Tensor& indices, const Tensor& slot, const Tensor& weights, const Tensor& pos,
                             const Tensor& dest, const DispatchPlan& plan, const Tensor& seg_start, const Tensor& fill,
                             const Tensor& offsets, const Tensor& out, const Tensor& out_scales, const Tensor& out_weights,
                             const Tensor& row_src, const Tensor& recv_row_of, const Tensor& recv_weight, const Tensor& recv_tokens) = 0;

  // ---- combine and the backward passes -----------------------------------------------------
  // y[t] = Σ over the ranks t was sent to of that rank's Σ_j c_j·rows[row(t,j)] (c_j the gate
  // weight, or 1 with recv_weight undefined), summed in fp32. rows: [N, H] expert order.
  virtual void combine(const Tensor& rows, const Tensor& recv_row_of, const Tensor& recv_weight, const Tensor& recv_tokens,
                       const Tensor& pos, const Tensor& y, int64_t sms) = 0;
  // Backward of combine: dy pushed to the ranks each token went to; there d_rows[r] = w·dy and
  // d_weight = <dy, rows[r]>, the latter returned to the token's owner into d_weights [T,k].
  virtual void combine_backward(const Tensor& dy, const Tensor& rows, const Tensor& row_src, const Tensor& recv_weight, const Tensor& pos,
                                const Tensor& dest, const Tensor& d_rows, const Tensor& d_weights, int64_t sms) = 0;
};

// Allocates this rank's buffer for `cap` (zeroed mail) on `device`. Throws Unavailable in a build
// without CUDA.
std::unique_ptr<PeerTransport> make_peer_transport(int rank, int size, int device, const PeerCapacity& cap, int64_t timeout_ms);

}  // namespace moe::comm
