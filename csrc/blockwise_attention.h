// Attention over a sequence, block by block of query positions, with the GEMMs in the vendor
// BLAS (through ATen) and the row passes in between supplied by the device. It reports the
// log-sum-exp that the prefix merge needs, and its backward takes any (out, lse) pair, which
// is what the prefix attention's sequence part requires from a device without a fused
// attention kernel that covers the inputs (CUDA here, and float64 on the CPU).
//
// Layout. q [B, Hq, n, d] with Hq = g·Hkv is viewed as [B·Hkv, g, n, d]: the g query heads
// that share a key/value head are rows of one matrix, so grouped-query attention needs no
// repeated K/V. The scores of one block, [B·Hkv, g·rows, keys], are the only n²-sized
// transient, and a causal block stops at its last visible key.
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
  int64_t rows;      // query positions in the block
  int64_t keys;      // sequence keys the block can see: [0, keys)
  bool causal;
  double scale;
};

struct AttentionRowKernels {
  // scores [B·Hkv, g·rows, keys] (raw q·kᵀ) becomes the softmax over the visible keys, in
  // place; lse [B·Hkv, g, n] gets the log-sum-exp of the scaled visible scores for the block's
  // rows (-inf and an all-zero row when no key is visible). mask: [B, n] bool or undefined.
  void (*softmax_rows)(at::Tensor& scores, at::Tensor& lse, const at::Tensor& mask,
                       const AttentionBlock& block);
  // scores (raw q·kᵀ) becomes P = exp(scores·scale - lse) on visible keys and 0 elsewhere,
  // in place (0 too on rows whose lse is -inf).
  void (*probs_rows)(at::Tensor& scores, const at::Tensor& lse, const at::Tensor& mask,
                     const AttentionBlock& block);
  // Budget for one block's scores, in bytes.
  int64_t block_bytes;
};

// q [B, Hq, n, d], k, v [B, Hkv, n, d] (any strides, any floating dtype), computed in
// compute_type(q) (tensor_utils.h). Returns (out, lse) in that dtype, both contiguous.
std::tuple<at::Tensor, at::Tensor> blockwise_attention_forward(
    const AttentionRowKernels& kernels, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& mask, bool causal, double scale);

// (dq, dk, dv) given out and lse (the probabilities are recomputed as exp(s·scale - lse)),
// in the compute dtype whatever the inputs'; a gradient not needed comes back undefined.
std::tuple<at::Tensor, at::Tensor, at::Tensor> blockwise_attention_backward(
    const AttentionRowKernels& kernels, const at::Tensor& grad_out, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, const at::Tensor& out,
    const at::Tensor& lse, bool causal, double scale, std::array<bool, 3> needed);

}  // namespace peftkern
