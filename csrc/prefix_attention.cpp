#include "prefix_attention.h"

#include "checks.h"

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
  check_size(k, 0, B, "k", "q.shape[0] (batch)");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "peftkern: q.shape[1] (query heads, ", Hq,
              ") must be a positive multiple of k.shape[1] (key/value heads, ", Hkv,
              "), got q ", shape_str(q), " and k ", shape_str(k));
  check_size(k, 2, n, "k", "q.shape[2] (sequence length)");
  check_size(k, 3, d, "k", "q.shape[3] (head_dim)");
  TORCH_CHECK(v.sizes() == k.sizes(), "peftkern: v must have the shape of k ", shape_str(k),
              ", got ", shape_str(v));

  const bool shared = prefix_k.dim() == 3;
  TORCH_CHECK(prefix_k.dim() == 3 || prefix_k.dim() == 4,
              "peftkern: prefix_k must be [kv_heads, m, head_dim] (shared) or "
              "[batch, kv_heads, m, head_dim] (per example), got shape ", shape_str(prefix_k));
  const int64_t off = shared ? 0 : 1;
  if (!shared) check_size(prefix_k, 0, B, "prefix_k", "q.shape[0] (batch)");
  check_size(prefix_k, off, Hkv, "prefix_k", "k.shape[1] (key/value heads)");
  check_size(prefix_k, off + 2, d, "prefix_k", "q.shape[3] (head_dim)");
  TORCH_CHECK(prefix_v.sizes() == prefix_k.sizes(), "peftkern: prefix_v must have the shape of "
              "prefix_k ", shape_str(prefix_k), ", got ", shape_str(prefix_v));

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

