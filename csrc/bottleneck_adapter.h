// The fused bottleneck adapter: out = residual + s·(act(h·W_downᵀ + b_down)·W_upᵀ + b_up),
// with s = scaling (a float) times an optional learned per-channel vector, and residual = h
// unless given.
//
// Both projections are GEMMs through ATen (cuBLAS / oneDNN / MKL), with everything else folded
// into them: b_down is the beta term of the down GEMM; b_up rides along as an extra column
// ([a | 1]·[W_up | b_up]ᵀ); the float scaling is applied by the activation pass to the tiny
// M×(r+1) bottleneck (so every M×d result is rounded once); the learned scaling is folded into
// the tiny [d, r+1] up weight; and the residual is the GEMM's beta = 1 term. Only the
// elementwise pass over the M×r bottleneck differs per device, supplied as `AdapterKernels`.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <tuple>

#include "activation.h"

namespace peftkern {

struct AdapterKernels {
  // a[:, :r] = scale·act(Z) and, when a has r + 1 columns, a[:, r] = scale. Z is [M, r]
  // contiguous, a is [M, r or r + 1] contiguous, both of h's dtype.
  void (*activate)(const at::Tensor& Z, Activation activation, double scale, at::Tensor& a);
  // dZ = scale·dA ⊙ act'(Z), written over dA; and, when `a` is defined, a as in `activate`
  // (Z is read once for both).
  void (*activate_backward)(const at::Tensor& Z, at::Tensor& dA, Activation activation,
                            double scale, at::Tensor& a);
};

// Returns (out, Z) with Z = h·W_downᵀ + b_down, the [M, r] pre-activation autograd saves.
std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_forward(
    const AdapterKernels& kernels, const at::Tensor& h, const at::Tensor& w_down,
    const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
    const c10::optional<at::Tensor>& b_up, const std::string& activation, double scaling,
    const c10::optional<at::Tensor>& scaling_vector, const c10::optional<at::Tensor>& residual);

// Returns (dh, dW_down, db_down, dW_up, db_up, dscaling_vector) for output_mask in that order;
// a gradient not asked for is an empty tensor (shape [0]) and is never computed. dh includes
// grad_out itself when residual_is_h (the residual path); a separate residual's gradient is
// grad_out and is handled by autograd without this op.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bottleneck_adapter_backward(const AdapterKernels& kernels, const at::Tensor& grad_out,
                            const at::Tensor& h, const at::Tensor& w_down, const at::Tensor& w_up,
                            const c10::optional<at::Tensor>& b_up, const at::Tensor& Z,
                            const std::string& activation, double scaling,
                            const c10::optional<at::Tensor>& scaling_vector, bool residual_is_h,
                            std::array<bool, 6> output_mask);

}  // namespace peftkern
