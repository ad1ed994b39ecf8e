// The Python module peftkern._C. Tensor ops go through the dispatcher (ops.cpp); this module
// only carries the non-tensor helpers.
#include <torch/extension.h>

#include "build_info.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "peftkern native extension";
  m.def("build_info", [] {
    const auto info = peftkern::build_info();
    pybind11::dict d;
    d["version"] = info.version;
    d["torch_version"] = info.torch_version;
    d["cuda"] = info.cuda;
    d["cuda_version"] = info.cuda_version;
    d["cuda_archs"] = info.cuda_archs;
    d["cpu_isa"] = info.cpu_isa;
    d["cpu_parallel"] = info.cpu_parallel;
    return d;
  });
}
