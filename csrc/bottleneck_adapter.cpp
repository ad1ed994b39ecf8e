#include "bottleneck_adapter.h"

#include "checks.h"
#include "tensor_utils.h"

namespace peftkern {
namespace {

// Checks an optional tensor that must be 1-D of `size` elements, on h's device and dtype.
void check_vector(const c10::optional<at::Tensor>& t, int64_t size, const char* name,
                  const char* what, const at::Tensor& h) {
  if (!given(t)) return;
  check_dim(*t, 1, name, what);
  check_size(*t, 0, size, name, what);
  check_same_device(*t, h, name, "h");
  check_same_dtype(*t, h, name, "h");
}

void check_adapter_args(const at::Tensor& h, const at::Tensor& w_down,
                        const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                        const c10::optional<at::Tensor>& b_up,
                        const c10::optional<at::Tensor>& scaling_vector,
                        const c10::optional<at::Tensor>& residual) {
  check_floating(h, "h");
  TORCH_CHECK(h.dim() >= 1, "peftkern: h must have shape [..., hidden_size], got a 0-D tensor");
  check_dim(w_down, 2, "w_down", "[bottleneck, hidden_size]");
  check_dim(w_up, 2, "w_up", "[hidden_size, bottleneck]");
  const int64_t r = w_down.size(0), d = w_down.size(1);
  TORCH_CHECK(r > 0,
              "peftkern: w_down.shape[0] is the bottleneck size r and must be > 0, got "
              "shape ",
              shape_str(w_down));
  check_size(h, h.dim() - 1, d, "h", "w_down.shape[1] (hidden_size)");
  check_size(w_up, 0, d, "w_up", "w_down.shape[1] (hidden_size)");
  check_size(w_up, 1, r, "w_up", "w_down.shape[0] (the bottleneck size r)");
  check_same_device(w_down, h, "w_down", "h");
  check_same_device(w_up, h, "w_up", "h");
  check_same_dtype(w_down, h, "w_down", "h");
  check_same_dtype(w_up, h, "w_up", "h");
  check_vector(b_down, r, "b_down", "[bottleneck]", h);
  check_vector(b_up, d, "b_up", "[hidden_size]", h);
  check_vector(scaling_vector, d, "scaling_vector", "[hidden_size]", h);
  if (given(residual)) {
    TORCH_CHECK(residual->sizes() == h.sizes(), "peftkern: residual must have the shape of h (",
                shape_str(h), "), got shape ", shape_str(*residual));
    check_same_device(*residual, h, "residual", "h");
    check_same_dtype(*residual, h, "residual", "h");
  }
}

// The learned per-channel scale as a [d, 1] column in at least float32, or an undefined
// tensor when there is none.
at::Tensor channel_scale(const c10::optional<at::Tensor>& scaling_vector) {
  if (!given(scaling_vector)) return at::Tensor();
  const auto compute = at::promote_types(scaling_vector->scalar_type(), at::kFloat);
  return scaling_vector->to(compute).unsqueeze(1);
}

// [W_up | b_up] (the bias as an extra column when given), each row times the learned channel
// scale when given: the [d, r(+1)] right-hand side of the up GEMM. Tiny, so building it is free.
at::Tensor up_weight(const at::Tensor& w_up, const c10::optional<at::Tensor>& b_up,
                     const at::Tensor& scale) {
  const at::Tensor w = given(b_up) ? at::cat({w_up, b_up->unsqueeze(1)}, 1) : w_up;
  if (!scale.defined()) return w;
  return (w.to(scale.scalar_type()) * scale).to(w_up.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_forward(
    const AdapterKernels& kernels, const at::Tensor& h, const at::Tensor& w_down,
    const c10::optional<at::Tensor>& b_down, const at::Tensor& w_up,
    const c10::optional<at::Tensor>& b_up, const std::string& activation, double scaling,
    const c10::optional<at::Tensor>& scaling_vector, const c10::optional<at::Tensor>& residual) {
  const Activation kind = parse_activation(activation);
  check_adapter_args(h, w_down, b_down, w_up, b_up, scaling_vector, residual);
  const int64_t r = w_down.size(0), d = w_down.size(1);
  const at::Tensor h2 = rows_of(h, d);
  const at::Tensor Z = given(b_down) ? at::addmm(*b_down, h2, w_down.t()) : at::mm(h2, w_down.t());
  // a = scaling·[act(Z) | 1]: the last column carries b_up through the up GEMM.
  at::Tensor a = at::empty({h2.size(0), r + (given(b_up) ? 1 : 0)}, h.options());
  kernels.activate(Z, kind, scaling, a);
  // out = residual + a·([W_up | b_up] ⊙ s)ᵀ: one GEMM with beta = 1 on the residual.
  const at::Tensor w = up_weight(w_up, b_up, channel_scale(scaling_vector));
  const at::Tensor res2 = given(residual) ? rows_of(*residual, d) : h2;
  const at::Tensor out = at::addmm(res2, a, w.t());
  return {out.view(h.sizes()), Z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
bottleneck_adapter_backward(const AdapterKernels& kernels, const at::Tensor& grad_out,
                            const at::Tensor& h, const at::Tensor& w_down, const at::Tensor& w_up,
                            const c10::optional<at::Tensor>& b_up, const at::Tensor& Z,
                            const std::string& activation, double scaling,
                            const c10::optional<at::Tensor>& scaling_vector, bool residual_is_h,
                            std::array<bool, 6> output_mask) {
  const Activation kind = parse_activation(activation);
  check_adapter_args(h, w_down, c10::nullopt, w_up, b_up, scaling_vector, c10::nullopt);
  const int64_t r = w_down.size(0), d = w_down.size(1);
  TORCH_CHECK(grad_out.sizes() == h.sizes(), "peftkern: grad_out must have the shape of h (",
              shape_str(h), "), got shape ", shape_str(grad_out));
  check_same_device(grad_out, h, "grad_out", "h");
  check_same_dtype(grad_out, h, "grad_out", "h");
  check_dim(Z, 2, "pre_activation", "[rows, bottleneck]");
  check_size(Z, 0, leading_rows(h), "pre_activation", "the number of rows of h");
  check_size(Z, 1, r, "pre_activation", "the bottleneck size r");
  const auto [need_dh, need_dWd, need_dbd, need_dWu, need_dbu, need_ds] = output_mask;
  const bool need_dZ = need_dh || need_dWd || need_dbd;
  const bool need_G = need_dWu || need_dbu || need_ds;
  // colsum(g) is needed for db_up and, with a bias, for ds; it comes from the ones column.
  const bool ones_column = need_dbu || (need_ds && given(b_up));

  const at::Tensor g2 = rows_of(grad_out, d);
  const at::Tensor Z2 = Z.contiguous();
  const at::Tensor scale = channel_scale(scaling_vector);

  // a = scaling·[act(Z) | 1], regenerated from Z (the M×r bottleneck is all that was saved).
  at::Tensor a =
      need_G ? at::empty({Z2.size(0), r + (ones_column ? 1 : 0)}, h.options()) : at::Tensor();
  // The up-side gradients come from GEMMs over g against a = scaling·[act(Z) | 1]:
  //   G_s = (g ⊙ s)ᵀ·a, whose columns are dW_up and db_up, and
  //   G   = gᵀ·a for the gradient of the learned scale (only asked for when there is one).
  // g ⊙ s is rounded elementwise before the GEMM, as in plain PyTorch; scaling G afterwards
  // would round the summed gradient twice, which in bf16/fp16 doubles its error.
  const bool learned = scale.defined();
  const bool need_Gs = need_dWu || need_dbu;
  // g ⊙ s costs a pass over g, but folding s into W_up instead would round that weight once
  // for all rows: an error that adds up coherently in dW_down and db_down in bf16/fp16.
  const at::Tensor gs =
      learned && (need_dZ || need_Gs) ? g2 * scale.squeeze(1).to(g2.scalar_type()) : g2;
  at::Tensor dZ;
  if (need_dZ) {
    // dA = (g ⊙ s)·W_up, then dZ = scaling·dA ⊙ act'(Z) in place, producing a on the way.
    dZ = at::mm(gs, w_up);
    kernels.activate_backward(Z2, dZ, kind, scaling, a);
  } else if (need_G) {
    kernels.activate(Z2, kind, scaling, a);
  }
  at::Tensor dh = unneeded_grad(h);
  if (need_dh) {
    // dh = g (the residual path) + dZ·W_down as one GEMM with beta = 1.
    dh = (residual_is_h ? at::addmm(g2, dZ, w_down) : at::mm(dZ, w_down)).view(h.sizes());
  }
  const at::Tensor dWd = need_dWd ? at::mm(dZ.t(), rows_of(h, d)) : unneeded_grad(w_down);
  // Both as (aᵀ·g)ᵀ: a GEMM with r + 1 output rows that reads g in its natural layout, which
  // the CPU BLAS runs faster than gᵀ·a (g read transposed).
  const auto a_t_times = [&](const at::Tensor& rows) { return at::mm(a.t(), rows).t(); };
  const at::Tensor G_s = need_Gs ? a_t_times(gs) : at::Tensor();
  const at::Tensor G = need_ds ? a_t_times(g2) : at::Tensor();
  const at::Tensor dbd = need_dbd ? dZ.sum(0) : unneeded_grad(w_down);
  const at::Tensor dWu = need_dWu ? G_s.narrow(1, 0, r).contiguous() : unneeded_grad(w_up);
  // A fresh tensor, not a view into G_s (whose transposed column r is already contiguous).
  const at::Tensor dbu = need_dbu ? G_s.select(1, r).clone() : unneeded_grad(w_up);
  at::Tensor ds = unneeded_grad(w_up);
  if (need_ds) {
    // ds[n] = scaling·Σ_m g[m, n]·u[m, n] with u = act(Z)·W_upᵀ + b_up, without forming u:
    // = Σ_k W_up[n, k]·G[n, k] + b_up[n]·G[n, r].
    const auto compute = at::promote_types(h.scalar_type(), at::kFloat);
    at::Tensor sum = (w_up.to(compute) * G.narrow(1, 0, r).to(compute)).sum(1);
    if (given(b_up)) sum += b_up->to(compute) * G.select(1, r).to(compute);
    ds = sum.to(h.scalar_type());
  }
  return {dh, dWd, dbd, dWu, dbu, ds};
}

}  // namespace peftkern
