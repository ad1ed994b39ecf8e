// CUDA registration of the fused DoRA linear: the device-agnostic orchestration
// (../dora_linear.cpp: cuBLAS GEMMs through ATen, ATen column scales and reductions) over the
// CUDA passes of the fused LoRA linear (lora_linear.cu). No kernel of its own.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../dora_linear.h"
#include "lora_kernels.h"

namespace peftkern::cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
    const at::Tensor& weight_norm_sq, double scaling, double dropout,
    const c10::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  return dora_linear_forward(lora_kernels(), x, weight, bias, lora_A, lora_B, magnitude,
                             weight_norm_sq, scaling, dropout, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dora_linear_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& lora_A, const at::Tensor& lora_B,
                          const at::Tensor& magnitude, const at::Tensor& S, const at::Tensor& z,
                          const at::Tensor& weight_norm, double scaling, double dropout,
                          const c10::optional<at::Tensor>& seed, std::array<bool, 6> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return dora_linear_backward(lora_kernels(), grad_y, x, weight, lora_A, lora_B, magnitude, S, z,
                              weight_norm, scaling, dropout, seed, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftkern, CUDA, m) {
  m.impl("dora_linear", &dora_linear_cuda);
  m.impl("dora_linear_backward", &dora_linear_backward_cuda);
}

}  // namespace peftkern::cuda
