// exp and erf for float32 written with arithmetic and bit moves only, so that a loop over them
// vectorises under each ISA variant (std::exp / std::erf stay scalar libm calls per element).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace peftkern::cpu {

// e^x = 2^n · e^f with n = round(x·log2 e) and |f| ≤ ln2/2; e^f by the Cephes expf polynomial
// (about 1 ulp on the reduced range). x is clamped to [-87.3, 88.3] so that 2^n stays a
// normal float: below that the result is at most 1.2e-38 instead of 0 (or a subnormal), which
// no softmax or activation sum can tell apart.
//
// One definition for a float (F = float, I = int32_t) and for a GCC vector of floats (I the
// int vector of the same lanes): every operation below means the same on both, lane by lane,
// so a row kernel can hold a whole register of exponentials without a second copy of this.
template <typename F, typename I>
inline F fast_exp_of(F x) {
  const F lo = F{} + -87.3f, hi = F{} + 88.3f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // Adding 1.5·2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
  constexpr float kRound = 12582912.0f;
  const F shifted = x * 1.44269504088896341f + kRound;
  const F n = shifted - kRound;
  I n_bits;
  std::memcpy(&n_bits, &shifted, sizeof n_bits);
  // ln 2 split in two so that n·ln2_hi is exact.
  const F f = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  F p = F{} + 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const I two_n = (n_bits - 0x4B400000 + 127) << 23;  // the float 2^n
  F scale;
  std::memcpy(&scale, &two_n, sizeof scale);
  return p * scale;
}

inline float fast_exp(float x) {
  return fast_exp_of<float, int32_t>(x);
}

// erf(x) as x·P(x²)/Q(x²), a rational approximation on [-4, 4] (where erf reaches 1 - 2e-8,
// i.e. 1 in float32), x clamped to that range. Its largest error against std::erf over
// [-6, 6] is 4.2e-7 (a few float ulps of 1; checked by tests/test_bottleneck_adapter.py through
// gelu).
inline float fast_erf(float x) {
  x = std::min(std::max(x, -4.0f), 4.0f);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

}  // namespace peftkern::cpu
