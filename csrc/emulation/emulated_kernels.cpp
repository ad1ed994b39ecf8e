// Python bindings that launch each kernel of csrc/cuda/kernels/ on CPU tensors through the CUDA
// emulation, with the geometry the CUDA launchers use. Built on the fly by
// tests/emulated_cuda.py for tests/test_emulated_cuda.py; not part of the peftkern extension.
//
// Outputs are allocated with exactly their size and filled with NaN, so an element that a
// launch geometry misses shows up in the comparison and a write past the end shows up under
// AddressSanitizer.
#include <torch/extension.h>

#include <limits>
#include <string>

#include "../cuda/kernels/bottleneck_adapter.cuh"
#include "../cuda/kernels/lora_linear.cuh"
#include "../cuda/kernels/prefix_attention.cuh"

namespace peftkern::cuda {
namespace {

template <typename Kernel, typename... Args>
void launch(const LaunchGeometry& g, Kernel kernel, Args... args) {
  emu::launch(kernel, g.grid, g.block, g.shared_bytes, args...);
}

at::Tensor nan_like(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
}

void check_cpu_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

// ---- LoRA ------------------------------------------------------------------------------

// Calls f(X{}, Acc{}, dropout{}) for x's dtype, the adapter dtype (x's, or float for half
// types, as in the CUDA op) and whether dropout is on.
template <typename F>
void lora_dispatch(const at::Tensor& x, const at::Tensor& adapter, double p, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "emulated_lora", [&] {
    using X = scalar_t;
    auto with_acc = [&](auto acc) {
      if (p > 0)
        f(X{}, acc, std::true_type{});
      else
        f(X{}, acc, std::false_type{});
    };
    if (adapter.scalar_type() == x.scalar_type()) {
      with_acc(X{});
    } else {
      TORCH_CHECK(adapter.scalar_type() == at::kFloat, "adapter must be x's dtype or float32");
      with_acc(float{});
    }
  });
}

DropoutParams dropout_params(double p) {
  return p > 0 ? DropoutParams::make(0, p) : DropoutParams{};
}

const int64_t* seed_ptr(double p, const at::Tensor& seed) {
  return p > 0 ? seed.const_data_ptr<int64_t>() : nullptr;
}

at::Tensor down_project(const at::Tensor& x, const at::Tensor& A, double p,
                        const at::Tensor& seed) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(A, "A");
  const int64_t M = x.size(0), K = x.size(1), r = A.size(0);
  at::Tensor S = nan_like({M, r}, A.options());
  lora_dispatch(x, A, p, [&](auto x_value, auto acc_value, auto dropout) {
    using X = decltype(x_value);
    using Acc = decltype(acc_value);
    launch(down_project_geometry(M, r), down_project_kernel<X, Acc, decltype(dropout)::value>,
           x.const_data_ptr<X>(), A.const_data_ptr<Acc>(), S.data_ptr<Acc>(), M, K, r,
           dropout_params(p), seed_ptr(p, seed));
  });
  return S;
}

at::Tensor lora_dx(const at::Tensor& x, const at::Tensor& A, const at::Tensor& dS, double p,
                   const at::Tensor& seed) {
  check_cpu_contiguous(A, "A");
  check_cpu_contiguous(dS, "dS");
  const int64_t M = x.size(0), K = x.size(1), r = A.size(0);
  at::Tensor dx = nan_like({M, K}, x.options());
  lora_dispatch(x, A, p, [&](auto x_value, auto acc_value, auto dropout) {
    using X = decltype(x_value);
    using Acc = decltype(acc_value);
    launch(lora_dx_geometry<compute_t<Acc>>(M, K, r),
           lora_dx_kernel<X, Acc, decltype(dropout)::value>, dS.const_data_ptr<Acc>(),
           A.const_data_ptr<Acc>(), dx.data_ptr<X>(), K, r, dropout_params(p), seed_ptr(p, seed));
  });
  return dx;
}

// The per-split partial sums [splits, r, K] (the CUDA launcher adds them up).
at::Tensor lora_dA(const at::Tensor& x, const at::Tensor& dS, double p, const at::Tensor& seed,
                   int64_t sms) {
  check_cpu_contiguous(x, "x");
  check_cpu_contiguous(dS, "dS");
  const int64_t M = x.size(0), K = x.size(1), r = dS.size(1);
  const LoraDAGeometry g = lora_dA_geometry(M, K, r, sms);
  const auto acc_type = dS.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = nan_like({g.splits, r, K}, x.options().dtype(acc_type));
  lora_dispatch(x, dS, p, [&](auto x_value, auto acc_value, auto dropout) {
    using X = decltype(x_value);
    using Acc = decltype(acc_value);
    launch(g.launch, lora_dA_kernel<X, Acc, decltype(dropout)::value>, x.const_data_ptr<X>(),
           dS.const_data_ptr<Acc>(), partial.data_ptr<compute_t<Acc>>(), M, K, r, g.rows_per_split,
           dropout_params(p), seed_ptr(p, seed));
  });
  return partial;
}

// ---- bottleneck adapter ----------------------------------------------------------------

at::Tensor activate(const at::Tensor& Z, const std::string& activation, double scale, int64_t width,
                    int64_t sms) {
  check_cpu_contiguous(Z, "Z");
  const int64_t rows = Z.size(0), r = Z.size(1);
  at::Tensor a = nan_like({rows, width}, Z.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Z.scalar_type(), "emulated_act", [&] {
    with_activation(parse_activation(activation), [&](auto kind) {
      launch(adapter_elementwise_geometry(rows * width, sms),
             activate_kernel<scalar_t, decltype(kind)::value>, Z.const_data_ptr<scalar_t>(),
             a.data_ptr<scalar_t>(), rows, r, width, static_cast<compute_t<scalar_t>>(scale));
    });
  });
  return a;
}

