// The body of the activation row kernels. Without an include guard and without includes on
// purpose: activation_rows.cpp includes it once per vector ISA, inside a namespace and a
// `#pragma GCC target` region. The activation kind and the dtype are template parameters, so
// each inner loop is a branch-free body over r contiguous elements that GCC vectorises: relu
// and identity, and in float32 silu, gelu and gelu_tanh, whose exp and erf (tanh written
// through exp) come from fast_math.h. Every float64 formula stays a libm call.

template <typename T>
using act_compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// tanh(u) = 1 - 2 / (e^{2u} + 1): saturates to ±1 where fast_exp clamps, and its absolute
// error near 0 (where the subtraction cancels) is a few float ulps of 1, which gelu_tanh then
// multiplies by z/2.
inline float tanh_via_exp(float u) {
  return 1.0f - 2.0f / (fast_exp(2.0f * u) + 1.0f);
}

template <Activation A, typename C>
inline C row_activation_value(C z) {
  if constexpr (std::is_same_v<C, float> && A == Activation::gelu) {
    return 0.5f * z * (1.0f + fast_erf(z * float(kSqrtHalf)));
  } else if constexpr (std::is_same_v<C, float> && A == Activation::silu) {
    return z / (1.0f + fast_exp(-z));
  } else if constexpr (std::is_same_v<C, float> && A == Activation::gelu_tanh) {
    const float u = float(kSqrt2OverPi) * (z + float(kGeluTanhCubic) * z * z * z);
    return 0.5f * z * (1.0f + tanh_via_exp(u));
  } else {
    return activation_value<A, C>(z);
  }
}

template <Activation A, typename C>
inline C row_activation_derivative(C z) {
  if constexpr (std::is_same_v<C, float> && A == Activation::gelu) {
    return 0.5f * (1.0f + fast_erf(z * float(kSqrtHalf))) +
           z * float(kInvSqrt2Pi) * fast_exp(-0.5f * z * z);
  } else if constexpr (std::is_same_v<C, float> && A == Activation::silu) {
    const float sigmoid = 1.0f / (1.0f + fast_exp(-z));
    return sigmoid * (1.0f + z * (1.0f - sigmoid));
  } else if constexpr (std::is_same_v<C, float> && A == Activation::gelu_tanh) {
    const float u = float(kSqrt2OverPi) * (z + float(kGeluTanhCubic) * z * z * z);
    const float t = tanh_via_exp(u);
    const float du = float(kSqrt2OverPi) * (1.0f + float(3 * kGeluTanhCubic) * z * z);
    return 0.5f * (1.0f + t) + 0.5f * z * (1.0f - t * t) * du;
  } else {
    return activation_derivative<A, C>(z);
  }
}

template <Activation A, typename T, bool kWithA>
void activation_rows_t(double scale, const T* Z, T* dA, T* a, int64_t rows, int64_t r,
                       int64_t a_width) {
  using C = act_compute_t<T>;
  const C s = static_cast<C>(scale);
  for (int64_t i = 0; i < rows; ++i) {
    const T* z = Z + i * r;
    T* out = kWithA ? a + i * a_width : nullptr;
    if (dA != nullptr) {
      T* g = dA + i * r;
      for (int64_t j = 0; j < r; ++j) {
        const C zj = static_cast<C>(z[j]);
        g[j] = static_cast<T>(s * static_cast<C>(g[j]) * row_activation_derivative<A, C>(zj));
        if constexpr (kWithA) out[j] = static_cast<T>(s * row_activation_value<A, C>(zj));
      }
    } else if constexpr (kWithA) {
      for (int64_t j = 0; j < r; ++j)
        out[j] = static_cast<T>(s * row_activation_value<A, C>(static_cast<C>(z[j])));
    }
    if constexpr (kWithA) {
      if (a_width > r) out[r] = static_cast<T>(s);
    }
  }
}

template <bool kWithA>
void activation_rows_dispatch(Dtype dtype, Activation activation, double scale, const void* Z,
                              void* dA, void* a, int64_t rows, int64_t r, int64_t a_width) {
  with_activation(activation, [&](auto kind) {
    constexpr Activation A = decltype(kind)::value;
    auto run = [&](auto* typed_Z) {
      using T = std::remove_const_t<std::remove_pointer_t<decltype(typed_Z)>>;
      activation_rows_t<A, T, kWithA>(scale, typed_Z, static_cast<T*>(dA), static_cast<T*>(a), rows,
                                      r, a_width);
    };
    switch (dtype) {
      case Dtype::f32:
        return run(static_cast<const float*>(Z));
      case Dtype::f64:
        return run(static_cast<const double*>(Z));
      case Dtype::f16:
        return run(static_cast<const c10::Half*>(Z));
      case Dtype::bf16:
        return run(static_cast<const c10::BFloat16*>(Z));
    }
  });
}

inline void activation_rows_impl(Dtype dtype, Activation activation, double scale, const void* Z,
                                 void* dA, void* a, int64_t rows, int64_t r, int64_t a_width) {
  if (a != nullptr) {
    activation_rows_dispatch<true>(dtype, activation, scale, Z, dA, a, rows, r, a_width);
  } else {
    activation_rows_dispatch<false>(dtype, activation, scale, Z, dA, a, rows, r, a_width);
  }
}
