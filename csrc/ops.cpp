// Every peftkern op schema, in one place. Kernels register per device in cpu/ and cuda/;
// fake (meta) kernels and autograd are registered from Python (peftkern/ops.py).
#include <torch/library.h>

TORCH_LIBRARY(peftkern, m) {
  // y = x·Wᵀ + bias + scaling·(drop(x)·Aᵀ)·Bᵀ. Returns (y, S) with S = drop(x)·Aᵀ, which
  // autograd saves. `seed` (one int64, on x's device) keys the dropout mask; None when
  // dropout == 0.
  m.def(
      "lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "float scaling, float dropout, Tensor? seed) -> (Tensor, Tensor)");
  // Returns (dx, dW, dbias, dA, dB) for output_mask = [x, weight, bias, lora_A, lora_B];
  // a gradient not asked for is an empty tensor.
  m.def(
      "lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, "
      "Tensor lora_B, Tensor S, float scaling, float dropout, Tensor? seed, "
      "bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
