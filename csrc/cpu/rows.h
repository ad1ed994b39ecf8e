// Helpers for CPU passes that hand rows of contiguous 2-D tensors to the row kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "dtype.h"

namespace peftkern::cpu {

inline Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return Dtype::f32;
    case at::kDouble:
      return Dtype::f64;
    case at::kHalf:
      return Dtype::f16;
    case at::kBFloat16:
      return Dtype::bf16;
    default:
      TORCH_CHECK(false, "peftkern: unsupported dtype ", t.scalar_type());
  }
}

// Address of row `row` of a contiguous 2-D tensor, or nullptr for an undefined tensor.
inline char* row_ptr(const at::Tensor& t, int64_t row) {
  if (!t.defined()) return nullptr;
  return static_cast<char*>(t.data_ptr()) + row * t.size(1) * t.element_size();
}

// Runs body(first_row, row_count) over rows [0, rows) of `width` elements on all threads,
// giving each task a few thousand elements.
template <typename F>
void parallel_rows(int64_t rows, int64_t width, F&& body) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, width));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { body(begin, end - begin); });
}

}  // namespace peftkern::cpu
