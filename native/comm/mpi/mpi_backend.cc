// moe_ep_mpi.so: the MPI backend behind native/comm/mpi/mpi_api.h. Every wait is a poll of
// nonblocking requests (MPI_Test) against a deadline, so no call can hang past its timeout.
// exchange() (behind the addon's call agreement, all_to_all and all_to_all_v) is Isend/Irecv pairs,
// so a timeout names exactly the peers not heard from.
//
// Buffers of requests still pending after a timeout or error are not touched again here; the addon
// keeps their memory alive (it never frees a buffer handed to a timed-out call). Such a process is
// "unclean": its communicators are never freed and MPI_Finalize at exit gets a deadline, since a
// dead or frozen peer would keep it from returning.
#include "comm/mpi/mpi_api.h"

#include <mpi.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

struct moe_mpi_comm {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0;
  int size = 1;
};

namespace {

bool g_we_initialised = false;
// Set by a timeout, a failure or a local abort: requests may be pending and peers may be gone.
bool g_unclean = false;
// How long MPI_Finalize may take at exit in an unclean process: OpenMPI's waits for every process
// of the job, so a frozen peer would hold it forever; a live peer still reaches it within its own
// error path.
constexpr int kFinalizeDeadlineMs = 10000;
char g_version[MPI_MAX_LIBRARY_VERSION_STRING + 1] = {0};

int fail(moe_mpi_error* err, int code, const char* fmt, ...) {
  if (err) {
    err->code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
  }
  return code;
}

std::string mpi_error_string(int rc) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, buf, &len) != MPI_SUCCESS) return "MPI error " + std::to_string(rc);
  return std::string(buf, size_t(len));
}

using Clock = std::chrono::steady_clock;

// Polls until every request completes (returns OK), one fails (FAILED, *failed = its index), or
// the deadline passes (TIMEOUT). done[i] tells which completed; statuses are kept.
int wait_requests(std::vector<MPI_Request>& reqs, std::vector<char>& done, std::vector<MPI_Status>& st, int64_t timeout_ms, size_t* failed,
                  int* failed_rc) {
  auto start = Clock::now();
  size_t remaining = 0;
  for (size_t i = 0; i < reqs.size(); ++i) remaining += done[i] ? 0 : 1;
  int spins = 0;
  while (remaining) {
    for (size_t i = 0; i < reqs.size(); ++i) {
      if (done[i]) continue;
      int flag = 0;
      int rc = MPI_Test(&reqs[i], &flag, &st[i]);
      if (rc != MPI_SUCCESS) {
        *failed = i;
        *failed_rc = rc;
        return MOE_MPI_FAILED;
      }
      if (flag) {
        done[i] = 1;
        --remaining;
      }
    }
    if (!remaining) break;
    if (timeout_ms > 0 && Clock::now() - start > std::chrono::milliseconds(timeout_ms)) return MOE_MPI_TIMEOUT;
    // Spin briefly (latency), then back off to sleeping (a rank waiting on a slow peer should not
    // burn a core that peer may need, e.g. with oversubscribed ranks).
    if (++spins < 200) sched_yield();
    else usleep(spins < 2000 ? 50 : 1000);
  }
  return MOE_MPI_OK;
}

int wait_one(MPI_Request& req, int64_t timeout_ms, moe_mpi_comm* c, const char* opname, moe_mpi_error* err) {
  std::vector<MPI_Request> reqs{req};
  std::vector<char> done(1, 0);
  std::vector<MPI_Status> st(1);
  size_t failed = 0;
  int rc = 0;
  int r = wait_requests(reqs, done, st, timeout_ms, &failed, &rc);
  req = reqs[0];
  if (r == MOE_MPI_TIMEOUT) {
    g_unclean = true;
    return fail(err, MOE_MPI_TIMEOUT,
                "timed out after %lld ms on rank %d of %d (mpi); peers not heard from: unknown for this collective "
                "(at least one of the other %d ranks has not made the matching call)",
                (long long)timeout_ms, c->rank, c->size, c->size - 1);
  }
  if (r == MOE_MPI_FAILED) {
    g_unclean = true;
    return fail(err, MOE_MPI_FAILED, "MPI failed on rank %d: %s", c->rank, mpi_error_string(rc).c_str());
  }
  return MOE_MPI_OK;
}

