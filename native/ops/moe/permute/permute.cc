#include "ops/moe/permute/permute.h"

#include <climits>

#include "ops/common/checks.h"
#include "ops/common/dispatch.h"

namespace moe::ops {

namespace {

void require_tensor(const Tensor& t, std::initializer_list<DType> dtypes, const Shape& shape, const Tensor& ref, const char* ref_name,
                    const char* op, const char* name) {
  require_defined(t, op, name);
  require_dtype(t, dtypes, op, name);
  require_contiguous(t, op, name);
  require_same_device(ref, ref_name, t, name, op);
  MOE_ARG_CHECK(t.shape() == shape, op, "'", name, "' has shape ", shape_str(t.shape()), "; expected ", shape_str(shape));
}

void require_2d(const Tensor& t, const char* op, const char* name, const char* what) {
  require_defined(t, op, name);
  MOE_ARG_CHECK(t.dim() == 2, op, "'", name, "' ", t.describe(), " must be 2-D ", what);
  MOE_ARG_CHECK(t.numel() < INT_MAX, op, "'", name, "' ", t.describe(), " is too large (2^31 elements at most)");
}

}  // namespace

void permute_layout(const Tensor& indices, const Tensor& slot, const Tensor& kept, const Tensor& weights, int64_t capacity, int64_t align,
                    const Tensor& offsets, const Tensor& row_of, const Tensor& row_token, const Tensor& row_weight, const Tensor& invalid) {
  const char* op = "permute";
  require_2d(indices, op, "indices", "[T,k]");
  require_tensor(indices, {DType::i32}, indices.shape(), indices, "indices", op, "indices");
  require_tensor(slot, {DType::i32}, indices.shape(), indices, "indices", op, "cap.slot");
  require_defined(kept, op, "cap.keptPerExpert");
  MOE_ARG_CHECK(kept.dim() == 1 && kept.numel() >= 1, op, "'cap.keptPerExpert' ", kept.describe(), " must be [E] with E >= 1");
  const int64_t E = kept.numel();
  require_tensor(kept, {DType::i32}, {E}, indices, "indices", op, "cap.keptPerExpert");
  require_tensor(weights, {DType::f32}, indices.shape(), indices, "indices", op, "weights");
  MOE_ARG_CHECK(align >= 1 && align <= INT_MAX, op, "'align' = ", align, " must be a positive integer");
  MOE_ARG_CHECK(capacity >= -1 && capacity < INT_MAX, op, "'capacity' = ", capacity, " must be -1 (no padding to capacity) or >= 0");
  require_tensor(offsets, {DType::i32}, {E + 1}, indices, "indices", op, "offsets");
  require_tensor(row_of, {DType::i32}, indices.shape(), indices, "indices", op, "rowOf");
  require_defined(row_token, op, "rowToken");
  MOE_ARG_CHECK(row_token.dim() == 1 && row_token.numel() < INT_MAX, op, "'rowToken' ", row_token.describe(), " must be [R], R < 2^31");
  const int64_t R = row_token.numel();
  require_tensor(row_token, {DType::i32}, {R}, indices, "indices", op, "rowToken");
  require_tensor(row_weight, {DType::f32}, {R}, indices, "indices", op, "rowWeight");
  require_tensor(invalid, {DType::i32}, {1}, indices, "indices", op, "invalid");
  if (indices.device().is_cuda())
    MOE_ARG_CHECK(E <= kMaxExpertsCuda, op, "'cap.keptPerExpert' has ", E, " experts; the CUDA layout kernel handles up to ",
                  kMaxExpertsCuda);
  MOE_ON_DEVICE(indices, op,
                permute_layout_cpu(indices, slot, kept, weights, capacity, align, offsets, row_of, row_token, row_weight, invalid),
                permute_layout_cuda(indices, slot, kept, weights, capacity, align, offsets, row_of, row_token, row_weight, invalid,
                                    op_stream(indices)));
}

void permute_rows(const Tensor& x, const Tensor& row_token, const Tensor& rows, const Tensor& row_of) {
  const char* op = "permute";
  require_2d(x, op, "x", "[T,H]");
  // Rows are copied as bytes: fp8 rows (and their scales, f32) for the FP8 dispatch too.
  require_tensor(x, {DType::f32, DType::bf16, DType::f16, DType::fp8e4m3}, x.shape(), x, "x", op, "x");
  require_defined(row_token, op, "rowToken");
  MOE_ARG_CHECK(row_token.dim() == 1, op, "'rowToken' ", row_token.describe(), " must be [R]");
  require_tensor(row_token, {DType::i32}, row_token.shape(), x, "x", op, "rowToken");
  require_defined(rows, op, "rows");
  require_tensor(rows, {x.dtype()}, {row_token.numel(), x.size(1)}, x, "x", op, "rows");
  if (row_of.defined()) {
    require_2d(row_of, op, "rowOf", "[T,k]");
    require_tensor(row_of, {DType::i32}, {x.size(0), row_of.size(1)}, x, "x", op, "rowOf");
  }
  if (rows.numel() == 0) return;
  MOE_ON_DEVICE(x, op, permute_rows_cpu(x, row_token, rows), permute_rows_cuda(x, row_token, rows, row_of, op_stream(x)));
}

namespace {
void check_unpermute(const Tensor& rows, const Tensor& row_of, const Tensor& weights, const Tensor& out, const char* op,
                     const char* rows_name, const char* out_name) {
  require_2d(rows, op, rows_name, "[R,H]");
  require_tensor(rows, {DType::f32, DType::bf16}, rows.shape(), rows, rows_name, op, rows_name);
  require_2d(row_of, op, "rowOf", "[T,k]");
  require_tensor(row_of, {DType::i32}, row_of.shape(), rows, rows_name, op, "rowOf");
  MOE_ARG_CHECK(rows.size(0) < INT_MAX, op, "'", rows_name, "' has too many rows");
  if (weights.defined()) require_tensor(weights, {DType::f32}, row_of.shape(), rows, rows_name, op, "weights");
  require_defined(out, op, out_name);
  require_tensor(out, {DType::f32, DType::bf16}, {row_of.size(0), rows.size(1)}, rows, rows_name, op, out_name);
}
}  // namespace

void unpermute(const Tensor& rows, const Tensor& row_of, const Tensor& weights, const Tensor& out) {
  const char* op = "unpermute";
  check_unpermute(rows, row_of, weights, out, op, "rows", "out");
  require_defined(weights, op, "weights");
  if (out.numel() == 0) return;
  MOE_ON_DEVICE(rows, op, unpermute_cpu(rows, row_of, weights, Tensor(), out, op),
                unpermute_cuda(rows, row_of, weights, Tensor(), out, op, op_stream(rows)));
}

void permute_backward(const Tensor& d_rows, const Tensor& row_of, const Tensor& dx, const Tensor& add) {
  const char* op = "permuteBackward";
  check_unpermute(d_rows, row_of, Tensor(), dx, op, "dRows", "dx");
  if (add.defined()) require_tensor(add, {dx.dtype()}, dx.shape(), d_rows, "dRows", op, "add");
  if (dx.numel() == 0) return;
  MOE_ON_DEVICE(d_rows, op, unpermute_cpu(d_rows, row_of, Tensor(), add, dx, op),
                unpermute_cuda(d_rows, row_of, Tensor(), add, dx, op, op_stream(d_rows)));
}

void unpermute_backward(const Tensor& dy, const Tensor& rows, const Tensor& weights, const Tensor& row_of, const Tensor& row_token,
                        const Tensor& d_rows, const Tensor& d_weights) {
  const char* op = "unpermuteBackward";
  check_unpermute(rows, row_of, weights, dy, op, "rows", "dy");
  require_defined(weights, op, "weights");
  require_tensor(row_token, {DType::i32}, {rows.size(0)}, rows, "rows", op, "rowToken");
  require_tensor(d_rows, {DType::f32, DType::bf16}, rows.shape(), rows, "rows", op, "dRows");
  require_tensor(d_weights, {DType::f32}, row_of.shape(), rows, "rows", op, "dWeights");
  if (d_rows.numel() == 0 && d_weights.numel() == 0) return;
  MOE_ON_DEVICE(rows, op, unpermute_backward_cpu(dy, rows, weights, row_of, row_token, d_rows, d_weights),
                unpermute_backward_cuda(dy, rows, weights, row_of, row_token, d_rows, d_weights, op_stream(rows)));
}

}  // namespace moe::ops
