// The body of the CPU row kernels. Deliberately without an include guard and without
// includes: dropout_rows.cpp includes it once per vector ISA, inside a namespace and a
// `#pragma GCC target` region, so every function here is compiled for that ISA. Written
// as plain loops that GCC and clang auto-vectorise, plus an AVX-512 Philox.

template <typename T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
struct DtypeTag {
  using type = T;
};

template <typename F>
void visit_dtype(Dtype dtype, F&& f) {
  switch (dtype) {
    case Dtype::f32:
      return f(DtypeTag<float>{});
    case Dtype::f64:
      return f(DtypeTag<double>{});
    case Dtype::f16:
      return f(DtypeTag<c10::Half>{});
    case Dtype::bf16:
      return f(DtypeTag<c10::BFloat16>{});
  }
}

// Dropout multipliers are produced 64 columns (16 Philox groups) at a time. The AVX-512
// variant evaluates the 16 Philox calls in the lanes of one vector, faster than what GCC
// makes of the scalar code (which it vectorises 4 groups wide); the words and the
// keep rule are exactly those of philox.h, so the mask is bitwise that of CUDA and of the
// Python reference.
constexpr int64_t kMaskBlock = 64;

#ifdef PEFTKERN_ISA_AVX512
// Low and high 32 bits of the 16 lane products x·m (m a broadcast constant).
inline void mulhilo16(__m512i x, __m512i m, __m512i& lo, __m512i& hi) {
  const __m512i even = _mm512_mul_epu32(x, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
}

// Bit j set when column 64·block + j of `row` is kept: philox4x32_10 of groups
// 16·block + lane, lane = 0..15, with word l of a group deciding column 4·group + l.
inline uint64_t keep_bits64(const DropoutParams& d, int64_t row, int64_t block) {
  const uint64_t r = static_cast<uint64_t>(row);
  __m512i c0 =
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(16 * block)),
                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(r)));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(r >> 32)));
  __m512i c3 = _mm512_setzero_si512();
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  uint32_t k0 = static_cast<uint32_t>(d.seed), k1 = static_cast<uint32_t>(d.seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m512i lo0, hi0, lo1, hi1;
    mulhilo16(c0, m0, lo0, hi0);
    mulhilo16(c2, m1, lo1, hi1);
    c0 =
        _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // a^b^c
    c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    c1 = lo1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const __m512i threshold = _mm512_set1_epi32(static_cast<int>(d.threshold));
  const __m512i words[4] = {c0, c1, c2, c3};
  uint64_t bits = 0;
  for (int l = 0; l < 4; ++l) {
    // dropout_keeps (philox.h), 16 lanes at a time.
    const uint64_t keep = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(words[l], 8), threshold);
    bits |= _pdep_u64(keep, 0x1111111111111111ull << l);  // lane i -> column 4·i + l
  }
  return bits;
}
#endif

// mult[j] = multiplier of column 64·block + j of `row` (keep_scale or 0), j < 64.
template <typename C>
inline void block_multipliers(const DropoutParams& d, int64_t row, int64_t block, C* mult) {
#ifdef PEFTKERN_ISA_AVX512
  if constexpr (std::is_same_v<C, float>) {
    const uint64_t bits = keep_bits64(d, row, block);
    const __m512 scale = _mm512_set1_ps(static_cast<float>(d.keep_scale));
    for (int j = 0; j < 4; ++j) {
      _mm512_storeu_ps(mult + 16 * j,
                       _mm512_maskz_mov_ps(static_cast<__mmask16>(bits >> (16 * j)), scale));
    }
    return;
  }
#endif
  const C scale = static_cast<C>(d.keep_scale);
  for (int64_t g = 0; g < kMaskBlock / 4; ++g) {
    const Philox4 w = dropout_words(d, row, 16 * block + g);
    for (int l = 0; l < 4; ++l) mult[4 * g + l] = dropout_keeps(d, w.v[l]) ? scale : C(0);
  }
}

// Calls element(k, multiplier) for the columns k = 0..K-1 of `row`, in order.
template <typename C, typename F>
inline void for_each_multiplier(const DropoutParams& d, int64_t row, int64_t K, F&& element) {
  alignas(64) C mult[kMaskBlock];
  const int64_t blocks = K / kMaskBlock;
  for (int64_t b = 0; b < blocks; ++b) {
    block_multipliers(d, row, b, mult);
    for (int64_t j = 0; j < kMaskBlock; ++j) element(b * kMaskBlock + j, mult[j]);
  }
  const C scale = static_cast<C>(d.keep_scale);
  for (int64_t k0 = blocks * kMaskBlock; k0 < K; k0 += 4) {
    const Philox4 w = dropout_words(d, row, k0 / 4);
    for (int64_t k = k0; k < std::min(K, k0 + 4); ++k) {
      element(k, dropout_keeps(d, w.v[k - k0]) ? scale : C(0));
    }
  }
}

template <typename X, typename Out, bool kDropout>
void drop_convert_row(const X* x, Out* out, int64_t K, int64_t row, const DropoutParams& d) {
  using C = compute_t<Out>;
  if constexpr (!kDropout) {
    for (int64_t k = 0; k < K; ++k) out[k] = static_cast<Out>(static_cast<C>(x[k]));
  } else {
    for_each_multiplier<C>(d, row, K, [&](int64_t k, C keep) {
      out[k] = static_cast<Out>(static_cast<C>(x[k]) * keep);
    });
  }
}

template <typename X, typename Acc, bool kDx, bool kMasked, bool kDropout>
void drop_backward_row(const X* x, X* dx, const Acc* tmp, Acc* masked, int64_t K, int64_t row,
                       const DropoutParams& d) {
  using C = compute_t<Acc>;
  auto element = [&](int64_t k, C keep) {
    if constexpr (kDx) dx[k] = static_cast<X>(keep * static_cast<C>(tmp[k]));
    if constexpr (kMasked) masked[k] = static_cast<Acc>(keep * static_cast<C>(x[k]));
  };
  if constexpr (kDropout) {
    for_each_multiplier<C>(d, row, K, element);
  } else {
    for (int64_t k = 0; k < K; ++k) element(k, C(1));
  }
}

// f(std::bool_constant<flag>{}): turns a run-time flag into a compile-time one.
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
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
  if (dx == nullptr && masked == nullptr) return;
  const DropoutParams d = dropout != nullptr ? *dropout : DropoutParams{};
  visit_dtype(x_type, [&](auto x_tag) {
    visit_dtype(acc_type, [&](auto acc_tag) {
      using X = typename decltype(x_tag)::type;
      using Acc = typename decltype(acc_tag)::type;
      with_flag(dx != nullptr, [&](auto has_dx) {
        with_flag(masked != nullptr, [&](auto has_masked) {
          with_flag(dropout != nullptr, [&](auto has_dropout) {
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t o = i * K;
              drop_backward_row<X, Acc, has_dx, has_masked, has_dropout>(
                  static_cast<const X*>(x) + o, has_dx ? static_cast<X*>(dx) + o : nullptr,
                  has_dx ? static_cast<const Acc*>(tmp) + o : nullptr,
                  has_masked ? static_cast<Acc*>(masked) + o : nullptr, K, row0 + i, d);
            }
          });
        });
      });
    });
  });
}
