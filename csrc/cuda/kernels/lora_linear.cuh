// Kernels of the fused LoRA linear (launched by ../lora_linear.cu, run on the CPU by the
// emulated-CUDA tests):
//   down_project_kernel:  S = drop(x)·Aᵀ with the dropout mask generated in registers while x
//                         is read, once.
//   lora_dx_kernel:       dx = drop'(dS·A) (mask regenerated, x not read).
//   lora_dA_kernel:       dA = dSᵀ·drop(x) as per-split partial sums (x read once, rows split
//                         across blocks); the launcher adds the splits in a fixed order, so dA
//                         is deterministic.
#pragma once

#include "../../philox.h"
#include "../common.cuh"

namespace peftkern::cuda {

constexpr int kLoraThreads = 128;
constexpr int kLoraWarps = kLoraThreads / 32;
constexpr int kDownRows = 4;   // rows of x per block in down_project
constexpr int kRankTile = 16;  // rank outputs per block (grid.y tiles larger ranks)

__device__ __forceinline__ DropoutParams with_seed(DropoutParams d, const int64_t* seed) {
  // The seed lives in device memory (drawn by torch's CUDA generator), so reading it here
  // needs no host synchronisation and is valid under CUDA graph capture.
  if (seed != nullptr) d.seed = static_cast<uint64_t>(*seed);
  return d;
}

template <typename C, bool kDropout>
__device__ __forceinline__ void group_multipliers(const DropoutParams& d, int64_t row,
                                                  int64_t group, C (&mult)[4]) {
  if constexpr (kDropout) {
    const Philox4 w = dropout_words(d, row, group);
#pragma unroll
    for (int l = 0; l < 4; ++l) mult[l] = static_cast<C>(dropout_multiplier(d, w.v[l]));
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) mult[l] = C(1);
  }
}

// drop(x)[m, 4g .. 4g+4) in C, 0 past the end of the row.
template <typename C, bool kDropout, typename X>
__device__ __forceinline__ void load_dropped_group(const X* __restrict__ x, const DropoutParams& d,
                                                   int64_t m, int64_t g, int64_t K, C (&out)[4]) {
  C mult[4];
  group_multipliers<C, kDropout>(d, m, g, mult);
  load_group(x + m * K, 4 * g, K, out);
#pragma unroll
  for (int l = 0; l < 4; ++l) out[l] *= mult[l];
}

inline LaunchGeometry down_project_geometry(int64_t M, int64_t r) {
  return {dim3(ceil_div(M, kDownRows), ceil_div(r, kRankTile)), dim3(kLoraThreads), 0};
}

template <typename X, typename Acc, bool kDropout>
__global__ void __launch_bounds__(kLoraThreads)
    down_project_kernel(const X* __restrict__ x, const Acc* __restrict__ A, Acc* __restrict__ S,
                        int64_t M, int64_t K, int64_t r, DropoutParams params,
                        const int64_t* __restrict__ seed) {
  using C = compute_t<Acc>;
  const DropoutParams d = with_seed(params, seed);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kDownRows;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kRankTile;
  const int64_t groups = ceil_div(K, 4);

  C acc[kDownRows][kRankTile];
#pragma unroll
  for (int i = 0; i < kDownRows; ++i)
#pragma unroll
    for (int j = 0; j < kRankTile; ++j) acc[i][j] = C(0);

  for (int64_t g = threadIdx.x; g < groups; g += kLoraThreads) {
    const int64_t k0 = 4 * g;
    C a[kRankTile][4];
#pragma unroll
    for (int j = 0; j < kRankTile; ++j) {
      if (j0 + j < r) {
        load_group(A + (j0 + j) * K, k0, K, a[j]);
      } else {
#pragma unroll
        for (int l = 0; l < 4; ++l) a[j][l] = C(0);
      }
    }
#pragma unroll
    for (int i = 0; i < kDownRows; ++i) {
      const int64_t m = row0 + i;
      if (m >= M) continue;
      C xm[4];
      load_dropped_group<C, kDropout>(x, d, m, g, K, xm);
#pragma unroll
      for (int j = 0; j < kRankTile; ++j)
#pragma unroll
        for (int l = 0; l < 4; ++l) acc[i][j] += a[j][l] * xm[l];
    }
  }

  // Block reduction: warp shuffles, then one partial per warp in shared memory.
  PEFTKERN_SHARED(C, partial, [kLoraWarps][kDownRows * kRankTile]);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < kDownRows; ++i)
#pragma unroll
    for (int j = 0; j < kRankTile; ++j) {
      C v = acc[i][j];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0) partial[warp][i * kRankTile + j] = v;
    }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kDownRows * kRankTile; idx += kLoraThreads) {
    const int64_t m = row0 + idx / kRankTile, j = j0 + idx % kRankTile;
    if (m >= M || j >= r) continue;
    C sum = C(0);
#pragma unroll
    for (int w = 0; w < kLoraWarps; ++w) sum += partial[w][idx];
    S[m * r + j] = static_cast<Acc>(sum);
  }
}

