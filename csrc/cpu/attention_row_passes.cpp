#include "attention_row_passes.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace peftkern::cpu {
namespace {

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

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

}  // namespace

void attention_softmax_rows(at::Tensor& scores, at::Tensor& lse, const at::Tensor& mask,
                            const AttentionBlock& b) {
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "peftkern_prefix_softmax", [&] {
    scalar_t* lse_data = lse.data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(b.scale);
    for_each_row<scalar_t>(
        scores, mask, b,
        [&](scalar_t* row, int64_t visible, int64_t keys, const bool* keep, int64_t lse_index) {
          lse_data[lse_index] = softmax_row(row, visible, keys, keep, scale);
        });
  });
}

void attention_probs_rows(at::Tensor& scores, const at::Tensor& lse, const at::Tensor& mask,
                          const AttentionBlock& b) {
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "peftkern_prefix_probs", [&] {
    const scalar_t* lse_data = lse.const_data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(b.scale);
    for_each_row<scalar_t>(
        scores, mask, b,
        [&](scalar_t* row, int64_t visible, int64_t keys, const bool* keep, int64_t lse_index) {
          probs_row(row, visible, keys, keep, scale, lse_data[lse_index]);
        });
  });
}

void attention_merge_rows(at::Tensor& out, at::Tensor& lse, const at::Tensor& o2,
                          const at::Tensor& lse2) {
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

}  // namespace peftkern::cpu
