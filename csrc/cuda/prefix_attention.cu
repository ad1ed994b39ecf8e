// CUDA side of the prefix attention. The sequence part is the blockwise attention
// (../blockwise_attention.h): its GEMMs run in cuBLAS through ATen, and the kernels of
// kernels/prefix_attention.cuh are the passes between them (softmax and probabilities of the
// score rows), plus the log-sum-exp merge of the sequence and prefix parts.
// Where ATen's FlashAttention-2 covers the sequence part (half precision, no padding mask; see
// flash_covers) it runs there instead; the blockwise path is exact for every other case.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../blockwise_attention.h"
#include "../prefix_attention.h"
#include "../tensor_utils.h"
#include "kernels/prefix_attention.cuh"

namespace peftkern::cuda {
namespace {

const bool* keep_ptr(const at::Tensor& mask) {
  return mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
}

void softmax_rows(at::Tensor& scores, at::Tensor& lse, const at::Tensor& mask,
                  const AttentionBlock& b) {
  const int64_t rows = scores.size(0) * scores.size(1);
  if (rows == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "peftkern_prefix_softmax", [&] {
    const LaunchGeometry g = score_rows_geometry(rows);
    softmax_rows_kernel<scalar_t><<<g.grid, g.block, g.shared_bytes, stream>>>(
        scores.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), keep_ptr(mask), scores.size(1),
        scores.size(2), b);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void probs_rows(at::Tensor& scores, const at::Tensor& lse, const at::Tensor& mask,
                const AttentionBlock& b) {
  const int64_t rows = scores.size(0) * scores.size(1);
  if (rows == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "peftkern_prefix_probs", [&] {
    const LaunchGeometry g = score_rows_geometry(rows);
    probs_rows_kernel<scalar_t><<<g.grid, g.block, g.shared_bytes, stream>>>(
        scores.data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(), keep_ptr(mask), scores.size(1),
        scores.size(2), b);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void merge(at::Tensor& out, at::Tensor& lse, const at::Tensor& o2, const at::Tensor& lse2) {
  const int64_t rows = lse.numel();
  if (rows == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "peftkern_prefix_merge", [&] {
    const LaunchGeometry g = merge_geometry(rows);
    merge_kernel<scalar_t><<<g.grid, g.block, g.shared_bytes, stream>>>(
        out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), o2.const_data_ptr<scalar_t>(),
        lse2.const_data_ptr<scalar_t>(), out.size(-1));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 256 MiB of scores per block: few enough launches for long sequences, and bounded so that a
// 32k-token sequence never needs its n² scores at once.
constexpr AttentionRowKernels kCudaRows{&softmax_rows, &probs_rows, 256 << 20};

// Whether ATen's FlashAttention-2 kernels run the sequence part: half-precision inputs without
// a padding mask (FlashAttention takes none), head dims every GPU generation trains with
// (multiples of 8 up to 128), Ampere or newer, and flash SDPA not switched off by the user
// (torch.backends.cuda.enable_flash_sdp). They take grouped-query heads as they are, return
// the lse the merge needs, and their backward accepts an external (out, lse): the merged
// attention's, which is exactly what the sequence part's backward needs. Causal alignment is
// moot for the sequence part (as many queries as keys).
bool flash_covers(const at::Tensor& q, const at::Tensor& k, const at::Tensor& mask) {
  const auto type = q.scalar_type();
  if (type != at::kHalf && type != at::kBFloat16) return false;
  if (mask.defined() || q.numel() == 0 || k.numel() == 0) return false;
  const int64_t d = q.size(3);
  if (d % 8 != 0 || d > 128) return false;
  if (!at::globalContext().userEnabledFlashSDP()) return false;
  return at::cuda::getCurrentDeviceProperties()->major >= 8;
}

std::tuple<at::Tensor, at::Tensor> sequence_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& v, const at::Tensor& mask,
                                                    bool causal, double scale) {
  if (flash_covers(q, k, mask)) {
    const auto type = q.scalar_type();
    auto result = at::_scaled_dot_product_flash_attention(
        in_compute(q, type), in_compute(k, type), in_compute(v, type), /*dropout_p=*/0.0, causal,
        /*return_debug_mask=*/false, scale);
    return {std::get<0>(result), std::get<1>(result)};
  }
  return blockwise_attention_forward(kCudaRows, q, k, v, mask, causal, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sequence_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& mask, const at::Tensor& out, const at::Tensor& lse, bool causal, double scale,
    std::array<bool, 3> needed) {
  if (flash_covers(q, k, mask)) {
    const auto type = q.scalar_type();
    const int64_t n = q.size(2);
    // Without dropout the kernel reads neither the cumulative lengths (dense inputs) nor the
    // RNG state, so they are passed undefined.
    auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_backward(
        in_compute(grad_out, type), in_compute(q, type), in_compute(k, type), in_compute(v, type),
        in_compute(out, type), lse.contiguous(), /*cum_seq_q=*/at::Tensor(),
        /*cum_seq_k=*/at::Tensor(), /*max_q=*/n, /*max_k=*/n, /*dropout_p=*/0.0, causal,
        /*philox_seed=*/at::Tensor(), /*philox_offset=*/at::Tensor(), scale);
    return {dq, dk, dv};
  }
  return blockwise_attention_backward(kCudaRows, grad_out, q, k, v, mask, out, lse, causal, scale,
                                      needed);
}

// Every call runs the merge orchestration: FlashAttention (or the blockwise path) for the
// sequence, the prefix as batched GEMMs and the row passes above, then the merge.
constexpr PrefixAttentionKernels kCudaKernels{&sequence_forward, &sequence_backward, &merge,
                                              kCudaRows};

std::tuple<at::Tensor, at::Tensor> prefix_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& prefix_k,
    const at::Tensor& prefix_v, const c10::optional<at::Tensor>& key_padding_mask, bool causal,
    double scale) {
  const c10::cuda::CUDAGuard guard(q.device());
  return prefix_attention_forward(kCudaKernels, q, k, v, prefix_k, prefix_v, key_padding_mask,
                                  causal, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
prefix_attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& prefix_k,
                               const at::Tensor& prefix_v,
                               const c10::optional<at::Tensor>& key_padding_mask,
                               const at::Tensor& out, const at::Tensor& lse, bool causal,
                               double scale, std::array<bool, 5> output_mask) {
  const c10::cuda::CUDAGuard guard(q.device());
  return prefix_attention_backward(kCudaKernels, grad_out, q, k, v, prefix_k, prefix_v,
                                   key_padding_mask, out, lse, causal, scale, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftkern, CUDA, m) {
  m.impl("prefix_attention", &prefix_attention_cuda);
  m.impl("prefix_attention_backward", &prefix_attention_backward_cuda);
}

}  // namespace peftkern::cuda
