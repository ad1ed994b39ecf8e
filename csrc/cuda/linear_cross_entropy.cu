// CUDA kernels of the fused linear + cross-entropy: the device-agnostic chunk loop
// (../linear_cross_entropy.cpp) with the generic row pass made of ATen ops, so every launch
// is an ATen kernel on the current stream and the GEMMs go to cuBLAS. This file has been
// compiled but never run on a GPU; the same chunk loop and row pass run in the CPU tests
// (PEFTKERN_CE_GENERIC_ROWS=1).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../linear_cross_entropy.h"

namespace peftkern::cuda {
namespace {

// 64M logits: 256 MB of float32 per chunk (512 rows at V = 128k), the size at which the
// [rows, H] × [H, V] GEMMs reach cuBLAS's full speed while the chunk stays far below the
// unfused logits (16k × 128k). The generic row pass holds about three chunk-sized temporaries.
constexpr int64_t kMaxChunkElements = int64_t{64} << 20;

constexpr LinearCrossEntropyKernels kCudaKernels{&generic_rows_pass, kMaxChunkElements};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cuda(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, c10::string_view reduction,
    double label_smoothing, c10::optional<double> softcap, std::array<bool, 3> grad_mask) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_cross_entropy_forward(kCudaKernels, hidden, weight, bias, labels, ignore_index,
                                      reduction, label_smoothing, softcap, grad_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cuda(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t ignore_index,
    c10::string_view reduction, double label_smoothing, c10::optional<double> softcap,
    std::array<bool, 3> output_mask) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  return linear_cross_entropy_backward(kCudaKernels, grad_loss, hidden, weight, bias, labels,
                                       ignore_index, reduction, label_smoothing, softcap,
                                       output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftkern, CUDA, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_cuda);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_cuda);
}

}  // namespace peftkern::cuda
