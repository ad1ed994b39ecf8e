// CUDA passes of the fused LoRA linear. The big GEMMs stay in cuBLAS (lora_linear.cpp); these
// kernels do the work around them that would otherwise cost extra passes over memory:
//   down_project:           S = drop(x)·Aᵀ with the dropout mask generated in registers while x
//                           is read, once.
//   down_project_backward:  dx = drop'(dS·A) (mask regenerated, x not read) and
//                           dA = dSᵀ·drop(x) (x read once, rows split across blocks, partial
//                           sums reduced in a fixed order so dA is deterministic).
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../lora_linear.h"
#include "../philox.h"
#include "lora_kernels.h"

namespace peftkern::cuda {
namespace {

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kDownRows = 4;   // rows of x per block in down_project
constexpr int kRankTile = 16;  // rank outputs per block (grid.y tiles larger ranks)

__device__ __forceinline__ DropoutParams with_seed(DropoutParams d, const int64_t* seed) {
  // The seed lives in device memory (drawn by torch's CUDA generator), so reading it here
  // needs no host synchronisation and is valid under CUDA graph capture.
  if (seed != nullptr) d.seed = static_cast<uint64_t>(*seed);
  return d;
}

template <typename C, bool kDropout>
__device__ __forceinline__ void group_multipliers(const DropoutParams& d, int64_t row,
                                                  int64_t group, C (&mult)[4]) {
  if constexpr (kDropout) {
    const Philox4 w = dropout_words(d, row, group);
#pragma unroll
    for (int l = 0; l < 4; ++l) mult[l] = static_cast<C>(dropout_multiplier(d, w.v[l]));
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) mult[l] = C(1);
  }
}

template <typename X, typename Acc, bool kDropout>
__global__ void __launch_bounds__(kThreads)
    down_project_kernel(const X* __restrict__ x, const Acc* __restrict__ A, Acc* __restrict__ S,
                        int64_t M, int64_t K, int64_t r, DropoutParams params,
                        const int64_t* __restrict__ seed) {
  using C = compute_t<Acc>;
  const DropoutParams d = with_seed(params, seed);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kDownRows;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kRankTile;
  const int64_t groups = (K + 3) / 4;

  C acc[kDownRows][kRankTile];
#pragma unroll
  for (int i = 0; i < kDownRows; ++i)
#pragma unroll
    for (int j = 0; j < kRankTile; ++j) acc[i][j] = C(0);

  for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
    const int64_t k0 = 4 * g;
    C a[kRankTile][4];
#pragma unroll
    for (int j = 0; j < kRankTile; ++j)
#pragma unroll
      for (int l = 0; l < 4; ++l)
        a[j][l] = (j0 + j < r && k0 + l < K) ? static_cast<C>(A[(j0 + j) * K + k0 + l]) : C(0);
#pragma unroll
    for (int i = 0; i < kDownRows; ++i) {
      const int64_t m = row0 + i;
      if (m >= M) continue;
      C mult[4];
      group_multipliers<C, kDropout>(d, m, g, mult);
      C xm[4];
#pragma unroll
      for (int l = 0; l < 4; ++l)
        xm[l] = k0 + l < K ? static_cast<C>(x[m * K + k0 + l]) * mult[l] : C(0);
#pragma unroll
      for (int j = 0; j < kRankTile; ++j)
#pragma unroll
        for (int l = 0; l < 4; ++l) acc[i][j] += a[j][l] * xm[l];
    }
  }

  // Block reduction: warp shuffles, then one partial per warp in shared memory.
  __shared__ C partial[kWarps][kDownRows * kRankTile];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < kDownRows; ++i)
#pragma unroll
    for (int j = 0; j < kRankTile; ++j) {
      C v = acc[i][j];
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
      if (lane == 0) partial[warp][i * kRankTile + j] = v;
    }
  __syncthreads();
  for (int idx = threadIdx.x; idx < kDownRows * kRankTile; idx += kThreads) {
    const int64_t m = row0 + idx / kRankTile, j = j0 + idx % kRankTile;
    if (m >= M || j >= r) continue;
    C sum = C(0);
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][idx];
    S[m * r + j] = static_cast<Acc>(sum);
  }
}

