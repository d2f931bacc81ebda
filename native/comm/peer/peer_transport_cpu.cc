// The peer-memory transport needs CUDA (IPC and kernels): a build without CUDA reports so.
#include "comm/peer/peer_transport.h"
#include "core/error.h"

#if !MOE_EP_WITH_CUDA
namespace moe::comm {

std::unique_ptr<PeerTransport> make_peer_transport(int, int, int, const PeerCapacity&, int64_t) {
  throw_error(ErrorKind::Unavailable, "peerTransport", "this addon was built without CUDA: the peer-memory transport needs GPUs");
}

}  // namespace moe::comm
#endif