// Returns (dA scaled by act'(Z), a or an empty tensor when width is 0).
std::tuple<at::Tensor, at::Tensor> activate_backward(const at::Tensor& Z, const at::Tensor& dA,
                                                     const std::string& activation, double scale,
                                                     int64_t width, int64_t sms) {
  check_cpu_contiguous(Z, "Z");
  check_cpu_contiguous(dA, "dA");
  const int64_t rows = Z.size(0), r = Z.size(1);
  at::Tensor dA_out = dA.clone();
  at::Tensor a = width > 0 ? nan_like({rows, width}, Z.options()) : at::Tensor();
  const int64_t span = width > 0 ? width : r;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, Z.scalar_type(), "emulated_act_bwd", [&] {
        with_activation(parse_activation(activation), [&](auto kind) {
          constexpr Activation A = decltype(kind)::value;
          const LaunchGeometry g = adapter_elementwise_geometry(rows * span, sms);
          const auto s = static_cast<compute_t<scalar_t>>(scale);
          if (width > 0) {
            launch(g, activate_backward_kernel<scalar_t, A, true>, Z.const_data_ptr<scalar_t>(),
                   dA_out.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), rows, r, width, s);
          } else {
            launch(g, activate_backward_kernel<scalar_t, A, false>, Z.const_data_ptr<scalar_t>(),
                   dA_out.data_ptr<scalar_t>(), static_cast<scalar_t*>(nullptr), rows, r, r, s);
          }
        });
      });
  return {dA_out, a};
}

// ---- prefix attention ------------------------------------------------------------------

AttentionBlock attention_block(const at::Tensor& scores, int64_t heads_kv, int64_t group, int64_t n,
                               int64_t q_begin, int64_t rows, bool causal, double scale) {
  return AttentionBlock{heads_kv, group, n, q_begin, rows, scores.size(2), causal, scale};
}

const bool* keep_ptr(const c10::optional<at::Tensor>& mask) {
  if (!mask) return nullptr;
  check_cpu_contiguous(*mask, "mask");
  return mask->const_data_ptr<bool>();
}

// scores [B·Hkv, g·rows, keys] becomes the softmax in place; lse [B·Hkv, g, n] gets the block's
// rows (the others keep their values).
void softmax_rows(at::Tensor& scores, at::Tensor& lse, const c10::optional<at::Tensor>& mask,
                  int64_t heads_kv, int64_t group, int64_t n, int64_t q_begin, int64_t rows,
                  bool causal, double scale) {
  check_cpu_contiguous(scores, "scores");
  check_cpu_contiguous(lse, "lse");
  const AttentionBlock b =
      attention_block(scores, heads_kv, group, n, q_begin, rows, causal, scale);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "emulated_softmax_rows", [&] {
    launch(score_rows_geometry(scores.size(0) * scores.size(1)), softmax_rows_kernel<scalar_t>,
           scores.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), keep_ptr(mask), scores.size(1),
           scores.size(2), b);
  });
}

void probs_rows(at::Tensor& scores, const at::Tensor& lse, const c10::optional<at::Tensor>& mask,
                int64_t heads_kv, int64_t group, int64_t n, int64_t q_begin, int64_t rows,
                bool causal, double scale) {
  check_cpu_contiguous(scores, "scores");
  check_cpu_contiguous(lse, "lse");
  const AttentionBlock b =
      attention_block(scores, heads_kv, group, n, q_begin, rows, causal, scale);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "emulated_probs_rows", [&] {
    launch(score_rows_geometry(scores.size(0) * scores.size(1)), probs_rows_kernel<scalar_t>,
           scores.data_ptr<scalar_t>(), lse.const_data_ptr<scalar_t>(), keep_ptr(mask),
           scores.size(1), scores.size(2), b);
  });
}

// out [rows, d] and lse [rows] are merged with (o2, lse2) in place.
void merge(at::Tensor& out, at::Tensor& lse, const at::Tensor& o2, const at::Tensor& lse2) {
  check_cpu_contiguous(out, "out");
  check_cpu_contiguous(lse, "lse");
  check_cpu_contiguous(o2, "o2");
  check_cpu_contiguous(lse2, "lse2");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "emulated_merge", [&] {
    launch(merge_geometry(lse.numel()), merge_kernel<scalar_t>, out.data_ptr<scalar_t>(),
           lse.data_ptr<scalar_t>(), o2.const_data_ptr<scalar_t>(), lse2.const_data_ptr<scalar_t>(),
           out.size(-1));
  });
}

}  // namespace
}  // namespace peftkern::cuda

namespace peftkern::emu {
void register_emulator_checks(pybind11::module& m);  // emulator_checks.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace k = peftkern::cuda;
  pybind11::register_exception<peftkern::emu::EmulationError>(m, "EmulationError",
                                                              PyExc_RuntimeError);
  m.def("down_project_kernel", &k::down_project);
  m.def("lora_dx_kernel", &k::lora_dx);
  m.def("lora_dA_kernel", &k::lora_dA);
  m.def("activate_kernel", &k::activate);
  m.def("activate_backward_kernel", &k::activate_backward);
  m.def("softmax_rows_kernel", &k::softmax_rows);
  m.def("probs_rows_kernel", &k::probs_rows);
  m.def("merge_kernel", &k::merge);
  peftkern::emu::register_emulator_checks(m);
}
