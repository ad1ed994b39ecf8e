// Helpers shared by the kernel headers: the compute type, the launch geometry and the masked
// load of a group of four columns that the row kernels use.
#pragma once

#include <c10/macros/Macros.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "portable.cuh"

namespace peftkern::cuda {

// Arithmetic type of a kernel over T: double for double, float for float and half types.
template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

C10_HOST_DEVICE constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// How a kernel is launched: kernel<<<grid, block, shared_bytes, stream>>>. Each kernel header
// has a function returning this for its kernel, used by the real launch and by the emulated one.
struct LaunchGeometry {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
};

// out[l] = row[k0 + l] for the columns k0 + l < K of the group, 0 past the end of the row.
template <typename C, typename T>
__device__ __forceinline__ void load_group(const T* __restrict__ row, int64_t k0, int64_t K,
                                           C (&out)[4]) {
#pragma unroll
  for (int l = 0; l < 4; ++l) out[l] = k0 + l < K ? static_cast<C>(row[k0 + l]) : C(0);
}

}  // namespace peftkern::cuda
