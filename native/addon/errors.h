// Native errors to JavaScript errors. lib/errors.ts hands its Error subclasses to the addon at load
// time (setErrorClasses); every binding runs inside guarded(), which turns a moe::Error into an
// instance of the matching class with `kind` and `op` set. Nothing native escapes as a crash.
#pragma once
#include <napi.h>

#include "core/error.h"

namespace moe::addon {

void register_error_classes(const Napi::CallbackInfo& info);
void clear_error_classes();
Napi::Error to_js_error(Napi::Env env, const moe::Error& e);

template <typename Fn> auto guarded(Napi::Env env, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Napi::Error&) {
    throw;
  } catch (const moe::Error& e) {
    throw to_js_error(env, e);
  } catch (const std::bad_alloc&) {
    throw to_js_error(env, moe::Error(ErrorKind::OutOfMemory, "", "out of host memory"));
  } catch (const std::exception& e) {
    throw to_js_error(env, moe::Error(ErrorKind::Internal, "", e.what()));
  }
}

// Wraps a binding function so every call runs inside guarded().
template <Napi::Value (*F)(const Napi::CallbackInfo&)> Napi::Value binding(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&] { return F(info); });
}

}  // namespace moe::addon
