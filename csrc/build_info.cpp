#include "build_info.h"

#include <ATen/Config.h>
#include <torch/version.h>

#include "cpu/isa.h"

#if defined(PEFTKERN_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#ifndef PEFTKERN_VERSION
#define PEFTKERN_VERSION "0.0.0+unknown"
#endif
#ifndef PEFTKERN_CUDA_ARCHS
#define PEFTKERN_CUDA_ARCHS ""
#endif

namespace peftkern {

BuildInfo build_info() {
  BuildInfo info;
  info.version = PEFTKERN_VERSION;
  info.torch_version = std::to_string(TORCH_VERSION_MAJOR) + "." +
                       std::to_string(TORCH_VERSION_MINOR) + "." +
                       std::to_string(TORCH_VERSION_PATCH);
#if defined(PEFTKERN_WITH_CUDA)
  info.cuda = true;
  info.cuda_version =
      std::to_string(CUDART_VERSION / 1000) + "." + std::to_string((CUDART_VERSION % 1000) / 10);
  info.cuda_archs = PEFTKERN_CUDA_ARCHS;
#else
  info.cuda = false;
#endif
  info.cpu_isa = cpu::isa_name(cpu::selected_isa());
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
  // ATen's OpenMP parallel_for is inlined into this binary; without OpenMP it runs serially.
  info.cpu_parallel = false;
#else
  info.cpu_parallel = true;
#endif
  return info;
}

}  // namespace peftkern
