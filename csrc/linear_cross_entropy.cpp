#include "linear_cross_entropy.h"

#include <algorithm>

#include "checks.h"
#include "tensor_utils.h"

namespace peftkern {
namespace {

CrossEntropyReduction parse_reduction(c10::string_view reduction) {
  if (reduction == "mean") return CrossEntropyReduction::mean;
  if (reduction == "sum") return CrossEntropyReduction::sum;
  TORCH_CHECK(reduction == "none", "peftkern: reduction must be 'mean', 'sum' or 'none', got '",
              std::string(reduction), "'");
  return CrossEntropyReduction::none;
}

// float32 for every dtype but float64, like the .float() of the eager expression (float64
// stays float64 so that gradcheck can check the op).
at::ScalarType loss_type(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

CrossEntropyParams check_args(const at::Tensor& hidden, const at::Tensor& weight,
                              const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
                              int64_t ignore_index, double label_smoothing,
                              c10::optional<double> softcap) {
  check_floating(hidden, "hidden");
  TORCH_CHECK(hidden.dim() >= 1,
              "peftkern: hidden must have shape [..., hidden_size], got a 0-D tensor");
  check_dim(weight, 2, "weight", "[vocab_size, hidden_size]");
  const int64_t V = weight.size(0), H = weight.size(1);
  check_size(hidden, hidden.dim() - 1, H, "hidden", "weight.shape[1] (hidden_size)");
  check_same_device(weight, hidden, "weight", "hidden");
  check_same_dtype(weight, hidden, "weight", "hidden");
  if (given(bias)) {
    check_dim(*bias, 1, "bias", "[vocab_size]");
    check_size(*bias, 0, V, "bias", "weight.shape[0] (vocab_size)");
    check_same_device(*bias, hidden, "bias", "hidden");
    check_same_dtype(*bias, hidden, "bias", "hidden");
  }
  TORCH_CHECK(labels.scalar_type() == at::kLong, "peftkern: labels must be int64, got ",
              labels.scalar_type());
  check_same_device(labels, hidden, "labels", "hidden");
  const int64_t M = leading_rows(hidden);
  TORCH_CHECK(labels.numel() == M, "peftkern: labels must have one entry per row of hidden (", M,
              " = the product of hidden.shape[:-1]), got shape ", shape_str(labels),
              " for hidden of shape ", shape_str(hidden));
  TORCH_CHECK(V > 0, "peftkern: weight.shape[0] (vocab_size) must be > 0, got shape ",
              shape_str(weight));
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0,
              "peftkern: label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(!softcap.has_value() || *softcap > 0.0, "peftkern: softcap must be None or > 0, got ",
              softcap.value_or(0.0));
  if (M > 0) {
    // One synchronisation on a GPU; an out-of-range label would otherwise index out of bounds.
    const at::Tensor bad = ((labels < 0) & (labels != ignore_index)) | (labels >= V);
    if (bad.any().item<bool>()) {
      const int64_t first =
          labels.reshape({-1}).masked_select(bad.reshape({-1}))[0].item<int64_t>();
      TORCH_CHECK(false, "peftkern: labels must be in [0, ", V,
                  ") (weight.shape[0], the vocabulary size) or equal ignore_index (", ignore_index,
                  "), got ", first);
    }
  }
  return {ignore_index, label_smoothing, softcap.value_or(0.0)};
}

// The gradients the chunk loop accumulates; an undefined one is not computed.
struct Gradients {
  at::Tensor hidden;  // [M, H], hidden's dtype
  at::Tensor weight;  // [V, H], the loss dtype (float32 for half-precision weights)
  at::Tensor bias;    // [V], the loss dtype
};

// The chunk loop: for each chunk of rows, its logits (one GEMM in the inputs' dtype, then the
// loss dtype), the row pass, and with row_scale defined the two GEMMs that take the logits'
// gradient into the hidden and weight gradients.
void run_chunks(const LinearCrossEntropyKernels& kernels, const at::Tensor& h2,
                const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                const at::Tensor& labels1, const at::Tensor& row_scale,
                const CrossEntropyParams& params, at::Tensor& loss_rows, Gradients& grads) {
  const int64_t M = h2.size(0), V = weight.size(0);
  const int64_t chunk =
      std::clamp<int64_t>(kernels.max_chunk_elements / V, 1, std::max<int64_t>(M, 1));
  const auto ltype = loss_rows.scalar_type();
  // A half-precision head's gradient is summed over the chunks in float32; each chunk's
  // product lands in this buffer first.
  at::Tensor weight_product;
  for (int64_t m0 = 0; m0 < M; m0 += chunk) {
    const int64_t rows = std::min(chunk, M - m0);
    const at::Tensor h_chunk = h2.narrow(0, m0, rows);
    // The logits in the inputs' dtype are a temporary: only their loss-dtype copy lives on
    // (the same tensor for float32 and float64).
    at::Tensor z =
        (given(bias) ? at::addmm(*bias, h_chunk, weight.t()) : at::mm(h_chunk, weight.t()))
            .to(ltype)
            .contiguous();
    at::Tensor loss_chunk = loss_rows.narrow(0, m0, rows);
    const at::Tensor scale_chunk =
        row_scale.defined() ? row_scale.narrow(0, m0, rows) : at::Tensor();
    kernels.rows_pass(z, labels1.narrow(0, m0, rows), scale_chunk, loss_chunk, params);
    if (!row_scale.defined()) continue;

    const at::Tensor g = z.to(weight.scalar_type());
    if (grads.hidden.defined()) {
      at::Tensor dh_chunk = grads.hidden.narrow(0, m0, rows);
      at::mm_out(dh_chunk, g, weight);
    }
    if (grads.weight.defined()) {
      if (grads.weight.scalar_type() == weight.scalar_type()) {
        grads.weight.addmm_(g.t(), h_chunk);
      } else {
        if (!weight_product.defined()) weight_product = at::empty_like(weight);
        at::mm_out(weight_product, g.t(), h_chunk);
        grads.weight.add_(weight_product);
      }
    }
    if (grads.bias.defined()) grads.bias.add_(z.sum(0));
  }
}

// Allocates the gradients asked for, zeroed where chunks accumulate into them.
Gradients allocate_gradients(const at::Tensor& hidden, const at::Tensor& weight,
                             const c10::optional<at::Tensor>& bias, at::ScalarType ltype,
                             std::array<bool, 3> mask) {
  Gradients grads;
  if (mask[0]) grads.hidden = at::empty({leading_rows(hidden), weight.size(1)}, hidden.options());
  if (mask[1]) {
    const auto acc_type = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    grads.weight = at::zeros(weight.sizes(), weight.options().dtype(acc_type));
  }
  if (mask[2] && given(bias))
    grads.bias = at::zeros({weight.size(0)}, weight.options().dtype(ltype));
  return grads;
}

// The gradients in the inputs' dtypes and shapes, an empty tensor for one not computed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_gradients(const Gradients& grads,
                                                                const at::Tensor& hidden,
                                                                const at::Tensor& weight) {
  return {grads.hidden.defined() ? grads.hidden.view(hidden.sizes()) : unneeded_grad(hidden),
          grads.weight.defined() ? grads.weight.to(weight.scalar_type()) : unneeded_grad(weight),
          grads.bias.defined() ? grads.bias.to(weight.scalar_type()) : unneeded_grad(weight)};
}

}  // namespace

