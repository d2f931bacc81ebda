#include "addon/tensor_binding.h"

#include <algorithm>
#include <cstring>

#include "addon/args.h"
#include "addon/errors.h"
#include "addon/stream_binding.h"
#include "core/cuda_runtime.h"
#include "ops/basic/copy/copy.h"

namespace moe::addon {

namespace {
Napi::Value tensor_empty(const Napi::CallbackInfo& info) {
  const char* op = "empty";
  Shape shape = arg_shape(info, 0, op, "shape");
  DType dtype = arg_dtype(info, 1, op, "dtype");
  Device device = arg_device(info, 2, op);
  return TensorHandle::wrap(info.Env(), Tensor::empty(shape, dtype, device, op));
}

// fromBuffer(bytes: ArrayBuffer | ArrayBufferView, shape, dtype, deviceType, deviceIndex)
Napi::Value tensor_from_buffer(const Napi::CallbackInfo& info) {
  const char* op = "fromArray";
  const void* src = nullptr;
  size_t bytes = 0;
  if (info.Length() > 0 && info[0].IsArrayBuffer()) {
    auto ab = info[0].As<Napi::ArrayBuffer>();
    src = ab.Data();
    bytes = ab.ByteLength();
  } else if (info.Length() > 0 && info[0].IsTypedArray()) {
    auto ta = info[0].As<Napi::TypedArray>();
    src = static_cast<const char*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
    bytes = ta.ByteLength();
  } else {
    throw_error(ErrorKind::InvalidArgument, op, "'data' must be a TypedArray or an ArrayBuffer");
  }
  Shape shape = arg_shape(info, 1, op, "shape");
  DType dtype = arg_dtype(info, 2, op, "dtype");
  Device device = arg_device(info, 3, op);
  check_shape(shape, dtype, op, "shape");
  int64_t n = 1;
  for (auto d : shape) n *= d;
  MOE_ARG_CHECK(int64_t(bytes) == n * dtype_size(dtype), op, "'data' holds ", bytes, " bytes but shape ", shape_str(shape), " of ",
                dtype_name(dtype), " needs ", n * dtype_size(dtype));
  Tensor host = Tensor::empty(shape, dtype, cpu_device(), op);
  if (bytes) std::memcpy(host.raw(), src, bytes);
  if (device.is_cpu()) return TensorHandle::wrap(info.Env(), host);
  Tensor out = Tensor::empty(shape, dtype, device, op);
  ops::copy(out, host);
  return TensorHandle::wrap(info.Env(), out);
}
}  // namespace

Napi::FunctionReference& TensorHandle::constructor() {
  static Napi::FunctionReference* ref = new Napi::FunctionReference();
  return *ref;
}

void TensorHandle::init(Napi::Env env, Napi::Object exports) {
  Napi::Function cls =
      DefineClass(env, "TensorHandle",
                  {InstanceMethod<&TensorHandle::describe>("describe"), InstanceMethod<&TensorHandle::dispose>("dispose"),
                   InstanceMethod<&TensorHandle::is_disposed>("isDisposed"), InstanceMethod<&TensorHandle::view>("view"),
                   InstanceMethod<&TensorHandle::narrow>("narrow"), InstanceMethod<&TensorHandle::transpose>("transpose"),
                   InstanceMethod<&TensorHandle::to_buffer>("toBuffer"), InstanceMethod<&TensorHandle::shares_storage>("sharesStorage"),
                   InstanceMethod<&TensorHandle::record_stream>("recordStream")});
  constructor() = Napi::Persistent(cls);
  env.AddCleanupHook([] { constructor().Reset(); });
  exports.Set("TensorHandle", cls);
  exports.Set("tensorEmpty", Napi::Function::New(env, binding<tensor_empty>, "tensorEmpty"));
  exports.Set("tensorFromBuffer", Napi::Function::New(env, binding<tensor_from_buffer>, "tensorFromBuffer"));
}

TensorHandle::TensorHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TensorHandle>(info) {}

Napi::Object TensorHandle::wrap(Napi::Env env, Tensor tensor) {
  Napi::Object obj = constructor().New({});
  TensorHandle* h = Unwrap(obj);
  // A handle that is the first owner of its storage tells V8 about it, so that handles dropped without
  // dispose() are collected under memory pressure. Host storage counts its bytes. Device storage
  // counts a fixed weight per handle, not its bytes: V8 reads external bytes as host-memory pressure
  // and runs a full collection when they jump, so reporting a 470 MB device buffer cost ~1-2 ms of
  // host time per allocation (H200, f838df1: permute's host time 0.7-2 ms for 0.16 ms of GPU work).
  if (tensor.storage().use_count() == 1) {
    constexpr int64_t kDeviceHandleWeight = 64 << 10;
    const int64_t bytes = tensor.storage()->bytes();
    h->external_bytes_ = tensor.device().is_cuda() ? std::min(bytes, kDeviceHandleWeight) : bytes;
    Napi::MemoryManagement::AdjustExternalMemory(env, h->external_bytes_);
  }
  h->tensor_ = std::move(tensor);
  return obj;
}

void TensorHandle::release(Napi::Env env) {
  tensor_ = Tensor();
  if (external_bytes_) {
    Napi::MemoryManagement::AdjustExternalMemory(env, -external_bytes_);
    external_bytes_ = 0;
  }
}

void TensorHandle::Finalize(Napi::Env env) { release(env); }

const Tensor& TensorHandle::live(const char* op) const {
  if (!tensor_.defined()) throw_error(ErrorKind::Disposed, op, "the tensor was disposed and cannot be used");
  return tensor_;
}

Napi::Value TensorHandle::describe(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const Tensor& t = live("tensor");
    Napi::Env env = info.Env();
    Napi::Object o = Napi::Object::New(env);
    o.Set("shape", shape_to_js(env, t.shape()));
    o.Set("strides", shape_to_js(env, t.strides()));
    o.Set("offset", Napi::Number::New(env, double(t.offset())));
    o.Set("dtype", Napi::Number::New(env, double(int(t.dtype()))));
    o.Set("deviceType", Napi::Number::New(env, double(int(t.device().type))));
    o.Set("deviceIndex", Napi::Number::New(env, t.device().index));
    o.Set("contiguous", Napi::Boolean::New(env, t.is_contiguous()));
    return o;
  });
}

