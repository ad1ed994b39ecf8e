#include "activation_rows.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstring>
#include <type_traits>

namespace peftkern::cpu {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEFTKERN_ACTIVATION_MULTIVERSION 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace avx512 {
#include "activation_rows_impl.h"
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "activation_rows_impl.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace baseline {
#include "activation_rows_impl.h"
}  // namespace baseline

namespace {

// Same ISA as the dropout row kernels: one detection for the whole extension.
void run(Dtype dtype, Activation activation, double scale, const void* Z, void* dA, void* a, int64_t rows,
         int64_t r, int64_t a_width) {
#ifdef PEFTKERN_ACTIVATION_MULTIVERSION
  static const char* const isa = selected_isa();
  if (std::strcmp(isa, "avx512") == 0) {
    return avx512::activation_rows_impl(dtype, activation, scale, Z, dA, a, rows, r, a_width);
  }
  if (std::strcmp(isa, "avx2") == 0) {
    return avx2::activation_rows_impl(dtype, activation, scale, Z, dA, a, rows, r, a_width);
  }
#endif
  baseline::activation_rows_impl(dtype, activation, scale, Z, dA, a, rows, r, a_width);
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
