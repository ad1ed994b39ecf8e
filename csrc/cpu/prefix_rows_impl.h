// The body of the prefix row kernels (prefix_rows.h). Without an include guard and without
// includes on purpose: prefix_rows.cpp includes it once per vector ISA, inside a namespace and
// a `#pragma GCC target` region.
//
// Query rows are taken kTile at a time, and the products are written with GCC vector types
// (`Lanes`: kLanes floats, one AVX-512 register, two AVX2 or four SSE ones): a tile's
// accumulators stay in registers, kTile independent chains so that the multiply-adds are not
// serialised on one register's latency, and each prefix element loaded serves kTile rows.
// (Plain loops over these shapes are vectorised by GCC the wrong way round, across rows.)

constexpr int64_t kLanes = 16;
constexpr int kTile = 4;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

inline Lanes load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Lanes v) { std::memcpy(p, &v, sizeof v); }

// s[t][0, m_pad) = rows[t]·t_mat for T rows of d floats (row t at rows + t·stride), t_mat
// [d, m_pad].
template <int T>
void project_tile(const float* rows, int64_t stride, const float* t_mat, int64_t d, int64_t m_pad,
                  float* s) {
  for (int64_t jb = 0; jb < m_pad; jb += kLanes) {
    Lanes acc[T] = {};
    for (int64_t c = 0; c < d; ++c) {
      const Lanes col = load(t_mat + c * m_pad + jb);
      for (int t = 0; t < T; ++t) acc[t] += rows[t * stride + c] * col;
    }
    for (int t = 0; t < T; ++t) store(s + t * m_pad + jb, acc[t]);
  }
}

// dst[t] = keep[t]·dst[t] + Σ_j w[t][j]·src[j] for T rows of dst (row t at dst + t·stride);
// src [m, d], w [T, m_pad].
template <int T>
void combine_tile(float* dst, int64_t stride, const float* keep, const float* w, const float* src,
                  int64_t m, int64_t m_pad, int64_t d) {
  int64_t cb = 0;
  for (; cb + kLanes <= d; cb += kLanes) {
    Lanes acc[T];
    for (int t = 0; t < T; ++t) acc[t] = keep[t] * load(dst + t * stride + cb);
    for (int64_t j = 0; j < m; ++j) {
      const Lanes row = load(src + j * d + cb);
      for (int t = 0; t < T; ++t) acc[t] += w[t * m_pad + j] * row;
    }
    for (int t = 0; t < T; ++t) store(dst + t * stride + cb, acc[t]);
  }
  for (int t = 0; t < T; ++t) {  // the last d % kLanes columns
    for (int64_t c = cb; c < d; ++c) {
      float sum = keep[t] * dst[t * stride + c];
      for (int64_t j = 0; j < m; ++j) sum += w[t * m_pad + j] * src[j * d + c];
      dst[t * stride + c] = sum;
    }
  }
}

// acc[j] += Σ_t w[t][j]·rows[t] for j < m: acc [m, d], w [T, m_pad], T rows of d floats (row t
// at rows + t·stride).
template <int T>
void accumulate_outer(float* acc, const float* w, const float* rows, int64_t stride, int64_t m,
                      int64_t m_pad, int64_t d) {
  for (int64_t j = 0; j < m; ++j) {
    float* dst = acc + j * d;
    int64_t cb = 0;
    for (; cb + kLanes <= d; cb += kLanes) {
      Lanes sum = load(dst + cb);
      for (int t = 0; t < T; ++t) sum += w[t * m_pad + j] * load(rows + t * stride + cb);
      store(dst + cb, sum);
    }
    for (int t = 0; t < T; ++t) {
      for (int64_t c = cb; c < d; ++c) dst[c] += w[t * m_pad + j] * rows[t * stride + c];
    }
  }
}

// Σ a[c]·b[c]: kLanes partial sums, then the lanes.
inline float dot(const float* a, const float* b, int64_t d) {
  Lanes lanes = {};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) lanes += load(a + c) * load(b + c);
  float sum = 0.0f;
  for (; c < d; ++c) sum += a[c] * b[c];
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

