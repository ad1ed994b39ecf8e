// CPU row passes of the prefix attention (the GEMMs run in the vendor BLAS, see
// ../prefix_attention.cpp).
//
// Each pass touches a score row once or twice while it is in cache: mask + scale + max, then
// exp + sum, then normalise. float32 rows use a polynomial exp written so that GCC vectorises
// it, and the row functions are compiled for AVX-512, AVX2 and baseline x86 (target_clones
// picks at load time), because a scalar libm exp would cost more than the whole sequence GEMM
// at head_dim 64. float64 rows (gradcheck, tests) use std::exp.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../prefix_attention.h"

namespace peftkern::cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEFTKERN_ROW_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PEFTKERN_ROW_CLONES
#endif

constexpr int kLanes = 16;  // independent accumulators, so max/sum reductions vectorise

// exp(x) to ~1 ulp for x <= ~88 (Cephes expf), 0 below -87; branch-free so loops vectorise.
inline __attribute__((always_inline)) float exp_approx(float x) {
  const float clamped = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // n = round(x·log2(e)); the +128 keeps the truncating conversion a floor.
  const int32_t n = static_cast<int32_t>(clamped * 1.44269504088896341f + 128.5f) - 128;
  const float nf = static_cast<float>(n);
  const float r = clamped - nf * 0.693359375f + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_n = std::bit_cast<float>((n + 127) << 23);
  return x < -87.0f ? 0.0f : p * two_n;
}

inline __attribute__((always_inline)) double exp_approx(double x) { return std::exp(x); }

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// Masks (padding, and keys past `visible`) and scales row[0, keys) in place; returns the max.
template <typename T>
inline __attribute__((always_inline)) T mask_scale_max(T* row, int64_t visible, int64_t keys,
                                                      const bool* keep, T scale) {
  T lane_max[kLanes];
  for (int l = 0; l < kLanes; ++l) lane_max[l] = kNegInf<T>;
  int64_t j = 0;
  for (; j + kLanes <= visible; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T x = keep == nullptr || keep[j + l] ? row[j + l] * scale : kNegInf<T>;
      row[j + l] = x;
      lane_max[l] = x > lane_max[l] ? x : lane_max[l];
    }
  }
  T mx = kNegInf<T>;
  for (int l = 0; l < kLanes; ++l) mx = lane_max[l] > mx ? lane_max[l] : mx;
  for (; j < visible; ++j) {
    const T x = keep == nullptr || keep[j] ? row[j] * scale : kNegInf<T>;
    row[j] = x;
    mx = x > mx ? x : mx;
  }
  for (j = visible; j < keys; ++j) row[j] = kNegInf<T>;
  return mx;
}

// row[j] = exp(row[j] - shift) in place over [0, keys); returns the sum.
template <typename T>
inline __attribute__((always_inline)) T exp_shift_sum(T* row, int64_t keys, T shift) {
  T lane_sum[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= keys; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T e = exp_approx(row[j + l] - shift);
      row[j + l] = e;
      lane_sum[l] += e;
    }
  }
  T sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += lane_sum[l];
  for (; j < keys; ++j) {
    row[j] = exp_approx(row[j] - shift);
    sum += row[j];
  }
  return sum;
}

template <typename T>
inline __attribute__((always_inline)) T softmax_row(T* row, int64_t visible, int64_t keys,
                                                   const bool* keep, T scale) {
  const T mx = mask_scale_max(row, visible, keys, keep, scale);
  if (mx == kNegInf<T>) {  // no visible key: an all-zero row, lse = -inf
    for (int64_t j = 0; j < keys; ++j) row[j] = T(0);
    return kNegInf<T>;
  }
  const T sum = exp_shift_sum(row, keys, mx);
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < keys; ++j) row[j] *= inv;
  return mx + std::log(sum);
}

