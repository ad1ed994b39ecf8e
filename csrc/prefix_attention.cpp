#include "prefix_attention.h"

#include "checks.h"
#include "tensor_utils.h"

#include <utility>

namespace peftkern {
namespace {

struct Dims {
  int64_t B, Hq, Hkv, g, n, d, m;
  bool shared_prefix;
};

Dims check_prefix_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                       const c10::optional<at::Tensor>& key_padding_mask) {
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

at::Tensor mask_or_undefined(const c10::optional<at::Tensor>& mask) {
  return mask.has_value() && mask->defined() ? mask->contiguous() : at::Tensor();
}

// The prefix scores [B, Hkv, g·n, m] seen as one block of the row passes: all n query
// positions, m keys, no mask, not causal (every query sees every prefix row).
AttentionBlock prefix_block(const Dims& s, double scale) {
  return {s.Hkv, s.g, s.n, /*q_begin=*/0, /*rows=*/s.n, /*keys=*/s.m, /*causal=*/false, scale};
}

at::Tensor as_block(const at::Tensor& scores, const Dims& s) {
  return scores.view({s.B * s.Hkv, s.g * s.n, s.m});
}

// Sums per-example prefix gradients [B, Hkv, m, d] over the batch for a shared prefix. The
// reduction runs over b = 0..B-1 in a fixed order, so the result is bitwise reproducible.
at::Tensor reduce_prefix_grad(at::Tensor grad, const Dims& s, const at::Tensor& like) {
  return (s.shared_prefix ? grad.sum(0) : grad).to(like.scalar_type());
}

// The prefix part through ATen GEMMs and the device's row passes: every query over the m
// prefix rows, one GEMM over all rows. A shared prefix [Hkv, m, d] broadcasts over the batch
// inside matmul; nothing of size B·(n+m) is built. out is [rows, d]-contiguous, in the
// compute dtype.
void prefix_forward_by_gemm(const PrefixAttentionKernels& kernels, const Dims& s,
                            const at::Tensor& qc, const at::Tensor& pk, const at::Tensor& pv,
                            at::Tensor& out, at::Tensor& lse, double scale) {
  const at::Tensor q_rows = qc.contiguous().view({s.B, s.Hkv, s.g * s.n, s.d});
  const at::Tensor p2 = at::matmul(q_rows, pk.transpose(-1, -2));
  at::Tensor p2_block = as_block(p2, s);
  at::Tensor lse2 = at::empty({s.B, s.Hkv, s.g * s.n, 1}, qc.options());
  kernels.rows.softmax_rows(p2_block, lse2, at::Tensor(), prefix_block(s, scale));
  kernels.merge(out, lse, at::matmul(p2, pv), lse2);
}

// Backward of prefix_forward_by_gemm: P₂ = exp(q·P_Kᵀ·scale - lse) and its softmax backward,
// over all rows at once. Adds to dq when defined (making it contiguous); sets the per-example
// prefix gradients.
void prefix_backward_by_gemm(const PrefixAttentionKernels& kernels, const Dims& s,
                             const at::Tensor& dO, const at::Tensor& qc, const at::Tensor& pk,
                             const at::Tensor& pv, const at::Tensor& out_c, const at::Tensor& lse_c,
                             double scale, at::Tensor& dq, at::Tensor* grad_k, at::Tensor* grad_v) {
  // The last size is given, not inferred: with B = 0 a -1 would be ambiguous.
  const auto rows = [&](const at::Tensor& t) {
    return t.contiguous().view({s.B, s.Hkv, s.g * s.n, t.size(-1)});
  };
  const at::Tensor q_rows = rows(qc), dO_rows = rows(dO);
  const at::Tensor p2 = at::matmul(q_rows, pk.transpose(-1, -2));
  at::Tensor p2_block = as_block(p2, s);
  kernels.rows.probs_rows(p2_block, lse_c, at::Tensor(), prefix_block(s, scale));
  if (grad_v != nullptr) *grad_v = at::matmul(p2.transpose(-1, -2), dO_rows);
  if (!dq.defined() && grad_k == nullptr) return;
  // dS₂ = P₂ ⊙ (dP₂ - D), D = rowsum(dO ⊙ O) of the merged output.
  at::Tensor dS2 = at::matmul(dO_rows, pv.transpose(-1, -2));
  dS2.sub_(rows((dO * out_c).sum(-1, /*keepdim=*/true))).mul_(p2);
  if (dq.defined()) {
    dq = dq.contiguous();
    rows(dq).add_(at::matmul(dS2, pk), scale);
  }
  if (grad_k != nullptr) *grad_k = at::matmul(dS2.transpose(-1, -2), q_rows).mul_(scale);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefix_attention_forward(
    const PrefixAttentionKernels& kernels, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const c10::optional<at::Tensor>& key_padding_mask, bool causal, double scale) {
  const Dims s = check_prefix_args(q, k, v, prefix_k, prefix_v, key_padding_mask);
  const auto type = compute_type(q);
  const at::Tensor pk = in_compute(prefix_k, type), pv = in_compute(prefix_v, type);
  const at::Tensor mask = mask_or_undefined(key_padding_mask);
  // A fused kernel, and the prefix part, compute in the compute dtype; the sequence part gets
  // the inputs as they are (a device kernel may take them in their own dtype). Where the
  // fused kernel declines (float64, empty inputs) the conversions are no-ops.
  if (kernels.fused_forward != nullptr) {
    if (auto fused = kernels.fused_forward(in_compute(q, type), in_compute(k, type),
                                           in_compute(v, type), pk, pv, mask, causal, scale)) {
      auto& [out, lse] = *fused;
      return {in_heads_layout(out, q), lse};
    }
  }
  auto [seq_out, lse] = kernels.sequence_forward(q, k, v, mask, causal, scale);
  if (s.m == 0) return {in_heads_layout(seq_out, q), lse};
  // The merge pass takes [rows, d]-contiguous rows in the compute dtype.
  at::Tensor out = seq_out.to(seq_out.options().dtype(type), /*non_blocking=*/false,
                              /*copy=*/false, at::MemoryFormat::Contiguous);
  prefix_forward_by_gemm(kernels, s, in_compute(q, type), pk, pv, out, lse, scale);
  return {in_heads_layout(out, q), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward(
    const PrefixAttentionKernels& kernels, const at::Tensor& grad_out, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const c10::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    std::array<bool, 5> output_mask) {
  const Dims s = check_prefix_args(q, k, v, prefix_k, prefix_v, key_padding_mask);
  TORCH_CHECK(grad_out.sizes() == q.sizes(), "peftkern: grad_out must have the shape of q ",
              shape_str(q), ", got ", shape_str(grad_out));
  TORCH_CHECK(out.sizes() == q.sizes(), "peftkern: out must have the shape of q ", shape_str(q),
              ", got ", shape_str(out));
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.Hq && lse.size(2) == s.n,
              "peftkern: lse must have shape [batch, heads, seq] = [", s.B, ", ", s.Hq, ", ", s.n,
              "], got ", shape_str(lse));
  const bool need_dq = output_mask[0], need_dk = output_mask[1], need_dv = output_mask[2];
  const bool need_dpk = output_mask[3], need_dpv = output_mask[4];
  const auto type = compute_type(q);
  const at::Tensor pk = in_compute(prefix_k, type), pv = in_compute(prefix_v, type);
  const at::Tensor mask = mask_or_undefined(key_padding_mask);
  const at::Tensor lse_c = in_compute(lse, type);

  const auto finish = [&](at::Tensor dq, at::Tensor dk, at::Tensor dv, at::Tensor dpk,
                          at::Tensor dpv) {
    if (s.m == 0) {  // m = 0: the prefix gradients are zero-size tensors of the prefix's shape.
      if (need_dpk) dpk = at::zeros_like(prefix_k);
      if (need_dpv) dpv = at::zeros_like(prefix_v);
    } else {
      if (need_dpk) dpk = reduce_prefix_grad(dpk, s, prefix_k);
      if (need_dpv) dpv = reduce_prefix_grad(dpv, s, prefix_v);
    }
    // In the layout the fake kernel promises (no copy when the device's kernel already
    // produced it, as the CPU one does).
    return std::make_tuple(need_dq ? in_heads_layout(dq, q) : unneeded_grad(q),
                           need_dk ? in_heads_layout(dk, k) : unneeded_grad(k),
                           need_dv ? in_heads_layout(dv, v) : unneeded_grad(v),
                           need_dpk ? dpk : unneeded_grad(prefix_k),
                           need_dpv ? dpv : unneeded_grad(prefix_v));
  };
  // As in forward: the fused kernel and the prefix part in the compute dtype, the sequence
  // part with the inputs as they are.
  if (kernels.fused_backward != nullptr) {
    if (auto fused =
            kernels.fused_backward(in_compute(grad_out, type), in_compute(q, type),
                                   in_compute(k, type), in_compute(v, type), pk, pv, mask,
                                   in_compute(out, type), lse_c, causal, scale, output_mask)) {
      auto& [dq, dk, dv, dpk, dpv] = *fused;
      return finish(dq, dk, dv, dpk, dpv);
    }
  }

  at::Tensor dq, dk, dv;
  if (need_dq || need_dk || need_dv) {
    std::tie(dq, dk, dv) = kernels.sequence_backward(grad_out, q, k, v, mask, out, lse_c, causal,
                                                     scale, {need_dq, need_dk, need_dv});
  }

  at::Tensor dpk, dpv;
  if (s.m > 0 && (need_dq || need_dpk || need_dpv)) {
    if (dq.defined()) dq = dq.to(type);  // the prefix part adds to it in the compute dtype
    prefix_backward_by_gemm(kernels, s, in_compute(grad_out, type), in_compute(q, type), pk, pv,
                            in_compute(out, type), lse_c, scale, dq, need_dpk ? &dpk : nullptr,
                            need_dpv ? &dpv : nullptr);
  }
  return finish(dq, dk, dv, dpk, dpv);
}

}  // namespace peftkern