int check_count(int64_t n, const char* what, moe_mpi_error* err) {
  if (n < 0 || n > INT_MAX)
    return fail(err, MOE_MPI_INVALID, "%s of %lld exceeds the MPI backend's limit of %d per message", what, (long long)n, INT_MAX);
  return MOE_MPI_OK;
}

// on_exit (not atexit): the exit status is needed to leave with it when MPI_Finalize overruns.
void finalize_at_exit(int status, void*) {
  int fin = 0;
  MPI_Finalized(&fin);
  if (fin) return;
  if (g_unclean) {
    // After a timeout the peer may be frozen: leave without MPI_Finalize once the deadline passes
    // (the launcher then reports this process and ends the job).
    std::thread([status] {
      std::this_thread::sleep_for(std::chrono::milliseconds(kFinalizeDeadlineMs));
      fprintf(stderr,
              "moe-ep: MPI_Finalize did not return within %d ms after a failed collective (a peer is gone or frozen); exiting without it\n",
              kFinalizeDeadlineMs);
      _exit(status);
    }).detach();
  }
  MPI_Finalize();
}

int api_init(moe_mpi_error* err) {
  int inited = 0, finalized = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&finalized);
  if (finalized) return fail(err, MOE_MPI_UNAVAILABLE, "MPI was already finalized in this process");
  if (!inited) {
    int provided = 0;
    int rc = MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
    if (rc != MPI_SUCCESS) return fail(err, MOE_MPI_FAILED, "MPI_Init_thread failed: %s", mpi_error_string(rc).c_str());
    g_we_initialised = true;
    // MPI_Finalize at exit, when we initialised MPI: launchers such as OpenMPI's mpirun report a
    // process that exits without it as failed. MOE_EP_MPI_FINALIZE=0 skips it.
    const char* f = getenv("MOE_EP_MPI_FINALIZE");
    if (!f || strcmp(f, "0") != 0) on_exit(finalize_at_exit, nullptr);
  }
  return MOE_MPI_OK;
}

// Allowed before MPI_Init (MPI-3), so `moe-ep info` can report it without starting MPI.
const char* api_library_version() {
  if (!g_version[0]) {
    int len = 0;
    MPI_Get_library_version(g_version, &len);
    for (int i = 0; i < len; ++i)
      if (g_version[i] == '\n' || g_version[i] == ',') {
        g_version[i] = 0;
        break;
      }
  }
  return g_version;
}

moe_mpi_comm* wrap(MPI_Comm comm) {
  auto* c = new moe_mpi_comm();
  c->comm = comm;
  MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
  MPI_Comm_rank(comm, &c->rank);
  MPI_Comm_size(comm, &c->size);
  return c;
}

moe_mpi_comm* api_world(int64_t timeout_ms, moe_mpi_error* err) {
  if (api_init(err) != MOE_MPI_OK) return nullptr;
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm dup = MPI_COMM_NULL;
  MPI_Request req = MPI_REQUEST_NULL;
  int rc = MPI_Comm_idup(MPI_COMM_WORLD, &dup, &req);
  if (rc != MPI_SUCCESS) {
    fail(err, MOE_MPI_FAILED, "MPI_Comm_idup failed: %s", mpi_error_string(rc).c_str());
    return nullptr;
  }
  moe_mpi_comm tmp;
  MPI_Comm_rank(MPI_COMM_WORLD, &tmp.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &tmp.size);
  if (wait_one(req, timeout_ms, &tmp, "commMpi", err) != MOE_MPI_OK) return nullptr;
  return wrap(dup);
}

int api_rank(const moe_mpi_comm* c) { return c->rank; }
int api_size(const moe_mpi_comm* c) { return c->size; }

MPI_Datatype mpi_type(int dtype) {
  switch (dtype) {
    case MOE_MPI_F32: return MPI_FLOAT;
    case MOE_MPI_I32: return MPI_INT32_T;
    case MOE_MPI_I64: return MPI_INT64_T;
    case MOE_MPI_U8: return MPI_UINT8_T;
  }
  return MPI_DATATYPE_NULL;
}

template <typename T> void divide(void* buf, int64_t n, int by) {
  T* p = static_cast<T*>(buf);
  for (int64_t i = 0; i < n; ++i) p[i] = T(p[i] / T(by));
}

