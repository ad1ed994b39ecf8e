// CPU side of the prefix attention: the sequence part, the merge pass and, for float32, the
// fused prefix part (the orchestration is device-agnostic, ../prefix_attention.cpp).
//
// Sequence part: ATen's fused CPU flash-attention kernel, which reports its log-sum-exp and
// whose backward accepts any (out, lse) — exactly what the merge needs, at the speed of plain
// attention, with grouped-query attention and the padding mask handled inside the kernel.
// float64 instead runs the blockwise path that the CUDA build uses (../blockwise_attention.h),
// with the row passes below, and so does its prefix part: float64 is the dtype of the exact
// reference tests and gradcheck, so that orchestration is verified on every machine, GPU or
// not. float32 does the prefix part in one fused pass over the query rows (prefix_rows.h).
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
#include "prefix_rows.h"

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

// The padding mask as the additive bias the fused kernel takes: [B, 1, 1, n], 0 or -inf.
std::optional<at::Tensor> additive_mask(const at::Tensor& mask, const at::Tensor& like) {
  if (!mask.defined()) return std::nullopt;
  const int64_t B = mask.size(0), n = mask.size(1);
  return at::zeros({B, 1, 1, n}, like.options())
      .masked_fill_(mask.logical_not().view({B, 1, 1, n}), -std::numeric_limits<double>::infinity());
}

// [B, 1, n]: true where query i sees no sequence key (every key it may see is padded).
at::Tensor sees_no_key(const at::Tensor& mask, bool causal) {
  const at::Tensor none = causal ? mask.cumsum(-1).eq(0)
                                 : mask.logical_not().all(-1, /*keepdim=*/true).expand_as(mask);
  return none.unsqueeze(1);
}

// ATen's fused CPU kernel divides by the sequence length: empty inputs take the blockwise path.
bool empty_attention(const at::Tensor& q, const at::Tensor& k) {
  return q.numel() == 0 || k.numel() == 0;
}

std::tuple<at::Tensor, at::Tensor> sequence_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& mask,
                                                    bool causal, double scale) {
  if (q.scalar_type() == at::kDouble || empty_attention(q, k)) {
    return blockwise_attention_forward(kCpuRows, q, k, v, mask, causal, scale);
  }
  auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(
      q, k, v, 0.0, causal, additive_mask(mask, q), scale);
  lse = lse.contiguous();  // the kernel's lse is [B, n, H] in memory
  // The fused kernel reports lse = 0 (and out = 0) for a query that sees no key; the merge
  // needs -inf there so that such a query takes the prefix part alone.
  if (mask.defined()) lse.masked_fill_(sees_no_key(mask, causal), -std::numeric_limits<double>::infinity());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& mask, const at::Tensor& out, const at::Tensor& lse, bool causal,
    double scale, std::array<bool, 3> needed) {
  if (q.scalar_type() == at::kDouble || empty_attention(q, k)) {
    return blockwise_attention_backward(kCpuRows, grad_out, q, k, v, mask, out, lse, causal, scale,
                                        needed);
  }
  // lse is -inf only on queries that see no key at all (m = 0); every score of such a row is
  // masked, so any finite lse there gives the right probabilities (0) instead of exp(NaN).
  const at::Tensor finite_lse = mask.defined() ? lse.masked_fill(lse.isneginf(), 0.0) : lse;
  return at::_scaled_dot_product_flash_attention_for_cpu_backward(
      grad_out, q, k, v, out, finite_lse, 0.0, causal, additive_mask(mask, q), scale);
}

// The fused prefix part (prefix_rows.h) for float32. float64 keeps the GEMM path: it is the
// one the CUDA build runs, and float64 is the dtype of the exact reference tests.
class FusedPrefix {
 public:
  FusedPrefix(const at::Tensor& prefix_k, const at::Tensor& prefix_v, double scale)
      : k_(prefix_k.contiguous()),
        v_(prefix_v.contiguous()),
        m_(prefix_k.size(-2)),
        m_pad_((m_ + 15) / 16 * 16),
        d_(prefix_k.size(-1)),
        kv_heads_(prefix_k.size(-3)),
        shared_(prefix_k.dim() == 3),
        k_t_(padded_transpose(k_)),
        v_t_(padded_transpose(v_)),
        scale_(static_cast<float>(scale)) {}

