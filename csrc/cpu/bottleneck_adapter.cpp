// CPU pass of the fused bottleneck adapter: the elementwise work on the M×r bottleneck
// (bias is already in Z from the down GEMM), split over rows on all threads and vectorised by
// the activation row kernels. The GEMMs around it are in ../bottleneck_adapter.cpp.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../bottleneck_adapter.h"
#include "activation_rows.h"

namespace peftkern::cpu {
namespace {

Dtype dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::f32;
    case at::kDouble: return Dtype::f64;
    case at::kHalf: return Dtype::f16;
    case at::kBFloat16: return Dtype::bf16;
    default: TORCH_CHECK(false, "peftkern: unsupported dtype ", t.scalar_type());
  }
}

// Runs body(first_row, row_count) over the rows of Z on all threads, a few KiB per task.
template <typename F>
void parallel_rows(int64_t rows, int64_t r, F&& body) {
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, r));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { body(begin, end - begin); });
}

// Address of row `row` of a contiguous 2-D tensor (nullptr for an undefined one).
char* row_ptr(const at::Tensor& t, int64_t row) {
  if (!t.defined()) return nullptr;
  return static_cast<char*>(t.data_ptr()) + row * t.size(1) * t.element_size();
}

void activate(const at::Tensor& Z, Activation activation, double scale, at::Tensor& a) {
  const int64_t r = Z.size(1);
  parallel_rows(Z.size(0), r, [&](int64_t first, int64_t count) {
    activation_rows(dtype_of(Z), activation, scale, row_ptr(Z, first), row_ptr(a, first), count, r,
                    a.size(1));
  });
}

void activate_backward(const at::Tensor& Z, at::Tensor& dA, Activation activation, double scale,
                       at::Tensor& a) {
  const int64_t r = Z.size(1), width = a.defined() ? a.size(1) : r;
  parallel_rows(Z.size(0), r, [&](int64_t first, int64_t count) {
    activation_backward_rows(dtype_of(Z), activation, scale, row_ptr(Z, first), row_ptr(dA, first),
                             row_ptr(a, first), count, r, width);
  });
}

constexpr AdapterKernels kCpuKernels{&activate, &activate_backward};

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_cpu(
    const at::Tensor& h, const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
    const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up, c10::string_view activation,
    double scaling, const c10::optional<at::Tensor>& scaling_vector,
    const c10::optional<at::Tensor>& residual) {
  return bottleneck_adapter_forward(kCpuKernels, h, w_down, b_down, w_up, b_up,
                                    std::string(activation), scaling, scaling_vector, residual);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bottleneck_adapter_backward_cpu(const at::Tensor& grad_out, const at::Tensor& h,
                                const at::Tensor& w_down, const at::Tensor& w_up,
                                const c10::optional<at::Tensor>& b_up,
                                const at::Tensor& pre_activation, c10::string_view activation,
                                double scaling, const c10::optional<at::Tensor>& scaling_vector,
                                bool residual_is_h, std::array<bool, 6> output_mask) {
  return bottleneck_adapter_backward(kCpuKernels, grad_out, h, w_down, w_up, b_up,
                                     pre_activation, std::string(activation), scaling,
                                     scaling_vector, residual_is_h, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter_cpu);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward_cpu);
}

}  // namespace peftkern::cpu
