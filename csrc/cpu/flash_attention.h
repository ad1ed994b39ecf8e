// Prefix-extended attention on the CPU for float32 in one pass (flash attention): every query
// block runs over the m prefix rows as its first key block and then over the sequence keys it
// may see, with an online softmax, so neither [P_K; K] nor the output of a partial attention
// is ever written. The products are register-tiled GEMM micro-kernels compiled once per x86
// vector ISA (flash_attention_impl.h); on the benchmark's decoder shape it is faster than
// ATen's CPU flash attention without a prefix.
//
// The entry points of PrefixAttentionKernels (../prefix_attention.h): tensors in the compute
// dtype with rows of d contiguous (other strides any), mask [B, n] bool or undefined.
// nullopt for inputs the kernel does not cover (not float32, or no query or no key).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace peftkern::cpu {

// (out [B, Hq, n, d] in the heads layout, lse [B, Hq, n]).
std::optional<std::tuple<at::Tensor, at::Tensor>> flash_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const at::Tensor& mask, bool causal, double scale);

// (dq, dk, dv, per-example prefix gradients [B, Hkv, m, d]), each undefined when its
// output_mask entry is false.
std::optional<std::array<at::Tensor, 5>> flash_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& mask,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    std::array<bool, 5> output_mask);

}  // namespace peftkern::cpu
