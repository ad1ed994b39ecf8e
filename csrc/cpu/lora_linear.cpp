// CPU passes of the fused LoRA linear.
//
// The rank-r projections are GEMMs with a tiny inner or outer dimension, which the vendor BLAS
// runs near peak when it can read its operands directly. When dropout or a dtype conversion
// stands between x and the GEMM, x is processed in row chunks: each chunk is masked and
// converted by the vectorised row kernels into a workspace small enough to stay in the L2
// cache, and the BLAS consumes it right away. The masked x therefore never exists in full,
// and the mask itself is never stored: backward regenerates it from the seed.
#include <torch/library.h>

#include <array>

#include "../lora_linear.h"
#include "dropout_rows.h"
#include "rows.h"

namespace peftkern::cpu {
namespace {

constexpr int64_t kWorkspaceBytes = 1 << 20;  // per chunk; fits the L2 of current x86 cores
constexpr int64_t kMinChunkRows = 16;

c10::optional<DropoutParams> dropout_params(double dropout,
                                            const c10::optional<at::Tensor>& seed) {
  if (dropout == 0.0) return c10::nullopt;
  const int64_t seed_value = seed->contiguous().data_ptr<int64_t>()[0];
  return DropoutParams::make(static_cast<uint64_t>(seed_value), dropout);
}

int64_t chunk_rows(int64_t M, int64_t K, int64_t element_size) {
  const int64_t rows = std::max(kMinChunkRows, kWorkspaceBytes / std::max<int64_t>(1, K * element_size));
  return std::max<int64_t>(1, std::min(rows, M));
}

// A [rows, K] chunk workspace, one of two per calling thread, kept between calls. Allocating
// them afresh on every call made the allocator hand back pages the kernel had to fault in
// again: about 300 page faults per LoRA layer step at M = 1024, K = N = 512 (a frozen
// nn.Linear step has none). The memory held is two chunks (at most 2 MiB) per thread that
// runs the op; the contents never outlive one call.
at::Tensor chunk_workspace(int slot, int64_t rows, int64_t K, const at::TensorOptions& options) {
  thread_local std::array<at::Tensor, 2> buffers;
  at::Tensor& buffer = buffers[slot];
  const int64_t numel = rows * K;
  if (!buffer.defined() || buffer.numel() < numel || buffer.scalar_type() != options.dtype()) {
    buffer = at::empty({numel}, options);
  }
  return buffer.narrow(0, 0, numel).view({rows, K});
}

at::Tensor down_project(const at::Tensor& x, const at::Tensor& lora_A, double dropout,
                        const c10::optional<at::Tensor>& seed) {
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  at::Tensor S = at::empty({M, r}, lora_A.options());
  if (M == 0) return S;
  const auto d = dropout_params(dropout, seed);
  const int64_t chunk = chunk_rows(M, K, lora_A.element_size());
  at::Tensor workspace = chunk_workspace(0, chunk, K, lora_A.options());
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t rows = std::min(chunk, M - m0);
    parallel_rows(rows, K, [&](int64_t first, int64_t count) {
      drop_convert_rows(dtype_of(x), dtype_of(lora_A), row_ptr(x, m0 + first),
                        row_ptr(workspace, first), count, K, m0 + first, d ? &*d : nullptr);
    });
    at::Tensor S_rows = S.narrow(0, m0, rows);
    at::mm_out(S_rows, workspace.narrow(0, 0, rows), lora_A.t());
  }
  return S;
}

void down_project_backward(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& dS,
                           double dropout, const c10::optional<at::Tensor>& seed, at::Tensor& dA,
                           at::Tensor& dx) {
  const int64_t M = x.size(0), K = x.size(1);
  if (M == 0) return;
  const auto d = dropout_params(dropout, seed);
  const int64_t chunk = chunk_rows(M, K, lora_A.element_size());
  // lora_term holds dS·A for the chunk (written to dx under the mask); masked_x holds drop(x)
  // for the chunk (consumed by the dA GEMM).
  at::Tensor lora_term = dx.defined() ? chunk_workspace(0, chunk, K, lora_A.options()) : at::Tensor();
  at::Tensor masked_x = dA.defined() ? chunk_workspace(1, chunk, K, lora_A.options()) : at::Tensor();
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t rows = std::min(chunk, M - m0);
    const at::Tensor dS_rows = dS.narrow(0, m0, rows);
    if (dx.defined()) {
      at::Tensor term_rows = lora_term.narrow(0, 0, rows);
      at::mm_out(term_rows, dS_rows, lora_A);
    }
    parallel_rows(rows, K, [&](int64_t first, int64_t count) {
      drop_backward_rows(dtype_of(x), dtype_of(lora_A), row_ptr(x, m0 + first),
                         row_ptr(dx, m0 + first), row_ptr(lora_term, first),
                         row_ptr(masked_x, first), count, K,
                         m0 + first, d ? &*d : nullptr);
    });
    if (dA.defined()) dA.addmm_(dS_rows.t(), masked_x.narrow(0, 0, rows));
  }
}

constexpr LoraKernels kCpuKernels{&down_project, &down_project_backward};

std::tuple<at::Tensor, at::Tensor> lora_linear_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout,
    const c10::optional<at::Tensor>& seed) {
  return lora_linear_forward(kCpuKernels, x, weight, bias, lora_A, lora_B, scaling, dropout, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& S, double scaling,
    double dropout, const c10::optional<at::Tensor>& seed, std::array<bool, 5> output_mask) {
  return lora_linear_backward(kCpuKernels, grad_y, x, weight, lora_A, lora_B, S, scaling, dropout,
                              seed, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace peftkern::cpu
