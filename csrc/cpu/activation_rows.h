// Row kernels of the bottleneck adapter's elementwise pass over the M×r bottleneck on the CPU.
// Compiled once per x86 vector ISA (isa_variants.h) and dispatched with the ISA that isa.h
// selects once per process, as every CPU row kernel is: the best the CPU supports, or a lesser
// one asked for with PEFTKERN_CPU_ISA.
#pragma once

#include <cstdint>

#include "../activation.h"
#include "dtype.h"

namespace peftkern::cpu {

// For rows [0, rows): a[i, j] = scale·act(Z[i, j]) for j < r, and a[i, r] = scale when
// a_width == r + 1. Z rows are r contiguous elements, a rows a_width.
void activation_rows(Dtype dtype, Activation activation, double scale, const void* Z, void* a,
                     int64_t rows, int64_t r, int64_t a_width);

// For rows [0, rows): dA[i, j] *= scale·act'(Z[i, j]) and, when a != nullptr, a as in
// activation_rows.
void activation_backward_rows(Dtype dtype, Activation activation, double scale, const void* Z,
                              void* dA, void* a, int64_t rows, int64_t r, int64_t a_width);

}  // namespace peftkern::cpu
