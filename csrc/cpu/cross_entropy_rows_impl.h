// The body of the cross-entropy row pass. Without an include guard and without includes on
// purpose: linear_cross_entropy.cpp includes it once per vector ISA, inside a namespace and a
// `#pragma GCC target` region.
//
// A row of logits (V floats, 128 KB at V = 32k: it stays in the L2 cache) is read three times:
// max and plain sum, the sum of exponentials, then the gradient written over the logits. The
// float32 loops run on GCC vector types of one register of the ISA, because GCC does not
// vectorise a float sum on its own (that would reorder the additions); exp comes from
// fast_math.h. float64 (used for gradcheck) stays scalar with libm.

#if defined(PEFTKERN_ISA_AVX512)
constexpr int64_t kLanes = 16;
#elif defined(PEFTKERN_ISA_AVX2)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif

typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t LaneInts __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Lanes load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Lanes v) {
  std::memcpy(p, &v, sizeof v);
}

inline float lane_sum(Lanes v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
  float sum = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

inline float lane_max(Lanes v) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
  float m = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) m = std::max(m, lanes[l]);
  return m;
}

inline Lanes exp_lanes(Lanes x) {
  return fast_exp_of<Lanes, LaneInts>(x);
}

template <typename C>
inline C exp_of(C x) {
  if constexpr (std::is_same_v<C, float>) {
    return fast_exp(x);
  } else {
    return std::exp(x);
  }
}

// tanh(u) = 1 - 2 / (e^{2u} + 1): saturates to ±1 where fast_exp clamps.
template <typename F>
inline F tanh_of(F u) {
  if constexpr (std::is_same_v<F, double>) {
    return std::tanh(u);
  } else if constexpr (std::is_same_v<F, float>) {
    return 1.0f - 2.0f / (fast_exp(2.0f * u) + 1.0f);
  } else {
    return 1.0f - 2.0f / (exp_lanes(2.0f * u) + 1.0f);
  }
}

// z = cap·tanh(z / cap), in place.
template <typename C>
inline void softcap_row(C* z, int64_t V, C cap) {
  const C inv_cap = C(1) / cap;
  int64_t j = 0;
  if constexpr (std::is_same_v<C, float>) {
    for (; j + kLanes <= V; j += kLanes) store(z + j, cap * tanh_of<Lanes>(load(z + j) * inv_cap));
  }
  for (; j < V; ++j) z[j] = cap * tanh_of<C>(z[j] * inv_cap);
}

// (max_j z_j, Σ_j z_j).
template <typename C>
inline std::pair<C, C> max_and_total(const C* z, int64_t V) {
  C m = -std::numeric_limits<C>::infinity(), total = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<C, float>) {
    if (V >= kLanes) {
      Lanes vm = load(z), vt = {};
      for (; j + kLanes <= V; j += kLanes) {
        const Lanes x = load(z + j);
        vm = x > vm ? x : vm;
        vt += x;
      }
      m = lane_max(vm);
      total = lane_sum(vt);
    }
  }
  for (; j < V; ++j) {
    m = std::max(m, z[j]);
    total += z[j];
  }
  return {m, total};
}

template <typename C>
inline C sum_exp(const C* z, int64_t V, C m) {
  C sum = 0;
  int64_t j = 0;
  if constexpr (std::is_same_v<C, float>) {
    Lanes vs = {};
    for (; j + kLanes <= V; j += kLanes) vs += exp_lanes(load(z + j) - m);
    sum = lane_sum(vs);
  }
  for (; j < V; ++j) sum += exp_of(z[j] - m);
  return sum;
}

// z_j = (e^{z_j - m}·inv_sum - smooth)·(1 - (z_j/cap)²), the last factor only with a softcap
// (z holds the capped logits, so z_j/cap is the tanh the cap applied).
template <typename C, bool kSoftcap>
inline void write_grad(C* z, int64_t V, C m, C inv_sum, C smooth, C inv_cap) {
  int64_t j = 0;
  if constexpr (std::is_same_v<C, float>) {
    for (; j + kLanes <= V; j += kLanes) {
      const Lanes x = load(z + j);
      Lanes g = exp_lanes(x - m) * inv_sum - smooth;
      if constexpr (kSoftcap) {
        const Lanes t = x * inv_cap;
        g *= 1.0f - t * t;
      }
      store(z + j, g);
    }
  }
  for (; j < V; ++j) {
    const C x = z[j];
    C g = exp_of(x - m) * inv_sum - smooth;
    if constexpr (kSoftcap) g *= C(1) - (x * inv_cap) * (x * inv_cap);
    z[j] = g;
  }
}

// One row: see LinearCrossEntropyKernels::rows_pass. want_grad writes the gradient (scaled by
// `scale`) over z.
template <typename C>
inline void cross_entropy_row(C* z, int64_t V, int64_t label, int64_t ignore_index, C eps, C cap,
                              bool want_grad, C scale, C* loss) {
  if (label == ignore_index) {
    *loss = 0;
    if (want_grad) std::fill(z, z + V, C(0));
    return;
  }
  if (cap > 0) softcap_row(z, V, cap);
  const auto [m, total] = max_and_total(z, V);
  const C s = sum_exp(z, V, m);
  const C z_label = z[label];
  *loss = m + std::log(s) - (1 - eps) * z_label - eps / C(V) * total;
  if (!want_grad) return;
  const C smooth = scale * eps / C(V), inv_sum = scale / s;
  const C inv_cap = cap > 0 ? C(1) / cap : C(0);
  if (cap > 0) {
    write_grad<C, true>(z, V, m, inv_sum, smooth, inv_cap);
    const C t = z_label * inv_cap;
    z[label] -= scale * (1 - eps) * (C(1) - t * t);
  } else {
    write_grad<C, false>(z, V, m, inv_sum, smooth, inv_cap);
    z[label] -= scale * (1 - eps);
  }
}

template <typename C>
inline void cross_entropy_rows_typed(C* z, const int64_t* labels, const C* row_scale, C* loss,
                                     int64_t rows, int64_t V, int64_t ignore_index, double eps,
                                     double cap) {
  for (int64_t i = 0; i < rows; ++i) {
    cross_entropy_row<C>(z + i * V, V, labels[i], ignore_index, C(eps), C(cap),
                         row_scale != nullptr, row_scale != nullptr ? row_scale[i] : C(0),
                         loss + i);
  }
}

inline void cross_entropy_rows_impl(Dtype dtype, void* z, const int64_t* labels,
                                    const void* row_scale, void* loss, int64_t rows, int64_t V,
                                    int64_t ignore_index, double eps, double cap) {
  if (dtype == Dtype::f64) {
    cross_entropy_rows_typed(static_cast<double*>(z), labels, static_cast<const double*>(row_scale),
                             static_cast<double*>(loss), rows, V, ignore_index, eps, cap);
  } else {
    cross_entropy_rows_typed(static_cast<float*>(z), labels, static_cast<const float*>(row_scale),
                             static_cast<float*>(loss), rows, V, ignore_index, eps, cap);
  }
}
