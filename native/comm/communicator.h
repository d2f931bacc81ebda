// Communicators: a group of ranks and the collectives moe-ep needs, on tensors. Three backends:
//   "single" (one rank; copies), "mpi" (host memory; CUDA tensors staged through pinned host
//   memory; lives in build/Release/moe_ep_mpi.so, opened on first use), "nccl" (device memory,
//   NCCL opened at run time).
//
// Rules for every collective (checked before any communication; violations throw InvalidArgument
// naming the op and the argument):
//   - tensors are contiguous, dim >= 1; counts are in rows (units of dim 0); all ranks pass the
//     same dtype and row shape (dims 1..), and the same op/root;
//   - all_gather: out is [size*rows, ...] of in [rows, ...]; rank r's rows land at r*rows;
//   - all_to_all: send and recv are [size*rows_per_peer, ...]; chunk p of send goes to peer p,
//     chunk p of recv comes from peer p;
//   - all_to_all_v: send_rows[p] rows of send go to peer p, recv_rows[p] rows of recv come from p,
//     each peer's rows contiguous in order of p; sum(send_rows) = send.size(0) and
//     sum(recv_rows) = recv.size(0); recv_rows[p] must equal what p sends us (the caller
//     exchanged counts first; the MPI backend verifies it and names the peer otherwise).
// Ranks agree before data moves: every collective first gathers a small header from every rank
// (op, reduce op or root, dtype, rows, row width; for all_to_all_v a checksum of the counts) and,
// when the ranks disagree, throws InvalidArgument on every rank alike, naming the op, this rank, the
// peers that differ and their values. Nothing has been sent then, so the communicator stays usable.
// A mismatch therefore never reaches the data transfer, where it would overrun buffers.
// Every blocking wait honours timeout_ms() (0 = wait forever). On timeout a Timeout error names
// the op, this rank and the peers not heard from where the backend knows them, and the
// communicator is aborted: every later call throws at once.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace moe::comm {

enum class ReduceOp : int { Sum = 0, Max = 1, Min = 2, Avg = 3 };
const char* reduce_op_name(ReduceOp op);

enum class CallKind : int64_t { AllReduce = 1, AllGather = 2, Broadcast = 3, AllToAll = 4, AllToAllV = 5, Barrier = 6, Split = 7 };

// What one rank is about to do, as agree() exchanges it (as kCallHeaderWords int64, in field order):
// the same size on every rank whatever the call, so the exchange itself can never disagree on sizes.
struct CallHeader {
  int64_t kind = 0;       // CallKind
  int64_t dtype = -1;     // DType code of the tensor as passed; -1: no tensor
  int64_t rows = 0;       // dim 0; 0 for all_to_all_v (ranks differ) and calls without a tensor
  int64_t row_elems = 0;  // elements per row (product of dims 1..)
  int64_t arg = -1;       // the reduce op (all_reduce) or the root (broadcast); -1 otherwise
  int64_t send_hash = 0;  // all_to_all_v: sum over peers q of mix(rank, q, send_rows[q])
  int64_t recv_hash = 0;  // all_to_all_v: sum over peers p of mix(p, rank, recv_rows[p])
};
constexpr int64_t kCallHeaderWords = 7;

constexpr int64_t kDefaultTimeoutMs = 300000;

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const char* backend() const = 0;  // "single" | "mpi" | "nccl"

  int64_t timeout_ms() const { return timeout_ms_; }
  void set_timeout_ms(int64_t ms) { timeout_ms_ = ms; }
  bool aborted() const { return aborted_; }

  virtual void all_reduce(const Tensor& t, ReduceOp op) = 0;
  virtual void all_gather(const Tensor& in, const Tensor& out) = 0;
  virtual void broadcast(const Tensor& t, int root) = 0;
  virtual void barrier() = 0;
  virtual void all_to_all(const Tensor& send, const Tensor& recv) = 0;
  virtual void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows, const Tensor& recv,
                            const std::vector<int64_t>& recv_rows) = 0;
  // Ranks passing the same color form a new communicator, ordered by key (ties by old rank).
  // A negative color takes no part and gets nullptr.
  virtual std::shared_ptr<Communicator> split(int color, int key) = 0;
  // Marks the communicator unusable (and, for NCCL, aborts its work). Local: peers are not told.
  virtual void abort() { aborted_ = true; }

 protected:
  // Throws Disposed-like InvalidArgument when aborted; every collective starts with it.
  void require_live(const char* op) const;
  // Every collective's first exchange, after its local argument checks: gathers every rank's
  // CallHeader (t: the tensor whose dtype and shape the ranks must share; nullptr for barrier and
  // split) and throws InvalidArgument on every rank when they differ. For all_to_all_v the headers
  // carry checksums of the counts; when they disagree a second exchange of the counts themselves
  // names the pairs of ranks that disagree (only then: the agreeing case costs one small exchange).
  void agree(const char* op, CallKind kind, const Tensor* t, int64_t arg, const std::vector<int64_t>* send_rows = nullptr,
             const std::vector<int64_t>* recv_rows = nullptr);
  // agree()'s transport: rank r's `words` int64 land at all[r * words], on every rank. Honours the
  // timeout like any collective (throws Timeout and aborts on it).
  virtual void gather_words(const char* op, const int64_t* mine, int64_t* all, int64_t words) = 0;
  int64_t timeout_ms_ = kDefaultTimeoutMs;
  bool aborted_ = false;
};

// ---- shared argument checks (the backends call them first) ----
// Bytes of one row (product of dims 1.. times the element size).
int64_t row_bytes(const Tensor& t);
void check_tensor(const Tensor& t, const char* op, const char* arg);
void check_all_reduce(const Tensor& t, ReduceOp op, const char* opname);
void check_all_gather(const Tensor& in, const Tensor& out, int size, const char* op);
void check_broadcast(const Tensor& t, int root, int size, const char* op);
void check_all_to_all(const Tensor& send, const Tensor& recv, int size, const char* op);
void check_all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows, const Tensor& recv,
                        const std::vector<int64_t>& recv_rows, int size, const char* op);

std::shared_ptr<Communicator> make_single();

// The MPI backend (native/comm/mpi/mpi_comm.cc): opens moe_ep_mpi.so on first use and initialises MPI
// unless the application already did. Throws Unavailable saying why when it cannot.
std::shared_ptr<Communicator> make_mpi_world(int64_t timeout_ms);
struct MpiStatus {
  bool built = false;   // the addon was built next to an MPI backend library
  bool loaded = false;  // the library opened (only tried by mpi_status(true) or first use)
  std::string path;     // where it was looked for / loaded from
  std::string library;  // the MPI library's own version string, when loaded
  std::string error;    // why not, when not loaded
};
MpiStatus mpi_status(bool try_load);

// The NCCL backend (native/comm/nccl/nccl.cc): one rank per GPU. unique_id is 128 bytes from rank 0's
// nccl_unique_id(), shared by the caller (MPI broadcast or the TCP rendezvous).
std::shared_ptr<Communicator> make_nccl(int rank, int size, const std::string& unique_id, int device, int64_t timeout_ms);
std::string nccl_unique_id();

}  // namespace moe::comm
