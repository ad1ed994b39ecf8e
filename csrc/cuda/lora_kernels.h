// The CUDA passes of the fused LoRA linear as a kernel table, for the ops built on LoRA
// (DoRA) that run the same passes with their own orchestration.
#pragma once

#include "../lora_linear.h"

namespace peftkern::cuda {

const LoraKernels& lora_kernels();

}  // namespace peftkern::cuda