// dx[m, k] = mult(m, k) · Σ_j dS[m, j]·A[j, k]. One block row per x row; dS[m, :] is staged
// in shared memory and A (r×K, small) is read through the cache.
template <typename X, typename Acc, bool kDropout>
__global__ void __launch_bounds__(kThreads)
    lora_dx_kernel(const Acc* __restrict__ dS, const Acc* __restrict__ A, X* __restrict__ dx,
                   int64_t K, int64_t r, DropoutParams params, const int64_t* __restrict__ seed) {
  using C = compute_t<Acc>;
  extern __shared__ unsigned char shared_bytes[];
  C* dS_row = reinterpret_cast<C*>(shared_bytes);
  const DropoutParams d = with_seed(params, seed);
  const int64_t m = blockIdx.x;
  for (int64_t j = threadIdx.x; j < r; j += kThreads) dS_row[j] = static_cast<C>(dS[m * r + j]);
  __syncthreads();

  const int64_t g = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  const int64_t k0 = 4 * g;
  if (k0 >= K) return;
  C sum[4] = {C(0), C(0), C(0), C(0)};
  for (int64_t j = 0; j < r; ++j) {
    const C s = dS_row[j];
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (k0 + l < K) sum[l] += s * static_cast<C>(A[j * K + k0 + l]);
  }
  C mult[4];
  group_multipliers<C, kDropout>(d, m, g, mult);
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    if (k0 + l < K) dx[m * K + k0 + l] = static_cast<X>(mult[l] * sum[l]);
  }
}

// partial[split, j, k] = Σ_{m in split} dS[m, j]·drop(x)[m, k] for one rank tile.
template <typename X, typename Acc, bool kDropout>
__global__ void __launch_bounds__(kThreads)
    lora_dA_kernel(const X* __restrict__ x, const Acc* __restrict__ dS,
                   compute_t<Acc>* __restrict__ partial, int64_t M, int64_t K, int64_t r,
                   int64_t rows_per_split, DropoutParams params, const int64_t* __restrict__ seed) {
  using C = compute_t<Acc>;
  const DropoutParams d = with_seed(params, seed);
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t k0 = 4 * g;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kRankTile;
  const int64_t split = blockIdx.z;
  const int64_t m_begin = split * rows_per_split;
  const int64_t m_end = m_begin + rows_per_split < M ? m_begin + rows_per_split : M;
  if (k0 >= K) return;

  C acc[kRankTile][4];
#pragma unroll
  for (int j = 0; j < kRankTile; ++j)
#pragma unroll
    for (int l = 0; l < 4; ++l) acc[j][l] = C(0);

  for (int64_t m = m_begin; m < m_end; ++m) {
    C mult[4];
    group_multipliers<C, kDropout>(d, m, g, mult);
    C xm[4];
#pragma unroll
    for (int l = 0; l < 4; ++l)
      xm[l] = k0 + l < K ? static_cast<C>(x[m * K + k0 + l]) * mult[l] : C(0);
#pragma unroll
    for (int j = 0; j < kRankTile; ++j) {
      const C s = j0 + j < r ? static_cast<C>(dS[m * r + j0 + j]) : C(0);
#pragma unroll
      for (int l = 0; l < 4; ++l) acc[j][l] += s * xm[l];
    }
  }
#pragma unroll
  for (int j = 0; j < kRankTile; ++j) {
    if (j0 + j >= r) continue;
#pragma unroll
    for (int l = 0; l < 4; ++l)
      if (k0 + l < K) partial[(split * r + j0 + j) * K + k0 + l] = acc[j][l];
  }
}

c10::optional<DropoutParams> dropout_params(double dropout) {
  if (dropout == 0.0) return c10::nullopt;
  return DropoutParams::make(0, dropout);  // the seed itself is read on the device
}

const int64_t* seed_ptr(double dropout, const c10::optional<at::Tensor>& seed) {
  return dropout == 0.0 ? nullptr : seed->data_ptr<int64_t>();
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Calls f(X{}, Acc{}) with the C++ types of x's dtype and the adapter dtype (equal, or float
// for half/bfloat16 x; the argument checks have already ruled out other pairs).
template <typename F>
void dispatch_types(const at::Tensor& x, const at::Tensor& lora_A, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "peftkern_lora", [&] {
    using X = scalar_t;
    if (lora_A.scalar_type() == x.scalar_type()) {
      f(X{}, X{});
    } else {
      f(X{}, float{});
    }
  });
}

