// Small kernels that pin down the emulator itself (tests/test_emulated_cuda.py): the results
// of each warp operation, and the errors it must raise for code a GPU would not run as meant.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <vector>

#include "cuda_emulation.h"

namespace peftkern::emu {
namespace {

// Per thread of one 64-thread block: the value of each warp operation, 8 per thread:
// shfl (lane 3's), shfl_up 1, shfl_down 1, shfl_xor 5, ballot(odd lane), any(lane == 7),
// all(lane < 32), and atomicAdd's return on a block-wide counter.
__global__ void warp_operations_kernel(int* out, int* counter) {
  const int t = static_cast<int>(threadIdx.x), lane = t % 32;
  int* o = out + 8 * t;
  o[0] = __shfl_sync(0xffffffffu, t, 3);
  o[1] = __shfl_up_sync(0xffffffffu, t, 1);
  o[2] = __shfl_down_sync(0xffffffffu, t, 1);
  o[3] = __shfl_xor_sync(0xffffffffu, t, 5);
  o[4] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 2 == 1));
  o[5] = __any_sync(0xffffffffu, lane == 7);
  o[6] = __all_sync(0xffffffffu, lane < 32);
  __syncwarp();
  o[7] = atomicAdd(counter, 1);
}

std::vector<int> warp_operations() {
  std::vector<int> out(64 * 8, -1);
  int counter = 0;
  launch(warp_operations_kernel, dim3(1), dim3(64), 0, out.data(), &counter);
  return out;
}

// Thread 0 skips the barrier that the others wait at (a barrier in divergent code).
__global__ void exit_before_barrier_kernel() {
  if (threadIdx.x == 0) return;
  __syncthreads();
}

// Even and odd warps wait at two different barriers.
__global__ void divergent_barriers_kernel() {
  if ((threadIdx.x / 32) % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

// A shuffle over half a warp.
__global__ void partial_mask_kernel(float* out) {
  if (threadIdx.x % 32 < 16) out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, 1.0f, 1);
}

// A full-warp shuffle in a block of 48 threads: its second warp has 16 lanes.
__global__ void partial_warp_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// Reads shared memory that the other warps write without a barrier in between.
__global__ void missing_barrier_kernel(float* out) {
  PEFTKERN_SHARED(float, values, [64]);
  values[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncwarp();
  out[threadIdx.x] = values[63 - threadIdx.x];
}

void run_broken(const std::string& name) {
  std::vector<float> out(64);
  if (name == "exit_before_barrier") launch(exit_before_barrier_kernel, dim3(2), dim3(64), 0);
  if (name == "divergent_barriers") launch(divergent_barriers_kernel, dim3(1), dim3(64), 0);
  if (name == "partial_mask") launch(partial_mask_kernel, dim3(1), dim3(32), 0, out.data());
  if (name == "partial_warp") launch(partial_warp_kernel, dim3(1), dim3(48), 0, out.data());
}

std::vector<float> missing_barrier() {
  std::vector<float> out(64, -1.0f);
  launch(missing_barrier_kernel, dim3(1), dim3(64), 0, out.data());
  return out;
}

}  // namespace

void register_emulator_checks(pybind11::module& m) {
  m.def("warp_operations", &warp_operations);
  m.def("run_broken", &run_broken);
  m.def("missing_barrier", &missing_barrier);
  m.def("set_reverse_warp_order", &set_reverse_warp_order);
}

}  // namespace peftkern::emu
