#include "dora_linear.h"

#include "checks.h"
#include "tensor_utils.h"

namespace peftkern {
namespace {

// Column reductions run over row blocks of about this many elements, so their float32
// temporaries stay bounded (never M×N) however many rows there are.
constexpr int64_t kReductionBlockElements = 1 << 20;

// The dtype the norm and the column scale are computed in: float32, float64 for float64 x.
at::ScalarType norm_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_dora_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                     const at::Tensor& magnitude, const at::Tensor& weight_norm,
                     const char* weight_norm_name) {
  const int64_t N = weight.size(0);
  check_dim(magnitude, 1, "magnitude", "[out_features]");
  check_size(magnitude, 0, N, "magnitude", "weight.shape[0] (out_features)");
  check_same_device(magnitude, x, "magnitude", "x");
  check_same_dtype(magnitude, lora_A, "magnitude", "lora_A");
  check_dim(weight_norm, 1, weight_norm_name, "[out_features]");
  check_size(weight_norm, 0, N, weight_norm_name, "weight.shape[0] (out_features)");
  check_same_device(weight_norm, x, weight_norm_name, "x");
  TORCH_CHECK(weight_norm.scalar_type() == norm_type(x), "peftkern: ", weight_norm_name,
              " must have dtype ", norm_type(x), " (float64 for float64 x, else float32), got ",
              weight_norm.scalar_type());
}

// n = ‖W_n + s·B_n·A‖ from ‖W_n‖² + 2s·B_n·(A·W_nᵀ) + s²·B_n·(A·Aᵀ)·B_nᵀ, in norm_type:
// no N×K temporary. W·Aᵀ reads a half-precision W through the device's conversion pass
// (a float32 product without a float32 copy of W). Rounding can take n² a little below 0
// when W_n + s·B_n·A (nearly) vanishes; it is clamped at 0 rather than turned into NaN.
at::Tensor weight_norm(const LoraKernels& kernels, const at::Tensor& weight,
                       const at::Tensor& lora_A, const at::Tensor& lora_B,
                       const at::Tensor& weight_norm_sq, double scaling) {
  const auto type = weight_norm_sq.scalar_type();
  const at::Tensor A = lora_A.to(type);
  const at::Tensor B = lora_B.to(type);
  const at::Tensor WA = weight.scalar_type() == type
                            ? at::mm(weight, A.t())
                            : kernels.down_project(weight.contiguous(), A, 0.0, c10::nullopt);
  const at::Tensor gram = at::mm(A, A.t());
  // The update's two terms are summed first: they are the small ones when the update is tiny
  // next to W, and adding them to ‖W_n‖² last keeps their own precision.
  const at::Tensor update = (B * WA).sum(1).mul_(2.0 * scaling);
  update.add_((at::mm(B, gram) * B).sum(1), scaling * scaling);
  return (weight_norm_sq + update).clamp_min_(0.0).sqrt_();
}

// t[M, N] ⊙ scale[N] in t's dtype (the product is formed in the scale's dtype, rounded once).
at::Tensor scale_columns(const at::Tensor& t, const at::Tensor& scale) {
  at::Tensor out = at::empty_like(t);
  at::mul_out(out, t, scale);
  return out;
}

// Σ_m g[m, n]·z[m, n] in `type`, over row blocks.
at::Tensor column_dots(const at::Tensor& g2, const at::Tensor& z, at::ScalarType type) {
  const int64_t M = g2.size(0), N = g2.size(1);
  at::Tensor dots = at::zeros({N}, g2.options().dtype(type));
  const int64_t block = std::max<int64_t>(1, kReductionBlockElements / std::max<int64_t>(1, N));
  for (int64_t m0 = 0; m0 < M; m0 += block) {
    const int64_t rows = std::min(block, M - m0);
    dots.add_((g2.narrow(0, m0, rows).to(type) * z.narrow(0, m0, rows)).sum(0));
  }
  return dots;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dora_linear_forward(
    const LoraKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& lora_A, const at::Tensor& lora_B,
    const at::Tensor& magnitude, const at::Tensor& weight_norm_sq, double scaling, double dropout,
    const c10::optional<at::Tensor>& seed) {
  check_lora_args(x, weight, bias, lora_A, lora_B, dropout, seed);
  check_dora_args(x, weight, lora_A, magnitude, weight_norm_sq, "weight_norm_sq");
  const int64_t K = weight.size(1), N = weight.size(0);
  const at::Tensor x2 = rows_of(x, K);

  const at::Tensor S = needs_fused_pass(x, lora_A, dropout)
                           ? kernels.down_project(x2, lora_A, dropout, seed)
                           : at::mm(x2, lora_A.t());
  const at::Tensor n = weight_norm(kernels, weight, lora_A, lora_B, weight_norm_sq, scaling);
  const at::Tensor c = magnitude.to(n.scalar_type()) / n;

  // z = drop(x)·Wᵀ + s·S·Bᵀ: the rank-r GEMM first, the base GEMM (or the masked pass, which
  // runs the LoRA down-projection with W in place of A) accumulating into or under it.
  const at::Tensor S_scaled = (S * scaling).to(x.scalar_type());
  const at::Tensor B_t = lora_B.to(x.scalar_type()).t();
  at::Tensor z, y;
  if (dropout == 0.0) {
    z = at::mm(S_scaled, B_t);
    z.addmm_(x2, weight.t());
    // y = c⊙z + b in one pass.
    if (given(bias)) {
      y = at::empty_like(z);
      at::addcmul_out(y, *bias, z, c);
    } else {
      y = scale_columns(z, c);
    }
  } else {
    z = kernels.down_project(x2, weight, dropout, seed);
    z.addmm_(S_scaled, B_t);
    // y = x·Wᵀ + b + s·S·Bᵀ + (c − 1)⊙z, which is peft's x·Wᵀ + b + (c − 1)⊙(x_d·Wᵀ) + c⊙s·S·Bᵀ.
    y = given(bias) ? at::addmm(*bias, S_scaled, B_t) : at::mm(S_scaled, B_t);
    y.addmm_(x2, weight.t());
    y.addcmul_(z, c - 1.0);
  }

  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  return {y.view(out_shape), S, z, n};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dora_linear_backward(const LoraKernels& kernels, const at::Tensor& grad_y, const at::Tensor& x,
                     const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                     const at::Tensor& magnitude, const at::Tensor& S, const at::Tensor& z,
                     const at::Tensor& weight_norm, double scaling, double dropout,
                     const c10::optional<at::Tensor>& seed, std::array<bool, 6> output_mask) {
  check_lora_args(x, weight, c10::nullopt, lora_A, lora_B, dropout, seed);
  check_dora_args(x, weight, lora_A, magnitude, weight_norm, "weight_norm");
  const int64_t K = weight.size(1), N = weight.size(0), r = lora_A.size(0);
  const int64_t M = leading_rows(x);
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.sizes().back() == N && leading_rows(grad_y) == M,
              "peftkern: grad_y must have shape [..., out_features] matching x, got ",
              shape_str(grad_y));
  check_dim(S, 2, "S", "[rows, r]");
  check_size(S, 1, r, "S", "the rank r");
  check_dim(z, 2, "z", "[rows, out_features]");
  check_size(z, 1, N, "z", "weight.shape[0] (out_features)");
  check_same_dtype(z, x, "z", "x");
  const auto [need_dx, need_dW, need_dbias, need_dA, need_dB, need_dm] = output_mask;

  const at::Tensor g2 = rows_of(grad_y, N);
  const at::Tensor x2 = rows_of(x, K);
  const at::Tensor c = magnitude.to(weight_norm.scalar_type()) / weight_norm;

  // The LoRA branch enters y with the factor c (directly and through z), so its gradients are
  // LoRA's over c⊙g. c is applied on the rank-r side, in float32: dS = s·g·(c⊙B) and
  // dB = c⊙(s·gᵀ·S), so g is never rounded after scaling (float32 adapters on half-precision
  // g would otherwise lose a rounding against plain PyTorch).
  const auto adapter_type = lora_B.scalar_type();
  const at::Tensor c_rows = c.unsqueeze(1);
  const at::Tensor B_scaled = (lora_B.to(c.scalar_type()) * c_rows).to(adapter_type);
  auto [dS, dB] = up_project_grads(kernels, g2, B_scaled, S, scaling, need_dx || need_dA, need_dB);
  if (need_dB) dB = (dB.to(c.scalar_type()) * c_rows).to(adapter_type);
  const bool fused = needs_fused_pass(x, lora_A, dropout);
  at::Tensor dx, dA, dW;
  if (need_dA) dA = fused ? at::zeros({r, K}, lora_A.options()) : at::mm(dS.t(), x2);
  if (need_dx) dx = fused ? at::empty({M, K}, x.options()) : at::mm(dS, lora_A);
  if (fused && (need_dx || need_dA)) {
    kernels.down_project_backward(x2, lora_A, dS, dropout, seed, dA, dx);
  }

  if (dropout == 0.0) {
    // The base enters as c⊙(x·Wᵀ).
    if (need_dx || need_dW) {
      const at::Tensor gc = scale_columns(g2, c);
      if (need_dx) dx.addmm_(gc, weight);
      if (need_dW) dW = at::mm(gc.t(), x2);
    }
  } else if (need_dx || need_dW) {
    // The base enters as x·Wᵀ and (c − 1)⊙(x_d·Wᵀ): the masked part is the LoRA
    // down-projection's backward with W in place of A and (c − 1)⊙g in place of dS.
    const at::Tensor g_masked = scale_columns(g2, c - 1.0);
    at::Tensor dx_masked = need_dx ? at::empty({M, K}, x.options()) : at::Tensor();
    if (need_dW) dW = at::zeros_like(weight, at::MemoryFormat::Contiguous);
    kernels.down_project_backward(x2, weight, g_masked, dropout, seed, dW, dx_masked);
    if (need_dx) dx.add_(dx_masked).addmm_(g2, weight);
    if (need_dW) dW.addmm_(g2.t(), x2);
  }

  // ∂magnitude_n = Σ_m g·z / n (n is a constant).
  at::Tensor dm = need_dm ? column_dots(g2, z, weight_norm.scalar_type())
                                .div_(weight_norm)
                                .to(magnitude.scalar_type())
                          : unneeded_grad(magnitude);
  at::Tensor dbias = need_dbias ? g2.sum(0) : unneeded_grad(weight);
  dx = need_dx ? dx.view(x.sizes()) : unneeded_grad(x);
  if (!need_dW) dW = unneeded_grad(weight);
  if (!need_dA) dA = unneeded_grad(lora_A);
  if (!need_dB) dB = unneeded_grad(lora_B);
  return {dx, dW, dbias, dA, dB, dm};
}

}  // namespace peftkern
