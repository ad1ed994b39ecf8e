#include "dropout_rows.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

namespace peftkern::cpu {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PEFTKERN_X86_MULTIVERSION 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace avx512 {
#include "dropout_rows_impl.h"
}  // namespace avx512
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "dropout_rows_impl.h"
}  // namespace avx2
#pragma GCC pop_options
#endif

namespace baseline {
#include "dropout_rows_impl.h"
}  // namespace baseline

namespace {

enum class Isa { avx512, avx2, baseline };

Isa detect_isa() {
#ifdef PEFTKERN_X86_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    return Isa::avx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::baseline;
}

Isa isa() {
  static const Isa selected = detect_isa();
  return selected;
}

}  // namespace

void drop_convert_rows(Dtype x_type, Dtype out_type, const void* x, void* out, int64_t rows,
                       int64_t K, int64_t row0, const DropoutParams* dropout) {
  switch (isa()) {
#ifdef PEFTKERN_X86_MULTIVERSION
    case Isa::avx512:
      return avx512::drop_convert_rows_impl(x_type, out_type, x, out, rows, K, row0, dropout);
    case Isa::avx2:
      return avx2::drop_convert_rows_impl(x_type, out_type, x, out, rows, K, row0, dropout);
#endif
    default:
      return baseline::drop_convert_rows_impl(x_type, out_type, x, out, rows, K, row0, dropout);
  }
}

void drop_backward_rows(Dtype x_type, Dtype acc_type, const void* x, void* dx, const void* tmp,
                        void* masked, int64_t rows, int64_t K, int64_t row0,
                        const DropoutParams* dropout) {
  switch (isa()) {
#ifdef PEFTKERN_X86_MULTIVERSION
    case Isa::avx512:
      return avx512::drop_backward_rows_impl(x_type, acc_type, x, dx, tmp, masked, rows, K, row0,
                                             dropout);
    case Isa::avx2:
      return avx2::drop_backward_rows_impl(x_type, acc_type, x, dx, tmp, masked, rows, K, row0,
                                           dropout);
#endif
    default:
      return baseline::drop_backward_rows_impl(x_type, acc_type, x, dx, tmp, masked, rows, K,
                                               row0, dropout);
  }
}

const char* selected_isa() {
  switch (isa()) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace peftkern::cpu
