// What this build of peftkern contains, for `peftkern.build_info()` and `peftkern info`.
#pragma once

#include <string>

namespace peftkern {

struct BuildInfo {
  std::string version;        // peftkern's version
  std::string torch_version;  // the torch headers it was compiled against (major.minor.patch)
  bool cuda;                  // whether CUDA kernels were compiled in
  std::string cuda_version;   // the CUDA toolkit it was compiled with, or ""
  std::string cuda_archs;     // the architectures compiled, e.g. "8.0;9.0+PTX", or ""
  std::string cpu_isa;        // the vector ISA the CPU kernels run with on this machine
  bool cpu_parallel;          // whether the CPU kernels' at::parallel_for uses torch's threads
};

BuildInfo build_info();

}  // namespace peftkern
