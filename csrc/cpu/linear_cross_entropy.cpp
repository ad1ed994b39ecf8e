// CPU kernels of the fused linear + cross-entropy: the device-agnostic chunk loop
// (../linear_cross_entropy.cpp) with a fused row pass. The GEMMs run on all threads through
// the BLAS; the row pass is one parallel region over the chunk's rows, each row read three
// times while it sits in the cache (cross_entropy_rows_impl.h) instead of the half-dozen
// full passes over the logits that log_softmax, nll_loss and their backward make.
//
// PEFTKERN_CE_GENERIC_ROWS=1 in the environment swaps in the generic ATen row pass that the
// CUDA build uses, so that the tests run that path on the CPU; it is a test switch, not a
// tuning knob.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "../linear_cross_entropy.h"
#include "dtype.h"
#include "fast_math.h"
#include "isa.h"

namespace peftkern::cpu {

#define PEFTKERN_ISA_IMPL "cross_entropy_rows_impl.h"
#include "isa_variants.h"
#undef PEFTKERN_ISA_IMPL

namespace {

// 8M logits: 32 MB of float32 per chunk (256 rows at V = 32k), enough rows for the BLAS to
// run at full speed and a sixteenth of the logits of M = 4096 rows.
constexpr int64_t kMaxChunkElements = int64_t{8} << 20;

void run_rows(Dtype dtype, void* z, const int64_t* labels, const void* row_scale, void* loss,
              int64_t rows, int64_t V, int64_t ignore_index, double eps, double cap) {
  PEFTKERN_ISA_DISPATCH(
      cross_entropy_rows_impl(dtype, z, labels, row_scale, loss, rows, V, ignore_index, eps, cap));
}

void fused_rows_pass(at::Tensor& z, const at::Tensor& labels, const at::Tensor& row_scale,
                     at::Tensor& loss, const CrossEntropyParams& params) {
  const int64_t rows = z.size(0), V = z.size(1);
  const bool f64 = z.scalar_type() == at::kDouble;
  const int64_t element = f64 ? 8 : 4;
  auto* z_data = static_cast<char*>(z.data_ptr());
  auto* loss_data = static_cast<char*>(loss.data_ptr());
  const int64_t* label_data = labels.data_ptr<int64_t>();
  const char* scale_data =
      row_scale.defined() ? static_cast<const char*>(row_scale.data_ptr()) : nullptr;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    run_rows(f64 ? Dtype::f64 : Dtype::f32, z_data + begin * V * element, label_data + begin,
             scale_data != nullptr ? scale_data + begin * element : nullptr,
             loss_data + begin * element, end - begin, V, params.ignore_index,
             params.label_smoothing, params.softcap);
  });
}

const LinearCrossEntropyKernels& cpu_kernels() {
  static const LinearCrossEntropyKernels fused{&fused_rows_pass, kMaxChunkElements};
  static const LinearCrossEntropyKernels generic{&generic_rows_pass, kMaxChunkElements};
  const char* flag = std::getenv("PEFTKERN_CE_GENERIC_ROWS");
  return flag != nullptr && std::strcmp(flag, "1") == 0 ? generic : fused;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cpu(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& labels, int64_t ignore_index, c10::string_view reduction,
    double label_smoothing, c10::optional<double> softcap, std::array<bool, 3> grad_mask) {
  return linear_cross_entropy_forward(cpu_kernels(), hidden, weight, bias, labels, ignore_index,
                                      reduction, label_smoothing, softcap, grad_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward_cpu(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t ignore_index,
    c10::string_view reduction, double label_smoothing, c10::optional<double> softcap,
    std::array<bool, 3> output_mask) {
  return linear_cross_entropy_backward(cpu_kernels(), grad_loss, hidden, weight, bias, labels,
                                       ignore_index, reduction, label_smoothing, softcap,
                                       output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_cpu);
  m.impl("linear_cross_entropy_backward", &linear_cross_entropy_backward_cpu);
}

}  // namespace peftkern::cpu
