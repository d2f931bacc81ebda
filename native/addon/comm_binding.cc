// Communicators for JavaScript: CommHandle wraps a shared moe::comm::Communicator. Factories:
// commSingle(), commMpi(timeoutMs), commNccl(rank, size, uniqueId, device, timeoutMs),
// ncclUniqueId(), mpiStatus(tryLoad).
#include <cstring>
#include <memory>

#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "comm/communicator.h"

namespace moe::addon {

namespace {

class CommHandle : public Napi::ObjectWrap<CommHandle> {
 public:
  static Napi::FunctionReference& constructor() {
    static auto* ref = new Napi::FunctionReference();
    return *ref;
  }
  static void init(Napi::Env env, Napi::Object exports) {
    Napi::Function cls =
        DefineClass(env, "CommHandle",
                    {InstanceMethod<&CommHandle::rank>("rank"), InstanceMethod<&CommHandle::size>("size"),
                     InstanceMethod<&CommHandle::backend>("backend"), InstanceMethod<&CommHandle::timeout>("timeoutMs"),
                     InstanceMethod<&CommHandle::set_timeout>("setTimeoutMs"), InstanceMethod<&CommHandle::is_aborted>("isAborted"),
                     InstanceMethod<&CommHandle::all_reduce>("allReduce"), InstanceMethod<&CommHandle::all_gather>("allGather"),
                     InstanceMethod<&CommHandle::broadcast>("broadcast"), InstanceMethod<&CommHandle::barrier>("barrier"),
                     InstanceMethod<&CommHandle::all_to_all>("allToAll"), InstanceMethod<&CommHandle::all_to_all_v>("allToAllV"),
                     InstanceMethod<&CommHandle::split>("split"), InstanceMethod<&CommHandle::abort>("abort"),
                     InstanceMethod<&CommHandle::dispose>("dispose")});
    constructor() = Napi::Persistent(cls);
    env.AddCleanupHook([] { constructor().Reset(); });
    exports.Set("CommHandle", cls);
  }
  static Napi::Value wrap(Napi::Env env, std::shared_ptr<comm::Communicator> c) {
    if (!c) return env.Null();
    Napi::Object obj = constructor().New({});
    Unwrap(obj)->comm_ = std::move(c);
    return obj;
  }

  explicit CommHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CommHandle>(info) {}

 private:
  comm::Communicator& live(const char* op) {
    if (!comm_) throw_error(ErrorKind::Disposed, op, "the communicator was disposed");
    return *comm_;
  }
  template <typename Fn> Napi::Value call(const Napi::CallbackInfo& info, Fn&& fn) {
    return guarded(info.Env(), [&]() -> Napi::Value { return fn(); });
  }
  static std::vector<int64_t> counts(const Napi::CallbackInfo& info, size_t i, const char* op, const char* name) {
    MOE_ARG_CHECK(info.Length() > i && info[i].IsArray(), op, "'", name, "' must be an array of row counts");
    Napi::Array a = info[i].As<Napi::Array>();
    std::vector<int64_t> v(a.Length());
    for (uint32_t k = 0; k < a.Length(); ++k) {
      Napi::Value x = a.Get(k);
      MOE_ARG_CHECK(x.IsNumber(), op, "'", name, "'[", k, "] is not a number");
      double d = x.As<Napi::Number>().DoubleValue();
      MOE_ARG_CHECK(d == double(int64_t(d)) && d > -9.0e15 && d < 9.0e15, op, "'", name, "'[", k, "] = ", d, " is not an integer");
      v[k] = int64_t(d);
    }
    return v;
  }