template <typename T>
inline __attribute__((always_inline)) void probs_row(T* row, int64_t visible, int64_t keys,
                                                    const bool* keep, T scale, T lse) {
  if (lse == kNegInf<T>) {
    for (int64_t j = 0; j < keys; ++j) row[j] = T(0);
    return;
  }
  mask_scale_max(row, visible, keys, keep, scale);
  exp_shift_sum(row, keys, lse);
}

PEFTKERN_ROW_CLONES float softmax_row_f32(float* row, int64_t visible, int64_t keys,
                                          const bool* keep, float scale) {
  return softmax_row(row, visible, keys, keep, scale);
}

PEFTKERN_ROW_CLONES void probs_row_f32(float* row, int64_t visible, int64_t keys,
                                       const bool* keep, float scale, float lse) {
  probs_row(row, visible, keys, keep, scale, lse);
}

float softmax_row_any(float* row, int64_t visible, int64_t keys, const bool* keep, float scale) {
  return softmax_row_f32(row, visible, keys, keep, scale);
}
double softmax_row_any(double* row, int64_t visible, int64_t keys, const bool* keep,
                       double scale) {
  return softmax_row(row, visible, keys, keep, scale);
}
void probs_row_any(float* row, int64_t visible, int64_t keys, const bool* keep, float scale,
                   float lse) {
  probs_row_f32(row, visible, keys, keep, scale, lse);
}
void probs_row_any(double* row, int64_t visible, int64_t keys, const bool* keep, double scale,
                   double lse) {
  probs_row(row, visible, keys, keep, scale, lse);
}

// Calls body(row_index, row_ptr, visible_keys, keep_ptr, lse_index) for every row of a block
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
      lse_data[lse_index] = softmax_row_any(row, visible, keys, keep, scale);
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
      probs_row_any(row, visible, keys, keep, scale, lse_data[lse_index]);
    });
  });
}

void merge_rows(const at::Tensor& o1, const at::Tensor& o2, const at::Tensor& lse2,
                at::Tensor& out, at::Tensor& lse, const AttentionBlock& b) {
  const int64_t BH = o1.size(0), R = o1.size(1), d = o1.size(2);
  AT_DISPATCH_FLOATING_TYPES(o1.scalar_type(), "peftkern_prefix_merge", [&] {
    const scalar_t* o1_data = o1.const_data_ptr<scalar_t>();
    const scalar_t* o2_data = o2.defined() ? o2.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* lse2_data = o2.defined() ? lse2.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out_data = out.data_ptr<scalar_t>();
    scalar_t* lse_data = lse.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, d));
    at::parallel_for(0, BH * R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end; ++idx) {
        const int64_t bh = idx / R, r = idx % R;
        const int64_t row = (bh * b.group + r / b.rows) * b.n + b.q_begin + r % b.rows;
        const scalar_t* src1 = o1_data + idx * d;
        scalar_t* dst = out_data + row * d;
        if (o2_data == nullptr) {
          for (int64_t c = 0; c < d; ++c) dst[c] = src1[c];
          continue;
        }
        // lse₂ is finite (m > 0); lse₁ is -inf when no sequence key is visible.
        const scalar_t l1 = lse_data[row], l2 = lse2_data[row];
        const scalar_t hi = std::max(l1, l2);
        const scalar_t w1 = std::exp(l1 - hi), w2 = std::exp(l2 - hi);
        const scalar_t total = w1 + w2;
        const scalar_t a1 = w1 / total, a2 = w2 / total;
        const scalar_t* src2 = o2_data + row * d;
        for (int64_t c = 0; c < d; ++c) dst[c] = a1 * src1[c] + a2 * src2[c];
        lse_data[row] = hi + std::log(total);
      }
    });
  });
}

// 4 MiB of scores per block: large enough that each batched GEMM runs near peak, small enough
// that the softmax pass finds the block in the last-level cache.
constexpr PrefixAttentionKernels kCpuKernels{&softmax_rows, &probs_rows, &merge_rows, 4 << 20};

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