Napi::Value TensorHandle::dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  release(env);
  // Node-API runs wrapped objects' finalizers from the event loop (SetImmediate), so the wrap of
  // every collected handle (~200 bytes) waited there, disposed or not: a synchronous loop (checkpoint
  // saves and loads make ~600 handles each) grew until the loop ran. A disposed handle owns nothing
  // more: unwrap and free it now, leaving V8 a plain object with nothing to finalize. JS never calls
  // a handle after dispose() (Tensor drops it; its methods throw DisposedError first).
  if (napi_remove_wrap(env, info.This(), nullptr) == napi_ok) delete this;
  return env.Undefined();
}

Napi::Value TensorHandle::is_disposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !tensor_.defined()); }

Napi::Value TensorHandle::view(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    Tensor t = live("view").view(arg_shape(info, 0, "view", "shape"));
    return wrap(info.Env(), std::move(t));
  });
}

Napi::Value TensorHandle::narrow(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const char* op = "narrow";
    Tensor t = live(op).narrow(arg_i32(info, 0, op, "dim"), arg_int(info, 1, op, "start"), arg_int(info, 2, op, "length"));
    return wrap(info.Env(), std::move(t));
  });
}

Napi::Value TensorHandle::transpose(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const char* op = "transpose";
    Tensor t = live(op).transpose(arg_i32(info, 0, op, "dim0"), arg_i32(info, 1, op, "dim1"));
    return wrap(info.Env(), std::move(t));
  });
}

// Copies the values, in row-major order and the tensor's own dtype, into a new ArrayBuffer.
// From a CUDA tensor this waits for the device (a deliberate synchronisation).
Napi::Value TensorHandle::to_buffer(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const Tensor& t = live("toArray");
    if (t.device().is_cuda() && cuda::capture_open_on_this_thread())
      cuda::refuse_in_capture("toArray", "reads a device tensor on the host (a device-to-host copy, then a wait for the device)");
    Tensor host = t;
    if (!t.device().is_cpu() || !t.is_contiguous()) {
      host = Tensor::empty(t.shape(), t.dtype(), cpu_device(), "toArray");
      ops::copy(host, t);
    }
    Napi::ArrayBuffer ab = Napi::ArrayBuffer::New(info.Env(), size_t(host.nbytes()));
    if (host.nbytes()) std::memcpy(ab.Data(), host.raw(), size_t(host.nbytes()));
    return ab;
  });
}

Napi::Value TensorHandle::shares_storage(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    Tensor other = arg_tensor(info, 0, "sharesStorage", "other");
    return Napi::Boolean::New(info.Env(), live("sharesStorage").storage() == other.storage());
  });
}

// recordStream(stream | null): the tensor's memory is also used on `stream` (null: its device's
// current stream), so the caching allocator must not hand it out again until the work queued there
// when the tensor is freed has finished. Nothing to do on the CPU.
Napi::Value TensorHandle::record_stream(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const char* op = "recordStream";
    const Tensor& t = live(op);
    void* stream = arg_stream_on(info, 0, op, t.device(), "the tensor " + t.describe());
    if (t.device().is_cuda() && t.storage()->data()) moe::record_stream(t.device(), t.storage()->data(), stream);
    return info.Env().Undefined();
  });
}

}  // namespace moe::addon
