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

// One row of out += multiplier ⊙ (coef·basis): out[k] += m(row, k)·Σ_j coef[j]·basis[j, k].
// Columns go in chunks of kRankChunk held in registers while the rank loop runs, so out is
// read and written once and basis (r×K, small) streams from cache.
constexpr int64_t kRankChunk = 64;

template <typename Out, typename Acc, bool kDropout>
void add_rank_row(const Acc* coef, const Acc* basis, Out* out, int64_t r, int64_t K, int64_t row,
                  const DropoutParams& d) {
  using C = compute_t<Acc>;
  const C scale = static_cast<C>(d.keep_scale);
  for (int64_t k0 = 0; k0 < K; k0 += kRankChunk) {
    const int64_t width = std::min(kRankChunk, K - k0);
    C acc[kRankChunk];
    for (int64_t t = 0; t < kRankChunk; ++t) acc[t] = C(0);
    for (int64_t j = 0; j < r; ++j) {
      const C c = static_cast<C>(coef[j]);
      const Acc* b = basis + j * K + k0;
      if (width == kRankChunk) {
        for (int64_t t = 0; t < kRankChunk; ++t) acc[t] += c * static_cast<C>(b[t]);
      } else {
        for (int64_t t = 0; t < width; ++t) acc[t] += c * static_cast<C>(b[t]);
      }
    }
    Out* o = out + k0;
    if constexpr (kDropout) {
      // The chunk's multipliers first (kRankChunk is a multiple of 4, so its Philox groups
      // start at k0 / 4), in a loop of whole groups that vectorises, then one fused add.
      C mult[kRankChunk];
      for (int64_t g = 0; g < (width + 3) / 4; ++g) {
        const Philox4 w = dropout_words(d, row, k0 / 4 + g);
        for (int l = 0; l < 4; ++l) mult[4 * g + l] = (w.v[l] >> 8) >= d.threshold ? scale : C(0);
      }
      for (int64_t t = 0; t < width; ++t) o[t] = static_cast<Out>(static_cast<C>(o[t]) + mult[t] * acc[t]);
    } else {
      for (int64_t t = 0; t < width; ++t) o[t] = static_cast<Out>(static_cast<C>(o[t]) + acc[t]);
    }
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

inline void add_rank_rows_impl(Dtype out_type, Dtype acc_type, const void* coef, const void* basis,
                               void* out, int64_t rows, int64_t r, int64_t K, int64_t row0,
                               const DropoutParams* dropout) {
  visit_dtype(out_type, [&](auto out_tag) {
    visit_dtype(acc_type, [&](auto acc_tag) {
      using Out = typename decltype(out_tag)::type;
      using Acc = typename decltype(acc_tag)::type;
      const Acc* coefs = static_cast<const Acc*>(coef);
      const Acc* basis_rows = static_cast<const Acc*>(basis);
      Out* outs = static_cast<Out*>(out);
      for (int64_t i = 0; i < rows; ++i) {
        if (dropout != nullptr) {
          add_rank_row<Out, Acc, true>(coefs + i * r, basis_rows, outs + i * K, r, K, row0 + i, *dropout);
        } else {
          add_rank_row<Out, Acc, false>(coefs + i * r, basis_rows, outs + i * K, r, K, row0 + i, DropoutParams{});
        }
      }
    });
  });
}
