// Compiled only where a real nccl.h exists at build time (see CMakeLists.txt): proves that the
// declarations in nccl_abi.h match NCCL's own, so the dlopen'd calls are made with the right ABI.
#include <nccl.h>

#include <type_traits>

#include "comm/nccl/nccl_abi.h"

namespace moe::nccl {

static_assert(sizeof(UniqueId) == sizeof(ncclUniqueId), "ncclUniqueId size");
static_assert(std::is_same_v<Comm, ncclComm_t>, "ncclComm_t");
static_assert(std::is_same_v<CudaStream, cudaStream_t>, "cudaStream_t");

static_assert(Success == int(ncclSuccess) && UnhandledCudaError == int(ncclUnhandledCudaError) && SystemError == int(ncclSystemError) &&
                  InternalError == int(ncclInternalError) && InvalidArgument == int(ncclInvalidArgument) &&
                  InvalidUsage == int(ncclInvalidUsage) && RemoteError == int(ncclRemoteError) && InProgress == int(ncclInProgress),
              "ncclResult_t values");
static_assert(Int8 == int(ncclInt8) && Uint8 == int(ncclUint8) && Int32 == int(ncclInt32) && Uint32 == int(ncclUint32) &&
                  Int64 == int(ncclInt64) && Uint64 == int(ncclUint64) && Float16 == int(ncclFloat16) && Float32 == int(ncclFloat32) &&
                  Float64 == int(ncclFloat64) && Bfloat16 == int(ncclBfloat16),
              "ncclDataType_t values");
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 24, 0)
static_assert(Float8e4m3 == int(ncclFloat8e4m3) && Float8e5m2 == int(ncclFloat8e5m2), "fp8 ncclDataType_t values");
#endif
static_assert(Sum == int(ncclSum) && Prod == int(ncclProd) && Max == int(ncclMax) && Min == int(ncclMin) && Avg == int(ncclAvg),
              "ncclRedOp_t values");

// Same parameter and return types: compare our function types with the real declarations',
// after mapping NCCL's enums to ours (they are distinct C enum types with equal values).
template <typename T> struct Map { using type = T; };
template <> struct Map<ncclResult_t> { using type = Result; };
template <> struct Map<ncclResult_t*> { using type = Result*; };
template <> struct Map<ncclDataType_t> { using type = DataType; };
template <> struct Map<ncclRedOp_t> { using type = RedOp; };
template <> struct Map<ncclUniqueId> { using type = UniqueId; };
template <> struct Map<ncclUniqueId*> { using type = UniqueId*; };
template <> struct Map<ncclConfig_t*> { using type = void*; };
template <typename F> struct MapFn;
template <typename R, typename... A> struct MapFn<R (*)(A...)> { using type = typename Map<R>::type (*)(typename Map<A>::type...); };
template <typename F> using Mapped = typename MapFn<F>::type;

static_assert(std::is_same_v<Mapped<decltype(&::ncclGetVersion)>, GetVersionFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclGetUniqueId)>, GetUniqueIdFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclCommInitRank)>, CommInitRankFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclCommDestroy)>, CommDestroyFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclCommAbort)>, CommAbortFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclCommGetAsyncError)>, CommGetAsyncErrorFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclGetErrorString)>, GetErrorStringFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclGetLastError)>, GetLastErrorFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclAllReduce)>, AllReduceFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclBroadcast)>, BroadcastFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclAllGather)>, AllGatherFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclSend)>, SendFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclRecv)>, RecvFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclGroupStart)>, GroupStartFn>);
static_assert(std::is_same_v<Mapped<decltype(&::ncclGroupEnd)>, GroupEndFn>);
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
static_assert(std::is_same_v<Mapped<decltype(&::ncclCommSplit)>, CommSplitFn>);
#endif

}  // namespace moe::nccl
