// The x86 vector ISA the CPU row kernels run with, detected once per process.
#pragma once

namespace peftkern::cpu {

enum class Isa { avx512, avx2, baseline };

Isa selected_isa();
const char* isa_name(Isa isa);

}  // namespace peftkern::cpu
