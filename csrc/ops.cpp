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
  // out = residual + scaling·s ⊙ (act(h·W_downᵀ + b_down)·W_upᵀ + b_up), s = scaling_vector
  // (a learned [d] vector) or 1, residual = h when None. activation: relu, gelu, gelu_tanh,
  // silu (swish), identity. Returns (out, Z) with Z = h·W_downᵀ + b_down ([rows, r]), which
  // autograd saves besides h.
  m.def(
      "bottleneck_adapter(Tensor h, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, "
      "str activation, float scaling, Tensor? scaling_vector, Tensor? residual) "
      "-> (Tensor, Tensor)");
  // Returns (dh, dw_down, db_down, dw_up, db_up, dscaling_vector) for output_mask in that
  // order; a gradient not asked for is an empty tensor. dh includes grad_out when
  // residual_is_h; a separate residual's gradient is grad_out itself.
  m.def(
      "bottleneck_adapter_backward(Tensor grad_out, Tensor h, Tensor w_down, Tensor w_up, "
      "Tensor? b_up, Tensor pre_activation, str activation, float scaling, "
      "Tensor? scaling_vector, bool residual_is_h, bool[6] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // softmax(q·[P_K; K]ᵀ·scale + mask)·[P_V; V] without building [P_K; K]. q [B, Hq, n, d];
  // k, v [B, Hkv, n, d] (Hq a multiple of Hkv); prefix_k, prefix_v [Hkv, m, d] (shared) or
  // [B, Hkv, m, d]; key_padding_mask [B, n] bool, True = keep (hides sequence keys only).
  // Returns (out, lse) with lse [B, Hq, n] in float32 (float64 for float64 q), which autograd
  // saves; a query that sees no key at all gets out = 0 and lse = -inf.
  m.def(
      "prefix_attention(Tensor q, Tensor k, Tensor v, Tensor prefix_k, Tensor prefix_v, "
      "Tensor? key_padding_mask, bool causal, float scale) -> (Tensor, Tensor)");
  // Returns (dq, dk, dv, dprefix_k, dprefix_v) for output_mask in that order; a gradient not
  // asked for is an empty tensor.
  m.def(
      "prefix_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
      "Tensor prefix_k, Tensor prefix_v, Tensor? key_padding_mask, Tensor out, Tensor lse, "
      "bool causal, float scale, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // cross_entropy(hidden·weightᵀ + bias, labels) in float32 (float64 for float64 hidden),
  // the logits optionally softcapped (cap·tanh(z/cap)) first, without materialising the
  // [rows, vocab] logits. reduction: mean, sum or none. Returns (loss, dhidden, dweight,
  // dbias): for mean and sum the loss's gradients (for an incoming gradient of 1), computed
  // in the same pass for grad_mask = [hidden, weight, bias]; empty tensors otherwise (and
  // always for none, whose backward recomputes).
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
      "int ignore_index, str reduction, float label_smoothing, float? softcap, bool[3] grad_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (dhidden, dweight, dbias) for output_mask, recomputing the logits chunk by chunk;
  // a gradient not asked for is an empty tensor.
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor labels, int ignore_index, str reduction, float label_smoothing, float? softcap, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // DoRA: y = x·Wᵀ + bias + (c − 1)⊙(drop(x)·Wᵀ) + c⊙scaling·(drop(x)·Aᵀ)·Bᵀ with
  // c = magnitude / ‖W + scaling·B·A‖ per output row (the norm a constant, as in peft).
  // weight_norm_sq is ‖W‖² per row in float32 (float64 for float64 x), cached by the caller
  // per weight version. Returns (y, S, z, weight_norm): S = drop(x)·Aᵀ, z = drop(x)·Wᵀ +
  // scaling·S·Bᵀ ([rows, out_features]) and the norm, which autograd saves.
  m.def(
      "dora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
      "Tensor magnitude, Tensor weight_norm_sq, float scaling, float dropout, Tensor? seed) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Returns (dx, dW, dbias, dA, dB, dmagnitude) for output_mask in that order; a gradient not
  // asked for is an empty tensor.
  m.def(
      "dora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, "
      "Tensor lora_B, Tensor magnitude, Tensor S, Tensor z, Tensor weight_norm, float scaling, "
      "float dropout, Tensor? seed, bool[6] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
