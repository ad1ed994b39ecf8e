#include "lora_linear.h"

#include "checks.h"
#include "tensor_utils.h"

namespace peftkern {

void check_lora_args(const at::Tensor& x, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                     const at::Tensor& lora_B, double dropout,
                     const c10::optional<at::Tensor>& seed) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 1, "peftkern: x must have shape [..., in_features], got a 0-D tensor");
  check_dim(weight, 2, "weight", "[out_features, in_features]");
  check_dim(lora_A, 2, "lora_A", "[r, in_features]");
  check_dim(lora_B, 2, "lora_B", "[out_features, r]");
  const int64_t K = weight.size(1), N = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK(r > 0, "peftkern: lora_A.shape[0] is the rank r and must be > 0, got shape ",
              shape_str(lora_A));
  check_size(x, x.dim() - 1, K, "x", "weight.shape[1] (in_features)");
  check_size(lora_A, 1, K, "lora_A", "weight.shape[1] (in_features)");
  check_size(lora_B, 0, N, "lora_B", "weight.shape[0] (out_features)");
  check_size(lora_B, 1, r, "lora_B", "lora_A.shape[0] (the rank r)");
  check_same_device(weight, x, "weight", "x");
  check_same_device(lora_A, x, "lora_A", "x");
  check_same_device(lora_B, x, "lora_B", "x");
  check_same_dtype(weight, x, "weight", "x");
  check_same_dtype(lora_B, lora_A, "lora_B", "lora_A");
  const auto x_type = x.scalar_type(), adapter_type = lora_A.scalar_type();
  const bool low_precision_x = x_type == at::kHalf || x_type == at::kBFloat16;
  TORCH_CHECK(adapter_type == x_type || (low_precision_x && adapter_type == at::kFloat),
              "peftkern: lora_A/lora_B must have the dtype of x (", x_type,
              ") or float32 when x is float16/bfloat16, got ", adapter_type);
  if (given(bias)) {
    check_dim(*bias, 1, "bias", "[out_features]");
    check_size(*bias, 0, N, "bias", "weight.shape[0] (out_features)");
    check_same_device(*bias, x, "bias", "x");
    check_same_dtype(*bias, x, "bias", "x");
  }
  check_dropout(dropout, "dropout");
  check_seed(seed, dropout, x);
}

// The fused device pass is needed when x must be masked or converted on its way into the
// rank-r projection; otherwise the vendor BLAS reads x directly and is the fastest option.
bool needs_fused_pass(const at::Tensor& x, const at::Tensor& lora_A, double dropout) {
  return dropout > 0.0 || x.scalar_type() != lora_A.scalar_type();
}

