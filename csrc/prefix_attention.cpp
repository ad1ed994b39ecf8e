#include "prefix_attention.h"

#include "prefix_attention_op.h"
#include "tensor_utils.h"

namespace peftkern {
namespace {

// The prefix scores [B, Hkv, g·n, m] seen as one block of the row passes: all n query
// positions, m keys, no mask, not causal (every query sees every prefix row).
AttentionBlock prefix_block(const PrefixAttentionShape& s, double scale) {
  return {s.Hkv, s.g, s.n, /*q_begin=*/0, /*rows=*/s.n, /*keys=*/s.m, /*causal=*/false, scale};
}

at::Tensor as_block(const at::Tensor& scores, const PrefixAttentionShape& s) {
  return scores.view({s.B * s.Hkv, s.g * s.n, s.m});
}

// The prefix part through ATen GEMMs and the device's row passes: every query over the m
// prefix rows, one GEMM over all rows. A shared prefix [Hkv, m, d] broadcasts over the batch
// inside matmul; nothing of size B·(n+m) is built. out is [rows, d]-contiguous, in the
// compute dtype.
void prefix_forward_by_gemm(const PrefixAttentionKernels& kernels, const PrefixAttentionShape& s,
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
void prefix_backward_by_gemm(const PrefixAttentionKernels& kernels, const PrefixAttentionShape& s,
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
  const PrefixAttentionShape s =
      check_prefix_attention_args(q, k, v, prefix_k, prefix_v, key_padding_mask);
  const auto type = compute_type(q);
  const at::Tensor mask = key_padding_mask_or_undefined(key_padding_mask);
  // The sequence part gets the inputs as they are (a device kernel may take them in their own
  // dtype); the prefix part computes in the compute dtype.
  auto [seq_out, lse] = kernels.sequence_forward(q, k, v, mask, causal, scale);
  if (s.m == 0) return {in_heads_layout(seq_out, q), lse};
  // The merge pass takes [rows, d]-contiguous rows in the compute dtype.
  at::Tensor out = seq_out.to(seq_out.options().dtype(type), /*non_blocking=*/false,
                              /*copy=*/false, at::MemoryFormat::Contiguous);
  prefix_forward_by_gemm(kernels, s, in_compute(q, type), in_compute(prefix_k, type),
                         in_compute(prefix_v, type), out, lse, scale);
  return {in_heads_layout(out, q), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> prefix_attention_backward(
    const PrefixAttentionKernels& kernels, const at::Tensor& grad_out, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const c10::optional<at::Tensor>& key_padding_mask,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    std::array<bool, 5> output_mask) {
  const PrefixAttentionShape s = check_prefix_attention_backward_args(
      grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse);
  const bool need_dq = output_mask[0], need_dk = output_mask[1], need_dv = output_mask[2];
  const bool need_dpk = output_mask[3], need_dpv = output_mask[4];
  const auto type = compute_type(q);
  const at::Tensor mask = key_padding_mask_or_undefined(key_padding_mask);
  const at::Tensor lse_c = in_compute(lse, type);

  // As in forward: the sequence part with the inputs as they are, the prefix part in the
  // compute dtype.
  at::Tensor dq, dk, dv;
  if (need_dq || need_dk || need_dv) {
    std::tie(dq, dk, dv) = kernels.sequence_backward(grad_out, q, k, v, mask, out, lse_c, causal,
                                                     scale, {need_dq, need_dk, need_dv});
  }

  at::Tensor dpk, dpv;
  if (s.m > 0 && (need_dq || need_dpk || need_dpv)) {
    if (dq.defined()) dq = dq.to(type);  // the prefix part adds to it in the compute dtype
    prefix_backward_by_gemm(kernels, s, in_compute(grad_out, type), in_compute(q, type),
                            in_compute(prefix_k, type), in_compute(prefix_v, type),
                            in_compute(out, type), lse_c, scale, dq, need_dpk ? &dpk : nullptr,
                            need_dpv ? &dpv : nullptr);
  }
  return prefix_attention_grads(s, q, k, v, prefix_k, prefix_v, {dq, dk, dv, dpk, dpv},
                                output_mask);
}

}  // namespace peftkern
