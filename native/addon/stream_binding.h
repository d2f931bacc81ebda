// StreamHandle and EventHandle: CUDA streams and events for JS, so communication can overlap
// compute. On the CPU both exist and complete immediately, so code need not branch.
#pragma once
#include <napi.h>

#include "core/device.h"

namespace moe::addon {

class StreamHandle : public Napi::ObjectWrap<StreamHandle> {
 public:
  static void init(Napi::Env env, Napi::Object exports);
  static Napi::FunctionReference& constructor();
  explicit StreamHandle(const Napi::CallbackInfo& info);  // (deviceType, deviceIndex)
  void Finalize(Napi::Env env) override;
  void* raw() const { return stream_; }
  bool disposed() const { return disposed_; }
  const Device& device() const { return device_; }

 private:
  Napi::Value synchronize(const Napi::CallbackInfo& info);
  Napi::Value query(const Napi::CallbackInfo& info);
  Napi::Value wait_event(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info);
  void release();

  Device device_;
  void* stream_ = nullptr;
  bool disposed_ = false;
};

class EventHandle : public Napi::ObjectWrap<EventHandle> {
 public:
  static void init(Napi::Env env, Napi::Object exports);
  static Napi::FunctionReference& constructor();
  explicit EventHandle(const Napi::CallbackInfo& info);  // (deviceType, deviceIndex, timing)
  void Finalize(Napi::Env env) override;
  void* raw() const { return event_; }
  bool disposed() const { return disposed_; }

 private:
  Napi::Value record(const Napi::CallbackInfo& info);
  Napi::Value synchronize(const Napi::CallbackInfo& info);
  Napi::Value query(const Napi::CallbackInfo& info);
  Napi::Value elapsed_time(const Napi::CallbackInfo& info);
  Napi::Value block(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info);
  void release();
  void* live(const char* op) const;

  Device device_;
  void* event_ = nullptr;
  bool disposed_ = false;
  bool recorded_ = false;
};

}  // namespace moe::addon
