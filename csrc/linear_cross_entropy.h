// Fused linear + cross-entropy: the loss of softmax(hidden·Wᵀ + b) against labels, without
// the [rows, vocab] logits ever existing whole.
//
// The rows of hidden are taken in chunks. Each chunk's logits come from one GEMM (in the
// inputs' dtype, exactly as F.linear makes them), a row pass turns them into per-row losses
// and, in place, into the loss's gradient with respect to those logits, and two more GEMMs
// multiply that gradient straight into dhidden and (only when the head trains) dW. Only the
// GEMMs and one chunk's logits are device work of any size, so the orchestration is written
// once with ATen calls; a device supplies the row pass. The generic row pass below is made of
// ATen ops and runs on any device: the CUDA build uses it, and the CPU tests run it too.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <tuple>

namespace peftkern {

enum class CrossEntropyReduction { none, mean, sum };

// What the row pass needs besides the data. softcap == 0 means no softcap.
struct CrossEntropyParams {
  int64_t ignore_index;
  double label_smoothing;
  double softcap;
};

struct LinearCrossEntropyKernels {
  // For z [rows, V] (contiguous, float32, or float64 for float64 inputs) holding a chunk's
  // logits and labels [rows] (int64): writes loss[i] = lse_i - (1-ε)·z_iy - (ε/V)·Σ_j z_ij
  // (0 for an ignored row; z softcapped first when softcap > 0). When row_scale [rows] is
  // defined, z is overwritten with row_scale_i · ∂loss_i/∂(logits before the softcap)_ij
  // (0 for an ignored row).
  void (*rows_pass)(at::Tensor& z, const at::Tensor& labels, const at::Tensor& row_scale,
                    at::Tensor& loss, const CrossEntropyParams& params);
  // How many logits (rows × V) one chunk may hold: large enough for efficient GEMMs, small
  // enough that a chunk is a small fraction of what the unfused logits would take.
  int64_t max_chunk_elements;
};

// The row pass written with ATen ops: the CUDA path, and a CPU test of that path.
void generic_rows_pass(at::Tensor& z, const at::Tensor& labels, const at::Tensor& row_scale,
                       at::Tensor& loss, const CrossEntropyParams& params);

// Returns (loss, dhidden, dweight, dbias). loss is a scalar for mean/sum and labels' shape for
// none, float32 (float64 for float64 inputs). For mean and sum, the gradients of that loss
// (for a gradient of 1) are computed in the same pass where grad_mask asks for them, since
// a scalar loss's incoming gradient only scales them; otherwise they are empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward(
    const LinearCrossEntropyKernels& kernels, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t ignore_index,
    c10::string_view reduction, double label_smoothing, c10::optional<double> softcap,
    std::array<bool, 3> grad_mask);

// Returns (dhidden, dweight, dbias) for output_mask, recomputing the logits chunk by chunk;
// grad_loss has the loss's shape. A gradient not asked for is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const LinearCrossEntropyKernels& kernels, const at::Tensor& grad_loss, const at::Tensor& hidden,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
    int64_t ignore_index, c10::string_view reduction, double label_smoothing,
    c10::optional<double> softcap, std::array<bool, 3> output_mask);

}  // namespace peftkern