namespace {

// dS = s·g·B and dB = s·(Sᵀ·g)ᵀ as two separate products, for a device without a one-pass
// kernel. With float32 adapters on a half-precision g they must accumulate into float32
// without a float32 copy of g: the device passes do exactly that (the same passes as for x,
// with g in place of x and no dropout). An output not needed comes back undefined.
std::tuple<at::Tensor, at::Tensor> rank_r_products_over_g(const LoraKernels& kernels,
                                                          const at::Tensor& g2,
                                                          const at::Tensor& lora_B,
                                                          const at::Tensor& S, double scaling,
                                                          bool mixed, bool need_dS, bool need_dB) {
  at::Tensor dS, dB;
  if (need_dS) {
    dS = mixed ? kernels.down_project(g2, lora_B.t().contiguous(), 0.0, c10::nullopt)
               : at::mm(g2, lora_B);
    dS.mul_(scaling);
  }
  if (need_dB) {
    if (mixed) {
      at::Tensor dB_t = at::zeros({lora_B.size(1), lora_B.size(0)}, lora_B.options()), no_dx;
      kernels.down_project_backward(g2, lora_B.t(), S, 0.0, c10::nullopt, dB_t, no_dx);
      dB = dB_t.t().contiguous();
    } else {
      // As (Sᵀ·g)ᵀ: a GEMM with r output rows and g in its natural layout, which the CPU BLAS
      // runs faster than gᵀ·S (g read transposed).
      dB = at::mm(S.t(), g2).t().contiguous();
    }
    dB.mul_(scaling);
  }
  return {dS, dB};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> up_project_grads(const LoraKernels& kernels,
                                                    const at::Tensor& g2, const at::Tensor& lora_B,
                                                    const at::Tensor& S, double scaling,
                                                    bool need_dS, bool need_dB) {
  if (kernels.up_project_backward != nullptr) {
    return kernels.up_project_backward(g2, lora_B, S, scaling, need_dS, need_dB);
  }
  return rank_r_products_over_g(kernels, g2, lora_B, S, scaling,
                                g2.scalar_type() != lora_B.scalar_type(), need_dS, need_dB);
}

std::tuple<at::Tensor, at::Tensor> lora_linear_forward(
    const LoraKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    double scaling, double dropout, const c10::optional<at::Tensor>& seed) {
  check_lora_args(x, weight, bias, lora_A, lora_B, dropout, seed);
  const int64_t K = weight.size(1), N = weight.size(0);
  const at::Tensor x2 = rows_of(x, K);

  const at::Tensor S = needs_fused_pass(x, lora_A, dropout)
                           ? kernels.down_project(x2, lora_A, dropout, seed)
                           : at::mm(x2, lora_A.t());

  // y = b + (s·S)·Bᵀ first (a rank-r GEMM), then the base GEMM accumulates into it with
  // beta = 1: no separate pass over y for the LoRA term. S and B are tiny, so casting them
  // to x's dtype costs nothing and keeps the big GEMM in the fast low-precision path.
  const at::Tensor S_scaled = (S * scaling).to(x.scalar_type());
  const at::Tensor B_t = lora_B.to(x.scalar_type()).t();
  at::Tensor y = given(bias) ? at::addmm(*bias, S_scaled, B_t) : at::mm(S_scaled, B_t);
  y.addmm_(x2, weight.t());

  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  return {y.view(out_shape), S};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_backward(
    const LoraKernels& kernels, const at::Tensor& grad_y, const at::Tensor& x,
    const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& S, double scaling, double dropout, const c10::optional<at::Tensor>& seed,
    std::array<bool, 5> output_mask) {
  check_lora_args(x, weight, c10::nullopt, lora_A, lora_B, dropout, seed);
  const int64_t K = weight.size(1), N = weight.size(0), r = lora_A.size(0);
  TORCH_CHECK(
      grad_y.dim() >= 1 && grad_y.sizes().back() == N && leading_rows(grad_y) == leading_rows(x),
      "peftkern: grad_y must have shape [..., out_features] matching x, got ", shape_str(grad_y));
  check_dim(S, 2, "S", "[rows, r]");
  check_size(S, 1, r, "S", "the rank r");
  const auto [need_dx, need_dW, need_dbias, need_dA, need_dB] = output_mask;

  const at::Tensor g2 = rows_of(grad_y, N);
  const at::Tensor x2 = rows_of(x, K);
  const bool fused = needs_fused_pass(x, lora_A, dropout);

  // dS = s·g·B and dB = s·gᵀ·S: the rank-r products over g, in one pass where the device has one.
  auto [dS, dB] = up_project_grads(kernels, g2, lora_B, S, scaling, need_dx || need_dA, need_dB);

  // dx = drop'(dS·A) + g·W: the LoRA term is written first (the fused pass under the mask,
  // or a rank-r GEMM), then the base GEMM accumulates into it with beta = 1, so no pass reads
  // and rewrites dx.
  at::Tensor dx, dA;
  if (need_dA) dA = fused ? at::zeros({r, K}, lora_A.options()) : at::mm(dS.t(), x2);
  if (need_dx) dx = fused ? at::empty({x2.size(0), K}, x.options()) : at::mm(dS, lora_A);
  if (fused && (need_dx || need_dA)) {
    kernels.down_project_backward(x2, lora_A, dS, dropout, seed, dA, dx);
  }
  if (need_dx) dx.addmm_(g2, weight);

  at::Tensor dW = need_dW ? at::mm(g2.t(), x2) : unneeded_grad(weight);
  at::Tensor dbias = need_dbias ? g2.sum(0) : unneeded_grad(weight);
  if (need_dx) {
    dx = dx.view(x.sizes());
  } else {
    dx = unneeded_grad(x);
  }
  if (!need_dA) dA = unneeded_grad(lora_A);
  if (!need_dB) dB = unneeded_grad(lora_B);
  return {dx, dW, dbias, dA, dB};
}

}  // namespace peftkern
