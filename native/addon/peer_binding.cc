// The peer-memory transport for JavaScript: PeerHandle wraps one moe::comm::PeerTransport.
// peerCreate(rank, size, device, tokenCap, rowBytes, topK, localExperts, timeoutMs) makes one;
// lib/moe/peer-transport.ts drives it (exports all-gathered through the communicator there).
#include <memory>

#include "addon/args.h"
#include "addon/errors.h"
#include "addon/registry.h"
#include "comm/peer/peer_transport.h"

namespace moe::addon {

namespace {

std::vector<std::vector<uint8_t>> arg_exports(const Napi::CallbackInfo& info, size_t i, const char* op) {
  MOE_ARG_CHECK(info.Length() > i && info[i].IsArray(), op, "'exports' must be an array of Uint8Array, one per rank");
  Napi::Array a = info[i].As<Napi::Array>();
  std::vector<std::vector<uint8_t>> out(a.Length());
  for (uint32_t r = 0; r < a.Length(); ++r) {
    Napi::Value v = a.Get(r);
    MOE_ARG_CHECK(v.IsTypedArray() && v.As<Napi::TypedArray>().TypedArrayType() == napi_uint8_array, op, "'exports'[", r,
                  "] must be a Uint8Array");
    Napi::Uint8Array b = v.As<Napi::Uint8Array>();
    out[r].assign(b.Data(), b.Data() + b.ElementLength());
  }
  return out;
}

Napi::Array int_array(Napi::Env env, const std::vector<int64_t>& v) {
  Napi::Array a = Napi::Array::New(env, v.size());
  for (size_t i = 0; i < v.size(); ++i) a.Set(uint32_t(i), Napi::Number::New(env, double(v[i])));
  return a;
}

class PeerHandle : public Napi::ObjectWrap<PeerHandle> {
 public:
  static Napi::FunctionReference& constructor() {
    static auto* ref = new Napi::FunctionReference();
    return *ref;
  }
  static void init(Napi::Env env, Napi::Object exports) {
    Napi::Function cls =
        DefineClass(env, "PeerHandle",
                    {InstanceMethod<&PeerHandle::export_handle>("exportHandle"), InstanceMethod<&PeerHandle::can_reach>("canReach"),
                     InstanceMethod<&PeerHandle::open>("open"), InstanceMethod<&PeerHandle::check>("check"),
                     InstanceMethod<&PeerHandle::abort>("abort"), InstanceMethod<&PeerHandle::is_aborted>("isAborted"),
                     InstanceMethod<&PeerHandle::set_timeout>("setTimeoutMs"), InstanceMethod<&PeerHandle::synchronize>("synchronize"),
                     InstanceMethod<&PeerHandle::close_peers>("closePeers"), InstanceMethod<&PeerHandle::dispatch_layout>("dispatchLayout"),
                     InstanceMethod<&PeerHandle::dispatch_rows>("dispatchRows"), InstanceMethod<&PeerHandle::combine>("combine"),
                     InstanceMethod<&PeerHandle::combine_backward>("combineBackward"), InstanceMethod<&PeerHandle::dispose>("dispose")});
    constructor() = Napi::Persistent(cls);
    env.AddCleanupHook([] { constructor().Reset(); });
    exports.Set("PeerHandle", cls);
  }
  static Napi::Value wrap(Napi::Env env, std::unique_ptr<comm::PeerTransport> t) {
    Napi::Object obj = constructor().New({});
    Unwrap(obj)->transport_ = std::move(t);
    return obj;
  }
  explicit PeerHandle(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PeerHandle>(info) {}

 private:
  comm::PeerTransport& live(const char* op) {
    if (!transport_) throw_error(ErrorKind::Disposed, op, "the peer-memory transport was disposed");
    return *transport_;
  }
  template <typename Fn> Napi::Value call(const Napi::CallbackInfo& info, Fn&& fn) {
    return guarded(info.Env(), [&]() -> Napi::Value { return fn(); });
  }
  static comm::PeerTransport::DispatchPlan plan(const Napi::CallbackInfo& info, size_t i, const char* op) {
    comm::PeerTransport::DispatchPlan p;
    p.segment = arg_int(info, i, op, "segment");
    p.align = arg_int(info, i + 1, op, "align");
    p.sms = arg_int(info, i + 2, op, "sms");
    p.local_experts = arg_i32(info, i + 3, op, "localExperts");
    MOE_ARG_CHECK(p.segment >= -1 && p.align >= 1 && p.sms >= 0 && p.local_experts >= 1, op, "bad plan: segment ", p.segment, ", align ",
                  p.align, ", sms ", p.sms, ", localExperts ", p.local_experts);
    return p;
  }

  Napi::Value export_handle(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      auto bytes = live("peerTransport").export_handle();
      Napi::Uint8Array a = Napi::Uint8Array::New(info.Env(), bytes.size());
      std::copy(bytes.begin(), bytes.end(), a.Data());
      return a;
    });
  }
  // canReach(exports) → null when every peer's buffer can be mapped here, else the reason.
  Napi::Value can_reach(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      std::string why;
      if (live("peerTransport").can_reach(arg_exports(info, 0, "peerTransport"), &why)) return info.Env().Null();
      return Napi::String::New(info.Env(), why);
    });
  }
  Napi::Value open(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      live("peerTransport").open(arg_exports(info, 0, "peerTransport"));
      return info.Env().Undefined();
    });
  }
  Napi::Value check(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      MOE_ARG_CHECK(info.Length() > 0 && info[0].IsString(), "peerTransport", "'op' must be a string");
      std::string op = info[0].As<Napi::String>().Utf8Value();
      live(op.c_str()).check(op.c_str());
      return info.Env().Undefined();
    });
  }
  Napi::Value abort(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      if (transport_) transport_->abort();
      return info.Env().Undefined();
    });
  }
  Napi::Value is_aborted(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), transport_ && transport_->aborted()); }
  Napi::Value set_timeout(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      int64_t ms = arg_int(info, 0, "peerTransport", "timeoutMs");
      MOE_ARG_CHECK(ms >= 0, "peerTransport", "'timeoutMs' ", ms, " is negative (0 means no timeout)");
      live("peerTransport").set_timeout_ms(ms);
      return info.Env().Undefined();
    });
  }
  Napi::Value synchronize(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      live("peerTransport").synchronize();
      return info.Env().Undefined();
    });
  }
  Napi::Value close_peers(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      live("peerTransport").close_peers();
      return info.Env().Undefined();
    });
  }
  // dispatchLayout(indices, slot, kept, segment, align, sms, localExperts, pos, dest, offsets?, segStart?, fill?)
  //   → { rows, maxTokens, segmentRows, tokensFrom }
  Napi::Value dispatch_layout(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      const char* op = "dispatch";
      auto& t = live(op);
      auto c = t.dispatch_layout(arg_tensor(info, 0, op, "indices"), arg_tensor(info, 1, op, "slot"), arg_tensor(info, 2, op, "kept"),
                                 plan(info, 3, op), arg_tensor(info, 7, op, "pos"), arg_tensor(info, 8, op, "dest"),
                                 arg_tensor(info, 9, op, "offsets", true), arg_tensor(info, 10, op, "segStart", true),
                                 arg_tensor(info, 11, op, "fill", true));
      Napi::Object r = Napi::Object::New(info.Env());
      r.Set("rows", Napi::Number::New(info.Env(), double(c.rows)));
      r.Set("maxTokens", Napi::Number::New(info.Env(), double(c.max_tokens)));
      r.Set("segmentRows", int_array(info.Env(), c.segment_rows));
      r.Set("tokensFrom", int_array(info.Env(), c.tokens_from));
      return r;
    });
  }
  // dispatchRows(payload, indices, slot, weights, pos, dest, segment, align, sms, localExperts, fp8, segStart?, fill?, offsets?,
  //              out, outWeights, rowSrc, recvRowOf, recvWeight, recvTokens, outScales?)
  Napi::Value dispatch_rows(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      const char* op = "dispatch";
      auto& t = live(op);
      comm::PeerTransport::DispatchPlan p = plan(info, 6, op);
      p.fp8 = arg_bool(info, 10, op, "fp8");
      t.dispatch_rows(arg_tensor(info, 0, op, "payload"), arg_tensor(info, 1, op, "indices"), arg_tensor(info, 2, op, "slot"),
                      arg_tensor(info, 3, op, "weights"), arg_tensor(info, 4, op, "pos"), arg_tensor(info, 5, op, "dest"), p,
                      arg_tensor(info, 11, op, "segStart", true), arg_tensor(info, 12, op, "fill", true),
                      arg_tensor(info, 13, op, "offsets", true), arg_tensor(info, 14, op, "out"),
                      arg_tensor(info, 20, op, "outScales", true), arg_tensor(info, 15, op, "outWeights"),
                      arg_tensor(info, 16, op, "rowSrc"), arg_tensor(info, 17, op, "recvRowOf"), arg_tensor(info, 18, op, "recvWeight"),
                      arg_tensor(info, 19, op, "recvTokens"));
      return info.Env().Undefined();
    });
  }
  // combine(rows, recvRowOf, recvWeight?, recvTokens, pos, y, sms): recvWeight null = weights 1 (dispatchBackward)
  Napi::Value combine(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      const char* op = "combine";
      live(op).combine(arg_tensor(info, 0, op, "rows"), arg_tensor(info, 1, op, "recvRowOf"), arg_tensor(info, 2, op, "recvWeight", true),
                       arg_tensor(info, 3, op, "recvTokens"), arg_tensor(info, 4, op, "pos"), arg_tensor(info, 5, op, "y"),
                       arg_int(info, 6, op, "sms"));
      return info.Env().Undefined();
    });
  }
  // combineBackward(dy, rows, rowSrc, recvWeight, pos, dest, dRows, dWeights, sms)
  Napi::Value combine_backward(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      const char* op = "combineBackward";
      live(op).combine_backward(arg_tensor(info, 0, op, "dy"), arg_tensor(info, 1, op, "rows"), arg_tensor(info, 2, op, "rowSrc"),
                                arg_tensor(info, 3, op, "recvWeight"), arg_tensor(info, 4, op, "pos"), arg_tensor(info, 5, op, "dest"),
                                arg_tensor(info, 6, op, "dRows"), arg_tensor(info, 7, op, "dWeights"), arg_int(info, 8, op, "sms"));
      return info.Env().Undefined();
    });
  }
  Napi::Value dispose(const Napi::CallbackInfo& info) {
    return call(info, [&]() -> Napi::Value {
      transport_.reset();
      return info.Env().Undefined();
    });
  }

  std::unique_ptr<comm::PeerTransport> transport_;
};

// peerCreate(rank, size, device, tokenCap, rowBytes, topK, localExperts, timeoutMs)
Napi::Value peer_create(const Napi::CallbackInfo& info) {
  const char* op = "peerTransport";
  comm::PeerCapacity cap;
  cap.token_cap = arg_int(info, 3, op, "tokenCap");
  cap.row_bytes = arg_int(info, 4, op, "rowBytes");
  cap.top_k = arg_i32(info, 5, op, "topK");
  cap.local_experts = arg_i32(info, 6, op, "localExperts");
  return PeerHandle::wrap(info.Env(), comm::make_peer_transport(arg_i32(info, 0, op, "rank"), arg_i32(info, 1, op, "size"),
                                                                arg_i32(info, 2, op, "device"), cap, arg_int(info, 7, op, "timeoutMs")));
}

}  // namespace

static void init_peer(Napi::Env env, Napi::Object exports) {
  PeerHandle::init(env, exports);
  exports.Set("peerCreate", Napi::Function::New(env, binding<peer_create>, "peerCreate"));
}

MOE_REGISTER_BINDING(init_peer);

}  // namespace moe::addon
