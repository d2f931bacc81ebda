// Binding registry: each *_binding.cc registers its init function with MOE_REGISTER_BINDING, and
// module.cc calls them all, so adding an op's bindings never touches a shared file.
#pragma once
#include <napi.h>

#include <vector>

namespace moe::addon {

using BindingInit = void (*)(Napi::Env env, Napi::Object exports);

inline std::vector<BindingInit>& binding_inits() {
  static std::vector<BindingInit> inits;
  return inits;
}

struct BindingRegistrar {
  explicit BindingRegistrar(BindingInit init) { binding_inits().push_back(init); }
};

}  // namespace moe::addon

#define MOE_REGISTER_BINDING(init_fn) static ::moe::addon::BindingRegistrar moe_binding_registrar_##init_fn(init_fn)
