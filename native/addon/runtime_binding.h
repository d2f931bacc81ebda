// Memory statistics, the cache, and what this build and machine offer (for `moe-ep info`).
#pragma once
#include <napi.h>

namespace moe::addon {
void init_runtime(Napi::Env env, Napi::Object exports);
}
