// Prefix-extended attention on the CPU for float32 in one pass (flash attention): every query
// block runs over the m prefix rows as its first key block and then over the sequence keys it
// may see, with an online softmax, so neither [P_K; K] nor the output of a partial attention
// is ever written. The products are register-tiled GEMM micro-kernels compiled once per x86
// vector ISA (flash_attention_f32_impl.h, through isa_variants.h).
//
// cpu/prefix_attention.cpp runs it for every call it covers. Tensors in float32 with rows of
// d contiguous (other strides any), checked by the caller (prefix_attention_op.h); mask
// [B, n] bool or undefined.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace peftkern::cpu {

// Whether the kernel covers a call with these (unconverted) inputs: computed in float32
// (float32, float16 and bfloat16 inputs; tensor_utils.h's compute_type) with at least one
// query and one key.
bool flash_attention_f32_covers(const at::Tensor& q, const at::Tensor& k);

// (out [B, Hq, n, d] in the heads layout, lse [B, Hq, n]).
std::tuple<at::Tensor, at::Tensor> flash_attention_f32_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const at::Tensor& mask, bool causal, double scale);

// (dq, dk, dv, per-example prefix gradients [B, Hkv, m, d]), each undefined when its
// output_mask entry is false (the prefix ones also when m = 0).
std::array<at::Tensor, 5> flash_attention_f32_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& mask,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    std::array<bool, 5> output_mask);

}  // namespace peftkern::cpu
