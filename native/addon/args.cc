#include "addon/args.h"

#include <cmath>
#include <cstdint>

#include "addon/stream_binding.h"
#include "addon/tensor_binding.h"
#include "core/cuda_runtime.h"

namespace moe::addon {

double arg_number(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
  MOE_ARG_CHECK(info.Length() > i && info[i].IsNumber(), op, "'", name, "' must be a number");
  return info[i].As<Napi::Number>().DoubleValue();
}

int64_t arg_int(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
  double v = arg_number(info, i, op, name);
  MOE_ARG_CHECK(std::isfinite(v) && v == std::floor(v) && std::fabs(v) <= 9007199254740991.0, op, "'", name, "' must be an integer, got ",
                v);
  return int64_t(v);
}

int arg_i32(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
  int64_t v = arg_int(info, i, op, name);
  MOE_ARG_CHECK(v >= INT32_MIN && v <= INT32_MAX, op, "'", name, "' must fit in 32 bits, got ", v);
  return int(v);
}

bool arg_bool(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
  MOE_ARG_CHECK(info.Length() > i && info[i].IsBoolean(), op, "'", name, "' must be a boolean");
  return info[i].As<Napi::Boolean>().Value();
}

DType arg_dtype(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
  int64_t v = arg_int(info, i, op, name);
  MOE_ARG_CHECK(v >= 0 && v < kNumDTypes, op, "'", name, "' is not a dtype code (", v, ")");
  return DType(v);
}

Device arg_device(const Napi::CallbackInfo& info, size_t i, const char* op) {
  int64_t type = arg_int(info, i, op, "deviceType"), index = arg_int(info, i + 1, op, "deviceIndex");
  MOE_ARG_CHECK(type == 0 || type == 1, op, "'deviceType' must be 0 (cpu) or 1 (cuda)");
  MOE_ARG_CHECK(index >= 0 && index < 64, op, "'deviceIndex' ", index, " is out of range");
  return Device{DeviceType(type), int(index)};
}

Shape arg_shape(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
  MOE_ARG_CHECK(info.Length() > i && info[i].IsArray(), op, "'", name, "' must be an array of integers");
  Napi::Array a = info[i].As<Napi::Array>();
  MOE_ARG_CHECK(a.Length() <= uint32_t(kMaxDims), op, "'", name, "' has ", a.Length(), " dimensions; at most ", kMaxDims);
  Shape s;
  for (uint32_t k = 0; k < a.Length(); ++k) {
    Napi::Value v = a.Get(k);
    MOE_ARG_CHECK(v.IsNumber(), op, "'", name, "' element ", k, " is not a number");
    double d = v.As<Napi::Number>().DoubleValue();
    MOE_ARG_CHECK(std::isfinite(d) && d == std::floor(d) && std::fabs(d) <= 9007199254740991.0, op, "'", name, "' element ", k,
                  " is not an integer (", d, ")");
    s.push_back(int64_t(d));
  }
  return s;
}

Tensor arg_tensor(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name, bool optional) {
  if (optional && (info.Length() <= i || info[i].IsUndefined() || info[i].IsNull())) return Tensor();
  MOE_ARG_CHECK(info.Length() > i && info[i].IsObject(), op, "'", name, "' must be a tensor");
  Napi::Object obj = info[i].As<Napi::Object>();
  MOE_ARG_CHECK(obj.InstanceOf(TensorHandle::constructor().Value()), op, "'", name, "' must be a tensor");
  TensorHandle* h = TensorHandle::Unwrap(obj);
  if (!h->tensor().defined()) throw_error(ErrorKind::Disposed, op, cat("'", name, "' was disposed and cannot be used"));
  return h->tensor();
}

void* arg_stream(const Napi::CallbackInfo& info, size_t i, const char* op) {
  if (info.Length() <= i || info[i].IsNull() || info[i].IsUndefined()) return nullptr;
  MOE_ARG_CHECK(info[i].IsObject() && info[i].As<Napi::Object>().InstanceOf(StreamHandle::constructor().Value()), op,
                "'stream' must be a Stream or null");
  StreamHandle* s = StreamHandle::Unwrap(info[i].As<Napi::Object>());
  if (s->disposed()) throw_error(ErrorKind::Disposed, op, "'stream' was disposed and cannot be used");
  return s->raw();
}

void* arg_stream_on(const Napi::CallbackInfo& info, size_t i, const char* op, const Device& device, const std::string& owner) {
  if (void* s = arg_stream(info, i, op)) {
    const Device& d = StreamHandle::Unwrap(info[i].As<Napi::Object>())->device();
    MOE_ARG_CHECK(d == device, op, "'stream' is on ", d.str(), " but ", owner, " is on ", device.str());
    return s;
  }
  return device.is_cuda() ? cuda::current_stream(device.index) : nullptr;
}

Napi::Array shape_to_js(Napi::Env env, const Shape& shape) {
  Napi::Array a = Napi::Array::New(env, shape.size());
  for (size_t k = 0; k < shape.size(); ++k) a.Set(uint32_t(k), Napi::Number::New(env, double(shape[k])));
  return a;
}

}  // namespace moe::addon
