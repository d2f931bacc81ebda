#include "addon/stream_binding.h"

#include "addon/args.h"
#include "addon/errors.h"
#include "core/cuda_runtime.h"

namespace moe::addon {

namespace {
// setCurrentStream(deviceIndex, stream | null): ops on that device run on it from now on.
Napi::Value set_current_stream(const Napi::CallbackInfo& info) {
  const char* op = "setCurrentStream";
  int64_t index = arg_int(info, 0, op, "deviceIndex");
  MOE_ARG_CHECK(index >= 0 && index < 64, op, "'deviceIndex' ", index, " is out of range");
  void* s = arg_stream(info, 1, op);  // checks it is a live Stream (or null)
  if (info.Length() > 1 && !info[1].IsNull() && !info[1].IsUndefined()) {
    // Ops on cuda:index would otherwise be launched on another device's stream.
    const Device& d = StreamHandle::Unwrap(info[1].As<Napi::Object>())->device();
    MOE_ARG_CHECK(d.is_cuda() && d.index == int(index), op, "'stream' is on ", d.str(), " but 'deviceIndex' is ", index);
  }
  cuda::set_current_stream(int(index), s);
  return info.Env().Undefined();
}
Napi::Value device_synchronize(const Napi::CallbackInfo& info) {
  Device d = arg_device(info, 0, "synchronize");
  if (d.is_cuda()) {
    cuda::require_device(d, "synchronize");
    cuda::device_synchronize(d.index, "synchronize");
  }
  return info.Env().Undefined();
}
}  // namespace

// ------------------------------------------------------------------------------------ streams
Napi::FunctionReference& StreamHandle::constructor() {
  static auto* ref = new Napi::FunctionReference();
  return *ref;
}

void StreamHandle::init(Napi::Env env, Napi::Object exports) {
  Napi::Function cls =
      DefineClass(env, "StreamHandle",
                  {InstanceMethod<&StreamHandle::synchronize>("synchronize"), InstanceMethod<&StreamHandle::query>("query"),
                   InstanceMethod<&StreamHandle::wait_event>("waitEvent"), InstanceMethod<&StreamHandle::dispose>("dispose")});
  constructor() = Napi::Persistent(cls);
  env.AddCleanupHook([] { constructor().Reset(); });
  exports.Set("StreamHandle", cls);
  exports.Set("setCurrentStream", Napi::Function::New(env, binding<set_current_stream>, "setCurrentStream"));
  exports.Set("deviceSynchronize", Napi::Function::New(env, binding<device_synchronize>, "deviceSynchronize"));
}

StreamHandle::StreamHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<StreamHandle>(info) {
  guarded(info.Env(), [&] {
    device_ = arg_device(info, 0, "Stream");
    if (device_.is_cuda()) {
      cuda::require_device(device_, "Stream");
      stream_ = cuda::stream_acquire(device_.index);
    }
    return 0;
  });
}

void StreamHandle::release() {
  if (!disposed_ && stream_) {
    // A stream still current for its device must not stay current once disposed.
    if (cuda::current_stream(device_.index) == stream_) cuda::set_current_stream(device_.index, nullptr);
    // Back to the pool, not cudaStreamDestroy: the caching allocator may still hold this handle
    // (blocks allocated on it, blocks other streams marked as used on it with recordStream, freed
    // only later), and recording an event on a destroyed stream is undefined behaviour: a segfault
    // when tensors marked with recordStream(stream) outlived stream.dispose(). Work still queued
    // runs to completion; whoever gets the stream next is ordered after it, so there is nothing to
    // wait for here (nor in a finalizer during garbage collection).
    cuda::stream_release(device_.index, stream_);
  }
  stream_ = nullptr;
  disposed_ = true;
}
void StreamHandle::Finalize(Napi::Env) { release(); }

Napi::Value StreamHandle::synchronize(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    if (disposed_) throw_error(ErrorKind::Disposed, "Stream.synchronize", "the stream was disposed");
    if (stream_) cuda::stream_synchronize(device_.index, stream_, "Stream.synchronize");
    return info.Env().Undefined();
  });
}
Napi::Value StreamHandle::query(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    if (disposed_) throw_error(ErrorKind::Disposed, "Stream.query", "the stream was disposed");
    return Napi::Boolean::New(info.Env(), stream_ ? cuda::stream_query(device_.index, stream_) : true);
  });
}
Napi::Value StreamHandle::wait_event(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const char* op = "Stream.waitEvent";
    if (disposed_) throw_error(ErrorKind::Disposed, op, "the stream was disposed");
    MOE_ARG_CHECK(info.Length() > 0 && info[0].IsObject() && info[0].As<Napi::Object>().InstanceOf(EventHandle::constructor().Value()), op,
                  "'event' must be an Event");
    EventHandle* e = EventHandle::Unwrap(info[0].As<Napi::Object>());
    if (e->disposed()) throw_error(ErrorKind::Disposed, op, "'event' was disposed");
    if (stream_ && e->raw()) cuda::stream_wait_event(device_.index, stream_, e->raw());
    return info.Env().Undefined();
  });
}
Napi::Value StreamHandle::dispose(const Napi::CallbackInfo& info) {
  release();
  return info.Env().Undefined();
}

