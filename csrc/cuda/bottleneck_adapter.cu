// Host side of the fused bottleneck adapter on CUDA. The GEMMs run in cuBLAS through ATen
// (../bottleneck_adapter.cpp), with b_up, the learned scaling and the residual folded in, so h
// is read and out written by the GEMMs alone; the kernels (kernels/bottleneck_adapter.cuh)
// touch only the M×r bottleneck (its bias is already in Z from the down GEMM).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../bottleneck_adapter.h"
#include "kernels/bottleneck_adapter.cuh"

namespace peftkern::cuda {
namespace {

LaunchGeometry elementwise_geometry(int64_t n) {
  return adapter_elementwise_geometry(n,
                                      at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

void activate(const at::Tensor& Z, Activation activation, double scale, at::Tensor& a) {
  const c10::cuda::CUDAGuard guard(Z.device());
  const int64_t rows = Z.size(0), r = Z.size(1), width = a.size(1);
  if (rows == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, Z.scalar_type(), "peftkern_adapter_act", [&] {
        with_activation(activation, [&](auto kind) {
          constexpr Activation A = decltype(kind)::value;
          const LaunchGeometry g = elementwise_geometry(rows * width);
          activate_kernel<scalar_t, A><<<g.grid, g.block, g.shared_bytes, stream>>>(
              Z.const_data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), rows, r, width,
              static_cast<compute_t<scalar_t>>(scale));
        });
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void activate_backward(const at::Tensor& Z, at::Tensor& dA, Activation activation, double scale,
                       at::Tensor& a) {
  const c10::cuda::CUDAGuard guard(Z.device());
  const int64_t rows = Z.size(0), r = Z.size(1), width = a.defined() ? a.size(1) : r;
  if (rows == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, Z.scalar_type(), "peftkern_adapter_act_bwd", [&] {
        with_activation(activation, [&](auto kind) {
          constexpr Activation A = decltype(kind)::value;
          const LaunchGeometry g = elementwise_geometry(rows * width);
          if (a.defined()) {
            activate_backward_kernel<scalar_t, A, true>
                <<<g.grid, g.block, g.shared_bytes, stream>>>(
                    Z.const_data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
                    rows, r, width, static_cast<compute_t<scalar_t>>(scale));
          } else {
            activate_backward_kernel<scalar_t, A, false>
                <<<g.grid, g.block, g.shared_bytes, stream>>>(
                    Z.const_data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(), nullptr, rows, r, width,
                    static_cast<compute_t<scalar_t>>(scale));
          }
        });
      });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr AdapterKernels kCudaKernels{&activate, &activate_backward};

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_cuda(
    const at::Tensor& h, const at::Tensor& w_down, const c10::optional<at::Tensor>& b_down,
    const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up, c10::string_view activation,
    double scaling, const c10::optional<at::Tensor>& scaling_vector,
    const c10::optional<at::Tensor>& residual) {
  const c10::cuda::CUDAGuard guard(h.device());
  return bottleneck_adapter_forward(kCudaKernels, h, w_down, b_down, w_up, b_up,
                                    std::string(activation), scaling, scaling_vector, residual);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bottleneck_adapter_backward_cuda(const at::Tensor& grad_out, const at::Tensor& h,
                                 const at::Tensor& w_down, const at::Tensor& w_up,
                                 const c10::optional<at::Tensor>& b_up,
                                 const at::Tensor& pre_activation, c10::string_view activation,
                                 double scaling, const c10::optional<at::Tensor>& scaling_vector,
                                 bool residual_is_h, std::array<bool, 6> output_mask) {
  const c10::cuda::CUDAGuard guard(h.device());
  return bottleneck_adapter_backward(kCudaKernels, grad_out, h, w_down, w_up, b_up, pre_activation,
                                     std::string(activation), scaling, scaling_vector,
                                     residual_is_h, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftkern, CUDA, m) {
  m.impl("bottleneck_adapter", &bottleneck_adapter_cuda);
  m.impl("bottleneck_adapter_backward", &bottleneck_adapter_backward_cuda);
}

}  // namespace peftkern::cuda
