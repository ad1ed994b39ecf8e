#include "blockwise_attention.h"

#include "tensor_utils.h"

namespace peftkern {
namespace {

struct Shape {
  int64_t B, Hkv, g, n, d;
  int64_t bh() const { return B * Hkv; }
};

Shape shape_of(const at::Tensor& q, const at::Tensor& k) {
  return {q.size(0), k.size(1), q.size(1) / k.size(1), q.size(2), q.size(3)};
}

// Query positions per block so that its scores [B·Hkv, g·rows, n] stay within the budget.
int64_t block_rows(const AttentionRowKernels& kernels, const Shape& s, int64_t elem) {
  const int64_t per_row = std::max<int64_t>(1, s.bh() * s.g * s.n * elem);
  return std::max<int64_t>(1, std::min(s.n, kernels.block_bytes / per_row));
}

// Calls body(block) for consecutive blocks of query positions covering [0, n).
template <typename F>
void for_each_block(const AttentionRowKernels& kernels, const Shape& s, int64_t elem, bool causal,
                    double scale, F&& body) {
  const int64_t step = block_rows(kernels, s, elem);
  for (int64_t i0 = 0; i0 < s.n; i0 += step) {
    const int64_t rows = std::min(step, s.n - i0);
    body(AttentionBlock{s.Hkv, s.g, s.n, i0, rows, causal ? i0 + rows : s.n, causal, scale});
  }
}

// The block's query rows as one matrix per batch-head: [B·Hkv, g·rows, cols] (a copy when
// g > 1). rows4 is [B·Hkv, g, n, cols].
at::Tensor block_of(const at::Tensor& rows4, const AttentionBlock& b) {
  return rows4.narrow(2, b.q_begin, b.rows)
      .reshape({rows4.size(0), rows4.size(1) * b.rows, rows4.size(3)});
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> blockwise_attention_forward(
    const AttentionRowKernels& kernels, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& mask, bool causal, double scale) {
  const Shape s = shape_of(q, k);
  const auto type = compute_type(q);
  const at::Tensor q4 = q.to(type).contiguous().view({s.bh(), s.g, s.n, s.d});
  const at::Tensor k3 = k.to(type).contiguous().view({s.bh(), s.n, s.d});
  const at::Tensor v3 = v.to(type).contiguous().view({s.bh(), s.n, s.d});
  at::Tensor out = at::empty_like(q4);
  at::Tensor lse = at::empty({s.bh(), s.g, s.n}, q4.options());
  for_each_block(kernels, s, q4.element_size(), causal, scale, [&](const AttentionBlock& b) {
    at::Tensor scores = at::bmm(block_of(q4, b), k3.narrow(1, 0, b.keys).transpose(1, 2));
    kernels.softmax_rows(scores, lse, mask, b);
    out.narrow(2, b.q_begin, b.rows)
        .copy_(at::bmm(scores, v3.narrow(1, 0, b.keys)).view({s.bh(), s.g, b.rows, s.d}));
  });
  return {out.view(q.sizes()), lse.view({s.B, s.Hkv * s.g, s.n})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> blockwise_attention_backward(
    const AttentionRowKernels& kernels, const at::Tensor& grad_out, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, const at::Tensor& out,
    const at::Tensor& lse, bool causal, double scale, std::array<bool, 3> needed) {
  const auto [need_dq, need_dk, need_dv] = needed;
  const Shape s = shape_of(q, k);
  const auto type = compute_type(q);
  const at::Tensor q4 = q.to(type).contiguous().view({s.bh(), s.g, s.n, s.d});
  const at::Tensor dO4 = grad_out.to(type).contiguous().view({s.bh(), s.g, s.n, s.d});
  const at::Tensor k3 = k.to(type).contiguous().view({s.bh(), s.n, s.d});
  const at::Tensor v3 = v.to(type).contiguous().view({s.bh(), s.n, s.d});
  const at::Tensor lse3 = lse.to(type).contiguous().view({s.bh(), s.g, s.n});
  // D = rowsum(dO ⊙ O) with the caller's out: with the matching lse this is the softmax
  // backward of whatever attention (out, lse) describe, restricted to these keys.
  const at::Tensor D =
      (dO4 * out.to(type).reshape({s.bh(), s.g, s.n, s.d})).sum(-1, /*keepdim=*/true);
  at::Tensor dq = need_dq ? at::empty_like(q4) : at::Tensor();
  at::Tensor dk = need_dk ? at::zeros_like(k3) : at::Tensor();
  at::Tensor dv = need_dv ? at::zeros_like(v3) : at::Tensor();

  for_each_block(kernels, s, q4.element_size(), causal, scale, [&](const AttentionBlock& b) {
    const at::Tensor qb = block_of(q4, b), dOb = block_of(dO4, b);
    const at::Tensor kk = k3.narrow(1, 0, b.keys), vk = v3.narrow(1, 0, b.keys);
    at::Tensor probs = at::bmm(qb, kk.transpose(1, 2));
    kernels.probs_rows(probs, lse3, mask, b);
    // Products land in fresh buffers and are added to the key rows [0, keys): an in-place
    // baddbmm on that strided view would fall back to one GEMM per batch-head on some BLAS.
    if (need_dv) dv.narrow(1, 0, b.keys).add_(at::bmm(probs.transpose(1, 2), dOb));
    if (!need_dq && !need_dk) return;
    // dS = P ⊙ (dP - D) with dP = dO·Vᵀ; the softmax scale is applied after the GEMMs.
    at::Tensor dS = at::bmm(dOb, vk.transpose(1, 2));
    dS.sub_(block_of(D, b)).mul_(probs);
    if (need_dq) {
      dq.narrow(2, b.q_begin, b.rows)
          .copy_(at::bmm(dS, kk).mul_(scale).view({s.bh(), s.g, b.rows, s.d}));
    }
    if (need_dk) dk.narrow(1, 0, b.keys).add_(at::bmm(dS.transpose(1, 2), qb), scale);
  });
  const auto shaped = [](const at::Tensor& t, const at::Tensor& like) {
    return t.defined() ? t.view(like.sizes()) : t;
  };
  return {shaped(dq, q), shaped(dk, k), shaped(dv, v)};
}

}  // namespace peftkern
