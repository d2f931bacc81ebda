// The addon's entry point: registers every binding. lib/native.ts is the only importer.
#include <napi.h>

#include <dlfcn.h>

#include <atomic>

#include "addon/errors.h"
#include "addon/registry.h"
#include "addon/stream_binding.h"
#include "addon/tensor_binding.h"

namespace moe::addon {
namespace {

// Node unloads the library when the last thread that loaded it exits; the next load would start a
// second copy of the statics, the device memory pools and the statically linked CUDA runtime, the
// first copy's cached device memory lost. Pinned instead: a process loads the addon once.
void keep_loaded() {
  Dl_info self{};
  if (dladdr(reinterpret_cast<void*>(&keep_loaded), &self) != 0 && self.dli_fname != nullptr)
    dlopen(self.dli_fname, RTLD_LAZY | RTLD_NOLOAD | RTLD_NODELETE);  // the same mapping, now never unloaded
}

Napi::Value set_error_classes(const Napi::CallbackInfo& info) {
  MOE_ARG_CHECK(info.Length() > 0 && info[0].IsObject(), "setErrorClasses", "expects an object of constructors");
  register_error_classes(info);
  return info.Env().Undefined();
}

Napi::Object init(Napi::Env env, Napi::Object exports) {
  // The bindings keep their JS classes and error constructors in process-wide statics: a second
  // JavaScript environment (a worker thread) registering its own would overwrite the first's, and
  // both threads would then crash. The environment that loads the addon keeps it until it exits (a
  // worker that ends hands it on: the next one registers afresh); others meanwhile are refused.
  static std::atomic<bool> taken{false};
  if (taken.exchange(true))
    throw Napi::Error::New(env,
                           "moe-ep: the addon is already in use by another JavaScript thread of this process; its bindings are "
                           "per process, so use moe-ep from one thread (for parallel work, start processes: child processes or "
                           "mpirun ranks)");
  // Run last at this environment's teardown (hooks run in reverse order: the bindings' own hooks,
  // added below, drop their class references first): only then may another thread take the addon.
  env.AddCleanupHook([] {
    clear_error_classes();
    taken.store(false);
  });
  keep_loaded();
  exports.Set("setErrorClasses", Napi::Function::New(env, binding<set_error_classes>, "setErrorClasses"));
  // 2: recordStream, Event.wait, stream pool; 3: peer transport; 4: fp8 quantised in the peer push;
  // 5: setKernelOptions; 6: CUDA graphs (GraphHandle, memoryStats.graphPoolBytes); 7: permuteBackward's
  // add; 8: setKernelOptions takes groupedGemm.pingpong and .decode; 9: and groupedGemm.fusedHandoff;
  // 10: neither groupedGemm.pingpong nor .fusedHandoff (their losing kernels moved to the ladder);
  // 11: groupedGemm.skinny; 12: groupedGemm.splitRows
  exports.Set("abiVersion", Napi::Number::New(env, 12));
  TensorHandle::init(env, exports);
  StreamHandle::init(env, exports);
  EventHandle::init(env, exports);
  for (BindingInit init : binding_inits()) init(env, exports);
  return exports;
}

}  // namespace
}  // namespace moe::addon

static Napi::Object init_module(Napi::Env env, Napi::Object exports) { return moe::addon::init(env, exports); }
NODE_API_MODULE(moe_ep, init_module)
