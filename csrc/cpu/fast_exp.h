// exp(x) for float32 written with arithmetic and bit moves only, so that a loop over it
// vectorises under each ISA variant (std::exp stays a scalar libm call per element).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace peftkern::cpu {

// e^x = 2^n · e^f with n = round(x·log2 e) and |f| ≤ ln2/2; e^f by the Cephes expf polynomial
// (about 1 ulp on the reduced range). x is clamped to [-87.3, 88.3] so that 2^n stays a
// normal float: below that the result is at most 1.2e-38 instead of 0 (or a subnormal), which
// no softmax or activation sum can tell apart.
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  // Adding 1.5·2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
  constexpr float kRound = 12582912.0f;
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  int32_t n_bits;
  std::memcpy(&n_bits, &shifted, sizeof n_bits);
  // ln 2 split in two so that n·ln2_hi is exact.
  const float f = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const int32_t two_n = (n_bits - 0x4B400000 + 127) << 23;  // the float 2^n
  float scale;
  std::memcpy(&scale, &two_n, sizeof scale);
  return p * scale;
}

}  // namespace peftkern::cpu
