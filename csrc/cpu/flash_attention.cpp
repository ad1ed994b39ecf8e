#include "flash_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "isa.h"

// The kernels pass GCC vector types between inline helpers of this file only, so the ABI note
// GCC gives for them in the baseline variant (wider vectors than the target has) is moot;
// fast_math.h is inside the region for its vector instantiation of fast_exp_of.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
#include "fast_math.h"

namespace peftkern::cpu {

#define PEFTKERN_ISA_IMPL "flash_attention_impl.h"
#include "isa_variants.h"
#undef PEFTKERN_ISA_IMPL

void flash_forward_unit(const FlashAttention& a, int64_t b, int64_t kv_head, int64_t q_begin,
                        int64_t q_end) {
  PEFTKERN_ISA_DISPATCH(flash_forward_unit_impl(a, b, kv_head, q_begin, q_end));
}

void flash_backward_unit(const FlashAttention& a, int64_t b, int64_t h) {
  PEFTKERN_ISA_DISPATCH(flash_backward_unit_impl(a, b, h));
}

}  // namespace peftkern::cpu

#pragma GCC diagnostic pop
