// The body of the float32 flash attention (flash_attention_f32_kernel.h). Without an include
// guard and without includes on purpose: flash_attention_f32.cpp includes it once per vector
// ISA (isa_variants.h), inside a namespace and a `#pragma GCC target` region.
//
// Vectors are GCC vector types of one register of the ISA (`Lanes`: kLanes floats), never
// wider: GCC keeps a vector type wider than the target's registers in memory between
// operations.
// Every product goes through one micro-kernel, gemm_rows: a tile of kTileRows rows ×
// kTileVectors column vectors of the result stays in registers (enough independent chains to
// keep the FMA units busy, leaving registers for the operands) while the inner dimension
// streams past, each loaded vector serving the tile's rows and each broadcast value its
// columns. Scores are Q·Kᵀ against a transposed copy of the key block, so that they too come
// out as rows of vectors.

#if defined(PEFTKERN_ISA_AVX512)
constexpr int64_t kLanes = 16;  // zmm; 4 × 4 accumulators of the 32 registers
constexpr int kTileVectors = 4;
#elif defined(PEFTKERN_ISA_AVX2)
constexpr int64_t kLanes = 8;  // ymm; 4 × 2 accumulators of the 16 registers
constexpr int kTileVectors = 2;
#else
constexpr int64_t kLanes = 4;  // xmm
constexpr int kTileVectors = 2;
#endif
constexpr int kTileRows = 4;

// Sequence keys per key block, and query rows per block: forward (kFlashQueryBlock,
// flash_attention_f32_kernel.h) and backward. A forward query block streams every key block
// it sees past its accumulators, so it is taller; a backward one holds P and dS for the whole
// key block. The scores of a block (at most 64 × 256 floats) stay in the L2 cache.
constexpr int64_t kKeyBlock = 256;
constexpr int64_t kQueryBlock = kFlashQueryBlock;
constexpr int64_t kBackwardQueryBlock = 32;

typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t LaneInts __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Lanes load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Lanes v) {
  std::memcpy(p, &v, sizeof v);
}

inline Lanes splat(float x) {
  return Lanes{} + x;
}

inline int64_t padded(int64_t count) {
  return (count + kLanes - 1) / kLanes * kLanes;
}

// Horizontal reductions as a tree of halvings: 4 dependent steps instead of 15.
template <typename Op>
inline float lane_reduce(Lanes v, Op op) {
  float lanes[kLanes];
  std::memcpy(lanes, &v, sizeof v);
  for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
    for (int64_t l = 0; l < width; ++l) lanes[l] = op(lanes[l], lanes[l + width]);
  }
  return lanes[0];
}

inline float lane_sum(Lanes v) {
  return lane_reduce(v, [](float a, float b) { return a + b; });
}

inline float lane_max(Lanes v) {
  return lane_reduce(v, [](float a, float b) { return std::max(a, b); });
}

// Lanes of the vector at column jb that hold one of the first `count` columns.
inline LaneInts columns_below(int64_t jb, int64_t count) {
  LaneInts lane = {};
  for (int32_t l = 0; l < kLanes; ++l) lane[l] = l;  // folded into a constant
  return lane + static_cast<int32_t>(jb) < static_cast<int32_t>(count);
}

inline Lanes exp_lanes(Lanes x) {
  return fast_exp_of<Lanes, LaneInts>(x);
}

inline float dot(const float* a, const float* b, int64_t d) {
  Lanes lanes = {};
  int64_t c = 0;
  for (; c + kLanes <= d; c += kLanes) lanes += load(a + c) * load(b + c);
  float sum = 0.0f;
  for (; c < d; ++c) sum += a[c] * b[c];
  return sum + lane_sum(lanes);
}

// One operand of gemm_rows: A(i, k) = a[i·row + k·col], so a matrix or its transpose.
struct Operand {
  const float* a;
  int64_t row, col;
};

