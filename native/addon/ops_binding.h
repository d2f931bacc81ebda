#pragma once
#include <napi.h>

namespace moe::addon {
void init_ops(Napi::Env env, Napi::Object exports);
}
