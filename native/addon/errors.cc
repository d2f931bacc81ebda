#include "addon/errors.h"

#include <map>

namespace moe::addon {

namespace {
// One persistent reference per error kind; set once by lib/errors.ts when the addon loads.
std::map<ErrorKind, Napi::FunctionReference>& classes() {
  static auto* m = new std::map<ErrorKind, Napi::FunctionReference>();
  return *m;
}
}  // namespace

void register_error_classes(const Napi::CallbackInfo& info) {
  Napi::Object table = info[0].As<Napi::Object>();
  for (ErrorKind k : {ErrorKind::InvalidArgument, ErrorKind::Disposed, ErrorKind::Cuda, ErrorKind::OutOfMemory, ErrorKind::Nccl,
                      ErrorKind::Unavailable, ErrorKind::Timeout, ErrorKind::Internal}) {
    Napi::Value ctor = table.Get(error_kind_name(k));
    if (ctor.IsFunction()) classes()[k] = Napi::Persistent(ctor.As<Napi::Function>());
  }
}

Napi::Error to_js_error(Napi::Env env, const moe::Error& e) {
  auto it = classes().find(e.kind());
  Napi::Object obj;
  if (it != classes().end()) {
    obj = it->second.New({Napi::String::New(env, e.what())});
  } else {
    obj = Napi::Error::New(env, e.what()).Value();
  }
  obj.Set("kind", Napi::String::New(env, error_kind_name(e.kind())));
  if (!e.op().empty()) obj.Set("op", Napi::String::New(env, e.op()));
  return Napi::Error(env, obj);
}

void clear_error_classes() { classes().clear(); }

}  // namespace moe::addon
