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

}  // namespace peftkern
