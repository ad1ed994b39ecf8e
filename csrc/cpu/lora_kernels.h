// The CPU passes of the fused LoRA linear as a kernel table, for the ops built on LoRA
// (DoRA) that run the same passes with their own orchestration.
#pragma once

#include "../lora_linear.h"

namespace peftkern::cpu {

const LoraKernels& lora_kernels();

}  // namespace peftkern::cpu
