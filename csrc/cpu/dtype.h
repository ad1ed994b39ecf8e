// The dtypes the CPU row kernels are instantiated for, without pulling ATen into the
// ISA-specific translation units.
#pragma once

namespace peftkern::cpu {

enum class Dtype { f32, f64, f16, bf16 };

}  // namespace peftkern::cpu
