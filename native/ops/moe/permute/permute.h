// Permute / unpermute: router assignments regrouped into expert-contiguous rows and back.
//
// Naming: T tokens, H hidden size, k experts per token, E experts, R rows after permutation
// (kept assignments plus padding), C capacity (or -1: none). An assignment is (t, j).
//
// permute_layout: where every kept assignment goes. Expert e owns rows offsets[e] .. offsets[e+1]);
//   its kept assignments fill the first kept[e] of them in (t, j) order (row = offsets[e] + slot);
//   the rest of the segment is padding. A segment is kept[e] long, or C with capacity ≥ 0
//   (padToCapacity), rounded up to a multiple of `align`; R must equal offsets[E].
//   in:  indices [T,k] i32, slot [T,k] i32 (from capacity; -1 = dropped), kept [E] i32,
//        weights [T,k] f32
//   out: offsets [E+1] i32, row_of [T,k] i32 (-1 when dropped), row_token [R] i32 (-1 for padding),
//        row_weight [R] f32 (the gate weight travelling with the row; 0 for padding), invalid [1] i32.
//   Bad input (expert id out of range, slot ≥ kept[e] or beyond its segment, R ≠ offsets[E], a
//   slot used twice): the CPU path throws. The CUDA path never syncs: it skips such assignments
//   (row_of -1) and counts them, plus 1 for R ≠ offsets[E], into invalid[0].
//
// permute_rows: rows[r] = x[row_token[r]], zeros where row_token[r] < 0.  x [T,H], rows [R,H], same
//   dtype (f32, bf16, f16). A pure copy, 16-byte accesses where alignment allows. row_of [T,k] is
//   optional: when given (the pair permute_layout wrote), the CUDA path works in token order, reading
//   each token's row once and writing it to its rows (row_of[t,j] in [0,R) with row_token[that row]
//   == t), then zeros the rows whose row_token is not a token; for a layout from permute_layout that
//   is the same result, with x read once instead of k times. The CPU path gathers either way.
//
// unpermute: out[t] = Σ_j w[t,j] · rows[row_of[t,j]] over j with row_of[t,j] ≥ 0, accumulated in
//   fp32, one write per token (no atomics). A token whose assignments were all dropped gets 0.
//   rows [R,H] and out [T,H] f32 or bf16 (independently); weights [T,k] f32 or undefined (all 1).
//
// unpermute_backward: d_rows[row_of[t,j]] = w[t,j]·dy[t]; rows with row_token < 0 get 0;
//   d_weights[t,j] = <dy[t], rows[row_of[t,j]]> in fp32 (0 when dropped).
//   dy [T,H], rows [R,H], d_rows [R,H] f32 or bf16; weights, d_weights [T,k] f32.
//
// permute_backward: dx[t] = Σ_j d_rows[row_of[t,j]] + add[t] (unpermute with weights 1). `add` [T,H]
//   of dx's dtype is optional: another gradient of the same x (the router's), summed in the same fp32
//   accumulator with one rounding, so the layer needs no separate pass to add it.
//
// On the GPU, row_of / row_token values outside [−1, R) / [−1, T) are skipped (treated as dropped /
// padding) rather than read; the CPU path throws for them. unpermute_backward on the GPU also skips
// an assignment whose row's row_token is not its token (d_weights 0; no row is written twice).
#pragma once
#include "core/tensor.h"

namespace moe::ops {

void permute_layout(const Tensor& indices, const Tensor& slot, const Tensor& kept, const Tensor& weights, int64_t capacity, int64_t align,
                    const Tensor& offsets, const Tensor& row_of, const Tensor& row_token, const Tensor& row_weight, const Tensor& invalid);
void permute_rows(const Tensor& x, const Tensor& row_token, const Tensor& rows, const Tensor& row_of = Tensor());
void unpermute(const Tensor& rows, const Tensor& row_of, const Tensor& weights, const Tensor& out);
void unpermute_backward(const Tensor& dy, const Tensor& rows, const Tensor& weights, const Tensor& row_of, const Tensor& row_token,
                        const Tensor& d_rows, const Tensor& d_weights);
void permute_backward(const Tensor& d_rows, const Tensor& row_of, const Tensor& dx, const Tensor& add = Tensor());

void permute_layout_cpu(const Tensor& indices, const Tensor& slot, const Tensor& kept, const Tensor& weights, int64_t capacity,
                        int64_t align, const Tensor& offsets, const Tensor& row_of, const Tensor& row_token, const Tensor& row_weight,
                        const Tensor& invalid);
void permute_rows_cpu(const Tensor& x, const Tensor& row_token, const Tensor& rows);
// weights may be undefined (all 1), add too (nothing added); op names the caller in errors.
void unpermute_cpu(const Tensor& rows, const Tensor& row_of, const Tensor& weights, const Tensor& add, const Tensor& out, const char* op);
void unpermute_backward_cpu(const Tensor& dy, const Tensor& rows, const Tensor& weights, const Tensor& row_of, const Tensor& row_token,
                            const Tensor& d_rows, const Tensor& d_weights);

void permute_layout_cuda(const Tensor& indices, const Tensor& slot, const Tensor& kept, const Tensor& weights, int64_t capacity,
                         int64_t align, const Tensor& offsets, const Tensor& row_of, const Tensor& row_token, const Tensor& row_weight,
                         const Tensor& invalid, void* stream);
void permute_rows_cuda(const Tensor& x, const Tensor& row_token, const Tensor& rows, const Tensor& row_of, void* stream);
void unpermute_cuda(const Tensor& rows, const Tensor& row_of, const Tensor& weights, const Tensor& add, const Tensor& out, const char* op,
                    void* stream);
void unpermute_backward_cuda(const Tensor& dy, const Tensor& rows, const Tensor& weights, const Tensor& row_of, const Tensor& row_token,
                             const Tensor& d_rows, const Tensor& d_weights, void* stream);

// Experts the CUDA layout kernel handles (it scans the segment lengths in shared memory).
constexpr int64_t kMaxExpertsCuda = 4096;

}  // namespace moe::ops
