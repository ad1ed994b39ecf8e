#include "prefix_rows.h"

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

#define PEFTKERN_ISA_IMPL "prefix_rows_impl.h"
#include "isa_variants.h"
#undef PEFTKERN_ISA_IMPL

void prefix_forward_rows(const PrefixRows& prefix, const float* q, int64_t q_stride, float* out,
                         int64_t out_stride, float* lse, int64_t rows) {
  PEFTKERN_ISA_DISPATCH(prefix_forward_rows_impl(prefix, q, q_stride, out, out_stride, lse, rows));
}

void prefix_backward_rows(const PrefixRows& prefix, const PrefixGradRows& rows_view,
                          float* grad_k, float* grad_v, int64_t rows) {
  PEFTKERN_ISA_DISPATCH(prefix_backward_rows_impl(prefix, rows_view, grad_k, grad_v, rows));
}

}  // namespace peftkern::cpu

#pragma GCC diagnostic pop
