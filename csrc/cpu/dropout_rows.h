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

// out[i, k] += multiplier(row0 + i, k) · Σ_j coef[i, j]·basis[j, k] for rows [0, rows): the
// rank-r product added into a full-size matrix in one read and write of it (multiplier 1
// without dropout). coef [rows, r] and basis [r, K] have acc_type, out [rows, K] out_type.
void add_rank_rows(Dtype out_type, Dtype acc_type, const void* coef, const void* basis, void* out,
                   int64_t rows, int64_t r, int64_t K, int64_t row0, const DropoutParams* dropout);

}  // namespace peftkern::cpu
