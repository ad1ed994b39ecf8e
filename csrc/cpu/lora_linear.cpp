// CPU passes of the fused LoRA linear.
//
// The rank-r projections are GEMMs with a tiny inner or outer dimension, which the vendor BLAS
// runs near peak when it can read its operands directly. When dropout or a dtype conversion
// stands between x and the GEMM, each thread walks its own share of the rows in blocks: a
// block is masked and converted by the vectorised row kernels into a thread-private workspace
// small enough to stay in that core's L2 cache, and a single-threaded BLAS call consumes it
// right away. The masked x therefore never exists in full, the mask itself is never stored
// (backward regenerates it from the seed), and the threads never wait for each other between
// blocks. (Blocks shared by all threads, i.e. a fork/join per block for the row pass and
// another inside each multithreaded BLAS call, cost more than the dropout itself.)
#include <ATen/CPUFunctions.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../lora_linear.h"
#include "dropout_rows.h"
#include "rows.h"

namespace peftkern::cpu {
namespace {

constexpr int64_t kBlockBytes = 256 << 10;  // one workspace block: well inside a core's L2
constexpr int64_t kMinBlockRows = 8;

c10::optional<DropoutParams> dropout_params(double dropout,
                                            const c10::optional<at::Tensor>& seed) {
  if (dropout == 0.0) return c10::nullopt;
  const int64_t seed_value = seed->contiguous().data_ptr<int64_t>()[0];
  return DropoutParams::make(static_cast<uint64_t>(seed_value), dropout);
}

// Rows [0, M) in blocks of at most kBlockBytes of K-wide rows, the blocks split into one
// contiguous range per thread ("unit"). body(first_row, end_row, block_rows, unit) runs once
// per unit; units() says how many there are, for per-unit accumulators.
class RowUnits {
 public:
  RowUnits(int64_t M, int64_t K, int64_t element_size)
      : M_(M),
        rows_(std::max<int64_t>(1, std::min(M, std::max(kMinBlockRows, kBlockBytes / std::max<int64_t>(1, K * element_size))))),
        blocks_((M + rows_ - 1) / rows_),
        units_(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks_))),
        blocks_per_unit_((blocks_ + units_ - 1) / units_) {}

  int64_t units() const { return units_; }

  // BLAS calls inside body run single-threaded (they are inside ATen's parallel region), so
  // each thread streams its blocks without waiting for the others. They must call the CPU
  // kernels directly (at::cpu::), not through the dispatcher: a worker thread does not
  // inherit the calling thread's "below autograd" dispatch state.
  template <typename F>
  void run(F&& body) const {
    at::parallel_for(0, units_, 1, [&](int64_t first_unit, int64_t end_unit) {
      for (int64_t unit = first_unit; unit < end_unit; ++unit) {
        const int64_t begin = std::min(M_, unit * blocks_per_unit_ * rows_);
        const int64_t end = std::min(M_, (unit + 1) * blocks_per_unit_ * rows_);
        if (begin < end) body(begin, end, rows_, unit);
      }
    });
  }

 private:
  int64_t M_, rows_, blocks_, units_, blocks_per_unit_;
};

at::Tensor down_project(const at::Tensor& x, const at::Tensor& lora_A, double dropout,
                        const c10::optional<at::Tensor>& seed) {
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  at::Tensor S = at::empty({M, r}, lora_A.options());
  if (M == 0) return S;
  const auto d = dropout_params(dropout, seed);
  const at::Tensor A_t = lora_A.t();
  RowUnits(M, K, lora_A.element_size()).run([&](int64_t begin, int64_t end, int64_t rows, int64_t) {
    at::Tensor workspace = at::empty({rows, K}, lora_A.options());
    for (int64_t m0 = begin; m0 < end; m0 += rows) {
      const int64_t count = std::min(rows, end - m0);
      drop_convert_rows(dtype_of(x), dtype_of(lora_A), row_ptr(x, m0), workspace.data_ptr(),
                        count, K, m0, d ? &*d : nullptr);
      at::Tensor S_rows = S.narrow(0, m0, count);
      at::cpu::mm_out(S_rows, workspace.narrow(0, 0, count), A_t);
    }
  });
  return S;
}

// dA accumulates per unit (one partial [r, K] each) and the partials are summed in unit
// order, so for a given thread count the result is bitwise reproducible.
void down_project_backward(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& dS,
                           double dropout, const c10::optional<at::Tensor>& seed, at::Tensor& dA,
                           at::Tensor& dx) {
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  if (M == 0) return;
  const auto d = dropout_params(dropout, seed);
  const RowUnits units(M, K, lora_A.element_size());
  at::Tensor dA_partials = dA.defined() ? at::zeros({units.units(), r, K}, dA.options()) : at::Tensor();
  units.run([&](int64_t begin, int64_t end, int64_t rows, int64_t unit) {
    // lora_term holds dS·A for the block (added into dx under the mask); masked_x holds
    // drop(x) for the block (consumed by the dA GEMM).
    at::Tensor lora_term = dx.defined() ? at::empty({rows, K}, lora_A.options()) : at::Tensor();
    at::Tensor masked_x = dA.defined() ? at::empty({rows, K}, lora_A.options()) : at::Tensor();
    at::Tensor dA_partial = dA.defined() ? dA_partials.select(0, unit) : at::Tensor();
    for (int64_t m0 = begin; m0 < end; m0 += rows) {
      const int64_t count = std::min(rows, end - m0);
      const at::Tensor dS_rows = dS.narrow(0, m0, count);
      if (dx.defined()) {
        at::Tensor term_rows = lora_term.narrow(0, 0, count);
        at::cpu::mm_out(term_rows, dS_rows, lora_A);
      }
      drop_backward_rows(dtype_of(x), dtype_of(lora_A), row_ptr(x, m0), row_ptr(dx, m0),
                         row_ptr(lora_term, 0), row_ptr(masked_x, 0), count, K, m0,
                         d ? &*d : nullptr);
      if (dA.defined()) at::cpu::addmm_(dA_partial, dS_rows.t(), masked_x.narrow(0, 0, count));
    }
  });
  if (dA.defined()) dA.add_(dA_partials.sum(0));
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
