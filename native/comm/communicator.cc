#include "comm/communicator.h"

#include <array>

#include "core/error.h"
#include "ops/common/checks.h"

namespace moe::comm {

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return "sum";
    case ReduceOp::Max: return "max";
    case ReduceOp::Min: return "min";
    case ReduceOp::Avg: return "avg";
  }
  return "?";
}

void Communicator::require_live(const char* op) const {
  MOE_ARG_CHECK(!aborted_, op, "the ", backend(), " communicator (rank ", rank(), " of ", size(),
                ") was aborted (after a timeout, an error or abort()); create a new one");
}

namespace {

const char* kind_name(int64_t k) {
  switch (CallKind(k)) {
    case CallKind::AllReduce: return "allReduce";
    case CallKind::AllGather: return "allGather";
    case CallKind::Broadcast: return "broadcast";
    case CallKind::AllToAll: return "allToAll";
    case CallKind::AllToAllV: return "allToAllV";
    case CallKind::Barrier: return "barrier";
    case CallKind::Split: return "split";
  }
  return "an unknown call";
}

// splitmix64: a well-mixed 64-bit hash, so that sums of hashes of (sender, receiver, rows) over all
// pairs match between senders and receivers only when every pair matches (but for a 2^-64 chance).
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}
uint64_t pair_hash(int64_t from, int64_t to, int64_t rows) { return mix(mix((uint64_t(from) << 32) ^ uint64_t(to)) ^ uint64_t(rows)); }

bool same_call(const CallHeader& a, const CallHeader& b) {
  return a.kind == b.kind && a.dtype == b.dtype && a.rows == b.rows && a.row_elems == b.row_elems && a.arg == b.arg;
}

std::string describe(const CallHeader& h) {
  std::string s = kind_name(h.kind);
  if (CallKind(h.kind) == CallKind::AllReduce) s += cat("(", (h.arg >= 0 && h.arg <= 3) ? reduce_op_name(ReduceOp(h.arg)) : "?", ")");
  if (CallKind(h.kind) == CallKind::Broadcast) s += cat("(root ", h.arg, ")");
  if (h.dtype < 0) return s;
  const char* dt = (h.dtype < kNumDTypes) ? dtype_name(DType(h.dtype)) : "?";
  if (CallKind(h.kind) == CallKind::AllToAllV) return cat(s, " on rows of ", h.row_elems, " ", dt);
  return cat(s, " on ", h.rows, " rows × ", h.row_elems, " ", dt);
}

// "rank 3" / "ranks 1, 2, 5" (at most 16 listed).
std::string ranks_text(const std::vector<int>& r) {
  std::string s = r.size() == 1 ? "rank " : "ranks ";
  for (size_t i = 0; i < r.size() && i < 16; ++i) s += cat(i ? ", " : "", r[i]);
  if (r.size() > 16) s += cat(" and ", r.size() - 16, " more");
  return s;
}

}  // namespace

