// Prefix-extended attention without concatenation:
//   out = softmax(q·[P_K; K]ᵀ·scale + mask)·[P_V; V]
// computed exactly as two attentions merged by their log-sum-exp, so neither [P_K; K], a
// batch-expanded prefix, nor an [n, n+m] mask is ever built:
//   sequence part: attention over the n keys (causal / padding mask) → O₁, lse₁;
//   prefix part:   attention of every query over the m prefix rows → O₂, lse₂ (one batched
//                  GEMM over all rows; q [B, Hq, n, d] is viewed as [B, Hkv, g·n, d] so the g
//                  query heads sharing a key/value head are rows of one matrix);
//   merge:         lse = log(e^lse₁ + e^lse₂), O = e^(lse₁-lse)·O₁ + e^(lse₂-lse)·O₂.
// Backward gets the merged out and lse; with them each part's softmax backward is exact on
// its own (P = exp(s·scale - lse), D = rowsum(dO ⊙ O)), so the parts never meet again.
//
// The prefix part is GEMMs through ATen plus the device's row softmax pass (the prefix scores
// are one unmasked block of m keys). The sequence part and the merge pass come from the
// device (`PrefixAttentionKernels`): an attention that reports its lse.
//
// This is the algorithm, not the op's dispatch: each device's entry points
// (cpu/prefix_attention.cpp, cuda/prefix_attention.cu) choose the kernel for a call and call
// this where they have no single kernel for the whole attention. The op's argument checks
// and the form of its results are in prefix_attention_op.h.
#pragma once

#include <ATen/ATen.h>

#include "blockwise_attention.h"

#include <array>
#include <tuple>

namespace peftkern {

struct PrefixAttentionKernels {
  // Attention of q [B, Hq, n, d] over k, v [B, Hkv, n, d] (the op's input dtype, as given:
  // a device may run a kernel of that dtype or convert) with the causal rule and mask
  // ([B, n] bool, True = keep, or undefined). Returns out [B, Hq, n, d] (any floating dtype,
  // any strides) and lse [B, Hq, n] (compute dtype, contiguous); a query that sees no key
  // gets out = 0, lse = -inf.
  std::tuple<at::Tensor, at::Tensor> (*sequence_forward)(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const at::Tensor& mask, bool causal,
                                                         double scale);
  // (dq, dk, dv) of the sequence part, given the merged out and lse of the whole attention
  // (grad_out, q, k, v and out in the input dtype, lse in the compute dtype); any floating
  // dtype back. A gradient whose `needed` entry is false may come back undefined.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> (*sequence_backward)(
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& mask, const at::Tensor& out, const at::Tensor& lse, bool causal,
      double scale, std::array<bool, 3> needed);
  // In place over rows: out ← merge(out, o2), lse ← log(e^lse + e^lse2). out, o2 are
  // [rows, d]-contiguous, lse, lse2 [rows]; lse2 is finite, lse may be -inf.
  void (*merge)(at::Tensor& out, at::Tensor& lse, const at::Tensor& o2, const at::Tensor& lse2);
  // Row passes; the prefix part uses softmax_rows / probs_rows on its [B·Hkv, g·n, m] scores.
  AttentionRowKernels rows;
};

// The op by this algorithm; both check the op's arguments first.
// Returns (out [B, Hq, n, d] in q's dtype, lse [B, Hq, n] in float32, float64 for float64 q).
std::tuple<at::Tensor, at::Tensor> prefix_attention_forward(
    const PrefixAttentionKernels& kernels, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const c10::optional<at::Tensor>& key_padding_mask, bool causal, double scale);

// Returns (dq, dk, dv, dprefix_k, dprefix_v) for output_mask in that order; a gradient not
// asked for is an empty tensor. A shared prefix's gradient is reduced over the batch in a
// fixed order (bitwise reproducible).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward(
    const PrefixAttentionKernels& kernels, const at::Tensor& grad_out, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const c10::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    std::array<bool, 5> output_mask);

}  // namespace peftkern
