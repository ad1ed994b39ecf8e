// Kernels of the fused bottleneck adapter (launched by ../bottleneck_adapter.cu, run on the CPU
// by the emulated-CUDA tests): the elementwise work on the M×r bottleneck, between the GEMMs.
#pragma once

#include "../../activation.h"
#include "../common.cuh"

namespace peftkern::cuda {

constexpr int kAdapterThreads = 256;

// Enough blocks to fill the GPU (`sms` multiprocessors) a few times over for n elements; the
// grid-stride loops of the kernels cover the rest.
inline LaunchGeometry adapter_elementwise_geometry(int64_t n, int64_t sms) {
  int64_t blocks = ceil_div(n, kAdapterThreads);
  if (blocks > 8 * sms) blocks = 8 * sms;
  if (blocks < 1) blocks = 1;
  return {dim3(blocks), dim3(kAdapterThreads), 0};
}

// a[i, j] = scale·act(Z[i, j]) for j < r and scale for j == r (when width == r + 1).
template <typename T, Activation A>
__global__ void __launch_bounds__(kAdapterThreads)
    activate_kernel(const T* __restrict__ Z, T* __restrict__ a, int64_t rows, int64_t r,
                    int64_t width, compute_t<T> scale) {
  using C = compute_t<T>;
  const int64_t n = rows * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kAdapterThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kAdapterThreads + threadIdx.x; idx < n;
       idx += stride) {
    const int64_t i = idx / width, j = idx - i * width;
    a[idx] = static_cast<T>(j < r ? scale * activation_value<A, C>(static_cast<C>(Z[i * r + j]))
                                  : scale);
  }
}

// dA[i, j] *= scale·act'(Z[i, j]) and, with kWithA, a as in activate_kernel (Z read once
// for both).
template <typename T, Activation A, bool kWithA>
__global__ void __launch_bounds__(kAdapterThreads)
    activate_backward_kernel(const T* __restrict__ Z, T* __restrict__ dA, T* __restrict__ a,
                             int64_t rows, int64_t r, int64_t width, compute_t<T> scale) {
  using C = compute_t<T>;
  const int64_t n = rows * width;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kAdapterThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kAdapterThreads + threadIdx.x; idx < n;
       idx += stride) {
    const int64_t i = idx / width, j = idx - i * width;
    if (j < r) {
      const int64_t zi = i * r + j;
      const C z = static_cast<C>(Z[zi]);
      dA[zi] = static_cast<T>(scale * static_cast<C>(dA[zi]) * activation_derivative<A, C>(z));
      if constexpr (kWithA) a[idx] = static_cast<T>(scale * activation_value<A, C>(z));
    } else if constexpr (kWithA) {
      a[idx] = static_cast<T>(scale);
    }
  }
}

}  // namespace peftkern::cuda
