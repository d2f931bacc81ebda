#include "comm/communicator.h"

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
  MOE_ARG_CHECK(!(t.dtype() == DType::fp8e4m3), opname, "'tensor' ", t.describe(), ": fp8e4m3 cannot be reduced; cast to f32 or bf16 first");
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
