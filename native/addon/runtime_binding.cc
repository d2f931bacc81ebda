
#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "comm/nccl/nccl_loader.h"
#include "core/allocator.h"
#include "core/cuda_runtime.h"

#ifndef MOE_EP_CUDA_ARCHS
#define MOE_EP_CUDA_ARCHS ""
#endif
#ifndef MOE_EP_WITH_MPI
#define MOE_EP_WITH_MPI 0
#endif
#ifndef MOE_EP_CUDA_COMPILER_VERSION
#define MOE_EP_CUDA_COMPILER_VERSION ""
#endif

namespace moe::addon {

namespace {

Napi::Value memory_stats(const Napi::CallbackInfo& info) {
  MemoryStats s = moe::memory_stats(arg_device(info, 0, "memoryStats"));
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  auto put = [&](const char* k, int64_t v) { o.Set(k, Napi::Number::New(env, double(v))); };
  put("liveBytes", s.live_bytes);
  put("peakBytes", s.peak_bytes);
  put("cachedBytes", s.cached_bytes);
  put("reservedBytes", s.reserved_bytes);
  put("liveAllocations", s.live_allocations);
  put("allocations", s.allocations);
  put("cacheHits", s.cache_hits);
  put("deviceMallocs", s.device_mallocs);
  put("outOfMemory", s.out_of_memory);
  put("graphPoolBytes", s.graph_pool_bytes);
  return o;
}

Napi::Value reset_peak(const Napi::CallbackInfo& info) {
  moe::reset_peak_memory(arg_device(info, 0, "resetPeakMemory"));
  return info.Env().Undefined();
}

Napi::Value empty_cache(const Napi::CallbackInfo& info) {
  moe::empty_cache(arg_device(info, 0, "emptyCache"));
  return info.Env().Undefined();
}

Napi::Value build_info(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("cuda", Napi::Boolean::New(env, MOE_EP_WITH_CUDA != 0));
  o.Set("cudaArchitectures", Napi::String::New(env, MOE_EP_CUDA_ARCHS));
  o.Set("cudaCompilerVersion", Napi::String::New(env, MOE_EP_CUDA_COMPILER_VERSION));
  o.Set("ncclAbiChecked", Napi::Boolean::New(env, MOE_EP_NCCL_ABI_CHECKED != 0));
  o.Set("mpi", Napi::Boolean::New(env, MOE_EP_WITH_MPI != 0));
  o.Set("compiler", Napi::String::New(env, __VERSION__));
  return o;
}

Napi::Value cuda_status(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto& s = cuda::status();
  Napi::Object o = Napi::Object::New(env);
  o.Set("builtWithCuda", Napi::Boolean::New(env, s.built_with_cuda));
  o.Set("deviceCount", Napi::Number::New(env, s.device_count));
  o.Set("unavailable", Napi::String::New(env, s.unavailable));
  o.Set("driverVersion", Napi::Number::New(env, s.driver_version));
  o.Set("runtimeVersion", Napi::Number::New(env, s.runtime_version));
  return o;
}

Napi::Value device_properties(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  cuda::DeviceProps p = cuda::device_props(arg_i32(info, 0, "deviceProperties", "index"));
  int64_t free_b = 0, total_b = 0;
  cuda::mem_get_info(p.index, &free_b, &total_b);
  Napi::Object o = Napi::Object::New(env);
  o.Set("index", Napi::Number::New(env, p.index));
  o.Set("name", Napi::String::New(env, p.name));
  o.Set("totalMemory", Napi::Number::New(env, double(p.total_memory)));
  o.Set("freeMemory", Napi::Number::New(env, double(free_b)));
  o.Set("computeCapability", Napi::String::New(env, cat(p.major, ".", p.minor)));
  o.Set("multiprocessors", Napi::Number::New(env, p.multiprocessors));
  o.Set("l2Bytes", Napi::Number::New(env, double(p.l2_bytes)));
  o.Set("sharedMemoryPerBlockOptin", Napi::Number::New(env, double(p.shared_memory_per_block_optin)));
  o.Set("pciBusId", Napi::String::New(env, p.pci_bus_id));
  return o;
}

Napi::Value nccl_status(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto& s = nccl::load_status();
  Napi::Object o = Napi::Object::New(env);
  o.Set("loaded", Napi::Boolean::New(env, s.loaded));
  o.Set("path", Napi::String::New(env, s.path));
  o.Set("version", Napi::Number::New(env, s.version));
  o.Set("error", Napi::String::New(env, s.summary));
  Napi::Array tried = Napi::Array::New(env, s.attempts.size());
  for (size_t i = 0; i < s.attempts.size(); ++i) {
    Napi::Object a = Napi::Object::New(env);
    a.Set("path", Napi::String::New(env, s.attempts[i].path));
    a.Set("error", Napi::String::New(env, s.attempts[i].error));
    tried.Set(uint32_t(i), a);
  }
  o.Set("attempts", tried);
  return o;
}

// requireNccl(): throws the Unavailable error a collective would throw (tests and `info` use it).
Napi::Value require_nccl(const Napi::CallbackInfo& info) {
  nccl::api("nccl");
  return info.Env().Undefined();
}

// peerAccess() → [i][j] 1 when GPU i can address GPU j's memory (the 'ipc' transport needs it).
Napi::Value peer_access(const Napi::CallbackInfo& info) {
  const int n = cuda::status().device_count;
  Napi::Array m = Napi::Array::New(info.Env(), n);
  for (int i = 0; i < n; ++i) {
    Napi::Array row = Napi::Array::New(info.Env(), n);
    for (int j = 0; j < n; ++j) row.Set(uint32_t(j), Napi::Number::New(info.Env(), cuda::can_access_peer(i, j) ? 1 : 0));
    m.Set(uint32_t(i), row);
  }
  return m;
}

// hostWaitCounts() → { deviceToHost, synchronizations } since the process started.
Napi::Value host_wait_counts(const Napi::CallbackInfo& info) {
  const cuda::HostWaitCounts c = cuda::host_wait_counts();
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("deviceToHost", Napi::Number::New(info.Env(), double(c.device_to_host)));
  o.Set("synchronizations", Napi::Number::New(info.Env(), double(c.synchronizations)));
  return o;
}

}  // namespace

static void init_runtime(Napi::Env env, Napi::Object exports) {
  exports.Set("memoryStats", Napi::Function::New(env, binding<memory_stats>, "memoryStats"));
  exports.Set("resetPeakMemory", Napi::Function::New(env, binding<reset_peak>, "resetPeakMemory"));
  exports.Set("emptyCache", Napi::Function::New(env, binding<empty_cache>, "emptyCache"));
  exports.Set("buildInfo", Napi::Function::New(env, binding<build_info>, "buildInfo"));
  exports.Set("cudaStatus", Napi::Function::New(env, binding<cuda_status>, "cudaStatus"));
  exports.Set("deviceProperties", Napi::Function::New(env, binding<device_properties>, "deviceProperties"));
  exports.Set("ncclStatus", Napi::Function::New(env, binding<nccl_status>, "ncclStatus"));
  exports.Set("requireNccl", Napi::Function::New(env, binding<require_nccl>, "requireNccl"));
  exports.Set("peerAccess", Napi::Function::New(env, binding<peer_access>, "peerAccess"));
  exports.Set("hostWaitCounts", Napi::Function::New(env, binding<host_wait_counts>, "hostWaitCounts"));
}

MOE_REGISTER_BINDING(init_runtime);

}  // namespace moe::addon
