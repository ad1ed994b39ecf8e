// The prefix attention op's contract, which every device's entry points keep whichever
// kernel runs the call: the argument checks and the form of the backward op's results.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace peftkern {

// The sizes of one call: q [B, Hq, n, d], k, v [B, Hkv, n, d] with Hq = g·Hkv, prefix rows
// [Hkv, m, d] (shared by the batch) or [B, Hkv, m, d] (per example).
struct PrefixAttentionShape {
  int64_t B, Hq, Hkv, g, n, d, m;
  bool shared_prefix;
};

// Checks the forward op's arguments (shapes, dtypes, devices, the mask's dtype), each error
// naming the argument; returns the sizes.
PrefixAttentionShape check_prefix_attention_args(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& prefix_k,
                                                 const at::Tensor& prefix_v,
                                                 const c10::optional<at::Tensor>& key_padding_mask);

// The same, and the backward op's own arguments: grad_out and out shaped like q, lse
// [B, Hq, n].
PrefixAttentionShape check_prefix_attention_backward_args(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const c10::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse);

// The key padding mask as the kernels take it: [B, n] bool, contiguous, or undefined for none.
at::Tensor key_padding_mask_or_undefined(const c10::optional<at::Tensor>& key_padding_mask);

// The backward op's results from a kernel's gradients (any floating dtype; the prefix ones
// per example, [B, Hkv, m, d], undefined when m = 0): dq, dk, dv in the layout the fake
// kernel promises (in_heads_layout, no copy when a kernel already produced it), the prefix
// gradients summed over the batch in a fixed order for a shared prefix (bitwise
// reproducible) and zero-size for m = 0, all in the dtype of their input; an empty tensor
// for each gradient whose output_mask entry is false.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_grads(
    const PrefixAttentionShape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v, std::array<at::Tensor, 5> grads,
    std::array<bool, 5> output_mask);

}  // namespace peftkern
