// Device side of the peer-memory transport (included by peer_transport.cu only): the buffer's
// layout as kernels see it, the flag primitives and the kernels. peer_transport.h has the protocol.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>
#include <cub/cub.cuh>

#include "comm/peer/peer_transport.h"
#include "core/numeric.h"
#include "ops/moe/fp8/block.h"
#include "ops/moe/fp8/block_cuda.cuh"

namespace moe::comm::peer {

using u64 = unsigned long long;

// What rank `s` writes into mail slot s of my buffer (one cache-line-aligned slot per rank).
struct Mail {
  u64 counts_step;  // s (as a source): its counts, n_tokens and t_src for this dispatch step are in
  u64 rows_step;    // s (as a source): its dispatch-region rows for this step are in
  u64 disp_ack;     // s (as a receiver): it consumed the dispatch-region rows I pushed, up to this step
  u64 comb_step;    // s (as an expert rank): its combine-region rows for this step are in
  u64 comb_ack;     // s (as an owner): it consumed the combine-region rows I pushed, up to this step
  int n_tokens;     // token rows s pushes me this dispatch step
  int t_src;        // s's token count this step
  int abort;        // s gave up: stop waiting for it
  int pad;
  // int counts[El] (rows s sends to each of my local experts) follows at kMailCountsOffset
};
constexpr int64_t kMailCountsOffset = 64;

// One entry of a row's top-k, as the receiver needs it.
struct Meta {
  int expert;  // local expert, or -1 when this entry goes to another rank (or was dropped)
  int slot;    // position among the source's rows for that expert (capacity()'s slot)
  float weight;
};

// The pinned host words the kernels report to. Plain stores only (atomics on host memory need
// PCIe atomics, which not every platform has): each waiting lane marks its own peer.
// The host also writes `timeout_ns` here (set_timeout_ms): kernels read it when a wait has spun a
// while, so a captured CUDA graph replays with the timeout in force at replay time.
struct HostFault {
  int kind;              // PeerFault (the first writer's, or another failing lane's: both are faults)
  int op;                // which wait (PeerOp)
  int peer[kMaxPeers];   // 1: rank p was not heard from, or gave up
  long long timeout_ns;  // written by the host: 0 waits forever
  // TokenMismatch (capacity mode): the sources that dispatched another T than this rank, their T
  // and this rank's (check_source_tokens).
  int mismatch[kMaxPeers];
  int tokens_peer[kMaxPeers];
  int tokens_mine;
};
enum PeerOp : int { kOpDispatch = 1, kOpCombine = 2, kOpCombineBackward = 3, kOpDispatchBackward = 4 };

struct HostCounts {
  volatile u64 step;   // written last: the fields below belong to the dropless dispatch of this host sequence number
  int64_t rows;        // rows received, padding included
  int64_t max_tokens;  // largest token count among the sources
  int data[1];         // segment counts [El·P] (per local expert, per source), then tokens_from [P]
};

// Everything a kernel needs to address any rank's buffer. Passed by value.
struct View {
  char* base[kMaxPeers];  // rank p's buffer as mapped in this process (mine at [me])
  int P, me, El, k_cap;
  int64_t t_cap, row_stride, mail_stride;
  int64_t off_mail, off_scratch, off_disp_rows, off_disp_meta, off_comb_rows, off_comb_aux;
  HostFault* fault;  // mapped pinned host memory (and the timeout the host set)
};

__device__ __forceinline__ Mail* mail(const View& v, int holder, int slot) {
  return reinterpret_cast<Mail*>(v.base[holder] + v.off_mail + int64_t(slot) * v.mail_stride);
}
__device__ __forceinline__ int* mail_counts(const View& v, int holder, int slot) {
  return reinterpret_cast<int*>(reinterpret_cast<char*>(mail(v, holder, slot)) + kMailCountsOffset);
}
__device__ __forceinline__ char* disp_row(const View& v, int holder, int src, int64_t i) {
  return v.base[holder] + v.off_disp_rows + (int64_t(src) * v.t_cap + i) * v.row_stride;
}
__device__ __forceinline__ Meta* disp_meta(const View& v, int holder, int src, int64_t i) {
  return reinterpret_cast<Meta*>(v.base[holder] + v.off_disp_meta) + (int64_t(src) * v.t_cap + i) * v.k_cap;
}
__device__ __forceinline__ char* comb_row(const View& v, int holder, int src, int64_t i) {
  return v.base[holder] + v.off_comb_rows + (int64_t(src) * v.t_cap + i) * v.row_stride;
}
__device__ __forceinline__ float* comb_aux(const View& v, int holder, int src, int64_t i) {
  return reinterpret_cast<float*>(v.base[holder] + v.off_comb_aux) + (int64_t(src) * v.t_cap + i) * v.k_cap;
}
// Block-completion counters, one per kernel kind, in my own buffer.
__device__ __forceinline__ unsigned* scratch_counter(const View& v, int which) {
  return reinterpret_cast<unsigned*>(v.base[v.me] + v.off_scratch + which * 128);
}
enum Counter : int { kCntPush = 0, kCntExpand, kCntCombPush, kCntCombReduce, kCntCbExpert, kCntCbOwner, kCntCount };

// The step counters, one per region, on the device in my own buffer (after the block counters;
// peers never read them). The first kernel of a call advances its region's counter (the layout
// kernel for a dispatch, the first wait kernel for a combine or combineBackward); the call's other
// kernels read it. So no step number is a kernel argument: a call captured in a CUDA graph once and
// replayed N times advances the protocol exactly like N eager calls, and the two interleave.
enum Region : int { kRegionDispatch = 0, kRegionCombine = 1, kRegionCount };
constexpr int kScratchSlots = kCntCount + kRegionCount;  // 128 bytes each
__device__ __forceinline__ u64* step_counter(const View& v, int region) {
  return reinterpret_cast<u64*>(v.base[v.me] + v.off_scratch + (kCntCount + region) * 128);
}
// The region's current step (set by an earlier kernel of this call, on this stream).
__device__ __forceinline__ u64 current_step(const View& v, int region) { return *reinterpret_cast<volatile u64*>(step_counter(v, region)); }

__device__ __forceinline__ u64 ld_acquire_sys(const u64* p) {
  u64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release_sys(u64* p, u64 v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}
__device__ __forceinline__ int ld_volatile(const int* p) { return *reinterpret_cast<const volatile int*>(p); }
__device__ __forceinline__ long long ld_volatile(const long long* p) { return *reinterpret_cast<const volatile long long*>(p); }
__device__ __forceinline__ u64 global_ns() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void record_fault(const View& v, PeerFault kind, int peer, int op) {
  volatile HostFault* f = v.fault;
  f->peer[peer] = 1;
  f->op = op;
  __threadfence_system();
  f->kind = int(kind);  // last: the host reads the rest once it sees a kind
  __threadfence_system();
}

// Capacity mode: every source must dispatch this rank's T (the fixed segments are sized from it;
// otherwise the rows are not where either side thinks: the receiver's bounds keep every access in its
// buffers, the results are wrong). Lane s (< P) of the calling warp compares source s's T from the
// mail with t_mine, only while no fault is recorded: a source that died or failed leaves an earlier
// step's T there, and the rows wait before this kernel has recorded the Timeout or PeerAborted that
// the host must report instead. It also compares only when s's counts for this step are in (always
// so once that wait succeeded: a second guard, should this kernel ever run without it). A mismatch
// is recorded once per warp, its kind written last, after every lane's fields (as record_fault does).
__device__ void check_source_tokens(const View& v, int t_mine) {
  const int lane = threadIdx.x & 31;
  const u64 step = current_step(v, kRegionDispatch);
  int t_src = 0;
  bool differs = false;
  if (ld_volatile(&v.fault->kind) == 0 && lane < v.P) {
    const Mail* m = mail(v, v.me, lane);
    if (ld_acquire_sys(&m->counts_step) == step) {
      t_src = ld_volatile(&m->t_src);
      differs = t_src != t_mine;
    }
  }
  const unsigned mask = __ballot_sync(0xffffffffu, differs);
  if (mask == 0u) return;
  volatile HostFault* f = v.fault;
  if (differs) {
    f->tokens_peer[lane] = t_src;
    f->mismatch[lane] = 1;
  }
  const int writer = __ffs(mask) - 1;
  if (lane == writer) f->tokens_mine = t_mine;
  __threadfence_system();
  __syncwarp();
  if (lane == writer) {
    f->op = kOpDispatch;
    __threadfence_system();
    f->kind = int(PeerFault::TokenMismatch);
    __threadfence_system();
  }
}

// Lane p (< P) of the calling warp waits until mail slot p's field (a byte offset into Mail)
// reaches `step`. Returns false on every lane when a wait failed (now or in an earlier call).
__device__ bool warp_wait(const View& v, int field, u64 step, int op) {
  const int lane = threadIdx.x & 31;
  bool ok = ld_volatile(&v.fault->kind) == 0;
  if (ok && lane < v.P && step > 0) {
    const Mail* m = mail(v, v.me, lane);
    const u64* flag = reinterpret_cast<const u64*>(reinterpret_cast<const char*>(m) + field);
    const u64 start = global_ns();
    for (unsigned spins = 0; ld_acquire_sys(flag) < step; ++spins) {
      if ((spins & 63) == 63) {
        if (ld_volatile(&m->abort)) {
          record_fault(v, PeerFault::PeerAborted, lane, op);
          ok = false;
          break;
        }
        if (ld_volatile(&v.fault->kind) != 0) {
          ok = false;
          break;
        }
        const long long timeout_ns = ld_volatile(&v.fault->timeout_ns);
        if (timeout_ns > 0 && global_ns() - start > u64(timeout_ns)) {
          record_fault(v, PeerFault::Timeout, lane, op);
          ok = false;
          break;
        }
      }
      __nanosleep(32);
    }
  }
  return __all_sync(0xffffffffu, ok);
}

// A wait condition: mail field `field` (a byte offset into Mail; -1: none) of every slot reaches
// the current step of `region` minus `back`.
struct Await {
  int field = -1;
  int region = 0;
  int back = 0;
};

// One warp: first advances the step counters of the regions in `bump` (bit r: region r; the first
// kernel of a combine or combineBackward), then waits for up to two conditions on every slot.
__global__ void wait_kernel(View v, unsigned bump, Await a, Await b, int op) {
  if (threadIdx.x == 0)
    for (int r = 0; r < kRegionCount; ++r)
      if ((bump >> r) & 1u) *step_counter(v, r) += 1;
  __syncwarp();
  if (a.field >= 0 && !warp_wait(v, a.field, current_step(v, a.region) - u64(a.back), op)) return;
  if (b.field >= 0) warp_wait(v, b.field, current_step(v, b.region) - u64(b.back), op);
}

// Every thread's writes made visible system-wide, then true in the last block to finish (which
// resets the counter for the next launch of this kind).
__device__ bool last_block(unsigned* counter) {
  __shared__ bool is_last;
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  if (is_last) {
    __threadfence_system();
    if (threadIdx.x == 0) atomicExch(counter, 0u);
  }
  return is_last;
}

// ---- row copies: a warp moves one row; 16-byte vectors when both sides allow, else 4-byte words ----
__device__ __forceinline__ uint4 ld_cg16(const void* p) { return __ldcg(reinterpret_cast<const uint4*>(p)); }

// ---- typed 8-value chunks (16 bytes of bf16, 32 of f32) for the vector paths ----
template <typename T> struct Chunk8;
template <> struct Chunk8<bf16> {
  static __device__ __forceinline__ void load(const bf16* p, float* out) {
    const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = bits_float(w[i] << 16);
      out[2 * i + 1] = bits_float(w[i] & 0xffff0000u);
    }
  }
  // 8 values as the 16 bytes that store() writes.
  static __device__ __forceinline__ void pack(const float* in, uint4* out) {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = uint32_t(bf16_from_float(in[2 * i]).bits) | (uint32_t(bf16_from_float(in[2 * i + 1]).bits) << 16);
    *out = make_uint4(w[0], w[1], w[2], w[3]);
  }
  static __device__ __forceinline__ void store(bf16* p, const float* in) { pack(in, reinterpret_cast<uint4*>(p)); }
};
template <> struct Chunk8<float> {
  static __device__ __forceinline__ void load(const float* p, float* out) {
    const float4 a = __ldcg(reinterpret_cast<const float4*>(p)), b = __ldcg(reinterpret_cast<const float4*>(p) + 1);
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
  }
  // 4 values as the 16 bytes of one float4.
  static __device__ __forceinline__ void pack(const float* in, uint4* out) {
    *out = make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]), __float_as_uint(in[3]));
  }
  static __device__ __forceinline__ void store(float* p, const float* in) {
    reinterpret_cast<float4*>(p)[0] = make_float4(in[0], in[1], in[2], in[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(in[4], in[5], in[6], in[7]);
  }
};
template <typename T> __device__ __forceinline__ float load1(const T* p) { return to_float(*reinterpret_cast<const volatile T*>(p)); }
template <> __device__ __forceinline__ float load1<float>(const float* p) { return __ldcg(p); }
template <> __device__ __forceinline__ float load1<bf16>(const bf16* p) {
  return bits_float(uint32_t(__ldcg(reinterpret_cast<const unsigned short*>(p))) << 16);
}

// ================================================================================== dispatch
constexpr int kLayoutThreads = 1024;
constexpr int kCountsThreads = 256;

// One block. pos[t,p]: position of token t among the tokens this rank sends to p (-1: none);
// dest[t,j]: the rank of entry j's expert (-1: dropped or invalid). Then, once every destination
// acknowledged the previous step, sends each its counts (kept[] of its experts), how many token
// rows it will get and this rank's T.
__global__ void __launch_bounds__(kLayoutThreads)
    layout_kernel(View v, const int* idx, const int* slot, const int* kept, int T, int k, int* pos, int* dest) {
  using Scan = cub::BlockScan<int, kLayoutThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int base[kMaxPeers];
  __shared__ bool ok;
  __shared__ u64 step;
  const int P = v.P, El = v.El, E = El * P;
  if (threadIdx.x < kMaxPeers) base[threadIdx.x] = 0;
  if (threadIdx.x == 0) {
    // The first kernel of a dispatch: this call's step.
    step = current_step(v, kRegionDispatch) + 1;
    *step_counter(v, kRegionDispatch) = step;
  }
  __syncthreads();
  for (int t0 = 0; t0 < T; t0 += kLayoutThreads) {
    const int t = t0 + int(threadIdx.x);
    unsigned mask = 0;
    if (t < T) {
      for (int j = 0; j < k; ++j) {
        const int64_t i = int64_t(t) * k + j;
        const int e = idx[i];
        int d = -1;
        if (slot[i] >= 0 && e >= 0 && e < E) {
          d = e / El;
          mask |= 1u << d;
        }
        dest[i] = d;
      }
    }
    for (int p = 0; p < P; ++p) {
      const int flag = int((mask >> p) & 1u);
      int before = 0, total = 0;
      Scan(scan).ExclusiveSum(flag, before, total);
      if (t < T) pos[int64_t(t) * P + p] = flag ? base[p] + before : -1;
      __syncthreads();
      if (threadIdx.x == 0) base[p] += total;
      __syncthreads();
    }
  }
  if (threadIdx.x < 32) {
    const bool w = warp_wait(v, offsetof(Mail, disp_ack), step - 1, kOpDispatch);
    if (threadIdx.x == 0) ok = w;
  }
  __syncthreads();
  if (!ok) return;
  for (int p = 0; p < P; ++p) {
    int* counts = mail_counts(v, p, v.me);
    for (int l = threadIdx.x; l < El; l += blockDim.x) counts[l] = kept[p * El + l];
  }
  if (threadIdx.x < P) {
    Mail* m = mail(v, threadIdx.x, v.me);
    m->n_tokens = base[threadIdx.x];
    m->t_src = T;
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x < P) st_release_sys(&mail(v, threadIdx.x, v.me)->counts_step, step);
}

// Dropless, one block: waits for every source's counts, then lays out my received rows: local
// expert l owns offsets[l] .. offsets[l+1] (its rows rounded up to `align`), source s's rows for l
// start at seg_start[l·P + s], padding from fill[l]. Reports the sizes to pinned host memory.
__global__ void __launch_bounds__(kCountsThreads)
    counts_kernel(View v, int align, int* offsets, int* seg_start, int* fill, HostCounts* host, u64 host_seq) {
  using Scan = cub::BlockScan<long long, kCountsThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ bool ok;
  const int P = v.P, El = v.El;
  const u64 step = current_step(v, kRegionDispatch);
  if (threadIdx.x < 32) {
    const bool w = warp_wait(v, offsetof(Mail, counts_step), step, kOpDispatch);
    if (threadIdx.x == 0) ok = w;
  }
  __syncthreads();
  if (!ok) return;
  auto count = [&](int s, int l) -> long long {
    const int c = __ldcg(mail_counts(v, v.me, s) + l);
    return c > 0 ? c : 0;
  };
  const int chunk = (El + kCountsThreads - 1) / kCountsThreads;
  const int lo = min(El, int(threadIdx.x) * chunk), hi = min(El, lo + chunk);
  long long mine = 0;
  for (int l = lo; l < hi; ++l) {
    long long n = 0;
    for (int s = 0; s < P; ++s) n += count(s, l);
    mine += (n + align - 1) / align * align;
  }
  long long start = 0, total = 0;
  Scan(scan).ExclusiveSum(mine, start, total);
  for (int l = lo; l < hi; ++l) {
    offsets[l] = int(start);
    long long at = start;
    for (int s = 0; s < P; ++s) {
      seg_start[l * P + s] = int(at);
      const long long c = count(s, l);
      host->data[l * P + s] = int(c);
      at += c;
    }
    fill[l] = int(at);
    start += (at - start + align - 1) / align * align;
  }
  if (threadIdx.x == 0) {
    offsets[El] = int(total);
    long long max_t = 0;
    for (int s = 0; s < P; ++s) {
      const Mail* m = mail(v, v.me, s);
      const int n = ld_volatile(&m->n_tokens), t = ld_volatile(&m->t_src);
      host->data[El * P + s] = n;
      max_t = t > max_t ? t : max_t;
    }
    host->rows = total;
    host->max_tokens = max_t;
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    host->step = host_seq;
    __threadfence_system();
  }
}

// What push_kernel writes as a token's row. Each is called by the whole warp of the token, with
// the destinations' row addresses (null where the token does not go).
//
// CopyRows: the payload row as it is (bf16 or f32), 16-byte words where the size allows.
struct CopyRows {
  const char* payload;
  int64_t bytes;  // per row
  bool vec16;
  __device__ __forceinline__ void write(int64_t t, int lane, char* const* dst, int P) const {
    const char* src = payload + t * bytes;
    if (vec16) {
      for (int64_t c = lane; c < bytes / 16; c += 32) {
        const uint4 val = __ldg(reinterpret_cast<const uint4*>(src) + c);
#pragma unroll
        for (int p = 0; p < kMaxPeers; ++p)
          if (dst[p]) reinterpret_cast<uint4*>(dst[p])[c] = val;
      }
    } else {
      for (int64_t c = lane; c < bytes / 4; c += 32) {
        const int val = __ldg(reinterpret_cast<const int*>(src) + c);
#pragma unroll
        for (int p = 0; p < kMaxPeers; ++p)
          if (dst[p]) reinterpret_cast<int*>(dst[p])[c] = val;
      }
    }
  }
};

// Fp8Rows: the row quantised on the way out, as quantizeFp8 does it (same bytes, same scales): a
// lane takes 16 values, the 8 lanes of a 128-value block reduce its amax, each lane writes its 16
// e4m3 bytes to every destination and the block's first lane the fp32 scale, which follows the
// values (at H rounded up to 16 bytes). One read of x, no fp8 copy in memory.
template <typename T> struct Fp8Rows {
  const T* x;
  int H;  // a multiple of 128
  __device__ __forceinline__ void write(int64_t t, int lane, char* const* dst, int P) const {
    const T* src = x + t * H;
    const int chunks = H / 16;  // a multiple of 8: an 8-lane group is all in or all out
    const int64_t scales_at = (int64_t(H) + 15) / 16 * 16;
    for (int c0 = 0; c0 < chunks; c0 += 32) {
      const int c = c0 + lane;
      float vals[16], amax = 0.0f;
      if (c < chunks) {
        Chunk8<T>::load(src + int64_t(c) * 16, vals);
        Chunk8<T>::load(src + int64_t(c) * 16 + 8, vals + 8);
#pragma unroll
        for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(vals[i]));
      }
#pragma unroll
      for (int o = 4; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      if (c < chunks) {
        const float scale = ops::fp8_scale_for(amax);
        const uint4 q = make_uint4(ops::fp8x4_quantize(vals, scale), ops::fp8x4_quantize(vals + 4, scale),
                                   ops::fp8x4_quantize(vals + 8, scale), ops::fp8x4_quantize(vals + 12, scale));
#pragma unroll
        for (int p = 0; p < kMaxPeers; ++p)
          if (dst[p]) {
            reinterpret_cast<uint4*>(dst[p])[c] = q;
            if ((lane & 7) == 0) reinterpret_cast<float*>(dst[p] + scales_at)[c / 8] = scale;
          }
      }
    }
  }
};

// A warp per token: its row (Rows says how) written once into each destination rank's buffer at
// [me][pos]; with `idx`, each destination also gets the token's top-k entries that are its own
// (the others marked -1). Assumes the destinations acknowledged the previous step (a wait kernel
// or the layout kernel ran first).
template <typename Rows>
__global__ void push_kernel(View v, Rows rows, const int* pos, int T, const int* idx, const int* slot, const float* weights,
                            const int* dest, int k) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * blockDim.x / 32;
  const int P = v.P;
  for (int64_t t = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; t < T; t += warps) {
    const int my_pos = lane < P ? pos[t * P + lane] : -1;
    const unsigned mask = __ballot_sync(0xffffffffu, my_pos >= 0);
    if (!mask) continue;
    char* dst[kMaxPeers];
    int64_t at[kMaxPeers];
#pragma unroll
    for (int p = 0; p < kMaxPeers; ++p) {
      at[p] = __shfl_sync(0xffffffffu, my_pos, p);
      dst[p] = (p < P && at[p] >= 0 && at[p] < v.t_cap) ? disp_row(v, p, v.me, at[p]) : nullptr;
    }
    rows.write(t, lane, dst, P);
    if (idx && lane < k) {
      // Lane j writes entry j to every destination: the real entry where it belongs, -1 elsewhere.
      const int64_t i = t * k + lane;
      const int d = dest[i];
      const Meta mine{d >= 0 ? idx[i] % v.El : -1, slot[i], weights[i]};
      const Meta other{-1, -1, 0.0f};
#pragma unroll
      for (int p = 0; p < kMaxPeers; ++p)
        if (dst[p]) disp_meta(v, p, v.me, at[p])[lane] = d == p ? mine : other;
    }
  }
  if (last_block(scratch_counter(v, kCntPush)) && threadIdx.x < P)
    st_release_sys(&mail(v, threadIdx.x, v.me)->rows_step, current_step(v, kRegionDispatch));
}