void generic_rows_pass(at::Tensor& z, const at::Tensor& labels, const at::Tensor& row_scale,
                       at::Tensor& loss, const CrossEntropyParams& params) {
  const int64_t V = z.size(1);
  const double eps = params.label_smoothing;
  at::Tensor capped;  // tanh(logits / cap), kept for the softcap's derivative
  if (params.softcap > 0.0) {
    capped = at::tanh(z / params.softcap);
    z.copy_(capped).mul_(params.softcap);
  }
  const at::Tensor valid = labels != params.ignore_index;
  const at::Tensor safe_labels = at::where(valid, labels, at::zeros_like(labels)).unsqueeze(1);
  const at::Tensor lse = at::logsumexp(z, 1);
  at::Tensor row_loss = lse - (1.0 - eps) * z.gather(1, safe_labels).squeeze(1);
  if (eps > 0.0) row_loss -= (eps / V) * z.sum(1);
  loss.copy_(row_loss.masked_fill(~valid, 0.0));
  if (!row_scale.defined()) return;

  z.sub_(lse.unsqueeze(1)).exp_();
  z.scatter_add_(1, safe_labels, at::full({z.size(0), 1}, -(1.0 - eps), z.options()));
  if (eps > 0.0) z.sub_(eps / V);
  z.mul_((row_scale * valid).unsqueeze(1));
  if (capped.defined()) z.mul_(1.0 - capped * capped);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward(
    const LinearCrossEntropyKernels& kernels, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, int64_t ignore_index,
    c10::string_view reduction, double label_smoothing, c10::optional<double> softcap,
    std::array<bool, 3> grad_mask) {
  const CrossEntropyParams params =
      check_args(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap);
  const auto kind = parse_reduction(reduction);
  const int64_t M = leading_rows(hidden), H = weight.size(1);
  const auto ltype = loss_type(hidden);
  const at::Tensor h2 = rows_of(hidden, H);
  const at::Tensor labels1 = labels.reshape({M}).contiguous();
  const at::Tensor counted = (labels1 != ignore_index).sum().to(ltype);

  // A scalar loss's incoming gradient only scales these, so they are made now, while the
  // logits are at hand, instead of recomputing every logit in backward.
  const bool with_grads =
      kind != CrossEntropyReduction::none && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
  at::Tensor row_scale;
  if (with_grads) {
    row_scale = at::ones({M}, hidden.options().dtype(ltype));
    if (kind == CrossEntropyReduction::mean) row_scale.div_(counted.clamp_min(1.0));
  }
  Gradients grads = allocate_gradients(hidden, weight, bias, ltype,
                                       with_grads ? grad_mask : std::array<bool, 3>{});
  at::Tensor loss_rows = at::empty({M}, hidden.options().dtype(ltype));
  run_chunks(kernels, h2, weight, bias, labels1, row_scale, params, loss_rows, grads);

  at::Tensor loss;
  switch (kind) {
    case CrossEntropyReduction::none:
      loss = loss_rows.view(labels.sizes());
      break;
    case CrossEntropyReduction::sum:
      loss = loss_rows.sum();
      break;
    case CrossEntropyReduction::mean:
      // 0/0 = nan when every label is ignored, as in PyTorch.
      loss = loss_rows.sum() / counted;
      break;
  }
  const auto [dh, dW, db] = finish_gradients(grads, hidden, weight);
  return {loss, dh, dW, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const LinearCrossEntropyKernels& kernels, const at::Tensor& grad_loss, const at::Tensor& hidden,
    const at::Tensor& weight, const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
    int64_t ignore_index, c10::string_view reduction, double label_smoothing,
    c10::optional<double> softcap, std::array<bool, 3> output_mask) {
  const CrossEntropyParams params =
      check_args(hidden, weight, bias, labels, ignore_index, label_smoothing, softcap);
  const auto kind = parse_reduction(reduction);
  const int64_t M = leading_rows(hidden), H = weight.size(1);
  const auto ltype = loss_type(hidden);
  check_same_device(grad_loss, hidden, "grad_loss", "hidden");
  if (kind == CrossEntropyReduction::none) {
    TORCH_CHECK(grad_loss.numel() == M, "peftkern: grad_loss must have the shape of labels (",
                shape_str(labels), "), got shape ", shape_str(grad_loss));
  } else {
    TORCH_CHECK(grad_loss.numel() == 1, "peftkern: grad_loss must be a scalar for reduction '",
                std::string(reduction), "', got shape ", shape_str(grad_loss));
  }
  const at::Tensor labels1 = labels.reshape({M}).contiguous();
  at::Tensor row_scale = grad_loss.to(ltype).reshape({-1}).expand({M}).contiguous();
  if (kind == CrossEntropyReduction::mean) {
    row_scale.div_((labels1 != ignore_index).sum().to(ltype).clamp_min(1.0));
  }
  Gradients grads = allocate_gradients(hidden, weight, bias, ltype, output_mask);
  at::Tensor loss_rows = at::empty({M}, hidden.options().dtype(ltype));
  run_chunks(kernels, rows_of(hidden, H), weight, bias, labels1, row_scale, params, loss_rows,
             grads);
  return finish_gradients(grads, hidden, weight);
}

}  // namespace peftkern
