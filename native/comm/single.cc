// The one-rank communicator: every collective is a local copy (or nothing), with the same argument
// checks as the multi-rank backends, so code written for N ranks runs unchanged on one.
#include "comm/communicator.h"
#include "ops/basic/copy/copy.h"

#include <algorithm>

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
    agree("allReduce", CallKind::AllReduce, &t, int64_t(op));
  }
  void all_gather(const Tensor& in, const Tensor& out) override {
    require_live("allGather");
    check_all_gather(in, out, 1, "allGather");
    agree("allGather", CallKind::AllGather, &in, -1);
    if (in.numel()) ops::copy(out, in);
  }
  void broadcast(const Tensor& t, int root) override {
    require_live("broadcast");
    check_broadcast(t, root, 1, "broadcast");
    agree("broadcast", CallKind::Broadcast, &t, root);
  }
  void barrier() override {
    require_live("barrier");
    agree("barrier", CallKind::Barrier, nullptr, -1);
  }
  void all_to_all(const Tensor& send, const Tensor& recv) override {
    require_live("allToAll");
    check_all_to_all(send, recv, 1, "allToAll");
    agree("allToAll", CallKind::AllToAll, &send, -1);
    if (send.numel()) ops::copy(recv, send);
  }
  void all_to_all_v(const Tensor& send, const std::vector<int64_t>& send_rows, const Tensor& recv,
                    const std::vector<int64_t>& recv_rows) override {
    require_live("allToAllV");
    check_all_to_all_v(send, send_rows, recv, recv_rows, 1, "allToAllV");
    agree("allToAllV", CallKind::AllToAllV, &send, -1, &send_rows, &recv_rows);  // sendRows[0] must equal recvRows[0]
    if (send.numel()) ops::copy(recv, send);
  }
  std::shared_ptr<Communicator> split(int color, int key) override {
    require_live("split");
    agree("split", CallKind::Split, nullptr, -1);
    if (color < 0) return nullptr;
    auto c = std::make_shared<SingleCommunicator>();
    c->set_timeout_ms(timeout_ms_);
    return c;
  }

 protected:
  void gather_words(const char*, const int64_t* mine, int64_t* all, int64_t words) override { std::copy(mine, mine + words, all); }
};

}  // namespace

std::shared_ptr<Communicator> make_single() { return std::make_shared<SingleCommunicator>(); }

}  // namespace moe::comm