// ------------------------------------------------------------------------------------- events
Napi::FunctionReference& EventHandle::constructor() {
  static auto* ref = new Napi::FunctionReference();
  return *ref;
}

void EventHandle::init(Napi::Env env, Napi::Object exports) {
  Napi::Function cls =
      DefineClass(env, "EventHandle",
                  {InstanceMethod<&EventHandle::record>("record"), InstanceMethod<&EventHandle::synchronize>("synchronize"),
                   InstanceMethod<&EventHandle::query>("query"), InstanceMethod<&EventHandle::elapsed_time>("elapsedTime"),
                   InstanceMethod<&EventHandle::block>("block"), InstanceMethod<&EventHandle::dispose>("dispose")});
  constructor() = Napi::Persistent(cls);
  env.AddCleanupHook([] { constructor().Reset(); });
  exports.Set("EventHandle", cls);
}

EventHandle::EventHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<EventHandle>(info) {
  guarded(info.Env(), [&] {
    device_ = arg_device(info, 0, "Event");
    bool timing = arg_bool(info, 2, "Event", "timing");
    if (device_.is_cuda()) {
      cuda::require_device(device_, "Event");
      event_ = cuda::event_create(device_.index, timing);
    }
    return 0;
  });
}

void EventHandle::release() {
  if (!disposed_ && event_) cuda::event_destroy(device_.index, event_);
  event_ = nullptr;
  disposed_ = true;
}
void EventHandle::Finalize(Napi::Env) { release(); }

void* EventHandle::live(const char* op) const {
  if (disposed_) throw_error(ErrorKind::Disposed, op, "the event was disposed");
  return event_;
}

// record(stream | null): null means the device's current stream.
Napi::Value EventHandle::record(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const char* op = "Event.record";
    void* e = live(op);
    void* s = arg_stream_on(info, 0, op, device_, "the event");
    if (e) cuda::event_record(device_.index, e, s);
    recorded_ = true;
    return info.Env().Undefined();
  });
}
Napi::Value EventHandle::synchronize(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    if (void* e = live("Event.synchronize")) cuda::event_synchronize(e);
    return info.Env().Undefined();
  });
}
Napi::Value EventHandle::query(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    void* e = live("Event.query");
    return Napi::Boolean::New(info.Env(), e ? cuda::event_query(e) : true);
  });
}
// elapsedTime(end): milliseconds between this event and `end`, both recorded and complete.
Napi::Value EventHandle::elapsed_time(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const char* op = "Event.elapsedTime";
    void* e = live(op);
    MOE_ARG_CHECK(info.Length() > 0 && info[0].IsObject() && info[0].As<Napi::Object>().InstanceOf(constructor().Value()), op,
                  "'end' must be an Event");
    EventHandle* end = Unwrap(info[0].As<Napi::Object>());
    void* f = end->live(op);
    MOE_ARG_CHECK(recorded_ && end->recorded_, op, "both events must be recorded first");
    MOE_ARG_CHECK(e && f, op, "timing needs CUDA events created with timing enabled");
    return Napi::Number::New(info.Env(), cuda::event_elapsed_ms(e, f));
  });
}
// block(stream | null): work queued on `stream` (null: the device's current stream) from now on
// waits for this event. The host does not wait.
Napi::Value EventHandle::block(const Napi::CallbackInfo& info) {
  return guarded(info.Env(), [&]() -> Napi::Value {
    const char* op = "Event.block";
    void* e = live(op);
    void* s = arg_stream_on(info, 0, op, device_, "the event");
    if (e) cuda::stream_wait_event(device_.index, s, e);
    return info.Env().Undefined();
  });
}
Napi::Value EventHandle::dispose(const Napi::CallbackInfo& info) {
  release();
  return info.Env().Undefined();
}

}  // namespace moe::addon
