// The fused DoRA linear (weight-decomposed LoRA), peft's definition with the weight norm
// treated as a constant:
//   n = ‖W + s·B·A‖ per output row (detached),  c = magnitude / n,  x_d = drop(x),
//   y = x·Wᵀ + b + (c − 1)⊙(x_d·Wᵀ) + c⊙s·(x_d·Aᵀ)·Bᵀ,
// which is y = c⊙(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) + b without dropout.
//
// DoRA is LoRA with a per-output-column scale, so the orchestration below runs the LoRA
// device passes (`LoraKernels`: the masked rank-r projections, the one-pass products over g,
// the fused dx pass) plus ATen column scales and reductions; it is written once for every
// device. The norm never forms W + s·B·A: ‖W_n‖² (cached by the caller per weight version)
// + 2s·B_n·(A·W_nᵀ) + s²·B_n·(A·Aᵀ)·B_nᵀ needs one r×N product and the r×r Gram.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

#include "lora_linear.h"

namespace peftkern {

// Returns (y, S, z, weight_norm): S = drop(x)·Aᵀ ([M, r], A's dtype), z = drop(x)·Wᵀ +
// s·S·Bᵀ ([M, N], x's dtype: the one M×N tensor autograd saves, what ∂magnitude needs) and
// n ([N], float32, float64 for float64 x). weight_norm_sq is ‖W_n‖² in n's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_forward(
    const LoraKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& magnitude, const at::Tensor& weight_norm_sq, double scaling, double dropout,
    const c10::optional<at::Tensor>& seed);

// Returns (dx, dW, dbias, dA, dB, dmagnitude); a gradient whose output_mask entry is false
// comes back as an empty tensor (shape [0]) and is never computed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dora_linear_backward(const LoraKernels& kernels, const at::Tensor& grad_y, const at::Tensor& x,
                     const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                     const at::Tensor& magnitude, const at::Tensor& S, const at::Tensor& z,
                     const at::Tensor& weight_norm, double scaling, double dropout,
                     const c10::optional<at::Tensor>& seed, std::array<bool, 6> output_mask);

}  // namespace peftkern
