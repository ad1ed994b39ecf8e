#include "dropout_rows.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "isa.h"

namespace peftkern::cpu {

#define PEFTKERN_ISA_IMPL "dropout_rows_impl.h"
#include "isa_variants.h"
#undef PEFTKERN_ISA_IMPL

void drop_convert_rows(Dtype x_type, Dtype out_type, const void* x, void* out, int64_t rows,
                       int64_t K, int64_t row0, const DropoutParams* dropout) {
  PEFTKERN_ISA_DISPATCH(drop_convert_rows_impl(x_type, out_type, x, out, rows, K, row0, dropout));
}

void add_rank_rows(Dtype out_type, Dtype acc_type, const void* coef, const void* basis, void* out,
                   int64_t rows, int64_t r, int64_t K, int64_t row0, const DropoutParams* dropout) {
  PEFTKERN_ISA_DISPATCH(add_rank_rows_impl(out_type, acc_type, coef, basis, out, rows, r, K, row0, dropout));
}

}  // namespace peftkern::cpu
