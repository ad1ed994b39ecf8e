// CPU passes of the fused LoRA linear.
//
// The rank-r projections are GEMMs with a tiny inner or outer dimension, which the vendor BLAS
// runs near peak when it can read its operands directly. When dropout or a dtype conversion
// stands between x and the GEMM, x is processed in row chunks: each chunk is masked and
// converted by the vectorised row kernels into a workspace small enough to stay in the L2
// cache, and the BLAS consumes it right away. The masked x therefore never exists in full,
// and the mask itself is never stored: backward regenerates it from the seed.
//
// Each pass is one parallel region over the chunks: a thread takes whole chunks and runs the
// row kernels and the BLAS calls of a chunk itself (the BLAS runs single-threaded inside a
// parallel region), so a chunk never leaves the cache of the core that made it, and there is
// no barrier between the row kernels and the GEMMs. Alternating the two as separate parallel
// passes would add an OpenMP wait per pass, which is not small next to the rank-r work of
// training shapes.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <array>

#include "../lora_linear.h"
#include "dropout_rows.h"
#include "lora_kernels.h"
#include "rows.h"

namespace peftkern::cpu {
namespace {

// Per chunk; with the chunk's workspaces it fits the L2 of current x86 cores.
constexpr int64_t kChunkBytes = 256 << 10;
constexpr int64_t kMinChunkRows = 16;

c10::optional<DropoutParams> dropout_params(double dropout, const c10::optional<at::Tensor>& seed) {
  if (dropout == 0.0) return c10::nullopt;
  const int64_t seed_value = seed->contiguous().data_ptr<int64_t>()[0];
  return DropoutParams::make(static_cast<uint64_t>(seed_value), dropout);
}

// Rows per chunk: fixed by K and the dtype alone, never by the thread count, so that the
// per-chunk partial sums (and hence dA) are bitwise the same on any number of threads.
int64_t chunk_rows(int64_t M, int64_t K, int64_t element_size) {
  const int64_t rows =
      std::max(kMinChunkRows, kChunkBytes / std::max<int64_t>(1, K * element_size));
  return std::max<int64_t>(1, std::min(rows, M));
}

// Calls body(chunk_index, first_row, row_count) for the chunks of rows [0, M), each on one
// thread, all threads taking part. The body makes ATen calls, so every thread runs it under
// the caller's thread-local state: the op runs below autograd, and worker threads would
// otherwise dispatch the BLAS calls to autograd again (which refuses out= with inputs that
// require grad).
template <typename F>
void for_each_chunk(int64_t M, int64_t chunk, F&& body) {
  const int64_t chunks = (M + chunk - 1) / chunk;
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller_state);
    for (int64_t c = begin; c < end; ++c) body(c, c * chunk, std::min(chunk, M - c * chunk));
  });
}

// A [rows, K] chunk workspace, one of two per thread, kept between calls. Allocating them
// afresh on every call made the allocator hand back pages the kernel had to fault in again:
// about 300 page faults per LoRA layer step at M = 1024, K = N = 512 (a frozen nn.Linear step
// has none). The memory held is two chunks per thread that runs the op; the contents never
// outlive one chunk.
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
  for_each_chunk(M, chunk, [&](int64_t, int64_t m0, int64_t rows) {
    at::Tensor masked_x = chunk_workspace(0, rows, K, lora_A.options());
    drop_convert_rows(dtype_of(x), dtype_of(lora_A), row_ptr(x, m0), row_ptr(masked_x, 0), rows, K,
                      m0, d ? &*d : nullptr);
    at::Tensor S_rows = S.narrow(0, m0, rows);
    at::mm_out(S_rows, masked_x, lora_A.t());
  });
  return S;
}