// T rows × V vectors of C from column 0 of b and c: acc = (C or 0) + Σ_k A(t, k)·B_k.
template <int T, int V, bool kAccumulate>
inline void gemm_tile(int64_t K, Operand A, const float* b, int64_t ldb, float* c, int64_t ldc) {
  Lanes acc[T][V];
  for (int t = 0; t < T; ++t) {
    for (int v = 0; v < V; ++v) acc[t][v] = kAccumulate ? load(c + t * ldc + v * kLanes) : Lanes{};
  }
  for (int64_t k = 0; k < K; ++k) {
    Lanes row[V];
    for (int v = 0; v < V; ++v) row[v] = load(b + k * ldb + v * kLanes);
    for (int t = 0; t < T; ++t) {
      const float x = A.a[t * A.row + k * A.col];
      for (int v = 0; v < V; ++v) acc[t][v] += x * row[v];
    }
  }
  for (int t = 0; t < T; ++t) {
    for (int v = 0; v < V; ++v) store(c + t * ldc + v * kLanes, acc[t][v]);
  }
}

// Calls f(std::integral_constant<int, x>) for x in 1..4.
template <typename F>
inline void with_constant(int64_t x, F&& f) {
  switch (x) {
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    default:
      return f(std::integral_constant<int, 1>{});
  }
}

// C[i, 0:N) (+)= Σ_{k<K} A(i, k)·B[k, 0:N) for i < M: B's row k at b + k·ldb, C's row i at
// c + i·ldc. Without kAccumulate C is overwritten.
template <bool kAccumulate>
void gemm_rows(int64_t M, int64_t N, int64_t K, Operand A, const float* b, int64_t ldb, float* c,
               int64_t ldc) {
  int64_t cb = 0;
  while (cb + kLanes <= N) {
    const int64_t vectors = std::min<int64_t>(kTileVectors, (N - cb) / kLanes);
    with_constant(vectors, [&](auto v) {
      constexpr int V = decltype(v)::value;
      int64_t i = 0;
      for (; i + kTileRows <= M; i += kTileRows) {
        const Operand rows{A.a + i * A.row, A.row, A.col};
        gemm_tile<kTileRows, V, kAccumulate>(K, rows, b + cb, ldb, c + i * ldc + cb, ldc);
      }
      if (i < M) {
        const Operand rows{A.a + i * A.row, A.row, A.col};
        with_constant(M - i, [&](auto t) {
          gemm_tile<decltype(t)::value, V, kAccumulate>(K, rows, b + cb, ldb, c + i * ldc + cb,
                                                        ldc);
        });
      }
    });
    cb += vectors * kLanes;
  }
  for (int64_t i = 0; i < M; ++i) {  // the last N % kLanes columns
    for (int64_t col = cb; col < N; ++col) {
      float sum = kAccumulate ? c[i * ldc + col] : 0.0f;
      for (int64_t k = 0; k < K; ++k) sum += A.a[i * A.row + k * A.col] * b[k * ldb + col];
      c[i * ldc + col] = sum;
    }
  }
}

// The row stride of a transposed block [d, count]: padded(count) plus one vector, so that the
// d rows do not sit a power of two apart (2 KB at count = 512), where they would all fall in
// the same few L1 cache sets and evict each other while the transpose writes them.
inline int64_t transposed_ld(int64_t count) {
  return padded(count) + kLanes;
}

// dst [d, ld_dst] ← the rows [0, count) of src (row j at src + j·ld) transposed, in columns
// [0, count); the columns from count to padded(count) are zero. Done in 16 × 16 squares:
// each reads 16 rows once and writes 16 whole cache lines.
inline void pack_transposed(const float* src, int64_t ld, int64_t count, int64_t d, float* dst,
                            int64_t ld_dst) {
  for (int64_t c = 0; c < d; ++c) {
    std::fill(dst + c * ld_dst + count, dst + c * ld_dst + padded(count), 0.0f);
  }
  for (int64_t j0 = 0; j0 < count; j0 += kLanes) {
    const int64_t j1 = std::min(j0 + kLanes, count);
    for (int64_t c0 = 0; c0 < d; c0 += kLanes) {
      const int64_t c1 = std::min(c0 + kLanes, d);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t j = j0; j < j1; ++j) dst[c * ld_dst + j] = src[j * ld + c];
      }
    }
  }
}

inline std::vector<float>& scratch(int slot, int64_t size) {
  thread_local std::vector<float> buffers[4];
  std::vector<float>& buffer = buffers[slot];
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer;
}

// One block of keys as a query block sees it: `count` keys whose transpose is kt [d, ldkt]
// (from column 0), rows k_rows / v_rows (row j at + j·ld), the first at sequence position
// `first` (-1 for the prefix rows, which every query sees and no mask hides).
struct KeyBlock {
  const float* kt;
  int64_t ldkt;
  const float* vt;  // backward only: V's transpose, like kt
  const float* k_rows;
  const float* v_rows;
  int64_t ld;
  int64_t count;
  int64_t first;
};

