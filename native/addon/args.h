// Reading arguments from JavaScript. Types are checked here (a wrong JS type is the caller's bug
// and says which argument); values are checked by the ops themselves.
#pragma once
#include <napi.h>

#include <string>

#include "core/device.h"
#include "core/dtype.h"
#include "core/tensor.h"

namespace moe::addon {

double arg_number(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name);
int64_t arg_int(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name);
// An integer argument the op keeps in an int (a dim, a rank, a device): refused past 32 bits rather
// than wrapped by the cast (2^32 + 1 would become 1).
int arg_i32(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name);
bool arg_bool(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name);
DType arg_dtype(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name);
Device arg_device(const Napi::CallbackInfo& info, size_t i, const char* op);  // two arguments: type, index
Shape arg_shape(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name);
// A tensor argument: must be a live TensorHandle. `optional` accepts undefined/null (returns an undefined Tensor).
Tensor arg_tensor(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name, bool optional = false);
void* arg_stream(const Napi::CallbackInfo& info, size_t i, const char* op);  // StreamHandle or null
// A stream for work on `device`: the given Stream (which must be on `device`; `owner` names what
// is there, for the error), or null for the device's current stream (null on the CPU).
void* arg_stream_on(const Napi::CallbackInfo& info, size_t i, const char* op, const Device& device, const std::string& owner);

Napi::Array shape_to_js(Napi::Env env, const Shape& shape);

}  // namespace moe::addon
