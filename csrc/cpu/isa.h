// The x86 vector ISA the CPU row kernels run with, detected once per process (the environment
// variable PEFTKERN_CPU_ISA may ask for a lesser one, see isa.cpp).
#pragma once

namespace peftkern::cpu {

// From the most capable to the least.
enum class Isa { avx512, avx2, baseline };

Isa selected_isa();
const char* isa_name(Isa isa);

}  // namespace peftkern::cpu