// The softmax of row s[0, m) (raw scores) over the prefix rows, merged with the sequence
// part: s becomes the weights of the prefix rows in the merged output, lse the merged lse,
// and the return value the weight of the sequence part's output. One log per row; the loops
// over m carry no reduction, so they vectorise.
inline float merge_weights(float* s, float& lse, int64_t m, float scale) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < m; ++j) mx = std::max(mx, s[j] * scale);
  for (int64_t j = 0; j < m; ++j) s[j] = fast_exp(s[j] * scale - mx);
  float sum = 0.0f;
  for (int64_t j = 0; j < m; ++j) sum += s[j];
  // Sequence part e^lse₁ and prefix part e^mx·sum, relative to the larger exponent (lse₁ is
  // -inf for a query that sees no sequence key: its weight is then ~1e-38, i.e. nothing).
  const float hi = std::max(lse, mx);
  const float w_seq = fast_exp(lse - hi), w_prefix = fast_exp(mx - hi);
  const float total = w_seq + w_prefix * sum;
  const float prob_scale = w_prefix / total;
  for (int64_t j = 0; j < m; ++j) s[j] *= prob_scale;
  lse = hi + std::log(total);
  return w_seq / total;
}

template <int T>
void forward_tile(const PrefixRows& p, const float* q, int64_t q_stride, float* out,
                  int64_t out_stride, float* lse, float* s) {
  project_tile<T>(q, q_stride, p.k_t, p.d, p.m_pad, s);
  float keep[T];
  for (int t = 0; t < T; ++t) keep[t] = merge_weights(s + t * p.m_pad, lse[t], p.m, p.scale);
  combine_tile<T>(out, out_stride, keep, s, p.v, p.m, p.m_pad, p.d);
}

// The tile of T rows starting at row i; probs and dscores are [T, m_pad] scratch.
template <int T>
void backward_tile(const PrefixRows& p, const PrefixGradRows& r, int64_t i, float* grad_k,
                   float* grad_v, float* probs, float* dscores) {
  const float* q = r.q + i * r.q_stride;
  const float* dO = r.grad_out + i * r.grad_out_stride;
  const float* out = r.out + i * r.out_stride;
  project_tile<T>(q, r.q_stride, p.k_t, p.d, p.m_pad, probs);
  project_tile<T>(dO, r.grad_out_stride, p.v_t, p.d, p.m_pad, dscores);
  for (int t = 0; t < T; ++t) {
    const float D = dot(dO + t * r.grad_out_stride, out + t * r.out_stride, p.d);
    const float lse = r.lse[i + t];
    float* pt = probs + t * p.m_pad;
    float* dst = dscores + t * p.m_pad;
    for (int64_t j = 0; j < p.m; ++j) {
      pt[j] = fast_exp(pt[j] * p.scale - lse);
      dst[j] = p.scale * pt[j] * (dst[j] - D);  // dS, with the softmax scale folded in
    }
  }
  if (r.dq != nullptr) {
    float keep[T];
    std::fill(keep, keep + T, 1.0f);
    combine_tile<T>(r.dq + i * r.dq_stride, r.dq_stride, keep, dscores, p.k, p.m, p.m_pad, p.d);
  }
  if (grad_k != nullptr) accumulate_outer<T>(grad_k, dscores, q, r.q_stride, p.m, p.m_pad, p.d);
  if (grad_v != nullptr) {
    accumulate_outer<T>(grad_v, probs, dO, r.grad_out_stride, p.m, p.m_pad, p.d);
  }
}

// Calls tile<T>(first_row, T) over rows [0, rows), kTile rows at a time and then the rest.
template <typename F>
void for_each_tile(int64_t rows, F&& tile) {
  int64_t i = 0;
  for (; i + kTile <= rows; i += kTile) tile(std::integral_constant<int, kTile>{}, i);
  switch (rows - i) {
    case 3: return tile(std::integral_constant<int, 3>{}, i);
    case 2: return tile(std::integral_constant<int, 2>{}, i);
    case 1: return tile(std::integral_constant<int, 1>{}, i);
    default: return;
  }
}

inline void prefix_forward_rows_impl(const PrefixRows& p, const float* q, int64_t q_stride,
                                     float* out, int64_t out_stride, float* lse, int64_t rows) {
  std::vector<float> scores(kTile * p.m_pad);
  for_each_tile(rows, [&](auto tile, int64_t i) {
    forward_tile<decltype(tile)::value>(p, q + i * q_stride, q_stride, out + i * out_stride,
                                        out_stride, lse + i, scores.data());
  });
}

inline void prefix_backward_rows_impl(const PrefixRows& p, const PrefixGradRows& r,
                                      float* grad_k, float* grad_v, int64_t rows) {
  std::vector<float> scratch(2 * kTile * p.m_pad);
  for_each_tile(rows, [&](auto tile, int64_t i) {
    backward_tile<decltype(tile)::value>(p, r, i, grad_k, grad_v, scratch.data(),
                                         scratch.data() + kTile * p.m_pad);
  });
}
