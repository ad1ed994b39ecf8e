// Prefix-extended attention without concatenation:
//   out = softmax(q·[P_K; K]ᵀ·scale + mask)·[P_V; V]
// computed exactly as two attentions merged by their log-sum-exp, so neither [P_K; K], a
// batch-expanded prefix, nor an [n, n+m] mask is ever built.
//
// Layout. q [B, Hq, n, d] with Hq = g·Hkv is viewed as [B·Hkv, g, n, d]: the g query heads that
// share one key/value head become g·n rows of one matrix, so grouped-query attention needs no
// repeated K/V. The sequence part runs over blocks of query positions (scores [B·Hkv, g·Bq,
// keys] are the only transient of size n², and causal blocks stop at their last visible key);
// the prefix part is one batched GEMM over all rows. The GEMMs go to the vendor BLAS through
// ATen on every device; each device supplies the row-wise passes below.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace peftkern {

// Where a block of query rows sits. Row r of a block score matrix [B·Hkv, g·rows, keys] is
// query position q_begin + r % rows of group head r / rows.
struct AttentionBlock {
  int64_t heads_kv;  // Hkv: batch-head index bh belongs to example bh / heads_kv
  int64_t group;     // g = Hq / Hkv
  int64_t n;         // sequence length (keys, and query positions)
  int64_t q_begin;   // first query position of the block
  int64_t rows;      // query positions in the block (Bq)
  int64_t keys;      // sequence keys the block can see: [0, keys)
  bool causal;
  double scale;
};

struct PrefixAttentionKernels {
  // scores [B·Hkv, g·rows, keys] (raw q·kᵀ) becomes the softmax over the visible keys, in
  // place; lse [B·Hkv, g, n] gets the log-sum-exp of the scaled visible scores for the block's
  // rows (-inf and an all-zero row when no key is visible). mask: [B, n] bool or undefined.
  void (*softmax_rows)(at::Tensor& scores, at::Tensor& lse, const at::Tensor& mask,
                       const AttentionBlock& block);
  // scores (raw q·kᵀ) becomes P = exp(scores·scale - lse) on visible keys and 0 elsewhere,
  // in place (0 too on rows whose lse is -inf).
  void (*probs_rows)(at::Tensor& scores, const at::Tensor& lse, const at::Tensor& mask,
                     const AttentionBlock& block);
  // Writes the block's rows of out [B·Hkv, g, n, d] and lse [B·Hkv, g, n]: the sequence part
  // o1 [B·Hkv, g·rows, d] with its lse (already in lse) merged with the prefix part o2
  // [B·Hkv, g, n, d] / lse2 [B·Hkv, g, n] by log-sum-exp. o2 undefined means m = 0.
  void (*merge_rows)(const at::Tensor& o1, const at::Tensor& o2, const at::Tensor& lse2,
                     at::Tensor& out, at::Tensor& lse, const AttentionBlock& block);
  // Budget for one block's scores, in bytes: bounds the only n²-sized transient.
  int64_t block_bytes;
};

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
