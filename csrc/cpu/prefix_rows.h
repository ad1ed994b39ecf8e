// Row kernels of the prefix part of prefix attention on the CPU (float32): every query row
// against the m prefix rows of its key/value head, fused so that q and out are read once.
// Compiled once per x86 vector ISA like the other row kernels (isa_variants.h).
#pragma once

#include <cstdint>

namespace peftkern::cpu {

// The prefix rows of one key/value head, [m, d] each, with their transposes zero-padded to
// [d, m_pad] (m_pad a multiple of 16) so that the scores of a query row are d vector
// multiply-adds over m, without horizontal sums.
struct PrefixRows {
  const float* k;
  const float* v;
  const float* k_t;
  const float* v_t;
  int64_t m, m_pad, d;
  float scale;
};

// Rows of a query head: row i of q starts at q + i·q_stride (d contiguous floats), and so on
// for each pointer with its own stride, so that both [B, H, n, d] and the [B, n, H, d] memory
// that projections produce are read in place. lse is contiguous over the rows.

// Rows [0, rows): attention over the prefix rows alone (scores, softmax, P·P_V), merged into
// the sequence part's (out, lse) in place.
void prefix_forward_rows(const PrefixRows& prefix, const float* q, int64_t q_stride, float* out,
                         int64_t out_stride, float* lse, int64_t rows);

// The prefix part's backward for rows [0, rows), given the merged out and lse:
//   dq     += scale · dS·P_K                 (when dq != nullptr)
//   grad_k += scale · dSᵀ·q, grad_v += Pᵀ·dO  ([m, d] accumulators, when not nullptr)
// with P = exp(q·P_Kᵀ·scale - lse), dS = P ⊙ (dO·P_Vᵀ - rowsum(dO ⊙ out)).
struct PrefixGradRows {
  const float* q;
  const float* grad_out;
  const float* out;
  float* dq;  // may be nullptr
  int64_t q_stride, grad_out_stride, out_stride, dq_stride;
  const float* lse;
};
void prefix_backward_rows(const PrefixRows& prefix, const PrefixGradRows& rows_view,
                          float* grad_k, float* grad_v, int64_t rows);

}  // namespace peftkern::cpu
