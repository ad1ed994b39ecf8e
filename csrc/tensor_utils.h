// Small tensor helpers shared by the device-agnostic op orchestrations.
#pragma once

#include <ATen/ATen.h>

namespace peftkern {

// An optional tensor argument that was actually passed (not None, not undefined).
inline bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// t as a contiguous [rows, features] matrix (a view when t is already contiguous).
inline at::Tensor rows_of(const at::Tensor& t, int64_t features) {
  return t.reshape({-1, features}).contiguous();
}

// What a backward op returns for a gradient that was not asked for: an empty tensor.
inline at::Tensor unneeded_grad(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

// t with like's dtype and the memory layout at::empty_like(like) gives (like's strides when
// it is dense, which is what the fake kernels promise): t itself when it already has both,
// otherwise a copy.
inline at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  at::Tensor result = at::empty_like(like);
  if (t.scalar_type() == like.scalar_type() && t.strides() == result.strides()) return t;
  return result.copy_(t);
}

}  // namespace peftkern