void Communicator::agree(const char* op, CallKind kind, const Tensor* t, int64_t arg, const std::vector<int64_t>* send_rows,
                         const std::vector<int64_t>* recv_rows) {
  const int n = size(), me = rank();
  CallHeader h;
  h.kind = int64_t(kind);
  h.arg = arg;
  if (t) {
    h.dtype = int64_t(t->dtype());
    h.rows = kind == CallKind::AllToAllV ? 0 : t->size(0);
    h.row_elems = 1;
    for (int d = 1; d < t->dim(); ++d) h.row_elems *= t->size(d);
  }
  if (send_rows && recv_rows) {
    uint64_t sh = 0, rh = 0;
    for (int p = 0; p < n; ++p) {
      sh += pair_hash(me, p, (*send_rows)[size_t(p)]);
      rh += pair_hash(p, me, (*recv_rows)[size_t(p)]);
    }
    h.send_hash = int64_t(sh);
    h.recv_hash = int64_t(rh);
  }
  const std::array<int64_t, kCallHeaderWords> mine_words{h.kind, h.dtype, h.rows, h.row_elems, h.arg, h.send_hash, h.recv_hash};
  std::vector<int64_t> words(size_t(n) * size_t(kCallHeaderWords));
  gather_words(op, mine_words.data(), words.data(), kCallHeaderWords);
  std::vector<CallHeader> all(static_cast<size_t>(n));
  for (size_t r = 0; r < all.size(); ++r) {
    const int64_t* w = &words[r * size_t(kCallHeaderWords)];
    all[r] = CallHeader{w[0], w[1], w[2], w[3], w[4], w[5], w[6]};
  }

  // Every rank holds the same headers, so every rank reaches the same verdict.
  std::vector<CallHeader> kinds;  // the distinct calls, in order of the first rank making each
  std::vector<std::vector<int>> who;
  for (int r = 0; r < n; ++r) {
    size_t i = 0;
    while (i < kinds.size() && !same_call(kinds[i], all[size_t(r)])) ++i;
    if (i == kinds.size()) {
      kinds.push_back(all[size_t(r)]);
      who.emplace_back();
    }
    who[i].push_back(r);
  }
  if (kinds.size() > 1) {
    std::string others, agreeing;
    for (size_t i = 0; i < kinds.size(); ++i) {
      std::vector<int> peers;
      for (int r : who[i])
        if (r != me) peers.push_back(r);
      if (peers.empty()) continue;
      if (same_call(kinds[i], h)) agreeing = cat(" (as ", peers.size() == 1 ? "does " : "do ", ranks_text(peers), ")");
      else others += cat(others.empty() ? "" : "; ", ranks_text(peers), peers.size() == 1 ? " calls " : " call ", describe(kinds[i]));
    }
    throw_error(ErrorKind::InvalidArgument, op,
                cat("rank ", me, " of ", n, ": ", others, " but this rank calls ", describe(h), agreeing,
                    "; every rank must make the same call with the same dtype and shape (nothing was sent; the ", backend(),
                    " communicator stays usable)"));
  }
  if (kind != CallKind::AllToAllV) return;
  uint64_t sent = 0, expected = 0;
  for (const CallHeader& x : all) {
    sent += uint64_t(x.send_hash);
    expected += uint64_t(x.recv_hash);
  }
  if (sent == expected) return;
  // Some pair disagrees: exchange the counts themselves (same size everywhere: n sends, n receives)
  // so that every rank can name the pairs.
  std::vector<int64_t> mine(size_t(2 * n)), counts(size_t(2 * n) * size_t(n));
  for (int p = 0; p < n; ++p) {
    mine[size_t(p)] = (*send_rows)[size_t(p)];
    mine[size_t(n + p)] = (*recv_rows)[size_t(p)];
  }
  gather_words(op, mine.data(), counts.data(), 2 * n);
  std::string pairs;
  int listed = 0, more = 0;
  for (int from = 0; from < n; ++from) {
    for (int to = 0; to < n; ++to) {
      const int64_t s = counts[size_t(from) * size_t(2 * n) + size_t(to)];
      const int64_t r = counts[size_t(to) * size_t(2 * n) + size_t(n + from)];
      if (s == r) continue;
      if (listed++ < 4)
        pairs += cat(pairs.empty() ? "" : "; ", "rank ", from, " sends ", s, " rows to rank ", to, " but rank ", to, " expects ", r,
                     " (recvRows[", from, "])");
      else ++more;
    }
  }
  if (more) pairs += cat("; and ", more, " more");
  throw_error(ErrorKind::InvalidArgument, op,
              cat("rank ", me, " of ", n, ": ", pairs, "; exchange the counts first (nothing was sent; the ", backend(),
                  " communicator stays usable)"));
}

int64_t row_bytes(const Tensor& t) {
  int64_t n = dtype_size(t.dtype());
  for (int d = 1; d < t.dim(); ++d) n *= t.size(d);
  return n;
}