// The receiver, a warp per (source, token row): waits were done by a wait kernel. Each of the row's
// entries that is mine goes to its expert-major row (capacity: (l·P + s)·segment + slot; dropless:
// seg_start[l·P + s] + slot), converted from the payload (a copy, or fp8 dequantised); with fp8
// rows kept (Out = fp8e4m3, out_scales given) the e4m3 bytes are copied and the row's scales go to
// out_scales [N, H/128]. Rows no entry fills are padding (zeros, scale 0, weight 0, source -1). recv_row_of[(s·cap + i)·k + j] remembers
// where entry j of (s, i) went, for combine. Acknowledges the step to every source at the end.
// Capacity mode: block 0's first warp checks that every source dispatched t_mine tokens.
template <typename Out, bool kFp8>
__global__ void expand_kernel(View v, int k, int64_t map_cap, int64_t segment, int t_mine, const int* seg_start, const int* fill,
                              const int* offsets, int64_t N, int H, bool vec16, Out* out, float* out_scales, float* out_w, int* row_src,
                              int* recv_row_of, float* recv_w, int* recv_tokens) {
  const int lane = threadIdx.x & 31;
  const int64_t warp0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32, warps = int64_t(gridDim.x) * blockDim.x / 32;
  const int P = v.P, El = v.El;
  if (segment >= 0 && blockIdx.x == 0 && threadIdx.x < 32) check_source_tokens(v, t_mine);
  const int64_t cap = v.t_cap < map_cap ? v.t_cap : map_cap;
  auto tokens_from = [&](int s) -> int64_t {
    const int64_t n = ld_volatile(&mail(v, v.me, s)->n_tokens);
    return n < 0 ? 0 : (n > cap ? cap : n);
  };
  if (blockIdx.x == 0 && threadIdx.x < P) recv_tokens[threadIdx.x] = int(tokens_from(threadIdx.x));
  for (int64_t item = warp0; item < P * map_cap; item += warps) {
    const int s = int(item / map_cap);
    const int64_t i = item % map_cap;
    const int64_t n = tokens_from(s);
    int row = -1;
    float weight = 0.0f;
    if (i < n && lane < k) {
      const int* m = reinterpret_cast<const int*>(disp_meta(v, v.me, s, i) + lane);
      const int l = __ldcg(m), slot = __ldcg(m + 1);
      weight = __int_as_float(__ldcg(m + 2));
      if (l >= 0 && l < El && slot >= 0) {
        int64_t base, len;
        if (segment >= 0) {
          base = (int64_t(l) * P + s) * segment;
          len = segment;
        } else {
          base = seg_start[l * P + s];
          len = (s + 1 < P ? seg_start[l * P + s + 1] : fill[l]) - base;
        }
        if (slot < len && base + slot < N) row = int(base + slot);
      }
    }
    if (lane < k) {
      recv_row_of[item * k + lane] = row;
      recv_w[item * k + lane] = row >= 0 ? weight : 0.0f;
    }
    if (i >= n) continue;  // uniform across the warp
    if (row >= 0) {
      out_w[row] = weight;
      row_src[row] = int(item * k + lane);
    }
    const unsigned valid = __ballot_sync(0xffffffffu, row >= 0);
    if (!valid) continue;
    const char* src = disp_row(v, v.me, s, i);
    if constexpr (kFp8) {
      // A lane-chunk is the values of one 16-byte store of Out (8 bf16 or 4 f32), so a warp's
      // stores are contiguous; dequantised and converted once, then stored to each of the row's
      // entries. The row's fp32 scales (one per 128 values) follow the values.
      constexpr int kVals = 16 / int(sizeof(Out));
      const float* scales = reinterpret_cast<const float*>(src + (H + 15) / 16 * 16);
      const int chunks = H / kVals;
      for (int c0 = 0; c0 < chunks; c0 += 32) {
        const int c = c0 + lane;
        uint4 packed{};
        if (c < chunks) {
          const float scale = __ldcg(scales + c * kVals / 128);
          float vals[kVals];
          if constexpr (kVals == 8) {
            const uint2 raw = __ldcg(reinterpret_cast<const uint2*>(src) + c);
            ops::fp8x4_dequantize(raw.x, scale, vals);
            ops::fp8x4_dequantize(raw.y, scale, vals + 4);
          } else {
            ops::fp8x4_dequantize(__ldcg(reinterpret_cast<const unsigned*>(src) + c), scale, vals);
          }
          Chunk8<Out>::pack(vals, &packed);
        }
        for (unsigned bits = valid; bits; bits &= bits - 1) {
          const int r = __shfl_sync(0xffffffffu, row, __ffs(bits) - 1);
          if (c < chunks) reinterpret_cast<uint4*>(out + int64_t(r) * H)[c] = packed;
        }
      }
    } else {
      const int64_t bytes = int64_t(H) * sizeof(Out);
      const int64_t words = vec16 ? bytes / 16 : bytes / 4;
      for (int64_t c0 = 0; c0 < words; c0 += 32) {
        const int64_t c = c0 + lane;
        uint4 val16{};
        int val4 = 0;
        if (c < words) {
          if (vec16) val16 = ld_cg16(src + c * 16);
          else val4 = __ldcg(reinterpret_cast<const int*>(src) + c);
        }
        for (unsigned bits = valid; bits; bits &= bits - 1) {
          const int r = __shfl_sync(0xffffffffu, row, __ffs(bits) - 1);
          if (c < words) {
            char* o = reinterpret_cast<char*>(out + int64_t(r) * H);
            if (vec16) reinterpret_cast<uint4*>(o)[c] = val16;
            else reinterpret_cast<int*>(o)[c] = val4;
          }
        }
      }
      if (out_scales) {
        // Kept fp8 rows: the scales that follow the values on the wire, one per 128 values.
        const int blocks = H / 128;
        const float* scales = reinterpret_cast<const float*>(src + (H + 15) / 16 * 16);
        for (int c0 = 0; c0 < blocks; c0 += 32) {  // the whole warp in every round (the shuffles)
          const int c = c0 + lane;
          const float scale = c < blocks ? __ldcg(scales + c) : 0.0f;
          for (unsigned bits = valid; bits; bits &= bits - 1) {
            const int r = __shfl_sync(0xffffffffu, row, __ffs(bits) - 1);
            if (c < blocks) out_scales[int64_t(r) * blocks + c] = scale;
          }
        }
      }
    }
  }
  // Padding rows: capacity segments past the source's kept count; dropless rows past fill[l].
  const int64_t row_bytes = int64_t(H) * sizeof(Out);
  for (int64_t r = warp0; r < N; r += warps) {
    bool pad;
    if (segment >= 0) {
      const int64_t seg = r / segment, within = r - seg * segment;
      const int l = int(seg / P), s = int(seg % P);
      const int filled = __ldcg(mail_counts(v, v.me, s) + l);
      pad = within >= filled;
    } else {
      int lo = 0, hi = El;  // the last l with offsets[l] <= r
      while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (offsets[mid] <= r) lo = mid;
        else hi = mid;
      }
      pad = r >= fill[lo];
    }
    if (!pad) continue;
    char* o = reinterpret_cast<char*>(out + r * H);
    for (int64_t c = lane; c < row_bytes / 4; c += 32) reinterpret_cast<int*>(o)[c] = 0;
    if (out_scales)
      for (int c = lane; c < H / 128; c += 32) out_scales[r * (H / 128) + c] = 0.0f;
    if (lane == 0) {
      out_w[r] = 0.0f;
      row_src[r] = -1;
    }
  }
  if (last_block(scratch_counter(v, kCntExpand)) && threadIdx.x < P)
    st_release_sys(&mail(v, threadIdx.x, v.me)->disp_ack, current_step(v, kRegionDispatch));
}

