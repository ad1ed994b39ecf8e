// Small tensor helpers shared by the device-agnostic op orchestrations.
#pragma once

#include <ATen/ATen.h>

namespace peftkern {

// An optional tensor argument that was actually passed (not None, not undefined).
inline bool given(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined();
}

// The number of rows of t seen as [..., features]: the product of all but the last size
// (counted, not derived from numel(), which is 0 for every row count when features is 0).
inline int64_t leading_rows(const at::Tensor& t) {
  return t.dim() == 0 ? 1 : c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
}

// t as a contiguous [rows, features] matrix (a view when t is already contiguous).
inline at::Tensor rows_of(const at::Tensor& t, int64_t features) {
  return t.reshape({leading_rows(t), features}).contiguous();
}

// The dtype attention computes in: float32 for every dtype but float64. Half-precision
// inputs are computed in float32 like FlashAttention does (scores, softmax and
// accumulation), and rounded once at the end.
inline at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// t in `type` with rows of the last dim contiguous, any other strides kept: the device
// kernels address [B, H, n, d] through strides, so the [B, n, H, d] memory that projections
// produce is read in place. t itself when it already is.
inline at::Tensor in_compute(const at::Tensor& t, at::ScalarType type) {
  at::Tensor c = t.to(type);
  return c.stride(-1) == 1 ? c : c.contiguous();
}

// What a backward op returns for a gradient that was not asked for: an empty tensor.
inline at::Tensor unneeded_grad(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

// t ([B, H, n, d]) with like's dtype in the memory layout of [B, n, H, d] seen transposed:
// what attention layers get from their projections and give back to them, so neither side
// copies. A fixed layout, whatever the input strides, because compilers assume it from the
// fake kernel. t itself when it already has both.
inline at::Tensor in_heads_layout(const at::Tensor& t, const at::Tensor& like) {
  const auto heads_layout = [&](const at::TensorOptions& options) {
    return at::empty({t.size(0), t.size(2), t.size(1), t.size(3)}, options).transpose(1, 2);
  };
  // The strides come from a meta tensor: no memory is allocated when t already has them.
  const at::Tensor layout = heads_layout(like.options().device(at::kMeta));
  if (t.scalar_type() == like.scalar_type() && t.strides() == layout.strides()) return t;
  return heads_layout(like.options()).copy_(t);
}

}  // namespace peftkern
