// CPU side of the prefix attention: which kernel runs a call.
//   - Computed in float32 (float32, and half-precision inputs, which attention computes in
//     float32) with at least one query and one key: the flash kernel
//     (flash_attention_f32.h), prefix rows and sequence keys in one pass. This is the path of
//     training.
//   - Everything else (float64, inputs without a query or a key): the merge orchestration
//     (../prefix_attention.h) with the blockwise sequence part that the CUDA build uses
//     (../blockwise_attention.h), the row passes of attention_row_passes.h and their merge.
//     float64 is the dtype of the exact reference tests and gradcheck, so that orchestration
//     is verified on every machine, GPU or not.
// Both keep the op's contract (../prefix_attention_op.h): the same argument checks, the same
// form of results.
#include <torch/library.h>

#include <array>
#include <tuple>
#include <utility>

#include "../blockwise_attention.h"
#include "../prefix_attention.h"
#include "../prefix_attention_op.h"
#include "../tensor_utils.h"
#include "attention_row_passes.h"
#include "flash_attention_f32.h"

namespace peftkern::cpu {
namespace {

constexpr AttentionRowKernels kCpuRows{&attention_softmax_rows, &attention_probs_rows, 4 << 20};

std::tuple<at::Tensor, at::Tensor> sequence_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& mask,
                                                    bool causal, double scale) {
  return blockwise_attention_forward(kCpuRows, q, k, v, mask, causal, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& mask, const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    std::array<bool, 3> needed) {
  return blockwise_attention_backward(kCpuRows, grad_out, q, k, v, mask, out, lse, causal, scale,
                                      needed);
}

constexpr PrefixAttentionKernels kCpuMergeKernels{&sequence_forward, &sequence_backward,
                                                  &attention_merge_rows, kCpuRows};

// The flash kernel takes float32 with rows of d contiguous.
at::Tensor in_float(const at::Tensor& t) {
  return in_compute(t, at::kFloat);
}

std::tuple<at::Tensor, at::Tensor> prefix_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const c10::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale) {
  if (!flash_attention_f32_covers(q, k)) {
    return prefix_attention_forward(kCpuMergeKernels, q, k, v, prefix_k, prefix_v, key_padding_mask,
                                    causal, scale);
  }
  check_prefix_attention_args(q, k, v, prefix_k, prefix_v, key_padding_mask);
  auto [out, lse] = flash_attention_f32_forward(
      in_float(q), in_float(k), in_float(v), in_float(prefix_k), in_float(prefix_v),
      key_padding_mask_or_undefined(key_padding_mask), causal, scale);
  return {in_heads_layout(out, q), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
prefix_attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& prefix_k,
                              const at::Tensor& prefix_v,
                              const c10::optional<at::Tensor>& key_padding_mask,
                              const at::Tensor& out, const at::Tensor& lse, bool causal,
                              double scale, std::array<bool, 5> output_mask) {
  if (!flash_attention_f32_covers(q, k)) {
    return prefix_attention_backward(kCpuMergeKernels, grad_out, q, k, v, prefix_k, prefix_v,
                                     key_padding_mask, out, lse, causal, scale, output_mask);
  }
  const PrefixAttentionShape s = check_prefix_attention_backward_args(
      grad_out, q, k, v, prefix_k, prefix_v, key_padding_mask, out, lse);
  std::array<at::Tensor, 5> grads = flash_attention_f32_backward(
      in_float(grad_out), in_float(q), in_float(k), in_float(v), in_float(prefix_k),
      in_float(prefix_v), key_padding_mask_or_undefined(key_padding_mask), in_float(out),
      in_float(lse), causal, scale, output_mask);
  return prefix_attention_grads(s, q, k, v, prefix_k, prefix_v, std::move(grads), output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("prefix_attention", &prefix_attention_cpu);
  m.impl("prefix_attention_backward", &prefix_attention_backward_cpu);
}

}  // namespace peftkern::cpu
