// CPU passes of the fused LoRA linear.
//
// Rank-r products that reduce over K or M (x·Aᵀ, dSᵀ·x) go to the vendor BLAS, which runs
// them near peak when it can read its operands directly. When dropout or a dtype conversion
// stands between x and the GEMM, x is processed in row chunks: each chunk is masked and
// converted by the vectorised row kernels into a workspace small enough to stay in the L2
// cache, and the BLAS consumes it right away. Rank-r products that produce a full-size matrix
// (s·S·Bᵀ into y, dS·A into dx) would cost the BLAS a full M×N write plus a read by the base
// GEMM; the row kernels instead add them into y / dx in one pass, mask included. The masked x
// never exists in full and the mask is never stored: backward regenerates it from the seed.
#include <torch/library.h>

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

// Calls consume(first_row, rows, masked) for consecutive row chunks of drop(x), converted to
// the dtype of `options` in an L2-sized workspace that is reused from chunk to chunk.
template <typename F>
void for_each_masked_chunk(const at::Tensor& x, at::TensorOptions options, double dropout,
                           const c10::optional<at::Tensor>& seed, F&& consume) {
  const int64_t M = x.size(0), K = x.size(1);
  if (M == 0) return;
  const auto d = dropout_params(dropout, seed);
  const int64_t chunk = chunk_rows(M, K, c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  at::Tensor workspace = at::empty({chunk, K}, options);
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t rows = std::min(chunk, M - m0);
    parallel_rows(rows, K, [&](int64_t first, int64_t count) {
      drop_convert_rows(dtype_of(x), dtype_of(workspace), row_ptr(x, m0 + first),
                        row_ptr(workspace, first), count, K, m0 + first, d ? &*d : nullptr);
    });
    consume(m0, rows, workspace.narrow(0, 0, rows));
  }
}

at::Tensor down_project(const at::Tensor& x, const at::Tensor& lora_A, double dropout,
                        const c10::optional<at::Tensor>& seed) {
  at::Tensor S = at::empty({x.size(0), lora_A.size(0)}, lora_A.options());
  for_each_masked_chunk(x, lora_A.options(), dropout, seed, [&](int64_t m0, int64_t rows, const at::Tensor& masked) {
    at::Tensor S_rows = S.narrow(0, m0, rows);
    at::mm_out(S_rows, masked, lora_A.t());
  });
  return S;
}

void add_rank_product(const at::Tensor& coef, const at::Tensor& basis, at::Tensor& out,
                      double dropout, const c10::optional<at::Tensor>& seed) {
  const int64_t M = out.size(0), K = out.size(1), r = coef.size(1);
  if (M == 0 || K == 0) return;
  const auto d = dropout_params(dropout, seed);
  const at::Tensor coef_c = coef.contiguous(), basis_c = basis.contiguous();
  parallel_rows(M, K * r / 16, [&](int64_t first, int64_t count) {
    add_rank_rows(dtype_of(out), dtype_of(basis_c), row_ptr(coef_c, first), basis_c.const_data_ptr(),
                  row_ptr(out, first), count, r, K, first, d ? &*d : nullptr);
  });
}

void accumulate_outer(const at::Tensor& x, const at::Tensor& coef, double dropout,
                      const c10::optional<at::Tensor>& seed, at::Tensor& acc) {
  for_each_masked_chunk(x, acc.options(), dropout, seed, [&](int64_t m0, int64_t rows, const at::Tensor& masked) {
    acc.addmm_(coef.narrow(0, m0, rows).t(), masked);
  });
}

constexpr LoraKernels kCpuKernels{&down_project, &add_rank_product, &accumulate_outer};

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
