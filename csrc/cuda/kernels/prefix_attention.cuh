// Kernels of the prefix attention's row passes (launched by ../prefix_attention.cu, run on the
// CPU by the emulated-CUDA tests), one thread block per score row:
//   softmax_rows_kernel: mask + scale + max, exp + sum, normalise, lse, with the row in L1/L2.
//   probs_rows_kernel:   P = exp(s·scale - lse) under the same mask, for backward.
//   merge_kernel:        out = w₁·O₁ + w₂·O₂ with the weights from lse₁ and lse₂, and the
//                        merged lse.
// Block reductions combine warp partials in a fixed order, so results are deterministic.
#pragma once

#include "../../blockwise_attention.h"
#include "../common.cuh"

namespace peftkern::cuda {

constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / 32;
constexpr int kMergeThreads = 64;

inline LaunchGeometry score_rows_geometry(int64_t rows) {
  return {dim3(rows), dim3(kRowThreads), 0};
}

inline LaunchGeometry merge_geometry(int64_t rows) {
  return {dim3(rows), dim3(kMergeThreads), 0};
}

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// Reduces v over the thread block; every thread gets the result. shared holds kRowWarps values.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();  // the previous reduction's readers are done with shared
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  T result = shared[0];
#pragma unroll
  for (int w = 1; w < kRowWarps; ++w) result = op(result, shared[w]);
  return result;
}

// Where score row `idx` of a block [B·Hkv, g·rows, keys] sits (see AttentionBlock).
struct RowPlace {
  int64_t visible;    // keys [0, visible) pass the causal rule
  const bool* keep;   // the example's padding mask row, or nullptr
  int64_t lse_index;  // into [B·Hkv, g, n]
};

__device__ __forceinline__ RowPlace place_row(int64_t idx, int64_t R, int64_t keys,
                                              const bool* keep, const AttentionBlock& b) {
  const int64_t bh = idx / R, r = idx % R;
  const int64_t i = b.q_begin + r % b.rows;
  RowPlace p;
  p.visible = b.causal ? (keys < i + 1 ? keys : i + 1) : keys;
  p.keep = keep != nullptr ? keep + (bh / b.heads_kv) * b.n : nullptr;
  p.lse_index = (bh * b.group + r / b.rows) * b.n + i;
  return p;
}

__device__ __forceinline__ bool key_visible(const RowPlace& p, int64_t j) {
  return j < p.visible && (p.keep == nullptr || p.keep[j]);
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    softmax_rows_kernel(T* __restrict__ scores, T* __restrict__ lse, const bool* __restrict__ keep,
                        int64_t R, int64_t keys, AttentionBlock b) {
  PEFTKERN_SHARED(T, shared, [kRowWarps]);
  const int64_t idx = blockIdx.x;
  const RowPlace p = place_row(idx, R, keys, keep, b);
  T* row = scores + idx * keys;
  const T scale = static_cast<T>(b.scale);

  T mx = neg_inf<T>();
  for (int64_t j = threadIdx.x; j < keys; j += kRowThreads) {
    const T x = key_visible(p, j) ? row[j] * scale : neg_inf<T>();
    row[j] = x;
    mx = x > mx ? x : mx;
  }
  mx = block_reduce(mx, MaxOp{}, shared);
  if (mx == neg_inf<T>()) {  // no visible key: all-zero row, lse = -inf (uniform branch)
    for (int64_t j = threadIdx.x; j < keys; j += kRowThreads) row[j] = T(0);
    if (threadIdx.x == 0) lse[p.lse_index] = neg_inf<T>();
    return;
  }
  T sum = T(0);
  for (int64_t j = threadIdx.x; j < keys; j += kRowThreads) {
    const T e = exp(row[j] - mx);  // each thread revisits only the elements it wrote
    row[j] = e;
    sum += e;
  }
  sum = block_reduce(sum, SumOp{}, shared);
  const T inv = T(1) / sum;
  for (int64_t j = threadIdx.x; j < keys; j += kRowThreads) row[j] *= inv;
  if (threadIdx.x == 0) lse[p.lse_index] = mx + log(sum);
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads)
    probs_rows_kernel(T* __restrict__ scores, const T* __restrict__ lse,
                      const bool* __restrict__ keep, int64_t R, int64_t keys, AttentionBlock b) {
  const int64_t idx = blockIdx.x;
  const RowPlace p = place_row(idx, R, keys, keep, b);
  T* row = scores + idx * keys;
  const T scale = static_cast<T>(b.scale);
  const T row_lse = lse[p.lse_index];
  const bool any = row_lse != neg_inf<T>();
  for (int64_t j = threadIdx.x; j < keys; j += kRowThreads) {
    row[j] = any && key_visible(p, j) ? exp(row[j] * scale - row_lse) : T(0);
  }
}

// out[row] ← a₁·out[row] + a₂·o2[row] and lse[row] ← log(e^lse + e^lse2); one block per row.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads)
    merge_kernel(T* __restrict__ out, T* __restrict__ lse, const T* __restrict__ o2,
                 const T* __restrict__ lse2, int64_t d) {
  const int64_t row = blockIdx.x;
  const T l1 = lse[row], l2 = lse2[row];
  const T hi = l1 > l2 ? l1 : l2;  // finite: lse2 is (m > 0); lse may be -inf
  const T w1 = exp(l1 - hi), w2 = exp(l2 - hi);
  const T total = w1 + w2;
  const T a1 = w1 / total, a2 = w2 / total;
  T* dst = out + row * d;
  const T* src2 = o2 + row * d;
  for (int64_t c = threadIdx.x; c < d; c += kMergeThreads) dst[c] = a1 * dst[c] + a2 * src2[c];
  __syncthreads();  // every thread has read lse[row] before it is overwritten
  if (threadIdx.x == 0) lse[row] = hi + log(total);
}

}  // namespace peftkern::cuda
