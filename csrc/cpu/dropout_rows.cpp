#include "dropout_rows.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>  // the AVX-512 Philox in dropout_rows_impl.h
#endif

#include "isa.h"

namespace peftkern::cpu {

#define PEFTKERN_ISA_IMPL "dropout_rows_impl.h"
#include "isa_variants.h"
#undef PEFTKERN_ISA_IMPL

void drop_convert_rows(Dtype x_type, Dtype out_type, const void* x, void* out, int64_t rows,
                       int64_t K, int64_t row0, const DropoutParams* dropout) {
  PEFTKERN_ISA_DISPATCH(drop_convert_rows_impl(x_type, out_type, x, out, rows, K, row0, dropout));
}

void drop_backward_rows(Dtype x_type, Dtype acc_type, const void* x, void* dx, const void* tmp,
                        void* masked, int64_t rows, int64_t K, int64_t row0,
                        const DropoutParams* dropout) {
  PEFTKERN_ISA_DISPATCH(
      drop_backward_rows_impl(x_type, acc_type, x, dx, tmp, masked, rows, K, row0, dropout));
}

}  // namespace peftkern::cpu