// Calls body(KeyBlock) for the prefix rows (when m > 0) and then for each block of the
// sequence keys of (b, kv_head). kt / vt hold the transposed sequence keys and values
// [d, transposed_ld(n)], pkt / pvt those of the prefix [d, transposed_ld(m)].
template <typename F>
void for_each_key_block(const FlashAttention& a, int64_t b, int64_t kv_head, const float* kt,
                        const float* vt, const float* pkt, const float* pvt, F&& body) {
  if (a.m > 0) {
    const int64_t prefix_head = a.shared_prefix ? kv_head : b * a.heads_kv + kv_head;
    const int64_t offset = prefix_head * a.m * a.d;
    body(KeyBlock{pkt, transposed_ld(a.m), pvt, a.prefix_k + offset, a.prefix_v + offset, a.d, a.m,
                  -1});
  }
  const int64_t ldkt = transposed_ld(a.n);
  for (int64_t j0 = 0; j0 < a.n; j0 += kKeyBlock) {
    body(KeyBlock{kt + j0, ldkt, vt ? vt + j0 : nullptr, a.k.row(b, kv_head, j0),
                  a.v.row(b, kv_head, j0), a.k.row_stride, std::min(kKeyBlock, a.n - j0), j0});
  }
}

// The keys of `block` that query rows [i0, i0 + rows) may see: under the causal rule a
// sequence block is cut after the last row's position (count 0: none of them).
inline KeyBlock seen_by(KeyBlock block, const FlashAttention& a, int64_t i0, int64_t rows) {
  if (a.causal && block.first >= 0) {
    block.count = std::clamp<int64_t>(i0 + rows - block.first, 0, block.count);
  }
  return block;
}

// Scaled scores of query i against the block, -inf where a key is hidden (past the causal
// limit, or padding): row[0, padded(count)) in place; returns their maximum.
inline float mask_scores(float* row, const FlashAttention& a, int64_t b, const KeyBlock& block,
                         int64_t i) {
  const int64_t visible = block.first < 0 || !a.causal
                              ? block.count
                              : std::clamp<int64_t>(i - block.first + 1, 0, block.count);
  const float* bias = block.first >= 0 && a.key_bias != nullptr
                          ? a.key_bias + b * a.key_bias_stride + block.first
                          : nullptr;
  const Lanes minus_inf = splat(-std::numeric_limits<float>::infinity());
  Lanes maxes = minus_inf;
  for (int64_t jb = 0; jb < padded(block.count); jb += kLanes) {
    Lanes x = load(row + jb) * a.scale;
    if (bias != nullptr) x += load(bias + jb);
    x = columns_below(jb, visible) ? x : minus_inf;
    store(row + jb, x);
    maxes = maxes > x ? maxes : x;
  }
  return lane_max(maxes);
}

// row[j] = exp(row[j] - shift), 0 where row[j] is -inf (a hidden key); returns the sum.
inline float exp_shifted(float* row, int64_t count, float shift) {
  const Lanes minus_inf = splat(-std::numeric_limits<float>::infinity());
  Lanes sums = {};
  for (int64_t jb = 0; jb < padded(count); jb += kLanes) {
    const Lanes x = load(row + jb);
    const Lanes e = x > minus_inf ? exp_lanes(x - shift) : Lanes{};
    store(row + jb, e);
    sums += e;
  }
  return lane_sum(sums);
}

inline void scale_row(float* row, int64_t d, float factor) {
  for (int64_t c = 0; c < d; ++c) row[c] *= factor;
}

