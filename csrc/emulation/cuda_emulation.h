// A small emulation of the CUDA execution model on the CPU, so that the kernel bodies in
// csrc/cuda/kernels/*.cuh run in tests on machines without a GPU (see docs/cuda-emulation.md).
// It is compiled with the host compiler in place of the CUDA headers (csrc/cuda/portable.cuh
// picks one or the other); nothing of it is part of the peftkern extension.
//
// What it does:
//   - launch(): the blocks of the grid run one after another; the threads of a block run as
//     fibers on the calling thread, switched only at barriers and warp collectives, so a run
//     is deterministic and __syncthreads() is a real barrier. Warps run one at a time as far
//     as they go (up to a __syncthreads()), in increasing or decreasing order
//     (set_reverse_warp_order), so that a missing barrier shows as a stale shared read.
//   - gridDim / blockIdx / blockDim / threadIdx, __syncthreads, __syncwarp, __shfl_sync,
//     __shfl_up/down/xor_sync, __ballot_sync / __any_sync / __all_sync, atomicAdd.
//   - shared memory, declared with PEFTKERN_SHARED(type, name, [dims]) (static) and
//     PEFTKERN_DYNAMIC_SHARED(type, name) (dynamic) from portable.cuh: a heap allocation of
//     exactly its size per block and declaration, filled with 0xFF bytes (a NaN in every
//     floating type) as a GPU's shared memory holds garbage when a block starts, so a read
//     before the block's own write shows up and AddressSanitizer sees overruns. A plain
//     `__shared__` is a compile error here: as a function-local static it would keep the
//     previous block's values.
//
// What is an error (EmulationError, raised from launch()):
//   - threads of a block waiting at different barriers, or some at a barrier while others
//     have exited (a barrier inside divergent code);
//   - a warp collective whose mask is not the full warp, whose lanes are not all at the same
//     call, or in a block whose size is not a multiple of 32 (partial warps);
//   - a shuffle width other than 32.
// Atomics are plain read-modify-writes (fibers never switch inside one); their order across
// threads is the emulator's fixed order, not the GPU's.
#pragma once

// <math.h> as well: it puts the float overloads of exp, log... in the global namespace, where
// the kernels find them under nvcc.
#include <math.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>

namespace peftkern::emu {

class EmulationError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Where a barrier or collective is written in the source: threads meet only at the same one.
struct Site {
  const char* file;
  int line;
};

}  // namespace peftkern::emu

// The built-in types and variables, in the global namespace as in CUDA.
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
// Set by the scheduler before it switches to a thread. Plain globals: launch() holds a lock,
// so one emulated kernel runs at a time in the process.
inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

// Qualifiers: device code is ordinary host code here.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ \
  static_assert(false, "declare shared memory with PEFTKERN_SHARED (portable.cuh)");
#define PEFTKERN_SHARED(type, name, dims)             \
  type(&name) dims = *reinterpret_cast<type(*) dims>( \
      ::peftkern::emu::static_shared_memory(PEFTKERN_EMU_SITE, sizeof(type dims)))
#define PEFTKERN_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::peftkern::emu::dynamic_shared_memory())
#define PEFTKERN_EMU_SITE \
  ::peftkern::emu::Site { \
    __FILE__, __LINE__    \
  }

namespace peftkern::emu {

// ---- called by the macros below from inside a kernel ------------------------------------
void sync_threads(Site site);
// Blocks the calling lane until every lane of its warp has made the same call; returns the
// 8 bytes that lane `source` deposited (shuffles) or the warp's predicate bits (ballot).
enum class WarpOp { sync, shuffle, ballot };
uint64_t warp_collective(Site site, WarpOp op, unsigned mask, uint64_t value, int source);
unsigned char* dynamic_shared_memory();
// The running block's storage for the PEFTKERN_SHARED declaration at `site`.
unsigned char* static_shared_memory(Site site, size_t bytes);
void check_width(Site site, int width);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}
int lane_id();  // of the running thread: its linear index in the block, modulo 32

template <typename T>
T shfl(Site site, unsigned mask, T v, int source, int width = 32) {
  check_width(site, width);
  return from_bits<T>(warp_collective(site, WarpOp::shuffle, mask, to_bits(v), source & 31));
}
template <typename T>
T shfl_down(Site site, unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = lane_id(), source = lane + static_cast<int>(delta);
  return shfl(site, mask, v, source < 32 ? source : lane, width);
}
template <typename T>
T shfl_up(Site site, unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = lane_id(), source = lane - static_cast<int>(delta);
  return shfl(site, mask, v, source >= 0 ? source : lane, width);
}
template <typename T>
T shfl_xor(Site site, unsigned mask, T v, int lane_mask, int width = 32) {
  return shfl(site, mask, v, lane_id() ^ lane_mask, width);
}
// __syncwarp(mask = full): the macro can only append the site, so the mask comes second.
struct SyncWarp {
  Site site;
  void operator()(unsigned mask = 0xffffffffu) const {
    warp_collective(site, WarpOp::sync, mask, 0, lane_id());
  }
};
inline unsigned ballot(Site site, unsigned mask, int predicate) {
  return static_cast<unsigned>(
      warp_collective(site, WarpOp::ballot, mask, predicate != 0 ? 1 : 0, lane_id()));
}

// ---- the launch ------------------------------------------------------------------------
// The warps of a block run one at a time, each until all its lanes wait at __syncthreads() or
// have exited, in increasing order or (reverse) decreasing order. Running a test both ways
// makes a read of shared memory written by another warp without a barrier in between see the
// stale value whichever warp writes.
void set_reverse_warp_order(bool reverse);

// Runs body() once per thread of every block of the grid; dynamic_shared_bytes per block.
void run_grid(dim3 grid, dim3 block, size_t dynamic_shared_bytes,
              const std::function<void()>& body);

// The emulated `kernel<<<grid, block, shared_bytes>>>(args...)`.
template <typename Kernel, typename... Args>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t dynamic_shared_bytes, Args... args) {
  run_grid(grid, block, dynamic_shared_bytes, [&] { kernel(args...); });
}

}  // namespace peftkern::emu

#define __syncthreads() ::peftkern::emu::sync_threads(PEFTKERN_EMU_SITE)
#define __syncwarp(...) ::peftkern::emu::SyncWarp{PEFTKERN_EMU_SITE}(__VA_ARGS__)
#define __shfl_sync(...) ::peftkern::emu::shfl(PEFTKERN_EMU_SITE, __VA_ARGS__)
#define __shfl_down_sync(...) ::peftkern::emu::shfl_down(PEFTKERN_EMU_SITE, __VA_ARGS__)
#define __shfl_up_sync(...) ::peftkern::emu::shfl_up(PEFTKERN_EMU_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) ::peftkern::emu::shfl_xor(PEFTKERN_EMU_SITE, __VA_ARGS__)
#define __ballot_sync(mask, predicate) ::peftkern::emu::ballot(PEFTKERN_EMU_SITE, mask, predicate)
#define __any_sync(mask, predicate) (__ballot_sync(mask, predicate) != 0u)
#define __all_sync(mask, predicate) (__ballot_sync(mask, predicate) == (mask))

template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

// Intrinsics the kernels use, at the host's (correctly rounded or near) precision.
inline float __expf(float x) {
  return std::exp(x);
}
inline float __logf(float x) {
  return std::log(x);
}
inline float rsqrtf(float x) {
  return 1.0f / std::sqrt(x);
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
