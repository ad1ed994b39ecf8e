// Counter-based dropout randomness shared by the CPU and CUDA kernels.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3") maps a
// (counter, key) pair to four independent 32-bit words. The key is the 64-bit seed the
// Python wrapper draws from torch's generator; the counter is the element's position
// (row, column / 4). Any kernel can therefore regenerate the mask of any element at any
// time: forward and backward agree, nothing of the size of `x` is stored, and checkpoint
// recomputation (which replays torch's RNG state) draws the same mask. CPU and CUDA
// produce the same mask for the same seed because they share this code.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define PEFTKERN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PEFTKERN_HOST_DEVICE inline
#endif

namespace peftkern {

struct Philox4 {
  uint32_t v[4];
};

PEFTKERN_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

// Four uniform 32-bit words for counter (c0, c1, c2) and a 64-bit key.
PEFTKERN_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint64_t seed) {
  uint32_t ctr[4] = {c0, c1, c2, 0u};
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, ctr[0], &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, ctr[2], &hi1);
    const uint32_t n0 = hi1 ^ ctr[1] ^ k0;
    const uint32_t n2 = hi0 ^ ctr[3] ^ k1;
    ctr[0] = n0;
    ctr[1] = lo1;
    ctr[2] = n2;
    ctr[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{ctr[0], ctr[1], ctr[2], ctr[3]}};
}

// Dropout parameters in the integer form the kernels compare against: an element is kept
// when the top 24 bits of its random word are >= threshold, i.e. with probability 1 - p.
struct DropoutParams {
  uint64_t seed;
  uint32_t threshold;  // ceil(p * 2^24)
  double keep_scale;   // 1 / (1 - p); kernels round it to their compute type

  static DropoutParams make(uint64_t seed, double p) {
    return DropoutParams{seed, static_cast<uint32_t>(std::ceil(p * 16777216.0)), 1.0 / (1.0 - p)};
  }
};

// The random words of row `row`, columns [4*group, 4*group+4).
PEFTKERN_HOST_DEVICE Philox4 dropout_words(const DropoutParams& d, int64_t row, int64_t group) {
  const uint64_t r = static_cast<uint64_t>(row);
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(r),
                       static_cast<uint32_t>(r >> 32), d.seed);
}

// Whether the element whose random word this is is kept: the one keep rule of every kernel.
PEFTKERN_HOST_DEVICE bool dropout_keeps(const DropoutParams& d, uint32_t word) {
  return (word >> 8) >= d.threshold;
}

// Multiplier of one element: keep_scale when kept, 0 when dropped.
PEFTKERN_HOST_DEVICE float dropout_multiplier(const DropoutParams& d, uint32_t word) {
  return dropout_keeps(d, word) ? static_cast<float>(d.keep_scale) : 0.0f;
}

}  // namespace peftkern