// The expert rank, a warp per received (source, token): Σ_j c_j·rows[row(j)] over the entries
// that came here (c_j the gate weight, or 1 without recv_w), in fp32, written once in the rows'
// dtype into the owner's combine region at [me][i]. The owners acknowledged the previous step.
template <typename T>
__global__ void combine_push_kernel(View v, const T* rows, int64_t N, int H, int k, int64_t map_cap, const int* recv_row_of,
                                    const float* recv_w, const int* recv_tokens) {
  const int lane = threadIdx.x & 31;
  const int64_t warp0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32, warps = int64_t(gridDim.x) * blockDim.x / 32;
  const int P = v.P;
  for (int64_t item = warp0; item < P * map_cap; item += warps) {
    const int s = int(item / map_cap);
    const int64_t i = item % map_cap;
    if (i >= recv_tokens[s] || i >= v.t_cap) continue;
    int r = -1;
    float c = 0.0f;
    if (lane < k) {
      r = recv_row_of[item * k + lane];
      c = recv_w ? recv_w[item * k + lane] : 1.0f;
      if (r >= N) r = -1;
    }
    const unsigned valid = __ballot_sync(0xffffffffu, r >= 0);
    T* dst = reinterpret_cast<T*>(comb_row(v, s, v.me, i));
    if (H % 8 == 0) {
      const int chunks = H / 8;
      for (int c0 = 0; c0 < chunks; c0 += 32) {
        const int ch = c0 + lane;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (unsigned bits = valid; bits; bits &= bits - 1) {
          const int j = __ffs(bits) - 1;
          const int rj = __shfl_sync(0xffffffffu, r, j);
          const float cj = __shfl_sync(0xffffffffu, c, j);
          if (ch < chunks) {
            float x[8];
            Chunk8<T>::load(rows + int64_t(rj) * H + ch * 8, x);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] += cj * x[e];
          }
        }
        if (ch < chunks) Chunk8<T>::store(dst + ch * 8, acc);
      }
    } else {
      for (int h0 = 0; h0 < H; h0 += 32) {
        const int h = h0 + lane;
        float acc = 0.0f;
        for (unsigned bits = valid; bits; bits &= bits - 1) {
          const int j = __ffs(bits) - 1;
          const int rj = __shfl_sync(0xffffffffu, r, j);
          const float cj = __shfl_sync(0xffffffffu, c, j);
          if (h < H) acc += cj * load1(rows + int64_t(rj) * H + h);
        }
        if (h < H) dst[h] = from_float<T>(acc);
      }
    }
  }
  if (last_block(scratch_counter(v, kCntCombPush)) && threadIdx.x < P)
    st_release_sys(&mail(v, threadIdx.x, v.me)->comb_step, current_step(v, kRegionCombine));
}