int api_all_reduce(moe_mpi_comm* c, void* buf, int64_t count, int dtype, int op, int64_t timeout_ms, const char* opname,
                   moe_mpi_error* err) {
  if (check_count(count, "element count", err)) return err->code;
  MPI_Datatype t = mpi_type(dtype);
  if (t == MPI_DATATYPE_NULL) return fail(err, MOE_MPI_INVALID, "dtype code %d cannot be reduced by the MPI backend", dtype);
  MPI_Op o = op == 1 ? MPI_MAX : op == 2 ? MPI_MIN : MPI_SUM;
  MPI_Request req = MPI_REQUEST_NULL;
  int rc = MPI_Iallreduce(MPI_IN_PLACE, buf, int(count), t, o, c->comm, &req);
  if (rc != MPI_SUCCESS) return fail(err, MOE_MPI_FAILED, "MPI_Iallreduce failed: %s", mpi_error_string(rc).c_str());
  if (int r = wait_one(req, timeout_ms, c, opname, err)) return r;
  if (op == 3) {  // avg: sum, then divide by the number of ranks (integers truncate toward zero)
    switch (dtype) {
      case MOE_MPI_F32: divide<float>(buf, count, c->size); break;
      case MOE_MPI_I32: divide<int32_t>(buf, count, c->size); break;
      case MOE_MPI_I64: divide<int64_t>(buf, count, c->size); break;
      case MOE_MPI_U8: divide<uint8_t>(buf, count, c->size); break;
    }
  }
  return MOE_MPI_OK;
}

int api_all_gather(moe_mpi_comm* c, const void* in, void* out, int64_t bytes, int64_t timeout_ms, const char* opname, moe_mpi_error* err) {
  if (check_count(bytes, "bytes per rank", err)) return err->code;
  MPI_Request req = MPI_REQUEST_NULL;
  int rc = MPI_Iallgather(in, int(bytes), MPI_BYTE, out, int(bytes), MPI_BYTE, c->comm, &req);
  if (rc != MPI_SUCCESS) return fail(err, MOE_MPI_FAILED, "MPI_Iallgather failed: %s", mpi_error_string(rc).c_str());
  return wait_one(req, timeout_ms, c, opname, err);
}

int api_broadcast(moe_mpi_comm* c, void* buf, int64_t bytes, int root, int64_t timeout_ms, const char* opname, moe_mpi_error* err) {
  if (check_count(bytes, "byte count", err)) return err->code;
  MPI_Request req = MPI_REQUEST_NULL;
  int rc = MPI_Ibcast(buf, int(bytes), MPI_BYTE, root, c->comm, &req);
  if (rc != MPI_SUCCESS) return fail(err, MOE_MPI_FAILED, "MPI_Ibcast failed: %s", mpi_error_string(rc).c_str());
  return wait_one(req, timeout_ms, c, opname, err);
}

std::string list(const std::vector<int>& v) {
  std::string s;
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s;
}

