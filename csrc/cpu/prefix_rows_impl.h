// The body of the prefix row kernels (prefix_rows.h). Without an include guard and without
// includes on purpose: prefix_rows.cpp includes it once per vector ISA, inside a namespace and
// a `#pragma GCC target` region.
//
// Query rows are taken kTile at a time, and the products are written with GCC vector types
// (`Lanes`: kLanes floats, one AVX-512 register, two AVX2 or four SSE ones). Every product
// keeps a tile's accumulators in registers as enough independent chains (rows × column
// vectors) that the multiply-adds run at the FMA units' rate instead of waiting on one
// register's latency, and reuses each value it loads across a row or a column of the tile.
// (Plain loops over these shapes are vectorised by GCC the wrong way round, across rows.)

constexpr int64_t kLanes = 16;
constexpr int kTile = 4;
// Column vectors of d held at once: kTile × kColumnVectors accumulators (16 registers).
constexpr int kColumnVectors = 4;
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t LaneInts __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Lanes load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Lanes v) { std::memcpy(p, &v, sizeof v); }

inline Lanes splat(float x) { return Lanes{} + x; }

// Horizontal reductions as a tree of halvings: 4 dependent steps instead of 15.
template <typename Op>
inline float lane_reduce(Lanes v, Op op) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
  for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] = op(lanes[l], lanes[l + width]);
  }
  return lanes[0];
}

inline float lane_sum(Lanes v) {
  return lane_reduce(v, [](float a, float b) { return a + b; });
}

inline float lane_max(Lanes v) {
  return lane_reduce(v, [](float a, float b) { return std::max(a, b); });
}

// Lanes of the vector at column jb that hold one of the first m columns.
inline LaneInts columns_below(int64_t jb, int64_t m) {
  const LaneInts lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  return lane + static_cast<int32_t>(jb) < static_cast<int32_t>(m);
}

// Calls body(std::integral_constant<int, C>, cb) over the column vectors of d, kColumnVectors
// at a time (C ≤ kColumnVectors), and returns the first column past them (d % kLanes remain).
template <typename F>
int64_t for_each_column_group(int64_t d, F&& body) {
  int64_t cb = 0;
  for (; cb + kColumnVectors * kLanes <= d; cb += kColumnVectors * kLanes) {
    body(std::integral_constant<int, kColumnVectors>{}, cb);
  }
  switch ((d - cb) / kLanes) {
    case 3: body(std::integral_constant<int, 3>{}, cb); return cb + 3 * kLanes;
    case 2: body(std::integral_constant<int, 2>{}, cb); return cb + 2 * kLanes;
    case 1: body(std::integral_constant<int, 1>{}, cb); return cb + kLanes;
    default: return cb;
  }
}

// s[t][0, m_pad) = rows[t]·t_mat for T rows of d floats (row t at rows + t·stride), t_mat
// [d, m_pad]. Even and odd c go to separate accumulators: 2T chains.
template <int T>
void project_tile(const float* rows, int64_t stride, const float* t_mat, int64_t d, int64_t m_pad,
                  float* s) {
  for (int64_t jb = 0; jb < m_pad; jb += kLanes) {
    Lanes even[T] = {}, odd[T] = {};
    int64_t c = 0;
    for (; c + 2 <= d; c += 2) {
      const Lanes col0 = load(t_mat + c * m_pad + jb), col1 = load(t_mat + (c + 1) * m_pad + jb);
      for (int t = 0; t < T; ++t) {
        even[t] += rows[t * stride + c] * col0;
        odd[t] += rows[t * stride + c + 1] * col1;
      }
    }
    if (c < d) {
      const Lanes col = load(t_mat + c * m_pad + jb);
      for (int t = 0; t < T; ++t) even[t] += rows[t * stride + c] * col;
    }
    for (int t = 0; t < T; ++t) store(s + t * m_pad + jb, even[t] + odd[t]);
  }
}

// dst[t] = keep[t]·dst[t] + Σ_j w[t][j]·src[j] for T rows of dst (row t at dst + t·stride);
// src [m, d], w [T, m_pad]. Each src vector loaded serves the T rows.
template <int T>
void combine_tile(float* dst, int64_t stride, const float* keep, const float* w, const float* src,
                  int64_t m, int64_t m_pad, int64_t d) {
  const int64_t tail = for_each_column_group(d, [&](auto columns, int64_t cb) {
    constexpr int C = decltype(columns)::value;
    Lanes acc[T][C];
    for (int t = 0; t < T; ++t) {
      for (int c = 0; c < C; ++c) acc[t][c] = keep[t] * load(dst + t * stride + cb + c * kLanes);
    }
    for (int64_t j = 0; j < m; ++j) {
      Lanes row[C];
      for (int c = 0; c < C; ++c) row[c] = load(src + j * d + cb + c * kLanes);
      for (int t = 0; t < T; ++t) {
        const float weight = w[t * m_pad + j];
        for (int c = 0; c < C; ++c) acc[t][c] += weight * row[c];
      }
    }
    for (int t = 0; t < T; ++t) {
      for (int c = 0; c < C; ++c) store(dst + t * stride + cb + c * kLanes, acc[t][c]);
    }
  });
  for (int t = 0; t < T; ++t) {  // the last d % kLanes columns
    for (int64_t c = tail; c < d; ++c) {
      float sum = keep[t] * dst[t * stride + c];
      for (int64_t j = 0; j < m; ++j) sum += w[t * m_pad + j] * src[j * d + c];
      dst[t * stride + c] = sum;
    }
  }
}