// The owner, a warp per token: y[t] = Σ over the ranks t went to of their partial rows, in fp32.
template <typename T> __global__ void combine_reduce_kernel(View v, const int* pos, int T_, int H, T* y) {
  const int lane = threadIdx.x & 31;
  const int64_t warp0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32, warps = int64_t(gridDim.x) * blockDim.x / 32;
  const int P = v.P;
  for (int64_t t = warp0; t < T_; t += warps) {
    int at = lane < P ? pos[t * P + lane] : -1;
    if (at >= v.t_cap) at = -1;
    const unsigned from = __ballot_sync(0xffffffffu, at >= 0);
    if (H % 8 == 0) {
      const int chunks = H / 8;
      for (int c0 = 0; c0 < chunks; c0 += 32) {
        const int ch = c0 + lane;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (unsigned bits = from; bits; bits &= bits - 1) {
          const int p = __ffs(bits) - 1;
          const int ap = __shfl_sync(0xffffffffu, at, p);
          if (ch < chunks) {
            float x[8];
            Chunk8<T>::load(reinterpret_cast<const T*>(comb_row(v, v.me, p, ap)) + ch * 8, x);
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] += x[e];
          }
        }
        if (ch < chunks) Chunk8<T>::store(y + t * H + ch * 8, acc);
      }
    } else {
      for (int h0 = 0; h0 < H; h0 += 32) {
        const int h = h0 + lane;
        float acc = 0.0f;
        for (unsigned bits = from; bits; bits &= bits - 1) {
          const int p = __ffs(bits) - 1;
          const int ap = __shfl_sync(0xffffffffu, at, p);
          if (h < H) acc += load1(reinterpret_cast<const T*>(comb_row(v, v.me, p, ap)) + h);
        }
        if (h < H) y[t * H + h] = from_float<T>(acc);
      }
    }
  }
  if (last_block(scratch_counter(v, kCntCombReduce)) && threadIdx.x < P)
    st_release_sys(&mail(v, threadIdx.x, v.me)->comb_ack, current_step(v, kRegionCombine));
}

