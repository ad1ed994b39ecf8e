#include "flash_attention_f32.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../tensor_utils.h"
#include "flash_attention_f32_kernel.h"
#include "isa.h"

// The kernels pass GCC vector types between inline helpers of this file only, so the ABI note
// GCC gives for them in the baseline variant (wider vectors than the target has) is moot;
// fast_math.h is inside the region for its vector instantiation of fast_exp_of.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include "fast_math.h"

namespace peftkern::cpu {

#define PEFTKERN_ISA_IMPL "flash_attention_f32_impl.h"
#include "isa_variants.h"
#undef PEFTKERN_ISA_IMPL

void flash_forward_unit(const FlashAttention& a, int64_t b, int64_t kv_head, int64_t q_begin,
                        int64_t q_end) {
  PEFTKERN_ISA_DISPATCH(flash_forward_unit_impl(a, b, kv_head, q_begin, q_end));
}

void flash_backward_unit(const FlashAttention& a, int64_t b, int64_t h) {
  PEFTKERN_ISA_DISPATCH(flash_backward_unit_impl(a, b, h));
}

namespace {

FlashRows flash_rows(const at::Tensor& t) {
  if (!t.defined()) return {};
  return {t.data_ptr<float>(), t.stride(0), t.stride(1), t.stride(2)};
}

// [B, n_pad]: 0 for a kept key, -inf for padding; n_pad = n rounded up to 16 so that the
// kernel reads whole vectors.
at::Tensor key_bias_of(const at::Tensor& mask) {
  const int64_t B = mask.size(0), n = mask.size(1), n_pad = (n + 15) / 16 * 16;
  at::Tensor bias = at::zeros({B, n_pad}, mask.options().dtype(at::kFloat));
  bias.narrow(1, 0, n).masked_fill_(mask.logical_not(), -std::numeric_limits<float>::infinity());
  return bias;
}

FlashAttention flash_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                             const at::Tensor& key_bias, bool causal, double scale) {
  FlashAttention a{};
  a.heads_q = q.size(1);
  a.heads_kv = k.size(1);
  a.n = q.size(2);
  a.m = prefix_k.size(-2);
  a.d = q.size(3);
  a.causal = causal;
  a.scale = static_cast<float>(scale);
  a.q = flash_rows(q);
  a.k = flash_rows(k);
  a.v = flash_rows(v);
  a.prefix_k = prefix_k.const_data_ptr<float>();
  a.prefix_v = prefix_v.const_data_ptr<float>();
  a.shared_prefix = prefix_k.dim() == 3;
  a.key_bias = key_bias.defined() ? key_bias.const_data_ptr<float>() : nullptr;
  a.key_bias_stride = key_bias.defined() ? key_bias.size(1) : 0;
  return a;
}

// A [B, H, n, d] float32 tensor in the heads layout ([B, n, H, d] memory), zero-filled.
at::Tensor zeros_in_heads_layout(const at::Tensor& like) {
  return at::zeros({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options())
      .transpose(1, 2);
}

// Sums per-query-head shares [B, Hq, rows, d] over the g heads of each group, in a fixed order
// (bitwise reproducible): [B, Hkv, rows, d].
at::Tensor sum_over_groups(const at::Tensor& shares, int64_t kv_heads) {
  const int64_t group = shares.size(1) / kv_heads;
  const at::Tensor by_group =
      shares.view({shares.size(0), kv_heads, group, shares.size(2), shares.size(3)});
  at::Tensor sum = by_group.select(2, 0).clone();
  for (int64_t g = 1; g < group; ++g) sum.add_(by_group.select(2, g));
  return sum;
}

}  // namespace

bool flash_attention_f32_covers(const at::Tensor& q, const at::Tensor& k) {
  return compute_type(q) == at::kFloat && q.numel() > 0 && k.numel() > 0;
}

std::tuple<at::Tensor, at::Tensor> flash_attention_f32_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const at::Tensor& mask, bool causal, double scale) {
  const at::Tensor pk = prefix_k.contiguous(), pv = prefix_v.contiguous();
  const at::Tensor key_bias = mask.defined() ? key_bias_of(mask) : at::Tensor();
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), n = q.size(2), d = q.size(3);
  at::Tensor out = at::empty({B, n, Hq, d}, q.options()).transpose(1, 2);
  at::Tensor lse = at::empty({B, Hq, n}, q.options());
  FlashAttention a = flash_problem(q, k, v, pk, pv, key_bias, causal, scale);
  a.out = flash_rows(out);
  a.lse = lse.data_ptr<float>();
  // Units of (example, key/value head, span of query positions): enough of them to keep every
  // thread busy when B·Hkv is small (a causal span's work grows with its position, so a few
  // units per thread even that out).
  const int64_t heads = B * Hkv, blocks = (n + kFlashQueryBlock - 1) / kFlashQueryBlock;
  const int64_t spans =
      std::clamp<int64_t>((4 * at::get_num_threads() + heads - 1) / heads, 1, blocks);
  const int64_t span = (blocks + spans - 1) / spans * kFlashQueryBlock;
  at::parallel_for(0, heads * spans, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t bh = unit / spans, first = unit % spans * span;
      if (first < n) flash_forward_unit(a, bh / Hkv, bh % Hkv, first, std::min(n, first + span));
    }
  });
  return std::make_tuple(out, lse);
}

