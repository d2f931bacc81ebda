#include "comm/nccl/nccl_loader.h"

#include <dlfcn.h>
#include <glob.h>

#include <cstdlib>
#include <mutex>

#include "core/error.h"

namespace moe::nccl {

namespace {

Api g_api;
LoadStatus g_status;
std::vector<std::string> g_patterns_without_match;  // pip locations searched that held no NCCL

std::vector<std::string> glob_paths(const std::string& pattern) {
  std::vector<std::string> out;
  glob_t g{};
  if (glob(pattern.c_str(), 0, nullptr, &g) == 0)
    for (size_t i = 0; i < g.gl_pathc; ++i) out.emplace_back(g.gl_pathv[i]);
  globfree(&g);
  return out;
}

std::vector<std::string> candidates() {
  std::vector<std::string> c;
  if (const char* explicit_path = std::getenv("MOE_EP_NCCL_LIBRARY"); explicit_path && *explicit_path) {
    c.emplace_back(explicit_path);
    return c;
  }
  c.emplace_back("libnccl.so.2");  // the dynamic linker's own search
  std::vector<std::string> roots;
  if (const char* v = std::getenv("VIRTUAL_ENV")) roots.emplace_back(v);
  if (const char* v = std::getenv("CONDA_PREFIX")) roots.emplace_back(v);
  if (const char* v = std::getenv("HOME")) roots.emplace_back(std::string(v) + "/.local");
  for (const char* r : {"/usr/local", "/usr", "/opt/conda"}) roots.emplace_back(r);
  for (const auto& root : roots) {
    for (const char* sub :
         {"/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so.2", "/lib/python3*/dist-packages/nvidia/nccl/lib/libnccl.so.2"}) {
      auto found = glob_paths(root + sub);
      if (found.empty()) g_patterns_without_match.push_back(root + sub);
      for (auto& p : found) c.push_back(p);
    }
  }
  if (const char* v = std::getenv("CONDA_PREFIX")) c.push_back(std::string(v) + "/lib/libnccl.so.2");
  c.emplace_back("/opt/conda/lib/libnccl.so.2");
  return c;
}

template <typename Fn> bool bind(void* lib, Fn& fn, const char* name, std::string& missing) {
  fn = reinterpret_cast<Fn>(dlsym(lib, name));
  if (!fn) missing += std::string(missing.empty() ? "" : ", ") + name;
  return fn != nullptr;
}

void load() {
  for (const auto& path : candidates()) {
    void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
      const char* e = dlerror();
      g_status.attempts.push_back({path, e ? e : "dlopen failed"});
      continue;
    }
    std::string missing;
    Api a;
    bind(lib, a.getVersion, "ncclGetVersion", missing);
    bind(lib, a.getUniqueId, "ncclGetUniqueId", missing);
    bind(lib, a.commInitRank, "ncclCommInitRank", missing);
    bind(lib, a.commDestroy, "ncclCommDestroy", missing);
    bind(lib, a.commAbort, "ncclCommAbort", missing);
    bind(lib, a.commGetAsyncError, "ncclCommGetAsyncError", missing);
    bind(lib, a.getErrorString, "ncclGetErrorString", missing);
    bind(lib, a.getLastError, "ncclGetLastError", missing);
    bind(lib, a.allReduce, "ncclAllReduce", missing);
    bind(lib, a.broadcast, "ncclBroadcast", missing);
    bind(lib, a.allGather, "ncclAllGather", missing);
    bind(lib, a.send, "ncclSend", missing);
    bind(lib, a.recv, "ncclRecv", missing);
    bind(lib, a.groupStart, "ncclGroupStart", missing);
    bind(lib, a.groupEnd, "ncclGroupEnd", missing);
    std::string optional_missing;
    bind(lib, a.commSplit, "ncclCommSplit", optional_missing);
    if (!missing.empty()) {
      g_status.attempts.push_back({path, "opened, but lacks " + missing + " (NCCL older than 2.13?)"});
      dlclose(lib);
      continue;
    }
    int version = 0;
    a.getVersion(&version);
    Dl_info info{};
    g_status.path = (dladdr(reinterpret_cast<void*>(a.getVersion), &info) && info.dli_fname) ? info.dli_fname : path;
    g_status.attempts.push_back({path, ""});
    g_status.version = version;
    g_status.loaded = true;
    g_api = a;
    return;
  }
  std::string tried;
  for (auto& at : g_status.attempts) tried += "\n  " + at.path + ": " + at.error;
  for (auto& p : g_patterns_without_match) tried += "\n  " + p + ": no match";
  g_status.summary = "NCCL (libnccl.so.2) could not be loaded. Tried:" + tried +
                     "\nInstall NCCL (e.g. the libnccl2 package or pip install nvidia-nccl-cu13), or set MOE_EP_NCCL_LIBRARY "
                     "to the library's path.";
}

}  // namespace

const LoadStatus& load_status() {
  static std::once_flag once;
  std::call_once(once, load);
  return g_status;
}

const Api& api(const char* op) {
  const auto& s = load_status();
  if (!s.loaded) throw_error(ErrorKind::Unavailable, op, s.summary);
  return g_api;
}

}  // namespace moe::nccl