// acc[j] += Σ_t w[t][j]·rows[t] for j < m: acc [m, d], w [T, m_pad], T rows of d floats (row t
// at rows + t·stride). The tile's rows stay in registers across j.
template <int T>
void accumulate_outer(float* acc, const float* w, const float* rows, int64_t stride, int64_t m,
                      int64_t m_pad, int64_t d) {
  const int64_t tail = for_each_column_group(d, [&](auto columns, int64_t cb) {
    constexpr int C = decltype(columns)::value;
    Lanes row[T][C];
    for (int t = 0; t < T; ++t) {
      for (int c = 0; c < C; ++c) row[t][c] = load(rows + t * stride + cb + c * kLanes);
    }
    for (int64_t j = 0; j < m; ++j) {
      float weight[T];
      for (int t = 0; t < T; ++t) weight[t] = w[t * m_pad + j];
      for (int c = 0; c < C; ++c) {
        float* dst = acc + j * d + cb + c * kLanes;
        Lanes sum = load(dst);
        for (int t = 0; t < T; ++t) sum += weight[t] * row[t][c];
        store(dst, sum);
      }
    }
  });
  for (int64_t j = 0; j < m; ++j) {  // the last d % kLanes columns
    for (int t = 0; t < T; ++t) {
      for (int64_t c = tail; c < d; ++c) acc[j * d + c] += w[t * m_pad + j] * rows[t * stride + c];
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
  return sum + lane_sum(lanes);
}

// The softmax of row s[0, m) (raw scores) over the prefix rows, merged with the sequence
// part: s becomes the weights of the prefix rows in the merged output, lse the merged lse,
// and the return value the weight of the sequence part's output. s has m_pad columns, those
// past m ignored (and left 0). One log per row.
inline float merge_weights(float* s, float& lse, int64_t m, int64_t m_pad, float scale) {
  const Lanes minus_inf = splat(-std::numeric_limits<float>::infinity());
  Lanes maxes = minus_inf;
  for (int64_t jb = 0; jb < m_pad; jb += kLanes) {
    const Lanes x = columns_below(jb, m) ? load(s + jb) * scale : minus_inf;
    maxes = maxes > x ? maxes : x;
  }
  const float mx = lane_max(maxes);
  Lanes sums = {};
  for (int64_t jb = 0; jb < m_pad; jb += kLanes) {
    const Lanes e = fast_exp_of<Lanes, LaneInts>(load(s + jb) * scale - mx);
    const Lanes kept = columns_below(jb, m) ? e : Lanes{};
    store(s + jb, kept);
    sums += kept;
  }
  const float sum = lane_sum(sums);
  // Sequence part e^lse₁ and prefix part e^mx·sum, relative to the larger exponent (lse₁ is
  // -inf for a query that sees no sequence key: its weight is then ~1e-38, i.e. nothing).
  const float hi = std::max(lse, mx);
  const float w_seq = fast_exp(lse - hi), w_prefix = fast_exp(mx - hi);
  const float total = w_seq + w_prefix * sum;
  const float prob_scale = w_prefix / total;
  for (int64_t jb = 0; jb < m_pad; jb += kLanes) store(s + jb, load(s + jb) * prob_scale);
  lse = hi + std::log(total);
  return w_seq / total;
}

template <int T>
void forward_tile(const PrefixRows& p, const float* q, int64_t q_stride, float* out,
                  int64_t out_stride, float* lse, float* s) {
  project_tile<T>(q, q_stride, p.k_t, p.d, p.m_pad, s);
  float keep[T];
  for (int t = 0; t < T; ++t) {
    keep[t] = merge_weights(s + t * p.m_pad, lse[t], p.m, p.m_pad, p.scale);
  }
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
    // Columns past m: their scores are 0 (zero padding), so P there is e^-lse, not 0; the
    // products read only the first m columns, and those are exact.
    for (int64_t jb = 0; jb < p.m_pad; jb += kLanes) {
      const Lanes probs_j = fast_exp_of<Lanes, LaneInts>(load(pt + jb) * p.scale - lse);
      store(pt + jb, probs_j);
      store(dst + jb, p.scale * probs_j * (load(dst + jb) - D));  // dS, softmax scale folded in
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
