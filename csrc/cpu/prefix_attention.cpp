// CPU side of the prefix attention. float32 (the dtype of training, and what half-precision
// inputs are computed in) runs the flash kernel (flash_attention.h): prefix rows and sequence
// keys in one pass, faster than ATen's own CPU flash attention without a prefix. float64 and
// empty inputs run the device-agnostic orchestration (../prefix_attention.cpp) with the
// blockwise sequence part that the CUDA build uses (../blockwise_attention.h), the row passes
// below and a merge pass: float64 is the dtype of the exact reference tests and gradcheck, so
// that orchestration is verified on every machine, GPU or not.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "../blockwise_attention.h"
#include "../prefix_attention.h"
#include "flash_attention.h"

namespace peftkern::cpu {
namespace {

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// The row passes: the float64 sequence path, where exactness matters more than speed, and the
// prefix softmax, whose rows are only m long; plain loops over std::exp serve both.

// Masks (padding, and keys past `visible`) and scales row[0, keys) in place; returns the max.
template <typename T>
T mask_scale_max(T* row, int64_t visible, int64_t keys, const bool* keep, T scale) {
  T mx = kNegInf<T>;
  for (int64_t j = 0; j < keys; ++j) {
    const T x = j < visible && (keep == nullptr || keep[j]) ? row[j] * scale : kNegInf<T>;
    row[j] = x;
    mx = std::max(mx, x);
  }
  return mx;
}

// row[j] = exp(row[j] - shift) in place; returns the sum.
template <typename T>
T exp_shift_sum(T* row, int64_t keys, T shift) {
  T sum = 0;
  for (int64_t j = 0; j < keys; ++j) {
    row[j] = std::exp(row[j] - shift);
    sum += row[j];
  }
  return sum;
}

template <typename T>
T softmax_row(T* row, int64_t visible, int64_t keys, const bool* keep, T scale) {
  const T mx = mask_scale_max(row, visible, keys, keep, scale);
  if (mx == kNegInf<T>) {  // no visible key: an all-zero row, lse = -inf
    std::fill(row, row + keys, T(0));
    return kNegInf<T>;
  }
  const T sum = exp_shift_sum(row, keys, mx);
  for (int64_t j = 0; j < keys; ++j) row[j] /= sum;
  return mx + std::log(sum);
}

template <typename T>
void probs_row(T* row, int64_t visible, int64_t keys, const bool* keep, T scale, T lse) {
  if (lse == kNegInf<T>) {
    std::fill(row, row + keys, T(0));
    return;
  }
  mask_scale_max(row, visible, keys, keep, scale);
  exp_shift_sum(row, keys, lse);
}

// Calls body(row_ptr, visible_keys, keys, keep_row, lse_index) for every row of a block
// score matrix [B·Hkv, g·rows, keys], on all threads.
template <typename T, typename F>
void for_each_row(at::Tensor& scores, const at::Tensor& mask, const AttentionBlock& b, F&& body) {
  const int64_t R = scores.size(1), keys = scores.size(2);
  T* data = scores.data_ptr<T>();
  const bool* keep = mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, keys));
  at::parallel_for(0, scores.size(0) * R, grain, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t bh = idx / R, r = idx % R;
      const int64_t i = b.q_begin + r % b.rows;
      const int64_t visible = b.causal ? std::min(keys, i + 1) : keys;
      const bool* keep_row = keep ? keep + (bh / b.heads_kv) * b.n : nullptr;
      const int64_t lse_index = (bh * b.group + r / b.rows) * b.n + i;
      body(data + idx * keys, visible, keys, keep_row, lse_index);
    }
  });
}

void softmax_rows(at::Tensor& scores, at::Tensor& lse, const at::Tensor& mask,
                  const AttentionBlock& b) {
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "peftkern_prefix_softmax", [&] {
    scalar_t* lse_data = lse.data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(b.scale);
    for_each_row<scalar_t>(scores, mask, b, [&](scalar_t* row, int64_t visible, int64_t keys,
                                                const bool* keep, int64_t lse_index) {
      lse_data[lse_index] = softmax_row(row, visible, keys, keep, scale);
    });
  });
}