// One block row per x row, kLoraThreads column groups of four per block; dS[m, :] staged in
// shared memory (C values).
template <typename C>
LaunchGeometry lora_dx_geometry(int64_t M, int64_t K, int64_t r) {
  return {dim3(M, ceil_div(ceil_div(K, 4), kLoraThreads)), dim3(kLoraThreads), r * sizeof(C)};
}

// dx[m, k] = mult(m, k) · Σ_j dS[m, j]·A[j, k]. A (r×K, small) is read through the cache.
template <typename X, typename Acc, bool kDropout>
__global__ void __launch_bounds__(kLoraThreads)
    lora_dx_kernel(const Acc* __restrict__ dS, const Acc* __restrict__ A, X* __restrict__ dx,
                   int64_t K, int64_t r, DropoutParams params, const int64_t* __restrict__ seed) {
  using C = compute_t<Acc>;
  PEFTKERN_DYNAMIC_SHARED(C, dS_row);
  const DropoutParams d = with_seed(params, seed);
  const int64_t m = blockIdx.x;
  for (int64_t j = threadIdx.x; j < r; j += kLoraThreads) dS_row[j] = static_cast<C>(dS[m * r + j]);
  __syncthreads();

  const int64_t g = static_cast<int64_t>(blockIdx.y) * kLoraThreads + threadIdx.x;
  const int64_t k0 = 4 * g;
  if (k0 >= K) return;
  C sum[4] = {C(0), C(0), C(0), C(0)};
  for (int64_t j = 0; j < r; ++j) {
    const C s = dS_row[j];
    C a[4];
    load_group(A + j * K, k0, K, a);
#pragma unroll
    for (int l = 0; l < 4; ++l) sum[l] += s * a[l];
  }
  C mult[4];
  group_multipliers<C, kDropout>(d, m, g, mult);
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    if (k0 + l < K) dx[m * K + k0 + l] = static_cast<X>(mult[l] * sum[l]);
  }
}

// Row splits of dA: enough to fill the GPU (`sms` multiprocessors) a few times over, each
// reducing at least 64 rows. The launch is grid (column blocks, rank tiles, splits).
struct LoraDAGeometry {
  LaunchGeometry launch;
  int64_t splits;
  int64_t rows_per_split;
};

inline LoraDAGeometry lora_dA_geometry(int64_t M, int64_t K, int64_t r, int64_t sms) {
  const int64_t column_blocks = ceil_div(ceil_div(K, 4), kLoraThreads);
  const int64_t rank_tiles = ceil_div(r, kRankTile);
  int64_t splits = ceil_div(4 * sms, column_blocks * rank_tiles);
  if (splits > ceil_div(M, 64)) splits = ceil_div(M, 64);
  if (splits < 1) splits = 1;
  const int64_t rows_per_split = ceil_div(M, splits);
  return {{dim3(column_blocks, rank_tiles, splits), dim3(kLoraThreads), 0}, splits, rows_per_split};
}

// partial[split, j, k] = Σ_{m in split} dS[m, j]·drop(x)[m, k] for one rank tile.
template <typename X, typename Acc, bool kDropout>
__global__ void __launch_bounds__(kLoraThreads)
    lora_dA_kernel(const X* __restrict__ x, const Acc* __restrict__ dS,
                   compute_t<Acc>* __restrict__ partial, int64_t M, int64_t K, int64_t r,
                   int64_t rows_per_split, DropoutParams params, const int64_t* __restrict__ seed) {
  using C = compute_t<Acc>;
  const DropoutParams d = with_seed(params, seed);
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kLoraThreads + threadIdx.x;
  const int64_t k0 = 4 * g;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kRankTile;
  const int64_t split = blockIdx.z;
  const int64_t m_begin = split * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < M ? m_begin + rows_per_split : M;
  if (k0 >= K) return;

  C acc[kRankTile][4];
#pragma unroll
  for (int j = 0; j < kRankTile; ++j)
#pragma unroll
    for (int l = 0; l < 4; ++l) acc[j][l] = C(0);

  for (int64_t m = m_begin; m < m_end; ++m) {
    C xm[4];
    load_dropped_group<C, kDropout>(x, d, m, g, K, xm);
#pragma unroll
    for (int j = 0; j < kRankTile; ++j) {
      const C s = j0 + j < r ? static_cast<C>(dS[m * r + j0 + j]) : C(0);
#pragma unroll
      for (int l = 0; l < 4; ++l) acc[j][l] += s * xm[l];
    }
  }
#pragma unroll
  for (int j = 0; j < kRankTile; ++j) {
    if (j0 + j >= r) continue;
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (k0 + l < K) partial[(split * r + j0 + j) * K + k0 + l] = acc[j][l];
  }
}

}  // namespace peftkern::cuda