inline void flash_forward_unit_impl(const FlashAttention& a, int64_t b, int64_t kv_head,
                                    int64_t q_begin, int64_t q_end) {
  const int64_t d = a.d, group = a.heads_q / a.heads_kv;
  const int64_t keys = a.causal ? std::min(a.n, q_end) : a.n;
  float* kt = scratch(0, d * transposed_ld(a.n)).data();
  float* pkt = scratch(1, d * transposed_ld(a.m)).data();
  float* scores = scratch(2, kQueryBlock * std::max(kKeyBlock, padded(a.m))).data();
  float* acc = scratch(3, kQueryBlock * (d + 2)).data();
  float* row_max = acc + kQueryBlock * d;
  float* row_sum = row_max + kQueryBlock;
  pack_transposed(a.k.row(b, kv_head, 0), a.k.row_stride, keys, d, kt, transposed_ld(a.n));
  if (a.m > 0) {
    const int64_t prefix_head = a.shared_prefix ? kv_head : b * a.heads_kv + kv_head;
    pack_transposed(a.prefix_k + prefix_head * a.m * d, d, a.m, d, pkt, transposed_ld(a.m));
  }
  for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
    for (int64_t i0 = q_begin; i0 < q_end; i0 += kQueryBlock) {
      const int64_t rows = std::min(kQueryBlock, q_end - i0);
      const float* q = a.q.row(b, h, i0);
      std::fill(acc, acc + rows * d, 0.0f);
      std::fill(row_max, row_max + rows, -std::numeric_limits<float>::infinity());
      std::fill(row_sum, row_sum + rows, 0.0f);
      for_each_key_block(a, b, kv_head, kt, nullptr, pkt, nullptr, [&](const KeyBlock& all) {
        const KeyBlock block = seen_by(all, a, i0, rows);
        if (block.count == 0) return;
        const int64_t ld = padded(block.count);
        gemm_rows<false>(rows, ld, d, Operand{q, a.q.row_stride, 1}, block.kt, block.ldkt, scores,
                         ld);
        for (int64_t r = 0; r < rows; ++r) {
          float* row = scores + r * ld;
          const float block_max = mask_scores(row, a, b, block, i0 + r);
          const float new_max = std::max(row_max[r], block_max);
          if (new_max == -std::numeric_limits<float>::infinity()) {
            std::fill(row, row + ld, 0.0f);  // nothing visible yet: no weight, no state
            continue;
          }
          const float block_sum = exp_shifted(row, block.count, new_max);
          if (row_max[r] != new_max) {  // rescale what earlier blocks accumulated
            const float correction = row_sum[r] > 0.0f ? fast_exp(row_max[r] - new_max) : 0.0f;
            row_sum[r] *= correction;
            scale_row(acc + r * d, d, correction);
            row_max[r] = new_max;
          }
          row_sum[r] += block_sum;
        }
        gemm_rows<true>(rows, d, block.count, Operand{scores, ld, 1}, block.v_rows, block.ld, acc,
                        d);
      });
      float* lse = a.lse + (b * a.heads_q + h) * a.n + i0;
      for (int64_t r = 0; r < rows; ++r) {
        float* out = a.out.row(b, h, i0 + r);
        if (row_sum[r] == 0.0f) {  // no visible key: out = 0, lse = -inf
          std::fill(out, out + d, 0.0f);
          lse[r] = -std::numeric_limits<float>::infinity();
          continue;
        }
        const float inverse = 1.0f / row_sum[r];
        for (int64_t c = 0; c < d; ++c) out[c] = acc[r * d + c] * inverse;
        lse[r] = row_max[r] + std::log(row_sum[r]);
      }
    }
  }
}

// P = exp(scores - lse) on visible keys (0 elsewhere, and on a row that sees no key).
inline void probabilities(float* row, const FlashAttention& a, int64_t b, const KeyBlock& block,
                          int64_t i, float lse) {
  mask_scores(row, a, b, block, i);
  if (lse == -std::numeric_limits<float>::infinity()) {
    std::fill(row, row + padded(block.count), 0.0f);
    return;
  }
  exp_shifted(row, block.count, lse);
}