// Backward of combine on the expert rank, a warp per expert-order row r that entry (s, i, j)
// filled: d_rows[r] = w·dy(s, i) and <dy(s, i), rows[r]> (fp32) into the owner's combine aux at
// [me][i][j]; padding rows get zeros. dy(s, i) is what the owner pushed into my dispatch region.
template <typename D, typename R>
__global__ void cb_expert_kernel(View v, const int* row_src, int64_t N, const R* rows, const float* recv_w, int H, int k, int64_t map_cap,
                                 R* d_rows) {
  const int lane = threadIdx.x & 31;
  const int64_t warp0 = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32, warps = int64_t(gridDim.x) * blockDim.x / 32;
  const int P = v.P;
  for (int64_t r = warp0; r < N; r += warps) {
    const int src = row_src[r];
    const int64_t item = src >= 0 ? src / k : -1;
    const int j = src >= 0 ? src % k : 0;
    const int s = item >= 0 ? int(item / map_cap) : -1;
    const int64_t i = item >= 0 ? item % map_cap : -1;
    R* d = d_rows + r * H;
    if (src < 0 || s >= P || i >= v.t_cap) {
      for (int h = lane; h < H; h += 32) d[h] = from_float<R>(0.0f);
      continue;
    }
    const D* dy = reinterpret_cast<const D*>(disp_row(v, v.me, s, i));
    const float w = recv_w[src];
    const R* x = rows + r * H;
    float dot = 0.0f;
    if (H % 8 == 0) {
      for (int ch = lane; ch < H / 8; ch += 32) {
        float g[8], a[8], o[8];
        Chunk8<D>::load(dy + ch * 8, g);
        Chunk8<R>::load(x + ch * 8, a);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          o[e] = w * g[e];
          dot += g[e] * a[e];
        }
        Chunk8<R>::store(d + ch * 8, o);
      }
    } else {
      for (int h = lane; h < H; h += 32) {
        const float g = load1(dy + h);
        d[h] = from_float<R>(w * g);
        dot += g * load1(x + h);
      }
    }
#pragma unroll
    for (int off = 16; off; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) comb_aux(v, s, v.me, i)[j] = dot;
  }
  if (last_block(scratch_counter(v, kCntCbExpert)) && threadIdx.x < P) {
    st_release_sys(&mail(v, threadIdx.x, v.me)->disp_ack, current_step(v, kRegionDispatch));
    st_release_sys(&mail(v, threadIdx.x, v.me)->comb_step, current_step(v, kRegionCombine));
  }
}

// Backward of combine on the owner: d_weights[t, j] from the rank that holds entry j's expert.
__global__ void cb_owner_kernel(View v, const int* pos, const int* dest, int T, int k, float* d_weights) {
  const int64_t n = int64_t(T) * k;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < n; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = q / k;
    const int j = int(q % k), p = dest[q];
    float val = 0.0f;
    if (p >= 0 && p < v.P) {
      const int at = pos[t * v.P + p];
      if (at >= 0 && at < v.t_cap) val = __ldcg(comb_aux(v, v.me, p, at) + j);
    }
    d_weights[q] = val;
  }
  if (last_block(scratch_counter(v, kCntCbOwner)) && threadIdx.x < v.P)
    st_release_sys(&mail(v, threadIdx.x, v.me)->comb_ack, current_step(v, kRegionCombine));
}

}  // namespace moe::comm::peer
