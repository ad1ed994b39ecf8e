// CUDA pass of the fused bottleneck adapter: the elementwise work on the M×r bottleneck (bias
// is already in Z from the down GEMM). The GEMMs around it run in cuBLAS through ATen
// (../bottleneck_adapter.cpp), with b_up, the learned scaling and the residual folded in,
// so h is read and out written by the GEMMs alone; these kernels touch only M×r elements.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../bottleneck_adapter.h"

namespace peftkern::cuda {
namespace {

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kThreads = 256;

// a[i, j] = scale·act(Z[i, j]) for j < r and scale for j == r (when width == r + 1).
template <typename T, Activation A>
__global__ void __launch_bounds__(kThreads)
    activate_kernel(const T* __restrict__ Z, T* __restrict__ a, int64_t rows, int64_t r,
                    int64_t width, compute_t<T> scale) {
  using C = compute_t<T>;
  const int64_t n = rows * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < n;
       idx += stride) {
    const int64_t i = idx / width, j = idx - i * width;
    a[idx] = static_cast<T>(j < r ? scale * activation_value<A, C>(static_cast<C>(Z[i * r + j]))
                                  : scale);
  }
}

// dA[i, j] *= scale·act'(Z[i, j]) and, with kWithA, a as in activate_kernel (Z read once
// for both).
template <typename T, Activation A, bool kWithA>
__global__ void __launch_bounds__(kThreads)
    activate_backward_kernel(const T* __restrict__ Z, T* __restrict__ dA, T* __restrict__ a,
                             int64_t rows, int64_t r, int64_t width, compute_t<T> scale) {
  using C = compute_t<T>;
  const int64_t n = rows * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < n;
       idx += stride) {
    const int64_t i = idx / width, j = idx - i * width;
    if (j < r) {
      const int64_t zi = i * r + j;
      const C z = static_cast<C>(Z[zi]);
      dA[zi] = static_cast<T>(scale * static_cast<C>(dA[zi]) * activation_derivative<A, C>(z));
      if constexpr (kWithA) a[idx] = static_cast<T>(scale * activation_value<A, C>(z));
    } else if constexpr (kWithA) {
      a[idx] = static_cast<T>(scale);
    }
  }
}

// Enough blocks to fill the GPU a few times over; the grid-stride loops cover the rest.
dim3 grid_for(int64_t n) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 8 * sms);
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, blocks)));
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
          activate_kernel<scalar_t, A><<<grid_for(rows * width), kThreads, 0, stream>>>(
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
          const dim3 grid = grid_for(rows * width);
          if (a.defined()) {
            activate_backward_kernel<scalar_t, A, true><<<grid, kThreads, 0, stream>>>(
                Z.const_data_ptr<scalar_t>(), dA.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), rows,
                r, width, static_cast<compute_t<scalar_t>>(scale));
          } else {
            activate_backward_kernel<scalar_t, A, false><<<grid, kThreads, 0, stream>>>(
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