// Key blocks outside, query blocks inside: a key block's dK and dV rows stay in the cache
// while every query block that sees it adds to them, and only dq is revisited (once per key
// block) instead of dK and dV once per query block.
inline void flash_backward_unit_impl(const FlashAttention& a, int64_t b, int64_t h) {
  const int64_t d = a.d, n = a.n, kv_head = h / (a.heads_q / a.heads_kv);
  const int64_t grad_head = a.key_grads_per_query_head ? h : kv_head;
  const int64_t grad_heads = a.key_grads_per_query_head ? a.heads_q : a.heads_kv;
  const int64_t block_cols = std::max(kKeyBlock, padded(a.m));
  float* kt = scratch(0, 2 * d * transposed_ld(n)).data();
  float* vt = kt + d * transposed_ld(n);
  float* pkt = scratch(1, 2 * d * transposed_ld(a.m)).data();
  float* pvt = pkt + d * transposed_ld(a.m);
  float* probs = scratch(2, 2 * kBackwardQueryBlock * block_cols).data();
  float* dscores = probs + kBackwardQueryBlock * block_cols;
  float* row_d = scratch(3, n).data();  // D = rowsum(dO ⊙ O) of every query row
  pack_transposed(a.k.row(b, kv_head, 0), a.k.row_stride, n, d, kt, transposed_ld(n));
  pack_transposed(a.v.row(b, kv_head, 0), a.v.row_stride, n, d, vt, transposed_ld(n));
  const int64_t prefix_head = a.shared_prefix ? kv_head : b * a.heads_kv + kv_head;
  if (a.m > 0) {
    pack_transposed(a.prefix_k + prefix_head * a.m * d, d, a.m, d, pkt, transposed_ld(a.m));
    pack_transposed(a.prefix_v + prefix_head * a.m * d, d, a.m, d, pvt, transposed_ld(a.m));
  }
  for (int64_t i = 0; i < n; ++i) row_d[i] = dot(a.grad_out.row(b, h, i), a.out.row(b, h, i), d);
  const int64_t prefix_grad_offset = (b * grad_heads + grad_head) * a.m * d;
  for_each_key_block(a, b, kv_head, kt, vt, pkt, pvt, [&](const KeyBlock& all) {
    const bool prefix = all.first < 0;
    float* dk = prefix ? (a.grad_prefix_k ? a.grad_prefix_k + prefix_grad_offset : nullptr)
                       : (a.dk.data ? a.dk.row(b, grad_head, all.first) : nullptr);
    float* dv = prefix ? (a.grad_prefix_v ? a.grad_prefix_v + prefix_grad_offset : nullptr)
                       : (a.dv.data ? a.dv.row(b, grad_head, all.first) : nullptr);
    const int64_t ld_dk = prefix ? d : a.dk.row_stride, ld_dv = prefix ? d : a.dv.row_stride;
    // Under the causal rule no query before the block's first key sees it.
    const int64_t first_query =
        a.causal && !prefix ? all.first / kBackwardQueryBlock * kBackwardQueryBlock : 0;
    for (int64_t i0 = first_query; i0 < n; i0 += kBackwardQueryBlock) {
      const int64_t rows = std::min(kBackwardQueryBlock, n - i0);
      const KeyBlock block = seen_by(all, a, i0, rows);
      if (block.count == 0) continue;
      const int64_t ld = padded(block.count);
      const float* q = a.q.row(b, h, i0);
      const float* grad_out = a.grad_out.row(b, h, i0);
      const float* lse = a.lse + (b * a.heads_q + h) * n + i0;
      gemm_rows<false>(rows, ld, d, Operand{q, a.q.row_stride, 1}, block.kt, block.ldkt, probs, ld);
      gemm_rows<false>(rows, ld, d, Operand{grad_out, a.grad_out.row_stride, 1}, block.vt,
                       block.ldkt, dscores, ld);
      for (int64_t r = 0; r < rows; ++r) {
        float* p = probs + r * ld;
        float* ds = dscores + r * ld;
        probabilities(p, a, b, block, i0 + r, lse[r]);
        for (int64_t jb = 0; jb < ld; jb += kLanes) {  // dS = P ⊙ (dP - D), scale folded in
          store(ds + jb, a.scale * load(p + jb) * (load(ds + jb) - row_d[i0 + r]));
        }
      }
      if (a.dq.data != nullptr) {  // dQ += dS·K
        gemm_rows<true>(rows, d, block.count, Operand{dscores, ld, 1}, block.k_rows, block.ld,
                        a.dq.row(b, h, i0), a.dq.row_stride);
      }
      if (dk != nullptr) {  // dK += dSᵀ·Q
        gemm_rows<true>(block.count, d, rows, Operand{dscores, 1, ld}, q, a.q.row_stride, dk,
                        ld_dk);
      }
      if (dv != nullptr) {  // dV += Pᵀ·dO
        gemm_rows<true>(block.count, d, rows, Operand{probs, 1, ld}, grad_out,
                        a.grad_out.row_stride, dv, ld_dv);
      }
    }
  });
}
