// The one include of every kernel header (kernels/*.cuh): the real CUDA built-ins under nvcc,
// the CPU emulation of them (../emulation/cuda_emulation.h) under the host compiler, so that
// the same kernel source is launched on GPUs and run on the CPU in tests.
//
// Kernel code written against this header uses only what both sides provide (the list is in
// docs/cuda-emulation.md), and declares shared memory with the two macros below, which the
// emulation gives fresh storage per block:
//   PEFTKERN_SHARED(float, partial, [4][64]);   // __shared__ float partial[4][64];
//   PEFTKERN_DYNAMIC_SHARED(float, row);        // extern __shared__ float row[];
#pragma once

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define PEFTKERN_SHARED(type, name, dims) __shared__ type name dims
#define PEFTKERN_DYNAMIC_SHARED(type, name)                     \
  extern __shared__ __align__(16) unsigned char name##_bytes[]; \
  type* name = reinterpret_cast<type*>(name##_bytes)
#else
#include "../emulation/cuda_emulation.h"
#endif