std::array<at::Tensor, 5> flash_attention_f32_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& mask,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    std::array<bool, 5> output_mask) {
  const at::Tensor pk = prefix_k.contiguous(), pv = prefix_v.contiguous();
  const at::Tensor key_bias = mask.defined() ? key_bias_of(mask) : at::Tensor();
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), n = q.size(2);
  const int64_t m = pk.size(-2), d = q.size(3);
  // One unit per (example, query head), as many as ATen's kernel has, so grouped-query
  // attention keeps every thread busy; with groups each unit writes its own share of the
  // key/value and prefix gradients, summed per group afterwards.
  const bool shares = Hq != Hkv;
  const auto key_grad = [&](bool needed, const at::Tensor& like) {
    if (!needed) return at::Tensor();
    return shares ? at::zeros({B, Hq, n, d}, q.options()) : zeros_in_heads_layout(like);
  };
  const auto prefix_grad = [&](bool needed) {
    return needed && m > 0 ? at::zeros({B, shares ? Hq : Hkv, m, d}, q.options()) : at::Tensor();
  };
  std::array<at::Tensor, 5> grads{output_mask[0] ? zeros_in_heads_layout(q) : at::Tensor(),
                                  key_grad(output_mask[1], k), key_grad(output_mask[2], v),
                                  prefix_grad(output_mask[3]), prefix_grad(output_mask[4])};
  const at::Tensor lse_c = lse.contiguous();
  FlashAttention a = flash_problem(q, k, v, pk, pv, key_bias, causal, scale);
  a.out = flash_rows(out);
  a.lse = lse_c.data_ptr<float>();
  a.grad_out = flash_rows(grad_out);
  a.dq = flash_rows(grads[0]);
  a.dk = flash_rows(grads[1]);
  a.dv = flash_rows(grads[2]);
  a.grad_prefix_k = grads[3].defined() ? grads[3].data_ptr<float>() : nullptr;
  a.grad_prefix_v = grads[4].defined() ? grads[4].data_ptr<float>() : nullptr;
  a.key_grads_per_query_head = shares;
  // No two units write the same rows: the result does not depend on the thread count.
  at::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) flash_backward_unit(a, bh / Hq, bh % Hq);
  });
  if (shares) {
    for (int i = 1; i < 5; ++i) {
      if (grads[i].defined()) grads[i] = sum_over_groups(grads[i], Hkv);
    }
  }
  return grads;
}

}  // namespace peftkern::cpu

#pragma GCC diagnostic pop
