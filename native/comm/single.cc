// The one-rank communicator: every collective is a local copy (or nothing), with the same argument
// checks as the multi-rank backends, so code written for N ranks runs unchanged on one.
#include "comm/communicator.h"
#include "ops/copy/copy.h"

namespace moe::comm {

namespace {

class SingleCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  const char* backend() const override { return "single"; }

  void all_reduce(const Tensor& t, ReduceOp op) override {
    require_live("allReduce");
    check_all_reduce(t, op, "allReduce");  // sum, max, min and avg of one value are the value
  }
  void all_gather(const Tensor& in, const Tensor& out) override {
    require_live("allGather");
    check_all_gather(in, out, 1, "allGather");
    if (in.numel()) ops::copy(out, in);
  }
  void broadcast(const Tensor& t, int root) override {
    require_live("broadcast");
    check_broadcast(t, root, 1, "broadcast");
  }
  void barrier() override { require_live("barrier"); }
  void all_to_all(const Tensor& send, const Tensor& recv) override {
    require_live("allToAll");
    check_all_to_all(send, recv, 1, "allToAll");
    if (send.numel()) ops::copy(recv, send);
  }
  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows, const Tensor& recv,
                    const std::vector<int64_t>& recv_rows) override {
    require_live("allToAllV");
    check_all_to_all_v(send, send_rows, recv, recv_rows, 1, "allToAllV");
    // With one rank, recv_rows[0] = sum = recv rows and send_rows[0] = send rows; they must agree.
    MOE_ARG_CHECK(send_rows[0] == recv_rows[0], "allToAllV", "rank 0 sends itself ", send_rows[0], " rows (sendRows[0]) but expects ",
                  recv_rows[0], " (recvRows[0])");
    if (send.numel()) ops::copy(recv, send);
  }
  std::shared_ptr<Communicator> split(int color, int key) override {
    require_live("split");
    if (color < 0) return nullptr;
    auto c = std::make_shared<SingleCommunicator>();
    c->set_timeout_ms(timeout_ms_);
    return c;
  }
};

}  // namespace

std::shared_ptr<Communicator> make_single() { return std::make_shared<SingleCommunicator>(); }

}  // namespace moe::comm
