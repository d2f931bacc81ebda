// Native errors. Every failure is thrown as moe::Error with a kind; the addon turns it into the
// matching JavaScript Error subclass (lib/errors.ts), so nothing native ever aborts the process.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moe {

enum class ErrorKind {
  InvalidArgument,  // bad shape, dtype, device, layout or value, detected before any work
  Disposed,         // a tensor or stream used after dispose()
  Cuda,             // a CUDA runtime call failed
  OutOfMemory,      // an allocation failed even after the cache was released
  Nccl,             // an NCCL call failed
  Unavailable,      // the backend needed is absent: no GPU, no driver, no NCCL, CPU-only build
  Timeout,          // a collective did not complete within its communicator's timeout
  Internal,         // a broken invariant inside moe-ep
};

inline const char* error_kind_name(ErrorKind k) {
  switch (k) {
    case ErrorKind::InvalidArgument: return "InvalidArgument";
    case ErrorKind::Disposed: return "Disposed";
    case ErrorKind::Cuda: return "Cuda";
    case ErrorKind::OutOfMemory: return "OutOfMemory";
    case ErrorKind::Nccl: return "Nccl";
    case ErrorKind::Unavailable: return "Unavailable";
    case ErrorKind::Timeout: return "Timeout";
    case ErrorKind::Internal: return "Internal";
  }
  return "Internal";
}

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, std::string op, const std::string& message)
      : std::runtime_error(op.empty() ? message : op + ": " + message), kind_(kind), op_(std::move(op)) {}
  ErrorKind kind() const { return kind_; }
  const std::string& op() const { return op_; }

 private:
  ErrorKind kind_;
  std::string op_;
};

template <typename... Parts> std::string cat(Parts&&... parts) {
  std::ostringstream s;
  (s << ... << parts);
  return s.str();
}

[[noreturn]] inline void throw_error(ErrorKind kind, const std::string& op, const std::string& msg) { throw Error(kind, op, msg); }

}  // namespace moe

// MOE_ARG_CHECK(cond, op, message parts...): InvalidArgument naming the op and the argument.
#define MOE_ARG_CHECK(cond, op, ...)                                                                   \
  do {                                                                                                 \
    if (!(cond)) ::moe::throw_error(::moe::ErrorKind::InvalidArgument, (op), ::moe::cat(__VA_ARGS__)); \
  } while (0)

#define MOE_INTERNAL_CHECK(cond, ...)                                                                                                      \
  do {                                                                                                                                     \
    if (!(cond)) ::moe::throw_error(::moe::ErrorKind::Internal, "", ::moe::cat(__FILE__, ":", __LINE__, ": ", #cond, " ", ##__VA_ARGS__)); \
  } while (0)
