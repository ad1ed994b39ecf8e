// CPU pass of the fused bottleneck adapter: the elementwise work on the M×r bottleneck
// (bias is already in Z from the down GEMM), split over rows on all threads and vectorised by
// the activation row kernels. The GEMMs around it are in ../bottleneck_adapter.cpp.
#include <torch/library.h>

#include "../bottleneck_adapter.h"
#include "activation_rows.h"
#include "rows.h"

namespace peftkern::cpu {
namespace {

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
  return bottleneck_adapter_backward(kCpuKernels, grad_out, h, w_down, w_up, b_up, pre_activation,
                                     std::string(activation), scaling, scaling_vector,
                                     residual_is_h, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter_cpu);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward_cpu);
}

}  // namespace peftkern::cpu