int api_exchange(moe_mpi_comm* c, int tag, const void* send, const int64_t* send_bytes, void* recv, const int64_t* recv_bytes,
                 int64_t timeout_ms, const char* opname, moe_mpi_error* err) {
  (void)opname;
  const int n = c->size;
  for (int p = 0; p < n; ++p) {
    if (check_count(send_bytes[p], "a message to one peer", err)) return err->code;
    if (check_count(recv_bytes[p], "a message from one peer", err)) return err->code;
  }
  // Requests: [0,n) receives, [n,2n) sends.
  std::vector<MPI_Request> reqs(size_t(2 * n), MPI_REQUEST_NULL);
  std::vector<MPI_Status> st(reqs.size());
  std::vector<int64_t> soff(size_t(n) + 1, 0), roff(size_t(n) + 1, 0);
  for (int p = 0; p < n; ++p) {
    soff[size_t(p) + 1] = soff[size_t(p)] + send_bytes[p];
    roff[size_t(p) + 1] = roff[size_t(p)] + recv_bytes[p];
  }
  auto post_fail = [&](int rc, const char* what, int p) {
    g_unclean = true;  // requests posted so far stay pending
    return fail(err, MOE_MPI_FAILED, "%s to/from rank %d failed on rank %d: %s", what, p, c->rank, mpi_error_string(rc).c_str());
  };
  int rc;
  for (int p = 0; p < n; ++p) {
    if (recv_bytes[p] > 0 &&
        (rc = MPI_Irecv(static_cast<char*>(recv) + roff[size_t(p)], int(recv_bytes[p]), MPI_BYTE, p, tag, c->comm, &reqs[size_t(p)])))
      return post_fail(rc, "MPI_Irecv", p);
  }
  for (int q = 0; q < n; ++q) {
    int p = (c->rank + q) % n;  // start with ourselves, then the next ranks: spreads the load
    if (send_bytes[p] > 0 && (rc = MPI_Isend(static_cast<const char*>(send) + soff[size_t(p)], int(send_bytes[p]), MPI_BYTE, p, tag,
                                             c->comm, &reqs[size_t(n + p)])))
      return post_fail(rc, "MPI_Isend", p);
  }
  std::vector<char> done(reqs.size(), 0);
  for (size_t i = 0; i < reqs.size(); ++i) done[i] = reqs[i] == MPI_REQUEST_NULL;
  size_t failed = 0;
  int failed_rc = 0;
  int r = wait_requests(reqs, done, st, timeout_ms, &failed, &failed_rc);
  if (r == MOE_MPI_TIMEOUT) {
    g_unclean = true;
    std::vector<int> missing, unsent;
    for (int p = 0; p < n; ++p) {
      if (!done[size_t(p)]) missing.push_back(p);
      else if (!done[size_t(n + p)]) unsent.push_back(p);
    }
    std::string extra = unsent.empty() ? "" : "; sends not yet taken by rank" + std::string(unsent.size() == 1 ? " " : "s ") + list(unsent);
    return fail(err, MOE_MPI_TIMEOUT, "timed out after %lld ms on rank %d of %d (mpi); not heard from rank%s %s%s", (long long)timeout_ms,
                c->rank, n, missing.size() == 1 ? "" : "s", missing.empty() ? "(none)" : list(missing).c_str(), extra.c_str());
  }
  if (r == MOE_MPI_FAILED) {
    g_unclean = true;
    int p = int(failed % size_t(n));
    int cls = 0;
    MPI_Error_class(failed_rc, &cls);
    // Sizes were agreed before; MPI truncates a longer message rather than overrun the buffer.
    if (failed < size_t(n) && cls == MPI_ERR_TRUNCATE)
      return fail(err, MOE_MPI_INVALID, "rank %d sent rank %d more than the %lld bytes agreed", p, c->rank, (long long)recv_bytes[p]);
    return fail(err, MOE_MPI_FAILED, "a message to/from rank %d failed on rank %d: %s", p, c->rank, mpi_error_string(failed_rc).c_str());
  }
  for (int p = 0; p < n; ++p) {
    if (recv_bytes[p] == 0) continue;
    int got = 0;
    MPI_Get_count(&st[size_t(p)], MPI_BYTE, &got);
    if (got != recv_bytes[p])
      return fail(err, MOE_MPI_INVALID, "rank %d sent rank %d %d bytes where %lld were agreed", p, c->rank, got, (long long)recv_bytes[p]);
  }
  return MOE_MPI_OK;
}

moe_mpi_comm* api_split(moe_mpi_comm* c, int color, int key, moe_mpi_error* err) {
  MPI_Comm out = MPI_COMM_NULL;
  int rc = MPI_Comm_split(c->comm, color < 0 ? MPI_UNDEFINED : color, key, &out);
  if (rc != MPI_SUCCESS) {
    fail(err, MOE_MPI_FAILED, "MPI_Comm_split failed: %s", mpi_error_string(rc).c_str());
    return nullptr;
  }
  if (out == MPI_COMM_NULL) {
    err->code = MOE_MPI_OK;
    return nullptr;
  }
  return wrap(out);
}

void api_abandon(moe_mpi_comm*) { g_unclean = true; }

void api_free(moe_mpi_comm* c) {
  if (!c) return;
  int fin = 0;
  MPI_Finalized(&fin);
  // In an unclean process a free could wait on pending requests or a gone peer: leave it.
  if (!fin && c->comm != MPI_COMM_NULL && !g_unclean) MPI_Comm_free(&c->comm);
  delete c;
}

const moe_mpi_api g_api = {
    MOE_MPI_ABI_VERSION, api_init,      api_library_version, api_world, api_rank,    api_size, api_all_reduce,
    api_all_gather,      api_broadcast, api_exchange,        api_split, api_abandon, api_free,
};

}  // namespace

extern "C" const moe_mpi_api* moe_ep_mpi_api(void) { return &g_api; }