  Napi::Value rank(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value { return Napi::Number::New(info.Env(), live("rank").rank()); });
  }
  Napi::Value size(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value { return Napi::Number::New(info.Env(), live("size").size()); });
  }
  Napi::Value backend(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value { return Napi::String::New(info.Env(), live("backend").backend()); });
  }
  Napi::Value timeout(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value { return Napi::Number::New(info.Env(), double(live("timeoutMs").timeout_ms())); });
  }
  Napi::Value set_timeout(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      int64_t ms = arg_int(info, 0, "timeoutMs", "timeoutMs");
      MOE_ARG_CHECK(ms >= 0, "timeoutMs", "'timeoutMs' ", ms, " is negative (0 means no timeout)");
      live("timeoutMs").set_timeout_ms(ms);
      return info.Env().Undefined();
    });
  }
  Napi::Value is_aborted(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value { return Napi::Boolean::New(info.Env(), comm_ && comm_->aborted()); });
  }
  Napi::Value all_reduce(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      const char* op = "allReduce";
      auto& c = live(op);
      Tensor t = arg_tensor(info, 0, op, "tensor");
      c.all_reduce(t, comm::ReduceOp(arg_int(info, 1, op, "op")));
      return info.Env().Undefined();
    });
  }
  Napi::Value all_gather(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      const char* op = "allGather";
      auto& c = live(op);
      c.all_gather(arg_tensor(info, 0, op, "input"), arg_tensor(info, 1, op, "output"));
      return info.Env().Undefined();
    });
  }
  Napi::Value broadcast(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      const char* op = "broadcast";
      auto& c = live(op);
      c.broadcast(arg_tensor(info, 0, op, "tensor"), arg_i32(info, 1, op, "root"));
      return info.Env().Undefined();
    });
  }
  Napi::Value barrier(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      live("barrier").barrier();
      return info.Env().Undefined();
    });
  }
  Napi::Value all_to_all(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      const char* op = "allToAll";
      auto& c = live(op);
      c.all_to_all(arg_tensor(info, 0, op, "send"), arg_tensor(info, 1, op, "recv"));
      return info.Env().Undefined();
    });
  }
  Napi::Value all_to_all_v(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      const char* op = "allToAllV";
      auto& c = live(op);
      Tensor send = arg_tensor(info, 0, op, "send");
      auto sr = counts(info, 1, op, "sendRows");
      Tensor recv = arg_tensor(info, 2, op, "recv");
      auto rr = counts(info, 3, op, "recvRows");
      c.all_to_all_v(send, sr, recv, rr);
      return info.Env().Undefined();
    });
  }
  Napi::Value split(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      const char* op = "split";
      auto& c = live(op);
      int64_t color = arg_int(info, 0, op, "color"), key = arg_int(info, 1, op, "key");
      MOE_ARG_CHECK(color >= -1 && color < (int64_t(1) << 30), op, "'color' ", color, " must be in [0, 2^30) (or -1 to take no part)");
      MOE_ARG_CHECK(key >= 0 && key < (int64_t(1) << 30), op, "'key' ", key, " must be in [0, 2^30)");
      return wrap(info.Env(), c.split(int(color), int(key)));
    });
  }
  Napi::Value abort(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      if (comm_) comm_->abort();
      return info.Env().Undefined();
    });
  }
  Napi::Value dispose(const Napi::CallbackInfo& info) {
    comm_.reset();
    return info.Env().Undefined();
  }

  std::shared_ptr<comm::Communicator> comm_;
};

Napi::Value comm_single(const Napi::CallbackInfo& info) { return CommHandle::wrap(info.Env(), comm::make_single()); }

Napi::Value comm_mpi(const Napi::CallbackInfo& info) {
  return CommHandle::wrap(info.Env(), comm::make_mpi_world(arg_int(info, 0, "commMpi", "timeoutMs")));
}

Napi::Value comm_nccl(const Napi::CallbackInfo& info) {
  const char* op = "commNccl";
  int64_t rank = arg_int(info, 0, op, "rank"), size = arg_int(info, 1, op, "size");
  MOE_ARG_CHECK(info.Length() > 2 && (info[2].IsTypedArray() || info[2].IsArrayBuffer()), op, "'uniqueId' must be a Uint8Array");
  std::string id;
  if (info[2].IsArrayBuffer()) {
    auto ab = info[2].As<Napi::ArrayBuffer>();
    id.assign(static_cast<const char*>(ab.Data()), ab.ByteLength());
  } else {
    auto ta = info[2].As<Napi::TypedArray>();
    id.assign(static_cast<const char*>(ta.ArrayBuffer().Data()) + ta.ByteOffset(), ta.ByteLength());
  }
  int64_t device = arg_int(info, 3, op, "device");
  MOE_ARG_CHECK(rank >= 0 && rank < (1 << 30) && size >= 1 && size < (1 << 30) && device >= 0 && device < 64, op, "rank ", rank, ", size ",
                size, " or device ", device, " out of range");
  return CommHandle::wrap(info.Env(), comm::make_nccl(int(rank), int(size), id, int(device), arg_int(info, 4, op, "timeoutMs")));
}

Napi::Value nccl_unique_id(const Napi::CallbackInfo& info) {
  std::string id = comm::nccl_unique_id();
  auto buf = Napi::Uint8Array::New(info.Env(), id.size());
  std::memcpy(buf.Data(), id.data(), id.size());
  return buf;
}

Napi::Value mpi_status(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bool try_load = info.Length() > 0 && info[0].IsBoolean() && info[0].As<Napi::Boolean>().Value();
  comm::MpiStatus s = comm::mpi_status(try_load);
  Napi::Object o = Napi::Object::New(env);
  o.Set("built", Napi::Boolean::New(env, s.built));
  o.Set("loaded", Napi::Boolean::New(env, s.loaded));
  o.Set("path", Napi::String::New(env, s.path));
  o.Set("library", Napi::String::New(env, s.library));
  o.Set("error", Napi::String::New(env, s.error));
  return o;
}

}  // namespace

static void init_comm(Napi::Env env, Napi::Object exports) {
  CommHandle::init(env, exports);
  exports.Set("commSingle", Napi::Function::New(env, binding<comm_single>, "commSingle"));
  exports.Set("commMpi", Napi::Function::New(env, binding<comm_mpi>, "commMpi"));
  exports.Set("commNccl", Napi::Function::New(env, binding<comm_nccl>, "commNccl"));
  exports.Set("ncclUniqueId", Napi::Function::New(env, binding<nccl_unique_id>, "ncclUniqueId"));
  exports.Set("mpiStatus", Napi::Function::New(env, binding<mpi_status>, "mpiStatus"));
}

MOE_REGISTER_BINDING(init_comm);

}  // namespace moe::addon
