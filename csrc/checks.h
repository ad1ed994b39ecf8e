// Argument checks shared by every op. Each message names the argument and says what was
// expected and what was given, so a user can fix the call without reading this code.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

namespace peftkern {

inline std::string shape_str(const at::Tensor& t) {
  return c10::str(t.sizes());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, "peftkern: ", name, " must be ", dim, "-D ", layout, ", got shape ",
              shape_str(t));
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* name,
                       const char* what) {
  TORCH_CHECK(t.size(dim) == expected, "peftkern: ", name, ".shape[", dim, "] must equal ", what,
              " (", expected, "), got shape ", shape_str(t));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "peftkern: ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; move them to the same device");
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "peftkern: ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
              "; they must match");
}

inline void check_floating(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16,
              "peftkern: ", name, " must be float64, float32, float16 or bfloat16, got ", s);
}

inline void check_dropout(double p, const char* name) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "peftkern: ", name, " must be in [0, 1), got ", p);
}

// The dropout seed is a one-element int64 tensor on the device of the data (drawn from
// torch's generator by the Python wrapper), or None when dropout is off.
inline void check_seed(const c10::optional<at::Tensor>& seed, double p, const at::Tensor& ref) {
  if (p == 0.0) return;
  TORCH_CHECK(seed.has_value() && seed->defined(), "peftkern: seed must be given when dropout > 0");
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 1,
              "peftkern: seed must be a one-element int64 tensor, got dtype ", seed->scalar_type(),
              " and shape ", shape_str(*seed));
  check_same_device(*seed, ref, "seed", "x");
}

}  // namespace peftkern