void check_tensor(const Tensor& t, const char* op, const char* arg) {
  ops::require_defined(t, op, arg);
  ops::require_contiguous(t, op, arg);
  MOE_ARG_CHECK(t.dim() >= 1, op, "'", arg, "' ", t.describe(), " is a scalar; collectives count rows along dim 0");
  ops::require_usable_device(t, op);
}

static Shape row_shape(const Tensor& t) { return Shape(t.shape().begin() + 1, t.shape().end()); }

static void check_pair(const Tensor& a, const char* an, const Tensor& b, const char* bn, const char* op) {
  check_tensor(a, op, an);
  check_tensor(b, op, bn);
  MOE_ARG_CHECK(a.dtype() == b.dtype(), op, "'", bn, "' ", b.describe(), " has dtype ", dtype_name(b.dtype()), " but '", an, "' ",
                a.describe(), " has ", dtype_name(a.dtype()));
  ops::require_same_device(a, an, b, bn, op);
  MOE_ARG_CHECK(row_shape(a) == row_shape(b), op, "'", bn, "' ", b.describe(), " and '", an, "' ", a.describe(),
                " must have the same row shape (dims after 0)");
}

void check_all_reduce(const Tensor& t, ReduceOp op, const char* opname) {
  check_tensor(t, opname, "tensor");
  int o = int(op);
  MOE_ARG_CHECK(o >= 0 && o <= 3, opname, "'op' ", o, " is not sum, max, min or avg");
  MOE_ARG_CHECK(!(t.dtype() == DType::fp8e4m3), opname, "'tensor' ", t.describe(),
                ": fp8e4m3 cannot be reduced; cast to f32 or bf16 first");
}

void check_all_gather(const Tensor& in, const Tensor& out, int size, const char* op) {
  check_pair(in, "input", out, "output", op);
  MOE_ARG_CHECK(out.size(0) == in.size(0) * size, op, "'output' ", out.describe(), " must have ", size, "·", in.size(0), " = ",
                in.size(0) * size, " rows (communicator size × input rows)");
}

void check_broadcast(const Tensor& t, int root, int size, const char* op) {
  check_tensor(t, op, "tensor");
  MOE_ARG_CHECK(root >= 0 && root < size, op, "'root' ", root, " is not a rank of this communicator of size ", size);
}

void check_all_to_all(const Tensor& send, const Tensor& recv, int size, const char* op) {
  check_pair(send, "send", recv, "recv", op);
  MOE_ARG_CHECK(send.size(0) % size == 0, op, "'send' ", send.describe(), " has ", send.size(0),
                " rows, not a multiple of the communicator size ", size);
  MOE_ARG_CHECK(recv.size(0) == send.size(0), op, "'recv' ", recv.describe(), " must have as many rows as 'send' ", send.describe(),
                " (equal chunks per peer)");
}

static void check_counts(const std::vector<int64_t>& rows, const Tensor& t, const char* arg, const char* targ, int size, const char* op) {
  MOE_ARG_CHECK(int64_t(rows.size()) == size, op, "'", arg, "' has ", rows.size(), " entries but the communicator has ", size,
                " ranks (one count per peer)");
  int64_t sum = 0;
  for (size_t p = 0; p < rows.size(); ++p) {
    MOE_ARG_CHECK(rows[p] >= 0, op, "'", arg, "'[", p, "] = ", rows[p], " is negative");
    sum += rows[p];
  }
  MOE_ARG_CHECK(sum == t.size(0), op, "'", arg, "' adds up to ", sum, " rows but '", targ, "' ", t.describe(), " has ", t.size(0));
}

void check_all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows, const Tensor& recv,
                        const std::vector<int64_t>& recv_rows, int size, const char* op) {
  check_pair(send, "send", recv, "recv", op);
  check_counts(send_rows, send, "sendRows", "send", size, op);
  check_counts(recv_rows, recv, "recvRows", "recv", size, op);
}

}  // namespace moe::comm
