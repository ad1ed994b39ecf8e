#include "isa.h"

#include "isa_variants.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <string>

namespace peftkern::cpu {
namespace {

Isa detect_isa() {
#ifdef PEFTKERN_X86_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("bmi2")) {
    return Isa::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::baseline;
}

// PEFTKERN_CPU_ISA=avx2 or =baseline selects a lesser variant than the CPU supports (never a
// greater one): how the tests run every variant on one machine, and a way around a variant
// that misbehaves somewhere.
Isa requested_isa(Isa detected) {
  const char* name = std::getenv("PEFTKERN_CPU_ISA");
  if (name == nullptr || *name == '\0') return detected;
  const std::string requested(name);
  for (Isa isa : {Isa::avx512, Isa::avx2, Isa::baseline}) {
    // The enumerators run from the most capable to the least: max is the lesser of the two.
    if (requested == isa_name(isa)) return std::max(isa, detected);
  }
  TORCH_CHECK(false, "peftkern: PEFTKERN_CPU_ISA must be avx512, avx2 or baseline, got '",
              requested, "'");
}

}  // namespace

Isa selected_isa() {
  static const Isa selected = requested_isa(detect_isa());
  return selected;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx2:
      return "avx2";
    default:
      return "baseline";
  }
}

}  // namespace peftkern::cpu