  // The prefix of batch-head bh (b·Hkv + h).
  PrefixRows rows_of(int64_t bh) const {
    const int64_t head = shared_ ? bh % kv_heads_ : bh;
    const int64_t plain = head * m_ * d_, padded = head * d_ * m_pad_;
    return {k_.const_data_ptr<float>() + plain, v_.const_data_ptr<float>() + plain,
            k_t_.const_data_ptr<float>() + padded, v_t_.const_data_ptr<float>() + padded,
            m_, m_pad_, d_, scale_};
  }
  int64_t m() const { return m_; }
  int64_t d() const { return d_; }
  int64_t kv_heads() const { return kv_heads_; }

 private:
  // [..., m, d] → [..., d, m_pad], the columns past m zero.
  at::Tensor padded_transpose(const at::Tensor& p) const {
    std::vector<int64_t> shape(p.sizes().begin(), p.sizes().end() - 2);
    shape.insert(shape.end(), {d_, m_pad_});
    at::Tensor t = at::zeros(shape, p.options());
    t.narrow(-1, 0, m_).copy_(p.transpose(-1, -2));
    return t;
  }

  at::Tensor k_, v_;
  int64_t m_, m_pad_, d_, kv_heads_;
  bool shared_;
  at::Tensor k_t_, v_t_;
  float scale_;
};

// A [B, H, n, d] float tensor whose rows of d are contiguous, addressed by (b, h, i) through
// its strides: contiguous tensors and the [B, n, H, d] memory of projections alike.
struct HeadRows {
  explicit HeadRows(const at::Tensor& t)
      : data(t.defined() ? t.data_ptr<float>() : nullptr),
        batch_stride(t.defined() ? t.stride(0) : 0),
        head_stride(t.defined() ? t.stride(1) : 0),
        row_stride(t.defined() ? t.stride(2) : 0) {}
  float* row(int64_t b, int64_t h, int64_t i) const {
    return data ? data + b * batch_stride + h * head_stride + i * row_stride : nullptr;
  }
  float* data;
  int64_t batch_stride, head_stride, row_stride;
};

// Calls body(b, h, i, count) for the runs of consecutive query rows i..i+count of one head
// (b, h) that make up the flat rows [begin, end) of [B, H, n] (row = (b·H + h)·n + i).
template <typename F>
void for_each_head_run(int64_t begin, int64_t end, int64_t heads, int64_t n, F&& body) {
  for (int64_t row = begin; row < end;) {
    const int64_t head = row / n, i = row % n;
    const int64_t count = std::min(end - row, n - i);
    body(head / heads, head % heads, i, count);
    row += count;
  }
}

// Query rows of one batch element taken kRowBlock positions at a time, every head of a block
// before the next block: projections lay q and out out as [B, n, H, d], where one position's
// heads are contiguous, so a block is one contiguous stretch of memory however the heads are
// strided (head by head, each row would be a fresh 2 KB stride away at H = 8, d = 64).
constexpr int64_t kRowBlock = 16;

