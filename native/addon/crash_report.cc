// Opt-in native backtraces on a fatal signal, for crashes seen only on machines we cannot debug
// interactively (a GPU run under mpirun that ends in "exited on signal 11"). With
// MOE_EP_CRASH_BACKTRACE=1 in the environment, SIGSEGV, SIGBUS, SIGILL and SIGFPE print the signal,
// the faulting address, the pid, the MPI rank when there is one, and the native frames to stderr
// (moe_ep.node's frames as moe_ep.node(+0xOFFSET): `addr2line -Cfe build/Release/moe_ep.node
// 0xOFFSET` names the function). The handler then reinstalls the previous action and returns, so
// the faulting instruction faults again into whatever handled the signal before (V8's WebAssembly
// trap handler, or the default: the process dies of the same signal, as mpirun expects). One shot:
// a debugging aid, not for production runs that rely on V8's handler (WebAssembly bounds traps).
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "addon/registry.h"

namespace moe::addon {

namespace {

constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE};
struct sigaction g_previous[sizeof(kSignals) / sizeof(kSignals[0])];
char g_rank[16] = "?";

void put(const char* s) {
  ssize_t ignored = write(STDERR_FILENO, s, strlen(s));
  (void)ignored;
}

// Async-signal-safe number formatting (no snprintf in a signal handler).
void put_number(uint64_t v, int base) {
  char buf[32];
  int i = sizeof buf;
  buf[--i] = 0;
  do {
    buf[--i] = "0123456789abcdef"[v % uint64_t(base)];
    v /= uint64_t(base);
  } while (v && i > 0);
  put(buf + i);
}

const char* signal_name(int sig) {
  switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGBUS: return "SIGBUS";
    case SIGILL: return "SIGILL";
    case SIGFPE: return "SIGFPE";
  }
  return "signal";
}

void on_fatal_signal(int sig, siginfo_t* info, void*) {
  put("\nmoe-ep: fatal ");
  put(signal_name(sig));
  if (info && info->si_code > 0) {
    put(" at address 0x");
    put_number(uint64_t(reinterpret_cast<uintptr_t>(info->si_addr)), 16);
  } else {
    put(" sent by kill() or raise()");
  }
  put(" in pid ");
  put_number(uint64_t(getpid()), 10);
  put(" (rank ");
  put(g_rank);
  put("); native backtrace:\n");
  void* frames[64];
  int n = backtrace(frames, 64);
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  put("moe-ep: end of backtrace; passing the signal on\n");
  for (size_t i = 0; i < sizeof(kSignals) / sizeof(kSignals[0]); ++i)
    if (kSignals[i] == sig) sigaction(sig, &g_previous[i], nullptr);
  // A fault (si_code > 0): returning re-executes the faulting instruction, which now reaches the
  // previous handler. A signal sent with kill() or raise(): send it again, delivered on return.
  if (!info || info->si_code <= 0) raise(sig);
}

void install(Napi::Env, Napi::Object) {
  const char* on = std::getenv("MOE_EP_CRASH_BACKTRACE");
  if (!on || !*on || std::strcmp(on, "0") == 0) return;
  for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "RANK"}) {
    const char* r = std::getenv(var);
    if (r && *r) {
      std::strncpy(g_rank, r, sizeof g_rank - 1);
      break;
    }
  }
  // The first backtrace() loads libgcc's unwinder (it allocates): do it now, not in the handler.
  void* warm[2];
  backtrace(warm, 2);
  for (size_t i = 0; i < sizeof(kSignals) / sizeof(kSignals[0]); ++i) {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fatal_signal;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(kSignals[i], &sa, &g_previous[i]);
  }
}

}  // namespace

MOE_REGISTER_BINDING(install);

}  // namespace moe::addon
