#include "activation_rows.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "fast_math.h"
#include "isa.h"

namespace peftkern::cpu {

#define PEFTKERN_ISA_IMPL "activation_rows_impl.h"
#include "isa_variants.h"
#undef PEFTKERN_ISA_IMPL

namespace {

void run(Dtype dtype, Activation activation, double scale, const void* Z, void* dA, void* a,
         int64_t rows, int64_t r, int64_t a_width) {
  PEFTKERN_ISA_DISPATCH(activation_rows_impl(dtype, activation, scale, Z, dA, a, rows, r, a_width));
}

}  // namespace

void activation_rows(Dtype dtype, Activation activation, double scale, const void* Z, void* a,
                     int64_t rows, int64_t r, int64_t a_width) {
  run(dtype, activation, scale, Z, nullptr, a, rows, r, a_width);
}

void activation_backward_rows(Dtype dtype, Activation activation, double scale, const void* Z,
                              void* dA, void* a, int64_t rows, int64_t r, int64_t a_width) {
  run(dtype, activation, scale, Z, dA, a, rows, r, a_width);
}

}  // namespace peftkern::cpu
