// The bottleneck adapter's activations, shared by the CPU and CUDA kernels.
//
// The kind is a template parameter of the formulas so that the per-element loops contain no
// switch: each device dispatches once per call (with_activation) and its loop is then a
// straight-line body the compiler can vectorise.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <type_traits>

namespace peftkern {

enum class Activation { relu, gelu, gelu_tanh, silu, identity };

// Parses the schema's `str activation`; the error names the argument and the valid values.
inline Activation parse_activation(const std::string& name) {
  if (name == "relu") return Activation::relu;
  if (name == "gelu") return Activation::gelu;
  if (name == "gelu_tanh") return Activation::gelu_tanh;
  if (name == "silu" || name == "swish") return Activation::silu;
  if (name == "identity") return Activation::identity;
  TORCH_CHECK(false,
              "peftkern: activation must be one of 'relu', 'gelu', 'gelu_tanh', 'silu' "
              "('swish'), 'identity', got '",
              name, "'");
}

// Calls f(std::integral_constant<Activation, kind>{}) for the runtime kind.
template <typename F>
void with_activation(Activation kind, F&& f) {
  switch (kind) {
    case Activation::relu:
      return f(std::integral_constant<Activation, Activation::relu>{});
    case Activation::gelu:
      return f(std::integral_constant<Activation, Activation::gelu>{});
    case Activation::gelu_tanh:
      return f(std::integral_constant<Activation, Activation::gelu_tanh>{});
    case Activation::silu:
      return f(std::integral_constant<Activation, Activation::silu>{});
    case Activation::identity:
      return f(std::integral_constant<Activation, Activation::identity>{});
  }
}

// Constants of the GELU formulas (the same as torch.nn.functional.gelu).
constexpr double kSqrtHalf = 0.70710678118654752440;     // 1/√2
constexpr double kInvSqrt2Pi = 0.39894228040143267794;   // 1/√(2π)
constexpr double kSqrt2OverPi = 0.79788456080286535588;  // √(2/π)
constexpr double kGeluTanhCubic = 0.044715;

template <Activation A, typename C>
C10_HOST_DEVICE inline C activation_value(C z) {
  if constexpr (A == Activation::relu) {
    return z > C(0) ? z : C(0);
  } else if constexpr (A == Activation::gelu) {
    return C(0.5) * z * (C(1) + std::erf(z * C(kSqrtHalf)));
  } else if constexpr (A == Activation::gelu_tanh) {
    const C u = C(kSqrt2OverPi) * (z + C(kGeluTanhCubic) * z * z * z);
    return C(0.5) * z * (C(1) + std::tanh(u));
  } else if constexpr (A == Activation::silu) {
    return z / (C(1) + std::exp(-z));
  } else {
    return z;
  }
}

// d act(z) / dz.
template <Activation A, typename C>
C10_HOST_DEVICE inline C activation_derivative(C z) {
  if constexpr (A == Activation::relu) {
    return z > C(0) ? C(1) : C(0);
  } else if constexpr (A == Activation::gelu) {
    return C(0.5) * (C(1) + std::erf(z * C(kSqrtHalf))) +
           z * C(kInvSqrt2Pi) * std::exp(C(-0.5) * z * z);
  } else if constexpr (A == Activation::gelu_tanh) {
    const C u = C(kSqrt2OverPi) * (z + C(kGeluTanhCubic) * z * z * z);
    const C t = std::tanh(u);
    const C du = C(kSqrt2OverPi) * (C(1) + C(3 * kGeluTanhCubic) * z * z);
    return C(0.5) * (C(1) + t) + C(0.5) * z * (C(1) - t * t) * du;
  } else if constexpr (A == Activation::silu) {
    const C sigmoid = C(1) / (C(1) + std::exp(-z));
    return sigmoid * (C(1) + z * (C(1) - sigmoid));
  } else {
    return C(1);
  }
}

}  // namespace peftkern
