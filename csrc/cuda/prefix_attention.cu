// CUDA side of the prefix attention. The sequence part is the blockwise attention
// (../blockwise_attention.h): its GEMMs run in cuBLAS through ATen, and these kernels are the
// passes between them, one thread block per score row:
//   softmax_rows: mask + scale + max, exp + sum, normalise, lse, with the row in L1/L2.
//   probs_rows:   P = exp(s·scale - lse) under the same mask, for backward.
// and merge: out = w₁·O₁ + w₂·O₂ with the weights from lse₁ and lse₂, and the merged lse.
// Block reductions combine warp partials in a fixed order, so results are deterministic.
// Where ATen's FlashAttention-2 covers the sequence part (half precision, no padding mask; see
// flash_covers) it runs there instead; the blockwise path is exact for every other case.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../blockwise_attention.h"
#include "../prefix_attention.h"
#include "../tensor_utils.h"

namespace peftkern::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMergeThreads = 64;

struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a > b ? a : b;
  }
};
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// Reduces v over the thread block; every thread gets the result. shared holds kWarps values.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();  // the previous reduction's readers are done with shared
  if (threadIdx.x % 32 == 0) shared[threadIdx.x / 32] = v;
  __syncthreads();
  T result = shared[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) result = op(result, shared[w]);
  return result;
}

// Where score row `idx` of a block [B·Hkv, g·rows, keys] sits (see AttentionBlock).
struct RowPlace {
  int64_t visible;    // keys [0, visible) pass the causal rule
  const bool* keep;   // the example's padding mask row, or nullptr
  int64_t lse_index;  // into [B·Hkv, g, n]
};

__device__ __forceinline__ RowPlace place_row(int64_t idx, int64_t R, int64_t keys,
                                              const bool* keep, const AttentionBlock& b) {
  const int64_t bh = idx / R, r = idx % R;
  const int64_t i = b.q_begin + r % b.rows;
  RowPlace p;
  p.visible = b.causal ? (keys < i + 1 ? keys : i + 1) : keys;
  p.keep = keep != nullptr ? keep + (bh / b.heads_kv) * b.n : nullptr;
  p.lse_index = (bh * b.group + r / b.rows) * b.n + i;
  return p;
}

__device__ __forceinline__ bool key_visible(const RowPlace& p, int64_t j) {
  return j < p.visible && (p.keep == nullptr || p.keep[j]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    softmax_rows_kernel(T* __restrict__ scores, T* __restrict__ lse, const bool* __restrict__ keep,
                        int64_t R, int64_t keys, AttentionBlock b) {
  __shared__ T shared[kWarps];
  const int64_t idx = blockIdx.x;
  const RowPlace p = place_row(idx, R, keys, keep, b);
  T* row = scores + idx * keys;
  const T scale = static_cast<T>(b.scale);

  T mx = neg_inf<T>();
  for (int64_t j = threadIdx.x; j < keys; j += kThreads) {
    const T x = key_visible(p, j) ? row[j] * scale : neg_inf<T>();
    row[j] = x;
    mx = x > mx ? x : mx;
  }
  mx = block_reduce(mx, MaxOp{}, shared);
  if (mx == neg_inf<T>()) {  // no visible key: all-zero row, lse = -inf (uniform branch)
    for (int64_t j = threadIdx.x; j < keys; j += kThreads) row[j] = T(0);
    if (threadIdx.x == 0) lse[p.lse_index] = neg_inf<T>();
    return;
  }
  T sum = T(0);
  for (int64_t j = threadIdx.x; j < keys; j += kThreads) {
    const T e = exp(row[j] - mx);  // each thread revisits only the elements it wrote
    row[j] = e;
    sum += e;
  }
  sum = block_reduce(sum, SumOp{}, shared);
  const T inv = T(1) / sum;
  for (int64_t j = threadIdx.x; j < keys; j += kThreads) row[j] *= inv;
  if (threadIdx.x == 0) lse[p.lse_index] = mx + log(sum);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    probs_rows_kernel(T* __restrict__ scores, const T* __restrict__ lse,
                      const bool* __restrict__ keep, int64_t R, int64_t keys, AttentionBlock b) {
  const int64_t idx = blockIdx.x;
  const RowPlace p = place_row(idx, R, keys, keep, b);
  T* row = scores + idx * keys;
  const T scale = static_cast<T>(b.scale);
  const T row_lse = lse[p.lse_index];
  const bool any = row_lse != neg_inf<T>();
  for (int64_t j = threadIdx.x; j < keys; j += kThreads) {
    row[j] = any && key_visible(p, j) ? exp(row[j] * scale - row_lse) : T(0);
  }
}

// out[row] ← a₁·out[row] + a₂·o2[row] and lse[row] ← log(e^lse + e^lse2); one block per row.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads)
    merge_kernel(T* __restrict__ out, T* __restrict__ lse, const T* __restrict__ o2,
                 const T* __restrict__ lse2, int64_t d) {
  const int64_t row = blockIdx.x;
  const T l1 = lse[row], l2 = lse2[row];
  const T hi = l1 > l2 ? l1 : l2;  // finite: lse2 is (m > 0); lse may be -inf
  const T w1 = exp(l1 - hi), w2 = exp(l2 - hi);
  const T total = w1 + w2;
  const T a1 = w1 / total, a2 = w2 / total;
  T* dst = out + row * d;
  const T* src2 = o2 + row * d;
  for (int64_t c = threadIdx.x; c < d; c += kMergeThreads) dst[c] = a1 * dst[c] + a2 * src2[c];
  __syncthreads();  // every thread has read lse[row] before it is overwritten
  if (threadIdx.x == 0) lse[row] = hi + log(total);
}

const bool* keep_ptr(const at::Tensor& mask) {
  return mask.defined() ? mask.const_data_ptr<bool>() : nullptr;
}

void softmax_rows(at::Tensor& scores, at::Tensor& lse, const at::Tensor& mask,
                  const AttentionBlock& b) {
  const int64_t rows = scores.size(0) * scores.size(1);
  if (rows == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "peftkern_prefix_softmax", [&] {
    softmax_rows_kernel<scalar_t>
        <<<rows, kThreads, 0, stream>>>(scores.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                        keep_ptr(mask), scores.size(1), scores.size(2), b);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void probs_rows(at::Tensor& scores, const at::Tensor& lse, const at::Tensor& mask,
                const AttentionBlock& b) {
  const int64_t rows = scores.size(0) * scores.size(1);
  if (rows == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "peftkern_prefix_probs", [&] {
    probs_rows_kernel<scalar_t>
        <<<rows, kThreads, 0, stream>>>(scores.data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(),
                                        keep_ptr(mask), scores.size(1), scores.size(2), b);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void merge(at::Tensor& out, at::Tensor& lse, const at::Tensor& o2, const at::Tensor& lse2) {
  const int64_t rows = lse.numel();
  if (rows == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "peftkern_prefix_merge", [&] {
    merge_kernel<scalar_t><<<rows, kMergeThreads, 0, stream>>>(
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
