// Host side of the fused LoRA linear on CUDA. The big GEMMs stay in cuBLAS (../lora_linear.cpp);
// the kernels around them (kernels/lora_linear.cuh) do the work that would otherwise cost extra
// passes over memory.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../lora_linear.h"
#include "kernels/lora_linear.cuh"
#include "lora_kernels.h"

namespace peftkern::cuda {
namespace {

c10::optional<DropoutParams> dropout_params(double dropout) {
  if (dropout == 0.0) return c10::nullopt;
  return DropoutParams::make(0, dropout);  // the seed itself is read on the device
}

const int64_t* seed_ptr(double dropout, const c10::optional<at::Tensor>& seed) {
  return dropout == 0.0 ? nullptr : seed->data_ptr<int64_t>();
}

// Calls f(X{}, Acc{}) with the C++ types of x's dtype and the adapter dtype (equal, or float
// for half/bfloat16 x; the argument checks have already ruled out other pairs).
template <typename F>
void dispatch_types(const at::Tensor& x, const at::Tensor& lora_A, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peftkern_lora", [&] {
    using X = scalar_t;
    if (lora_A.scalar_type() == x.scalar_type()) {
      f(X{}, X{});
    } else {
      f(X{}, float{});
    }
  });
}

at::Tensor down_project(const at::Tensor& x, const at::Tensor& lora_A, double dropout,
                        const c10::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  at::Tensor S = at::empty({M, r}, lora_A.options());
  if (M == 0) return S;
  const at::Tensor A = lora_A.contiguous();
  const auto d = dropout_params(dropout);
  const LaunchGeometry geometry = down_project_geometry(M, r);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_types(x, A, [&](auto x_value, auto acc_value) {
    using X = decltype(x_value);
    using Acc = decltype(acc_value);
    auto launch = [&](auto kernel) {
      kernel<<<geometry.grid, geometry.block, geometry.shared_bytes, stream>>>(
          x.const_data_ptr<X>(), A.const_data_ptr<Acc>(), S.data_ptr<Acc>(), M, K, r,
          d.value_or(DropoutParams{}), seed_ptr(dropout, seed));
    };
    if (d)
      launch(down_project_kernel<X, Acc, true>);
    else
      launch(down_project_kernel<X, Acc, false>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return S;
}

void down_project_backward(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& dS,
                           double dropout, const c10::optional<at::Tensor>& seed, at::Tensor& dA,
                           at::Tensor& dx) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  if (M == 0 || K == 0) return;
  const at::Tensor A = lora_A.contiguous();
  const at::Tensor dS_c = dS.contiguous();
  const auto d = dropout_params(dropout);
  const DropoutParams params = d.value_or(DropoutParams{});
  const int64_t* seed_data = seed_ptr(dropout, seed);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  dispatch_types(x, A, [&](auto x_value, auto acc_value) {
    using X = decltype(x_value);
    using Acc = decltype(acc_value);
    using C = compute_t<Acc>;
    if (dx.defined()) {
      const LaunchGeometry geometry = lora_dx_geometry<C>(M, K, r);
      auto launch = [&](auto kernel) {
        kernel<<<geometry.grid, geometry.block, geometry.shared_bytes, stream>>>(
            dS_c.const_data_ptr<Acc>(), A.const_data_ptr<Acc>(), dx.data_ptr<X>(), K, r, params,
            seed_data);
      };
      if (d)
        launch(lora_dx_kernel<X, Acc, true>);
      else
        launch(lora_dx_kernel<X, Acc, false>);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (dA.defined()) {
      const LoraDAGeometry geometry = lora_dA_geometry(M, K, r, sms);
      const auto acc_type = std::is_same_v<C, double> ? at::kDouble : at::kFloat;
      at::Tensor partial = at::empty({geometry.splits, r, K}, x.options().dtype(acc_type));
      const LaunchGeometry& launch_geometry = geometry.launch;
      auto launch = [&](auto kernel) {
        kernel<<<launch_geometry.grid, launch_geometry.block, launch_geometry.shared_bytes,
                 stream>>>(x.const_data_ptr<X>(), dS_c.const_data_ptr<Acc>(), partial.data_ptr<C>(),
                           M, K, r, geometry.rows_per_split, params, seed_data);
      };
      if (d)
        launch(lora_dA_kernel<X, Acc, true>);
      else
        launch(lora_dA_kernel<X, Acc, false>);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dA.copy_(partial.sum(0));
    }
  });
}

// No one-pass kernel over g yet: dS and dB are two products (cuBLAS, or the passes above for
// float32 adapters on half-precision g).
constexpr LoraKernels kCudaKernels{&down_project, &down_project_backward,
                                   /*up_project_backward=*/nullptr};

std::tuple<at::Tensor, at::Tensor> lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias,
                                                    const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, double scaling,
                                                    double dropout,
                                                    const c10::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_linear_forward(kCudaKernels, x, weight, bias, lora_A, lora_B, scaling, dropout, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& S, double scaling,
    double dropout, const c10::optional<at::Tensor>& seed, std::array<bool, 5> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_linear_backward(kCudaKernels, grad_y, x, weight, lora_A, lora_B, S, scaling, dropout,
                              seed, output_mask);
}

}  // namespace

const LoraKernels& lora_kernels() {
  return kCudaKernels;
}

TORCH_LIBRARY_IMPL(peftkern, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_cuda);
}

}  // namespace peftkern::cuda
