// The row passes of the merge orchestration (../prefix_attention.h) on the CPU: plain loops
// over std::exp in any floating dtype. They run where the float32 flash kernel does not
// (float64, and inputs without a query or a key): float64 is the dtype of the exact reference
// tests and gradcheck, where exactness matters more than speed, and the prefix softmax rows
// are only m long.
#pragma once

#include <ATen/ATen.h>

#include "../blockwise_attention.h"

namespace peftkern::cpu {

// AttentionRowKernels::softmax_rows and probs_rows (../blockwise_attention.h), on all threads.
void attention_softmax_rows(at::Tensor& scores, at::Tensor& lse, const at::Tensor& mask,
                            const AttentionBlock& block);
void attention_probs_rows(at::Tensor& scores, const at::Tensor& lse, const at::Tensor& mask,
                          const AttentionBlock& block);

// PrefixAttentionKernels::merge (../prefix_attention.h), on all threads.
void attention_merge_rows(at::Tensor& out, at::Tensor& lse, const at::Tensor& o2,
                          const at::Tensor& lse2);

}  // namespace peftkern::cpu