void probs_rows(at::Tensor& scores, const at::Tensor& lse, const at::Tensor& mask,
                const AttentionBlock& b) {
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "peftkern_prefix_probs", [&] {
    const scalar_t* lse_data = lse.const_data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(b.scale);
    for_each_row<scalar_t>(scores, mask, b, [&](scalar_t* row, int64_t visible, int64_t keys,
                                                const bool* keep, int64_t lse_index) {
      probs_row(row, visible, keys, keep, scale, lse_data[lse_index]);
    });
  });
}

void merge(at::Tensor& out, at::Tensor& lse, const at::Tensor& o2, const at::Tensor& lse2) {
  const int64_t d = out.size(-1), rows = lse.numel();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "peftkern_prefix_merge", [&] {
    scalar_t* out_data = out.data_ptr<scalar_t>();
    scalar_t* lse_data = lse.data_ptr<scalar_t>();
    const scalar_t* o2_data = o2.const_data_ptr<scalar_t>();
    const scalar_t* lse2_data = lse2.const_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, d));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t l1 = lse_data[row], l2 = lse2_data[row];
        const scalar_t hi = std::max(l1, l2);  // finite: lse2 is (m > 0)
        const scalar_t w1 = std::exp(l1 - hi), w2 = std::exp(l2 - hi);
        const scalar_t total = w1 + w2;
        const scalar_t a1 = w1 / total, a2 = w2 / total;
        scalar_t* dst = out_data + row * d;
        const scalar_t* src2 = o2_data + row * d;
        for (int64_t c = 0; c < d; ++c) dst[c] = a1 * dst[c] + a2 * src2[c];
        lse_data[row] = hi + std::log(total);
      }
    });
  });
}

constexpr AttentionRowKernels kCpuRows{&softmax_rows, &probs_rows, 4 << 20};

std::tuple<at::Tensor, at::Tensor> sequence_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& mask,
                                                    bool causal, double scale) {
  return blockwise_attention_forward(kCpuRows, q, k, v, mask, causal, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& mask, const at::Tensor& out, const at::Tensor& lse, bool causal,
    double scale, std::array<bool, 3> needed) {
  return blockwise_attention_backward(kCpuRows, grad_out, q, k, v, mask, out, lse, causal, scale,
                                      needed);
}

// The flash kernel covers float32 with at least one query and one key; everything else takes
// the part-by-part path.
bool flash_covers(const at::Tensor& q, const at::Tensor& k) {
  return q.scalar_type() == at::kFloat && q.numel() > 0 && k.numel() > 0;
}

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

std::optional<std::tuple<at::Tensor, at::Tensor>> flash_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const at::Tensor& mask, bool causal, double scale) {
  if (!flash_covers(q, k)) return std::nullopt;
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

std::optional<std::array<at::Tensor, 5>> flash_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& prefix_k, const at::Tensor& prefix_v, const at::Tensor& mask,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    std::array<bool, 5> output_mask) {
  if (!flash_covers(q, k)) return std::nullopt;
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

constexpr PrefixAttentionKernels kCpuKernels{&sequence_forward, &sequence_backward, &merge,
                                             kCpuRows, &flash_forward, &flash_backward};

std::tuple<at::Tensor, at::Tensor> prefix_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const c10::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale) {
  return prefix_attention_forward(kCpuKernels, q, k, v, prefix_k, prefix_v, key_padding_mask,
                                  causal, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
prefix_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                              const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                              const c10::optional<at::Tensor>& key_padding_mask,
                              const at::Tensor& out, const at::Tensor& lse, bool causal,
                              double scale, std::array<bool, 5> output_mask) {
  return prefix_attention_backward(kCpuKernels, grad_out, q, k, v, prefix_k, prefix_v,
                                   key_padding_mask, out, lse, causal, scale, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("prefix_attention", &prefix_attention_cpu);
  m.impl("prefix_attention_backward", &prefix_attention_backward_cpu);
}

}  // namespace peftkern::cpu
