// Grouped GEMM bindings: unwrap, call the op.
#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "ops/moe/grouped_gemm/grouped_gemm.h"

namespace moe::addon {

namespace {

// groupedGemm(mode, epilogue, a, b, offsets, out, aux | null, accumulate, aScales | null)
Napi::Value grouped_gemm(const Napi::CallbackInfo& info) {
  const char* op = "groupedGemm";
  int64_t mode = arg_int(info, 0, op, "mode"), epilogue = arg_int(info, 1, op, "epilogue");
  MOE_ARG_CHECK(mode >= 0 && mode <= 2, op, "'mode' must be 0 (NN), 1 (NT) or 2 (TN)");
  MOE_ARG_CHECK(epilogue >= 0 && epilogue <= 2, op, "'epilogue' must be 0 (store), 1 (SwiGLU) or 2 (dSwiGLU)");
  ops::GroupedGemm g;
  g.mode = ops::GemmMode(mode);
  g.epilogue = ops::GemmEpilogue(epilogue);
  g.a = arg_tensor(info, 2, op, "a");
  g.b = arg_tensor(info, 3, op, "b");
  g.offsets = arg_tensor(info, 4, op, "offsets");
  g.out = arg_tensor(info, 5, op, "out");
  g.aux = arg_tensor(info, 6, op, "g", true);
  g.accumulate = arg_bool(info, 7, op, "accumulate");
  g.a_scales = arg_tensor(info, 8, op, "a.scales", true);
  ops::grouped_gemm(g);
  return info.Env().Undefined();
}

void init_grouped_gemm(Napi::Env env, Napi::Object exports) {
  exports.Set("groupedGemm", Napi::Function::New(env, binding<grouped_gemm>, "groupedGemm"));
}

}  // namespace

MOE_REGISTER_BINDING(init_grouped_gemm);

}  // namespace moe::addon