bool fused_prefix_forward(const at::Tensor& q, const at::Tensor& prefix_k,
                          const at::Tensor& prefix_v, at::Tensor& out, at::Tensor& lse,
                          double scale) {
  // Empty inputs (no rows, or head_dim 0) go to the GEMM path, which handles every shape.
  if (q.scalar_type() != at::kFloat || q.numel() == 0) return false;
  const FusedPrefix prefix(prefix_k, prefix_v, scale);
  const int64_t Hq = q.size(1), n = q.size(2), group = Hq / prefix.kv_heads();
  const int64_t blocks = (n + kRowBlock - 1) / kRowBlock;
  const HeadRows Q(q), O(out);
  float* lse_data = lse.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / (kRowBlock * Hq * prefix.m() * prefix.d()));
  at::parallel_for(0, q.size(0) * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t b = unit / blocks, i = unit % blocks * kRowBlock;
      const int64_t count = std::min(kRowBlock, n - i);
      for (int64_t h = 0; h < Hq; ++h) {
        prefix_forward_rows(prefix.rows_of(b * prefix.kv_heads() + h / group), Q.row(b, h, i),
                            Q.row_stride, O.row(b, h, i), O.row_stride,
                            lse_data + (b * Hq + h) * n + i, count);
      }
    }
  });
  return true;
}

bool fused_prefix_backward(const at::Tensor& grad_out, const at::Tensor& q,
                           const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                           const at::Tensor& out, const at::Tensor& lse, double scale,
                           at::Tensor& dq, at::Tensor* grad_k, at::Tensor* grad_v) {
  if (q.scalar_type() != at::kFloat || q.numel() == 0) return false;  // as in the forward
  const FusedPrefix prefix(prefix_k, prefix_v, scale);
  const int64_t B = q.size(0), Hq = q.size(1), n = q.size(2), Hkv = prefix.kv_heads();
  const int64_t group = Hq / Hkv, bh_count = B * Hkv, rows_per_bh = group * n;
  const int64_t m = prefix.m(), d = prefix.d();
  // Each unit (a batch-head, or a fixed slice of its rows when there are few batch-heads)
  // owns its prefix-gradient accumulators, summed afterwards in a fixed order: the result
  // depends on the shapes only, never on the thread count, so it is bitwise reproducible.
  const int64_t slices = std::clamp<int64_t>((64 + bh_count - 1) / bh_count, 1,
                                             (rows_per_bh + 127) / 128);
  const int64_t slice_rows = (rows_per_bh + slices - 1) / slices;
  const auto partials = [&](bool needed) {
    return needed ? at::zeros({bh_count, slices, m, d}, q.options()) : at::Tensor();
  };
  at::Tensor k_parts = partials(grad_k != nullptr), v_parts = partials(grad_v != nullptr);
  const HeadRows Q(q), dO(grad_out), O(out), dQ(dq), K_parts(k_parts), V_parts(v_parts);
  const float* lse_data = lse.const_data_ptr<float>();
  at::parallel_for(0, bh_count * slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t bh = unit / slices, slice = unit % slices, b = bh / Hkv, kv_head = bh % Hkv;
      const int64_t first = slice * slice_rows;
      const int64_t last = std::min(first + slice_rows, rows_per_bh);
      // The unit's rows are those of its query heads kv_head·group + [0, group).
      const int64_t head_base = b * Hq + kv_head * group;
      for_each_head_run(head_base * n + first, head_base * n + std::max(first, last), Hq, n,
                        [&](int64_t b_, int64_t h, int64_t i, int64_t count) {
        const PrefixGradRows rows{Q.row(b_, h, i), dO.row(b_, h, i), O.row(b_, h, i),
                                  dQ.row(b_, h, i), Q.row_stride, dO.row_stride, O.row_stride,
                                  dQ.row_stride, lse_data + (b_ * Hq + h) * n + i};
        prefix_backward_rows(prefix.rows_of(bh), rows, K_parts.row(bh, slice, 0),
                             V_parts.row(bh, slice, 0), count);
      });
    }
  });
  const auto per_example = [&](const at::Tensor& parts) {
    return (slices == 1 ? parts.squeeze(1) : parts.sum(1)).view({B, Hkv, m, d});
  };
  if (grad_k != nullptr) *grad_k = per_example(k_parts);
  if (grad_v != nullptr) *grad_v = per_example(v_parts);
  return true;
}

constexpr PrefixAttentionKernels kCpuKernels{&sequence_forward, &sequence_backward, &merge,
                                             kCpuRows, &fused_prefix_forward,
                                             &fused_prefix_backward};

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
