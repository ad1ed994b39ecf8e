#include "prefix_attention_op.h"

#include "checks.h"
#include "tensor_utils.h"

#include <utility>

namespace peftkern {

PrefixAttentionShape check_prefix_attention_args(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const c10::optional<at::Tensor>& key_padding_mask) {
  check_floating(q, "q");
  check_dim(q, 4, "q", "[batch, heads, seq, head_dim]");
  check_dim(k, 4, "k", "[batch, kv_heads, seq, head_dim]");
  check_dim(v, 4, "v", "[batch, kv_heads, seq, head_dim]");
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1);
  TORCH_CHECK(d > 0, "peftkern: q.shape[3] (head_dim) must be > 0, got q ", shape_str(q));
  check_size(k, 0, B, "k", "q.shape[0] (batch)");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "peftkern: q.shape[1] (query heads, ", Hq,
              ") must be a positive multiple of k.shape[1] (key/value heads, ", Hkv, "), got q ",
              shape_str(q), " and k ", shape_str(k));
  check_size(k, 2, n, "k", "q.shape[2] (sequence length)");
  check_size(k, 3, d, "k", "q.shape[3] (head_dim)");
  TORCH_CHECK(v.sizes() == k.sizes(), "peftkern: v must have the shape of k ", shape_str(k),
              ", got ", shape_str(v));

  const bool shared = prefix_k.dim() == 3;
  TORCH_CHECK(prefix_k.dim() == 3 || prefix_k.dim() == 4,
              "peftkern: prefix_k must be [kv_heads, m, head_dim] (shared) or "
              "[batch, kv_heads, m, head_dim] (per example), got shape ",
              shape_str(prefix_k));
  const int64_t off = shared ? 0 : 1;
  if (!shared) check_size(prefix_k, 0, B, "prefix_k", "q.shape[0] (batch)");
  check_size(prefix_k, off, Hkv, "prefix_k", "k.shape[1] (key/value heads)");
  check_size(prefix_k, off + 2, d, "prefix_k", "q.shape[3] (head_dim)");
  TORCH_CHECK(prefix_v.sizes() == prefix_k.sizes(),
              "peftkern: prefix_v must have the shape of "
              "prefix_k ",
              shape_str(prefix_k), ", got ", shape_str(prefix_v));

  const std::pair<const at::Tensor*, const char*> others[] = {
      {&k, "k"}, {&v, "v"}, {&prefix_k, "prefix_k"}, {&prefix_v, "prefix_v"}};
  for (const auto& [t, name] : others) {
    check_same_device(*t, q, name, "q");
    check_same_dtype(*t, q, name, "q");
  }
  if (key_padding_mask.has_value() && key_padding_mask->defined()) {
    const at::Tensor& mask = *key_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool,
                "peftkern: key_padding_mask must be bool (True = keep the key), got ",
                mask.scalar_type());
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == n,
                "peftkern: key_padding_mask must have shape [batch, seq] = [", B, ", ", n,
                "], got ", shape_str(mask));
    check_same_device(mask, q, "key_padding_mask", "q");
  }
  return {B, Hq, Hkv, Hq / Hkv, n, d, prefix_k.size(off + 1), shared};
}

PrefixAttentionShape check_prefix_attention_backward_args(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const c10::optional<at::Tensor>& key_padding_mask, const at::Tensor& out,
    const at::Tensor& lse) {
  const PrefixAttentionShape s =
      check_prefix_attention_args(q, k, v, prefix_k, prefix_v, key_padding_mask);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "peftkern: grad_out must have the shape of q ",
              shape_str(q), ", got ", shape_str(grad_out));
  TORCH_CHECK(out.sizes() == q.sizes(), "peftkern: out must have the shape of q ", shape_str(q),
              ", got ", shape_str(out));
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.Hq && lse.size(2) == s.n,
              "peftkern: lse must have shape [batch, heads, seq] = [", s.B, ", ", s.Hq, ", ", s.n,
              "], got ", shape_str(lse));
  return s;
}

at::Tensor key_padding_mask_or_undefined(const c10::optional<at::Tensor>& key_padding_mask) {
  return given(key_padding_mask) ? key_padding_mask->contiguous() : at::Tensor();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_grads(
    const PrefixAttentionShape& s, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v, std::array<at::Tensor, 5> grads,
    std::array<bool, 5> output_mask) {
  auto& [dq, dk, dv, dpk, dpv] = grads;
  const auto prefix_grad = [&](const at::Tensor& per_example, const at::Tensor& like) {
    // m = 0: a zero-size tensor of the prefix's shape.
    if (s.m == 0) return at::zeros_like(like);
    return (s.shared_prefix ? per_example.sum(0) : per_example).to(like.scalar_type());
  };
  return std::make_tuple(output_mask[0] ? in_heads_layout(dq, q) : unneeded_grad(q),
                         output_mask[1] ? in_heads_layout(dk, k) : unneeded_grad(k),
                         output_mask[2] ? in_heads_layout(dv, v) : unneeded_grad(v),
                         output_mask[3] ? prefix_grad(dpk, prefix_k) : unneeded_grad(prefix_k),
                         output_mask[4] ? prefix_grad(dpv, prefix_v) : unneeded_grad(prefix_v));
}

}  // namespace peftkern