// float32 for every dtype but float64: half-precision inputs are computed in float32 like
// FlashAttention does (scores, softmax and accumulation), and rounded once at the end.
at::ScalarType compute_type(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor in_compute(const at::Tensor& t, at::ScalarType type) {
  return t.to(type).contiguous();
}

at::Tensor mask_or_undefined(const c10::optional<at::Tensor>& mask) {
  return mask.has_value() && mask->defined() ? mask->contiguous() : at::Tensor();
}

// Query positions per block so that its scores [B·Hkv, g·rows, n] stay within the budget.
int64_t block_rows(const PrefixAttentionKernels& kernels, const Dims& s, int64_t elem) {
  const int64_t per_row = std::max<int64_t>(1, s.B * s.Hq * s.n * elem);
  return std::max<int64_t>(1, std::min(s.n, kernels.block_bytes / per_row));
}

AttentionBlock block_at(const Dims& s, int64_t q_begin, int64_t rows, bool causal,
                        double scale) {
  return {s.Hkv, s.g, s.n, q_begin, rows, causal ? q_begin + rows : s.n, causal, scale};
}

// The block's query rows as one matrix per batch-head: [B·Hkv, g·rows, d] (a copy when g > 1).
at::Tensor block_of(const at::Tensor& rows4, const AttentionBlock& b) {
  return rows4.narrow(2, b.q_begin, b.rows).reshape({rows4.size(0), -1, rows4.size(3)});
}

at::Tensor unneeded_grad(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

// Sums per-example prefix gradients [B, Hkv, m, d] over the batch for a shared prefix. The
// reduction runs over b = 0..B-1 in a fixed order, so the result is bitwise reproducible.
at::Tensor reduce_prefix_grad(at::Tensor grad, const Dims& s, const at::Tensor& like) {
  return (s.shared_prefix ? grad.sum(0) : grad).to(like.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefix_attention_forward(
    const PrefixAttentionKernels& kernels, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
    const c10::optional<at::Tensor>& key_padding_mask, bool causal, double scale) {
  const Dims s = check_prefix_args(q, k, v, prefix_k, prefix_v, key_padding_mask);
  const auto type = compute_type(q);
  const int64_t BH = s.B * s.Hkv;
  const at::Tensor q4 = in_compute(q, type).view({BH, s.g, s.n, s.d});
  const at::Tensor k3 = in_compute(k, type).view({BH, s.n, s.d});
  const at::Tensor v3 = in_compute(v, type).view({BH, s.n, s.d});
  const at::Tensor mask = mask_or_undefined(key_padding_mask);
  at::Tensor out = at::empty({BH, s.g, s.n, s.d}, q4.options());
  at::Tensor lse = at::empty({BH, s.g, s.n}, q4.options());

  // Prefix part: every query over the m prefix rows, one GEMM over all rows. A shared prefix
  // [Hkv, m, d] broadcasts over the batch inside matmul; nothing of size B·(n+m) is built.
  at::Tensor o2, lse2;
  if (s.m > 0) {
    const at::Tensor q_rows = q4.view({s.B, s.Hkv, s.g * s.n, s.d});
    at::Tensor s2 = at::matmul(q_rows, in_compute(prefix_k, type).transpose(-1, -2)).mul_(scale);
    lse2 = at::logsumexp(s2, -1, /*keepdim=*/true);
    s2.sub_(lse2).exp_();
    o2 = at::matmul(s2, in_compute(prefix_v, type)).view({BH, s.g, s.n, s.d});
    lse2 = lse2.view({BH, s.g, s.n});
  }

  // Sequence part, block by block of query positions, merged into out as each block is done.
  const int64_t step = block_rows(kernels, s, q4.element_size());
  for (int64_t i0 = 0; i0 < s.n; i0 += step) {
    const AttentionBlock b = block_at(s, i0, std::min(step, s.n - i0), causal, scale);
    const at::Tensor qb = block_of(q4, b);
    at::Tensor scores = at::bmm(qb, k3.narrow(1, 0, b.keys).transpose(1, 2));
    kernels.softmax_rows(scores, lse, mask, b);
    const at::Tensor o1 = at::bmm(scores, v3.narrow(1, 0, b.keys));
    kernels.merge_rows(o1, o2, lse2, out, lse, b);
  }
  return {out.view(q.sizes()).to(q.scalar_type()), lse.view({s.B, s.Hq, s.n})};
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
  const auto [need_dq, need_dk, need_dv, need_dpk, need_dpv] = output_mask;
  const auto type = compute_type(q);
  const int64_t BH = s.B * s.Hkv;
  const at::Tensor q4 = in_compute(q, type).view({BH, s.g, s.n, s.d});
  const at::Tensor k3 = in_compute(k, type).view({BH, s.n, s.d});
  const at::Tensor v3 = in_compute(v, type).view({BH, s.n, s.d});
  const at::Tensor dO4 = in_compute(grad_out, type).view({BH, s.g, s.n, s.d});
  const at::Tensor lse3 = in_compute(lse, type).view({BH, s.g, s.n});
  const at::Tensor mask = mask_or_undefined(key_padding_mask);
  // D = rowsum(dO ⊙ O) over the full (prefix + sequence) attention: with the merged lse it
  // makes each part's softmax backward exact on its own.
  const at::Tensor D = (dO4 * out.to(type).view({BH, s.g, s.n, s.d})).sum(-1);

  at::Tensor dq = need_dq ? at::empty({BH, s.g, s.n, s.d}, q4.options()) : at::Tensor();
  at::Tensor dk = need_dk ? at::zeros({BH, s.n, s.d}, q4.options()) : at::Tensor();
  at::Tensor dv = need_dv ? at::zeros({BH, s.n, s.d}, q4.options()) : at::Tensor();

  if (need_dq || need_dk || need_dv) {
    const int64_t step = block_rows(kernels, s, q4.element_size());
    for (int64_t i0 = 0; i0 < s.n; i0 += step) {
      const AttentionBlock b = block_at(s, i0, std::min(step, s.n - i0), causal, scale);
      const at::Tensor qb = block_of(q4, b);
      const at::Tensor dOb = block_of(dO4, b);
      const at::Tensor kk = k3.narrow(1, 0, b.keys), vk = v3.narrow(1, 0, b.keys);
      at::Tensor probs = at::bmm(qb, kk.transpose(1, 2));
      kernels.probs_rows(probs, lse3, mask, b);
      if (need_dv) dv.narrow(1, 0, b.keys).baddbmm_(probs.transpose(1, 2), dOb);
      if (!need_dq && !need_dk) continue;
      // dS = P ⊙ (dP - D) with dP = dO·Vᵀ; the softmax scale is applied in the GEMMs below.
      at::Tensor dS = at::bmm(dOb, vk.transpose(1, 2));
      dS.sub_(block_of(D.unsqueeze(-1), b)).mul_(probs);
      if (need_dq) {
        dq.narrow(2, b.q_begin, b.rows)
            .copy_(at::bmm(dS, kk).mul_(scale).view({BH, s.g, b.rows, s.d}));
      }
      if (need_dk) dk.narrow(1, 0, b.keys).baddbmm_(dS.transpose(1, 2), qb, 1.0, scale);
    }
  }

  at::Tensor dpk, dpv;
  if (s.m > 0 && (need_dq || need_dpk || need_dpv)) {
    // Prefix part: P₂ = exp(q·P_Kᵀ·scale - lse) and its softmax backward, over all rows at once.
    const at::Tensor q_rows = q4.view({s.B, s.Hkv, s.g * s.n, s.d});
    const at::Tensor dO_rows = dO4.view({s.B, s.Hkv, s.g * s.n, s.d});
    const at::Tensor pk = in_compute(prefix_k, type), pv = in_compute(prefix_v, type);
    at::Tensor p2 = at::matmul(q_rows, pk.transpose(-1, -2))
                        .mul_(scale)
                        .sub_(lse3.view({s.B, s.Hkv, -1, 1}))
                        .exp_();
    if (need_dpv) dpv = reduce_prefix_grad(at::matmul(p2.transpose(-1, -2), dO_rows), s, prefix_v);
    if (need_dq || need_dpk) {
      at::Tensor dS2 = at::matmul(dO_rows, pv.transpose(-1, -2));
      dS2.sub_(D.view({s.B, s.Hkv, -1, 1})).mul_(p2);
      if (need_dq) dq.view({s.B, s.Hkv, s.g * s.n, s.d}).add_(at::matmul(dS2, pk), scale);
      if (need_dpk) {
        dpk = reduce_prefix_grad(at::matmul(dS2.transpose(-1, -2), q_rows).mul_(scale), s,
                                 prefix_k);
      }
    }
  } else if (s.m == 0) {
    // m = 0: the prefix gradients are zero-size tensors of the prefix's shape.
    if (need_dpk) dpk = at::zeros_like(prefix_k);
    if (need_dpv) dpv = at::zeros_like(prefix_v);
  }

  return {need_dq ? dq.view(q.sizes()).to(q.scalar_type()) : unneeded_grad(q),
          need_dk ? dk.view(k.sizes()).to(k.scalar_type()) : unneeded_grad(k),
          need_dv ? dv.view(v.sizes()).to(v.scalar_type()) : unneeded_grad(v),
          need_dpk ? dpk : unneeded_grad(prefix_k),
          need_dpv ? dpv : unneeded_grad(prefix_v)};
}

}  // namespace peftkern
