// The float32 flash attention kernel's view of one call (`FlashAttention`: pointers, strides,
// shapes) and its units of work, each compiled once per x86 vector ISA
// (flash_attention_f32_impl.h). flash_attention_f32.cpp builds the call from tensors and runs
// the units on all threads.
#pragma once

#include <cstdint>

namespace peftkern::cpu {

// Query positions per forward block. A unit's span of positions starts at a multiple of it,
// so every position falls in the same block, tile and arithmetic however the spans are cut
// (the result does not depend on the thread count).
constexpr int64_t kFlashQueryBlock = 64;

// The rows of d floats of a [B, H, n, d] tensor, addressed through its strides, so that both
// contiguous tensors and the [B, n, H, d] memory of projections are read in place. A null
// `data` stands for a tensor that is not there (a gradient nobody asked for).
struct FlashRows {
  float* data = nullptr;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0;
  float* row(int64_t b, int64_t h, int64_t i) const {
    return data + b * batch_stride + h * head_stride + i * row_stride;
  }
};

struct FlashAttention {
  int64_t heads_q, heads_kv, n, m, d;
  bool causal;
  float scale;
  FlashRows q, k, v;
  // [Hkv, m, d] shared by the batch, or [B, Hkv, m, d] per example; contiguous.
  const float* prefix_k;
  const float* prefix_v;
  bool shared_prefix;
  // [B, n_pad] with n_pad = n rounded up to 16: 0 where a key is kept, -inf where it is
  // padding (and past n); nullptr without a padding mask.
  const float* key_bias;
  int64_t key_bias_stride;
  // Forward writes out and lse ([B, Hq, n], contiguous); backward reads them.
  FlashRows out;
  float* lse;
  // Backward: the output gradient in, and the gradients out (zero-filled by the caller, each
  // optional): dq like q; dk, dv like k, v and the prefix's per example [B, Hkv, m, d] — or,
  // with key_grads_per_query_head, those three with Hq heads: each query head's share, for
  // the caller to sum over the heads of a group (units then never write the same rows).
  FlashRows grad_out, dq, dk, dv;
  float* grad_prefix_k;
  float* grad_prefix_v;
  bool key_grads_per_query_head;
};

// Query positions [q_begin, q_end) (q_begin a multiple of kFlashQueryBlock) of the query heads
// that share key/value head kv_head of example b: out and lse.
void flash_forward_unit(const FlashAttention& a, int64_t b, int64_t kv_head, int64_t q_begin,
                        int64_t q_end);

// Every query position of query head h of example b: adds to dq of (b, h) and to the key,
// value and prefix gradients of its key/value head (or of h itself, with
// key_grads_per_query_head), which no other unit touches.
void flash_backward_unit(const FlashAttention& a, int64_t b, int64_t h);

}  // namespace peftkern::cpu
