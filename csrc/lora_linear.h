// The fused LoRA linear: y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ.
//
// The big GEMMs (x·Wᵀ forward, g·W and gᵀ·x backward) go to the vendor BLAS through ATen on
// every device; what is fused is everything around them, and only those passes differ per
// device. The orchestration below is therefore written once, and each device supplies the
// two passes that touch x element by element (dropout, dtype conversion, the rank-r
// projections) as a `LoraKernels` table.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace peftkern {

// Both passes are generic rank-r products (the backward also runs them over g, with B in
// place of A and without dropout, for float32 adapters on half-precision data).
struct LoraKernels {
  // S[M, r] = drop(x)·Aᵀ in A's dtype, reading x[M, K] (contiguous) once.
  at::Tensor (*down_project)(const at::Tensor& x, const at::Tensor& lora_A, double dropout,
                             const c10::optional<at::Tensor>& seed);
  // dA[r, K] = dSᵀ·drop(x) when dA is defined, and dx[M, K] = drop'(dS·A) when dx is
  // defined (written, not read: the base GEMM accumulates into it afterwards),
  // regenerating the dropout mask on the fly and reading x once.
  void (*down_project_backward)(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& dS,
                                double dropout, const c10::optional<at::Tensor>& seed,
                                at::Tensor& dA, at::Tensor& dx);
  // Optional (nullptr: two separate products): dS[M, r] = scaling·g·B when need_dS and
  // dB[N, r] = scaling·(Sᵀ·g)ᵀ when need_dB, in the adapters' dtype, reading g[M, N]
  // (contiguous) once; an output not needed comes back undefined.
  std::tuple<at::Tensor, at::Tensor> (*up_project_backward)(const at::Tensor& g,
                                                            const at::Tensor& lora_B,
                                                            const at::Tensor& S, double scaling,
                                                            bool need_dS, bool need_dB);
};

// The argument checks of both directions (bias may be None), naming the offending argument.
void check_lora_args(const at::Tensor& x, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                     const at::Tensor& lora_B, double dropout,
                     const c10::optional<at::Tensor>& seed);

// Whether x must go through the device's fused pass (dropout, or a dtype conversion) on its
// way into a rank-r projection; otherwise the vendor BLAS reads it directly.
bool needs_fused_pass(const at::Tensor& x, const at::Tensor& lora_A, double dropout);

// dS[M, r] = scaling·g·B (when need_dS) and dB[N, r] = scaling·(Sᵀ·g)ᵀ (when need_dB) over
// g2 [M, N] (contiguous): the device's one-pass kernel where it has one, else two products.
std::tuple<at::Tensor, at::Tensor> up_project_grads(const LoraKernels& kernels,
                                                    const at::Tensor& g2, const at::Tensor& lora_B,
                                                    const at::Tensor& S, double scaling,
                                                    bool need_dS, bool need_dB);

// Returns (y, S). S = drop(x)·Aᵀ is what autograd saves besides x: [M, r] in A's dtype.
std::tuple<at::Tensor, at::Tensor> lora_linear_forward(
    const LoraKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scaling, double dropout, const c10::optional<at::Tensor>& seed);

// Returns (dx, dW, dbias, dA, dB); a gradient whose output_mask entry is false comes back as
// an empty tensor (shape [0]) and is never computed.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const LoraKernels& kernels, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& S, double scaling, double dropout, const c10::optional<at::Tensor>& seed,
    std::array<bool, 5> output_mask);

}  // namespace peftkern
