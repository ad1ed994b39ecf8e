// Row kernels that apply the dropout mask (regenerated from philox.h) and convert dtypes on
// the CPU. They are compiled once per x86 vector ISA (AVX-512, AVX2, baseline) and the best
// one the running CPU supports is picked at first use, so one wheel runs everywhere and is
// fast where it can be.
#pragma once

#include <cstdint>

#include "../philox.h"
#include "dtype.h"

namespace peftkern::cpu {

// out[i, k] = x[i, k] * multiplier(row0 + i, k), converted from x_type to out_type.
// With dropout == nullptr the multiplier is 1 (a pure conversion). Rows are K contiguous.
void drop_convert_rows(Dtype x_type, Dtype out_type, const void* x, void* out, int64_t rows,
                       int64_t K, int64_t row0, const DropoutParams* dropout);

// Backward of the dropout on the rank-r branch, for rows [0, rows):
//   dx[i, k]     = multiplier(row0 + i, k) * tmp[i, k]   (when dx != nullptr)
//   masked[i, k] = multiplier(row0 + i, k) * x[i, k]     (when masked != nullptr)
// x and dx have x_type; tmp and masked have acc_type (the adapter's dtype).
void drop_backward_rows(Dtype x_type, Dtype acc_type, const void* x, void* dx, const void* tmp,
                        void* masked, int64_t rows, int64_t K, int64_t row0,
                        const DropoutParams* dropout);

}  // namespace peftkern::cpu
