// Kernel switches: setKernelOptions({ groupedGemm: { hopper, fewRows, decode, skinny, bResident, trimTails, splitRows }, router: { fast,
// pdl } }) and kernelOptions(). lib/kernel-options.ts decides the values (defaults, the environment, the caller's choices) and always
// passes every field; each op's .cc reads its struct when it picks a kernel.
#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "ops/moe/grouped_gemm/grouped_gemm.h"
#include "ops/moe/router/router.h"

namespace moe::addon {

namespace {

constexpr const char* kOp = "setKernelOptions";

Napi::Object group(const Napi::Object& o, const char* name) {
  Napi::Value v = o.Get(name);
  MOE_ARG_CHECK(v.IsObject(), kOp, "'", name, "' must be an object");
  return v.As<Napi::Object>();
}

bool flag(const Napi::Object& g, const char* group_name, const char* name) {
  Napi::Value v = g.Get(name);
  MOE_ARG_CHECK(v.IsBoolean(), kOp, "'", group_name, ".", name, "' must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

// setKernelOptions({ groupedGemm: { hopper, fewRows, decode, skinny, bResident, trimTails, splitRows }, router: { fast, pdl } }): every
// field given.
Napi::Value set_kernel_options(const Napi::CallbackInfo& info) {
  MOE_ARG_CHECK(info.Length() >= 1 && info[0].IsObject(), kOp, "expects an object { groupedGemm, router }");
  const Napi::Object o = info[0].As<Napi::Object>();
  const Napi::Object gg = group(o, "groupedGemm"), r = group(o, "router");
  ops::GroupedGemmOptions g;
  g.hopper = flag(gg, "groupedGemm", "hopper");
  g.few_rows = flag(gg, "groupedGemm", "fewRows");
  g.decode = flag(gg, "groupedGemm", "decode");
  g.skinny = flag(gg, "groupedGemm", "skinny");
  g.b_resident = flag(gg, "groupedGemm", "bResident");
  g.trim_tails = flag(gg, "groupedGemm", "trimTails");
  g.split_rows = flag(gg, "groupedGemm", "splitRows");
  ops::RouterOptions ro;
  ro.fast = flag(r, "router", "fast");
  ro.pdl = flag(r, "router", "pdl");
  ops::set_grouped_gemm_options(g);
  ops::set_router_options(ro);
  return info.Env().Undefined();
}

// kernelOptions(): what the ops read now.
Napi::Value kernel_options(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const ops::GroupedGemmOptions g = ops::grouped_gemm_options();
  const ops::RouterOptions ro = ops::router_options();
  Napi::Object gg = Napi::Object::New(env), r = Napi::Object::New(env), o = Napi::Object::New(env);
  gg.Set("hopper", Napi::Boolean::New(env, g.hopper));
  gg.Set("bResident", Napi::Boolean::New(env, g.b_resident));
  gg.Set("trimTails", Napi::Boolean::New(env, g.trim_tails));
  gg.Set("fewRows", Napi::Boolean::New(env, g.few_rows));
  gg.Set("decode", Napi::Boolean::New(env, g.decode));
  gg.Set("skinny", Napi::Boolean::New(env, g.skinny));
  gg.Set("splitRows", Napi::Boolean::New(env, g.split_rows));
  r.Set("fast", Napi::Boolean::New(env, ro.fast));
  r.Set("pdl", Napi::Boolean::New(env, ro.pdl));
  o.Set("groupedGemm", gg);
  o.Set("router", r);
  return o;
}

void init_kernel_options(Napi::Env env, Napi::Object exports) {
  exports.Set("setKernelOptions", Napi::Function::New(env, binding<set_kernel_options>, "setKernelOptions"));
  exports.Set("kernelOptions", Napi::Function::New(env, binding<kernel_options>, "kernelOptions"));
}

}  // namespace

MOE_REGISTER_BINDING(init_kernel_options);

}  // namespace moe::addon
