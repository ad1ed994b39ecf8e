// The body of the CPU row kernels. Deliberately without an include guard and without
// includes: dropout_rows.cpp includes it once per vector ISA, inside a namespace and a
// `#pragma GCC target` region, so every function here is compiled for that ISA. Written
// as plain loops over 4-element Philox groups, which GCC and clang auto-vectorise.

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
struct DtypeTag {
  using type = T;
};

template <typename F>
void visit_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::f32: return f(DtypeTag<float>{});
    case Dtype::f64: return f(DtypeTag<double>{});
    case Dtype::f16: return f(DtypeTag<c10::Half>{});
    case Dtype::bf16: return f(DtypeTag<c10::BFloat16>{});
  }
}

template <typename X, typename Out, bool kDropout>
void drop_convert_row(const X* x, Out* out, int64_t K, int64_t row, const DropoutParams& d) {
  using C = compute_t<Out>;
  if constexpr (!kDropout) {
    for (int64_t k = 0; k < K; ++k) out[k] = static_cast<Out>(static_cast<C>(x[k]));
  } else {
    const C scale = static_cast<C>(d.keep_scale);
    const int64_t groups = K / 4;
    for (int64_t g = 0; g < groups; ++g) {
      const Philox4 w = dropout_words(d, row, g);
      for (int l = 0; l < 4; ++l) {
        const C keep = (w.v[l] >> 8) >= d.threshold ? scale : C(0);
        out[4 * g + l] = static_cast<Out>(static_cast<C>(x[4 * g + l]) * keep);
      }
    }
    if (K % 4 != 0) {
      const Philox4 w = dropout_words(d, row, groups);
      for (int64_t k = 4 * groups; k < K; ++k) {
        const C keep = (w.v[k - 4 * groups] >> 8) >= d.threshold ? scale : C(0);
        out[k] = static_cast<Out>(static_cast<C>(x[k]) * keep);
      }
    }
  }
}

template <typename X, typename Acc, bool kDx, bool kMasked>
void drop_backward_row(const X* x, X* dx, const Acc* tmp, Acc* masked, int64_t K, int64_t row,
                       const DropoutParams& d) {
  using C = compute_t<Acc>;
  const C scale = static_cast<C>(d.keep_scale);
  auto element = [&](int64_t k, uint32_t word) {
    const C keep = (word >> 8) >= d.threshold ? scale : C(0);
    if constexpr (kDx) dx[k] = static_cast<X>(static_cast<C>(dx[k]) + keep * static_cast<C>(tmp[k]));
    if constexpr (kMasked) masked[k] = static_cast<Acc>(keep * static_cast<C>(x[k]));
  };
  const int64_t groups = K / 4;
  for (int64_t g = 0; g < groups; ++g) {
    const Philox4 w = dropout_words(d, row, g);
    for (int l = 0; l < 4; ++l) element(4 * g + l, w.v[l]);
  }
  if (K % 4 != 0) {
    const Philox4 w = dropout_words(d, row, groups);
    for (int64_t k = 4 * groups; k < K; ++k) element(k, w.v[k - 4 * groups]);
  }
}

inline void drop_convert_rows_impl(Dtype x_type, Dtype out_type, const void* x, void* out,
                                   int64_t rows, int64_t K, int64_t row0,
                                   const DropoutParams* dropout) {
  visit_dtype(x_type, [&](auto x_tag) {
    visit_dtype(out_type, [&](auto out_tag) {
      using X = typename decltype(x_tag)::type;
      using Out = typename decltype(out_tag)::type;
      const X* xs = static_cast<const X*>(x);
      Out* outs = static_cast<Out*>(out);
      for (int64_t i = 0; i < rows; ++i) {
        if (dropout != nullptr) {
          drop_convert_row<X, Out, true>(xs + i * K, outs + i * K, K, row0 + i, *dropout);
        } else {
          drop_convert_row<X, Out, false>(xs + i * K, outs + i * K, K, row0 + i, DropoutParams{});
        }
      }
    });
  });
}

inline void drop_backward_rows_impl(Dtype x_type, Dtype acc_type, const void* x, void* dx,
                                    const void* tmp, void* masked, int64_t rows, int64_t K,
                                    int64_t row0, const DropoutParams* dropout) {
  // Without dropout the multiplier is 1 everywhere: threshold 0 keeps every element.
  const DropoutParams d = dropout != nullptr ? *dropout : DropoutParams{0, 0, 1.0};
  visit_dtype(x_type, [&](auto x_tag) {
    visit_dtype(acc_type, [&](auto acc_tag) {
      using X = typename decltype(x_tag)::type;
      using Acc = typename decltype(acc_tag)::type;
      const X* xs = static_cast<const X*>(x);
      X* dxs = static_cast<X*>(dx);
      const Acc* tmps = static_cast<const Acc*>(tmp);
      Acc* maskeds = static_cast<Acc*>(masked);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t o = i * K;
        if (dxs != nullptr && maskeds != nullptr) {
          drop_backward_row<X, Acc, true, true>(xs + o, dxs + o, tmps + o, maskeds + o, K, row0 + i, d);
        } else if (dxs != nullptr) {
          drop_backward_row<X, Acc, true, false>(xs + o, dxs + o, tmps + o, nullptr, K, row0 + i, d);
        } else if (maskeds != nullptr) {
          drop_backward_row<X, Acc, false, true>(xs + o, nullptr, nullptr, maskeds + o, K, row0 + i, d);
        }
      }
    });
  });
}