void down_project_backward(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& dS,
                           double dropout, const c10::optional<at::Tensor>& seed, at::Tensor& dA,
                           at::Tensor& dx) {
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  if (M == 0) return;
  const auto d = dropout_params(dropout, seed);
  const int64_t chunk = chunk_rows(M, K, lora_A.element_size());
  // dA as a sum of per-chunk partials, added in chunk order after the parallel region.
  at::Tensor partials =
      dA.defined() ? at::empty({(M + chunk - 1) / chunk, r, K}, lora_A.options()) : at::Tensor();
  for_each_chunk(M, chunk, [&](int64_t c, int64_t m0, int64_t rows) {
    const at::Tensor dS_rows = dS.narrow(0, m0, rows);
    // lora_term holds dS·A for the chunk (written to dx under the mask); masked_x holds
    // drop(x) for the chunk (consumed by the dA GEMM).
    at::Tensor lora_term, masked_x;
    if (dx.defined()) {
      lora_term = chunk_workspace(0, rows, K, lora_A.options());
      at::mm_out(lora_term, dS_rows, lora_A);
    }
    if (dA.defined()) masked_x = chunk_workspace(1, rows, K, lora_A.options());
    drop_backward_rows(dtype_of(x), dtype_of(lora_A), row_ptr(x, m0), row_ptr(dx, m0),
                       row_ptr(lora_term, 0), row_ptr(masked_x, 0), rows, K, m0, d ? &*d : nullptr);
    if (dA.defined()) {
      at::Tensor partial = partials.select(0, c);
      at::mm_out(partial, dS_rows.t(), masked_x);
    }
  });
  if (dA.defined()) at::sum_out(dA, partials, 0);
}

// Both products over g in one pass: a thread takes a chunk of g rows (converted to the
// adapters' dtype in its workspace when they differ) and runs both GEMMs on it while it is in
// its cache. dB sums per-chunk partials in chunk order, like dA.
std::tuple<at::Tensor, at::Tensor> up_project_backward(const at::Tensor& g,
                                                       const at::Tensor& lora_B,
                                                       const at::Tensor& S, double scaling,
                                                       bool need_dS, bool need_dB) {
  const int64_t M = g.size(0), N = g.size(1), r = lora_B.size(1);
  const bool convert = g.scalar_type() != lora_B.scalar_type();
  const int64_t chunk = chunk_rows(M, N, lora_B.element_size());
  at::Tensor dS = need_dS ? at::empty({M, r}, lora_B.options()) : at::Tensor();
  at::Tensor partials =
      need_dB ? at::empty({(M + chunk - 1) / chunk, r, N}, lora_B.options()) : at::Tensor();
  for_each_chunk(M, chunk, [&](int64_t c, int64_t m0, int64_t rows) {
    at::Tensor g_rows = g.narrow(0, m0, rows);
    if (convert) {
      at::Tensor converted = chunk_workspace(0, rows, N, lora_B.options());
      drop_convert_rows(dtype_of(g), dtype_of(lora_B), row_ptr(g, m0), row_ptr(converted, 0), rows,
                        N, m0, nullptr);
      g_rows = converted;
    }
    if (need_dS) {
      at::Tensor dS_rows = dS.narrow(0, m0, rows);
      at::mm_out(dS_rows, g_rows, lora_B);
    }
    if (need_dB) {
      at::Tensor partial = partials.select(0, c);
      at::mm_out(partial, S.narrow(0, m0, rows).t(), g_rows);
    }
  });
  if (need_dS) dS.mul_(scaling);
  at::Tensor dB = need_dB ? partials.sum(0).mul_(scaling).t().contiguous() : at::Tensor();
  return {dS, dB};
}

constexpr LoraKernels kCpuKernels{&down_project, &down_project_backward, &up_project_backward};

std::tuple<at::Tensor, at::Tensor> lora_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias,
                                                   const at::Tensor& lora_A,
                                                   const at::Tensor& lora_B, double scaling,
                                                   double dropout,
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

const LoraKernels& lora_kernels() {
  return kCpuKernels;
}

TORCH_LIBRARY_IMPL(peftkern, CPU, m) {
  m.impl("lora_linear", &lora_linear_cpu);
  m.impl("lora_linear_backward", &lora_linear_backward_cpu);
}

}  // namespace peftkern::cpu