at::Tensor down_project(const at::Tensor& x, const at::Tensor& lora_A, double dropout,
                        const c10::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  at::Tensor S = at::empty({M, r}, lora_A.options());
  if (M == 0) return S;
  const at::Tensor A = lora_A.contiguous();
  const auto d = dropout_params(dropout);
  const dim3 grid(ceil_div(M, kDownRows), ceil_div(r, kRankTile));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_types(x, A, [&](auto x_value, auto acc_value) {
    using X = decltype(x_value);
    using Acc = decltype(acc_value);
    auto launch = [&](auto kernel) {
      kernel<<<grid, kThreads, 0, stream>>>(x.const_data_ptr<X>(), A.const_data_ptr<Acc>(),
                                            S.data_ptr<Acc>(), M, K, r, d.value_or(DropoutParams{}),
                                            seed_ptr(dropout, seed));
    };
    if (d)
      launch(down_project_kernel<X, Acc, true>);
    else
      launch(down_project_kernel<X, Acc, false>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return S;
}

void down_project_backward(const at::Tensor& x, const at::Tensor& lora_A, const at::Tensor& dS,
                           double dropout, const c10::optional<at::Tensor>& seed, at::Tensor& dA,
                           at::Tensor& dx) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1), r = lora_A.size(0);
  if (M == 0 || K == 0) return;
  const at::Tensor A = lora_A.contiguous();
  const at::Tensor dS_c = dS.contiguous();
  const auto d = dropout_params(dropout);
  const DropoutParams params = d.value_or(DropoutParams{});
  const int64_t* seed_data = seed_ptr(dropout, seed);
  const int64_t column_blocks = ceil_div(ceil_div(K, 4), kThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;

  dispatch_types(x, A, [&](auto x_value, auto acc_value) {
    using X = decltype(x_value);
    using Acc = decltype(acc_value);
    using C = compute_t<Acc>;
    if (dx.defined()) {
      const dim3 grid(M, column_blocks);
      const size_t smem = r * sizeof(C);
      auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, smem, stream>>>(dS_c.const_data_ptr<Acc>(),
                                                 A.const_data_ptr<Acc>(), dx.data_ptr<X>(), K, r,
                                                 params, seed_data);
      };
      if (d)
        launch(lora_dx_kernel<X, Acc, true>);
      else
        launch(lora_dx_kernel<X, Acc, false>);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (dA.defined()) {
      // Enough row splits to fill the GPU a few times over; each split reduces at least 64 rows.
      const int64_t rank_tiles = ceil_div(r, kRankTile);
      const int64_t splits = std::max<int64_t>(
          1, std::min(ceil_div(4 * sms, column_blocks * rank_tiles), ceil_div(M, 64)));
      const int64_t rows_per_split = ceil_div(M, splits);
      const auto acc_type = std::is_same_v<C, double> ? at::kDouble : at::kFloat;
      at::Tensor partial = at::empty({splits, r, K}, x.options().dtype(acc_type));
      const dim3 grid(column_blocks, rank_tiles, splits);
      auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(x.const_data_ptr<X>(), dS_c.const_data_ptr<Acc>(),
                                              partial.data_ptr<C>(), M, K, r, rows_per_split,
                                              params, seed_data);
      };
      if (d)
        launch(lora_dA_kernel<X, Acc, true>);
      else
        launch(lora_dA_kernel<X, Acc, false>);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      dA.copy_(partial.sum(0));
    }
  });
}

// No one-pass kernel over g yet: dS and dB are two products (cuBLAS, or the passes above for
// float32 adapters on half-precision g).
constexpr LoraKernels kCudaKernels{&down_project, &down_project_backward,
                                   /*up_project_backward=*/nullptr};

std::tuple<at::Tensor, at::Tensor> lora_linear_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                    const c10::optional<at::Tensor>& bias,
                                                    const at::Tensor& lora_A,
                                                    const at::Tensor& lora_B, double scaling,
                                                    double dropout,
                                                    const c10::optional<at::Tensor>& seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_linear_forward(kCudaKernels, x, weight, bias, lora_A, lora_B, scaling, dropout, seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& S, double scaling,
    double dropout, const c10::optional<at::Tensor>& seed, std::array<bool, 5> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_linear_backward(kCudaKernels, grad_y, x, weight, lora_A, lora_B, S, scaling, dropout,
                              seed, output_mask);
}

}  // namespace

const LoraKernels& lora_kernels() {
  return kCudaKernels;
}

TORCH_LIBRARY_IMPL(peftkern, CUDA, m) {
  m.impl("lora_linear", &lora_linear_cuda);
  m.impl("lora_linear_backward", &lora_linear_backward_cuda);
}

}  // namespace peftkern::cuda
