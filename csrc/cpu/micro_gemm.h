// GEMM micro-kernels of the CPU attention: C[M x N] (=|+=) A[M x K] B[K x N]
// over the small tiles of one block (M, N, K from 16 to 256, data in L1/L2),
// accumulating in fp32, with the epilogues the attention steps fold in (a
// scale, a per-row rescale of C, a running column max) and the products' cut
// at a causal diagonal (GemmArgs::diag).
//
// at::native::cpublas::gemm (what PyTorch's CPU flash attention calls) is not
// exported from libtorch_cpu, and MKL sgemm reaches 107 GFLOP/s on one Zen 5
// core against a 263 GFLOP/s FMA peak; the AVX-512 micro-kernels below run
// the attention's tile shapes at 247-260.
//
// Three register-blocked families, chosen by the caller's instruction set:
//   AVX-512      fp32 FMA, 8 rows x 2 vectors of 16 columns;
//   AVX512-BF16  bf16 dot products (vdpbf16ps) on pairs packed in uint32;
//   AVX2 + FMA   fp32, 6 rows x 2 vectors of 8 columns;
// and a portable C++ product in fp32 for everything else.
#pragma once

#include "simd.h"

namespace pyfastattn {
namespace cpu {

// ---------------------------------------------------------------------------
// GEMM micro-kernels: C[M x N] (=|+=) A[M x K] B[K x N], fp32 accumulation.
// A is read by element: row-major (A(r, k) = a[r * lda + k]) or column-major
// (A(r, k) = a[k * lda + r]); B is row-major with leading dimension ldb; C is
// row-major with ldc. In the bf16 variant every K index is a pair of bf16
// values packed in a uint32 (A pairs along k; B "VNNI": row k2 holds, for
// each column, the pair (B[2 k2][c], B[2 k2 + 1][c])).
// ---------------------------------------------------------------------------

// Cache lines a product prefetches while it runs (gemm_tiled, gemm_portable):
// `rows` rows of `bytes` bytes, `stride` bytes apart from `base`, a few
// lines after each micro-kernel call, so that the operands of the tile's next
// step (V rows, the next tile's K rows) arrive from L3 while this product
// computes instead of stalling the copy that reads them (PERF_NOTES
// "issue 21, session 4"). A hint only: no result depends on it.
struct PrefetchRows {
  const char* base = nullptr;
  int64_t stride = 0;
  int rows = 0;
  int lines = 0;  // per row, from the first row's alignment
  int row = 0, line = 0;
  PrefetchRows() = default;
  PrefetchRows(const void* p, int64_t stride_bytes, int nrows, int64_t bytes)
      : base(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63))),
        stride(stride_bytes),
        rows(nrows),
        lines(int(((reinterpret_cast<uintptr_t>(p) & 63) + bytes + 63) / 64)) {}
  int64_t total() const { return int64_t(rows) * lines; }
  // The next `count` lines, row by row.
  PFA_INLINE void issue(int64_t count) {
    for (; count > 0 && row < rows; --count) {
      __builtin_prefetch(base + row * stride + 64 * line, 0, 3);
      if (++line == lines) {
        line = 0;
        ++row;
      }
    }
  }
};

// GemmArgs::diag when no causal diagonal crosses the product.
constexpr int64_t kNoDiag = int64_t(1) << 40;

struct GemmArgs {
  int64_t m, n, k;  // k counts uint32 pairs in the bf16 variant
  const void* a;
  int64_t lda;
  bool a_col_major;
  const void* b;
  int64_t ldb;
  float* c;
  int64_t ldc;
  bool accumulate;                   // C += A B, else C = A B
  float alpha = 1.0f;                // without accumulate: C = alpha A B
  const float* row_scale = nullptr;  // with accumulate: C = row_scale[r] C + A B
  float* col_max = nullptr;          // col_max[c] = max(col_max[c], max_r C[r][c])
  PrefetchRows* prefetch = nullptr;  // lines to prefetch, spread over the product's micro-kernel calls
  // A causal diagonal across the tile (the forward's diagonal tiles,
  // attention_fwd.cpp), kNoDiag when none:
  //   C = alpha A B (S^T: rows keys, columns queries): C[r][c] = -inf where
  //     r >= c + diag; blocks with no entry left are filled, not computed;
  //   C += A B with A column-major (P V: rows queries, K keys): row r reads
  //     keys k < r + diag only (A is 0 beyond), so a block of rows stops at
  //     its last row's limit; with diag_pairs, K counts key pairs.
  int64_t diag = kNoDiag;
  bool diag_pairs = false;
};

// Lines per micro-kernel call (of `calls`) that spread g.prefetch over a product.
PFA_INLINE int64_t prefetch_per_call(const GemmArgs& g, int64_t calls) {
  return g.prefetch ? (g.prefetch->total() + calls - 1) / std::max<int64_t>(calls, 1) : 0;
}

// GemmArgs::diag of an accumulating product: the K extent row r reads (keys
// k < r + diag, in pairs with diag_pairs), within [0, g.k].
PFA_INLINE int64_t diag_k_limit(const GemmArgs& g, int64_t r) {
  const int64_t keys = std::max<int64_t>(0, r + g.diag);
  return std::min(g.k, g.diag_pairs ? (keys + 1) / 2 : keys);
}

// What a micro-kernel does around its K loop (pointers already offset to
// the block).
struct Epilogue {
  bool accumulate;
  bool scale;
  float alpha;
  const float* row_scale;
  float* col_max;
  int64_t diag = kNoDiag;  // C[r][c] = -inf where r >= c + diag (after the scale, before col_max)
};

// The columns of row r that keep their value under Epilogue::diag: c >= r - diag + 1.
PFA_INLINE int64_t diag_first_col(int r, int64_t diag) { return int64_t(r) - diag + 1; }

// A micro-kernel computes one block of C: up to kMr rows and kNv vectors of
// columns; `last` is the number of valid columns in its last vector.
template <typename E>
using MicroFn = void (*)(int64_t k, const E* a, int64_t lda, const E* b, int64_t ldb, float* c, int64_t ldc,
                         int last, const Epilogue& e);

#if PFA_X86
// AVX-512 kernels: 8 rows x 2 vectors of 16 columns, 16 accumulators. On one
// Zen 5 core, for this kernel's tile shapes (M, N, K from 64 to 256, data in
// L1/L2), 8 x 2 runs at 247-260 GFLOP/s fp32 and 457-520 bf16 (FMA peak 263,
// bf16 dot ~520), like 4 x 4; 8 x 3 splits the common N = 64 (a head dim)
// into 48 + 16, and its 16-wide 8 x 1 remainder runs at 174-201.

PFA_AVX512 PFA_INLINE __mmask16 tail_mask(int cols) {
  return cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1u);
}

template <int MR, int NV>
PFA_AVX512 PFA_INLINE void micro_prologue(__m512 (&acc)[MR][NV], const float* c, int64_t ldc, __mmask16 last,
                                          const Epilogue& e) {
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xFFFF);
      acc[r][v] = e.accumulate ? _mm512_maskz_loadu_ps(mk, c + r * ldc + 16 * v) : _mm512_setzero_ps();
      if (e.accumulate && e.row_scale) acc[r][v] = _mm512_mul_ps(acc[r][v], _mm512_set1_ps(e.row_scale[r]));
    }
  }
}

template <int MR, int NV>
PFA_AVX512 PFA_INLINE void micro_epilogue(__m512 (&acc)[MR][NV], float* c, int64_t ldc, __mmask16 last,
                                          const Epilogue& e) {
  if (e.scale) {
    const __m512 al = _mm512_set1_ps(e.alpha);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_mul_ps(acc[r][v], al);
    }
  }
  if (e.diag != kNoDiag) {
    const __m512 ninf = _mm512_set1_ps(-kInf);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        const int64_t s = diag_first_col(r, e.diag) - 16 * v;  // lanes >= s keep their value
        const __mmask16 keep = s <= 0 ? __mmask16(0xFFFF) : s >= 16 ? __mmask16(0) : __mmask16(~((1u << s) - 1u));
        acc[r][v] = _mm512_mask_mov_ps(ninf, keep, acc[r][v]);
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xFFFF);
      _mm512_mask_storeu_ps(c + r * ldc + 16 * v, mk, acc[r][v]);
    }
  }
  if (e.col_max) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xFFFF);
      __m512 mx = acc[0][v];
#pragma GCC unroll 16
      for (int r = 1; r < MR; ++r) mx = _mm512_max_ps(mx, acc[r][v]);
      float* cm = e.col_max + 16 * v;
      _mm512_mask_storeu_ps(cm, mk, _mm512_max_ps(mx, _mm512_maskz_loadu_ps(mk, cm)));
    }
  }
}

template <int MR, int NV, bool kColA>
PFA_AVX512 void micro_f32(int64_t kk, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                          int64_t ldc, int last_cols, const Epilogue& e) {
  const __mmask16 last = tail_mask(last_cols);
  __m512 acc[MR][NV];
  micro_prologue<MR, NV>(acc, c, ldc, last, e);
  const float* arow[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) arow[r] = kColA ? a + r : a + r * lda;
  for (int64_t k = 0; k < kk; ++k) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xFFFF);
      bv[v] = _mm512_maskz_loadu_ps(mk, b + k * ldb + 16 * v);
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(kColA ? arow[0][k * lda + r] : arow[r][k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  micro_epilogue<MR, NV>(acc, c, ldc, last, e);
}

template <int MR, int NV, bool kColA>
PFA_AVX512_BF16 void micro_bf16(int64_t kk, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                                float* c, int64_t ldc, int last_cols, const Epilogue& e) {
  const __mmask16 last = tail_mask(last_cols);
  __m512 acc[MR][NV];
  micro_prologue<MR, NV>(acc, c, ldc, last, e);
  const uint32_t* arow[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) arow[r] = kColA ? a + r : a + r * lda;
  for (int64_t k = 0; k < kk; ++k) {
    __m512i bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xFFFF);
      bv[v] = _mm512_maskz_loadu_epi32(mk, b + k * ldb + 16 * v);
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const uint32_t pair = kColA ? arow[0][k * lda + r] : arow[r][k];
      const __m512bh av = (__m512bh)_mm512_set1_epi32(int(pair));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, (__m512bh)bv[v]);
    }
  }
  micro_epilogue<MR, NV>(acc, c, ldc, last, e);
}

// AVX2 + FMA kernel of the same shape: 6 rows x 2 vectors of 8 columns, 12
// accumulators of the 16 ymm registers.
PFA_AVX2 PFA_INLINE __m256i tail_mask8(int cols) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(cols), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// Loads and stores of vector v of NV; the last one is masked to `last`.
template <int NV>
PFA_AVX2 PFA_INLINE __m256 load8(const float* p, int v, __m256i last, bool full) {
  return v == NV - 1 && !full ? _mm256_maskload_ps(p, last) : _mm256_loadu_ps(p);
}
template <int NV>
PFA_AVX2 PFA_INLINE void store8(float* p, int v, __m256i last, bool full, __m256 x) {
  if (v == NV - 1 && !full) {
    _mm256_maskstore_ps(p, last, x);
  } else {
    _mm256_storeu_ps(p, x);
  }
}

template <int MR, int NV, bool kColA>
PFA_AVX2 void micro_f32_avx2(int64_t kk, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                             int64_t ldc, int last_cols, const Epilogue& e) {
  const __m256i last = tail_mask8(last_cols);
  const bool full = last_cols == 8;
  __m256 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = e.accumulate ? load8<NV>(c + r * ldc + 8 * v, v, last, full) : _mm256_setzero_ps();
      if (e.accumulate && e.row_scale) acc[r][v] = _mm256_mul_ps(acc[r][v], _mm256_set1_ps(e.row_scale[r]));
    }
  }
  const float* arow[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) arow[r] = kColA ? a + r : a + r * lda;
  for (int64_t k = 0; k < kk; ++k) {
    __m256 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = load8<NV>(b + k * ldb + 8 * v, v, last, full);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256 av = _mm256_set1_ps(kColA ? arow[0][k * lda + r] : arow[r][k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if (e.scale) acc[r][v] = _mm256_mul_ps(acc[r][v], _mm256_set1_ps(e.alpha));
      if (e.diag != kNoDiag) {
        const int64_t s = diag_first_col(r, e.diag) - 8 * v;  // lanes >= s keep their value
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        const int sc = int(std::max<int64_t>(-1, std::min<int64_t>(8, s)));
        const __m256 drop = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(sc), lane));
        acc[r][v] = _mm256_blendv_ps(acc[r][v], _mm256_set1_ps(-kInf), drop);
      }
      store8<NV>(c + r * ldc + 8 * v, v, last, full, acc[r][v]);
    }
  }
  if (e.col_max) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      __m256 mx = acc[0][v];
#pragma GCC unroll 16
      for (int r = 1; r < MR; ++r) mx = _mm256_max_ps(mx, acc[r][v]);
      float* cm = e.col_max + 8 * v;
      store8<NV>(cm, v, last, full, _mm256_max_ps(mx, load8<NV>(cm, v, last, full)));
    }
  }
}

// A micro-kernel family: element type, register block, columns per vector.
// The register blocks and their measurements are described above.
struct MicroF32Avx512 {
  using Elem = float;
  static constexpr int kMr = 8, kNv = 2, kWidth = 16;
  template <int MR, int NV, bool kColA>
  static constexpr MicroFn<float> get() {
    return &micro_f32<MR, NV, kColA>;
  }
};
struct MicroBf16Avx512 {
  using Elem = uint32_t;
  static constexpr int kMr = 8, kNv = 2, kWidth = 16;
  template <int MR, int NV, bool kColA>
  static constexpr MicroFn<uint32_t> get() {
    return &micro_bf16<MR, NV, kColA>;
  }
};
struct MicroF32Avx2 {
  using Elem = float;
  static constexpr int kMr = 6, kNv = 2, kWidth = 8;
  template <int MR, int NV, bool kColA>
  static constexpr MicroFn<float> get() {
    return &micro_f32_avx2<MR, NV, kColA>;
  }
};

// Function table over (rows 1..kMr, vectors 1..kNv) for one A layout, so
// that the edge blocks of a product use exactly sized kernels.
template <class F, bool kColA>
struct MicroTable {
  MicroFn<typename F::Elem> fn[F::kMr][F::kNv];
  constexpr MicroTable() : fn() { fill<1>(); }
  template <int MR>
  constexpr void fill() {
    fill_row<MR, 1>();
    if constexpr (MR < F::kMr) fill<MR + 1>();
  }
  template <int MR, int NV>
  constexpr void fill_row() {
    fn[MR - 1][NV - 1] = F::template get<MR, NV, kColA>();
    if constexpr (NV < F::kNv) fill_row<MR, NV + 1>();
  }
};

// Column panels of kNv vectors outside, row blocks of kMr inside: the B panel
// (k x 32 floats, 32 KiB for k = 256) stays in L1 across row blocks.
template <class F>
void gemm_tiled(const GemmArgs& g) {
  using E = typename F::Elem;
  static constexpr MicroTable<F, false> kRow{};
  static constexpr MicroTable<F, true> kCol{};
  constexpr int kPanel = F::kWidth * F::kNv;
  const E* a = static_cast<const E*>(g.a);
  const E* b = static_cast<const E*>(g.b);
  const bool scale = !g.accumulate && g.alpha != 1.0f;
  const int64_t pf = prefetch_per_call(g, (g.n + kPanel - 1) / kPanel * ((g.m + F::kMr - 1) / F::kMr));
  for (int64_t n0 = 0; n0 < g.n; n0 += kPanel) {
    const int cols = int(std::min<int64_t>(kPanel, g.n - n0));
    const int nv = (cols + F::kWidth - 1) / F::kWidth;
    const int last = cols - F::kWidth * (nv - 1);
    for (int64_t m0 = 0; m0 < g.m; m0 += F::kMr) {
      const int mr = int(std::min<int64_t>(F::kMr, g.m - m0));
      const E* ablk = g.a_col_major ? a + m0 : a + m0 * g.lda;
      const MicroFn<E> fn = g.a_col_major ? kCol.fn[mr - 1][nv - 1] : kRow.fn[mr - 1][nv - 1];
      Epilogue e{g.accumulate, scale, g.alpha, g.row_scale ? g.row_scale + m0 : nullptr,
                 g.col_max ? g.col_max + n0 : nullptr};
      int64_t kk = g.k;
      if (g.diag != kNoDiag) {
        const int64_t d = g.diag + n0 - m0;  // the block's own diagonal
        if (g.accumulate) {
          kk = diag_k_limit(g, m0 + mr - 1);
        } else if (m0 >= n0 + cols - 1 + g.diag) {
          // Every entry of the block is past the diagonal: -inf, no product.
          for (int r = 0; r < mr; ++r) std::fill_n(g.c + (m0 + r) * g.ldc + n0, cols, -kInf);
          if (pf) g.prefetch->issue(pf);
          continue;
        } else if (m0 + mr - 1 >= n0 + g.diag) {
          e.diag = d;
        }
      }
      fn(kk, ablk, g.lda, b + n0, g.ldb, g.c + m0 * g.ldc + n0, g.ldc, last, e);
      if (pf) g.prefetch->issue(pf);
    }
  }
}
#endif  // PFA_X86

// Portable fp32 product with the same epilogue (CPUs without AVX2, non-x86),
// in blocks of 6 rows x 16 columns held in local arrays.
template <int R, bool kColA>
PFA_INLINE void portable_block(int64_t kk, const float* a, int64_t lda, const float* b, int64_t ldb,
                               float (&acc)[R][kLanes]) {
  for (int64_t k = 0; k < kk; ++k) {
    float bv[kLanes];
    for (int v = 0; v < kLanes; ++v) bv[v] = b[k * ldb + v];
    for (int r = 0; r < R; ++r) {
      const float av = kColA ? a[k * lda + r] : a[r * lda + k];
      for (int v = 0; v < kLanes; ++v) acc[r][v] += av * bv[v];
    }
  }
}

PFA_INLINE void gemm_portable(const GemmArgs& g) {
  constexpr int kR = 6;
  const float* a = static_cast<const float*>(g.a);
  const float* b = static_cast<const float*>(g.b);
  const int64_t pf = prefetch_per_call(g, (g.n + kLanes - 1) / kLanes * ((g.m + kR - 1) / kR));
  for (int64_t n0 = 0; n0 < g.n; n0 += kLanes) {
    const int nc = int(std::min<int64_t>(kLanes, g.n - n0));
    for (int64_t m0 = 0; m0 < g.m; m0 += kR) {
      const int mr = int(std::min<int64_t>(kR, g.m - m0));
      float acc[kR][kLanes] = {};
      const float* ablk = g.a_col_major ? a + m0 : a + m0 * g.lda;
      // GemmArgs::diag, as gemm_tiled applies it.
      const int64_t kk = g.diag != kNoDiag && g.accumulate ? diag_k_limit(g, m0 + mr - 1) : g.k;
      if (g.diag != kNoDiag && !g.accumulate && m0 >= n0 + nc - 1 + g.diag) {
        for (int r = 0; r < mr; ++r) std::fill_n(g.c + (m0 + r) * g.ldc + n0, nc, -kInf);
        if (pf) g.prefetch->issue(pf);
        continue;
      }
      if (mr == kR && nc == kLanes) {
        if (g.a_col_major) {
          portable_block<kR, true>(kk, ablk, g.lda, b + n0, g.ldb, acc);
        } else {
          portable_block<kR, false>(kk, ablk, g.lda, b + n0, g.ldb, acc);
        }
      } else {
        for (int64_t k = 0; k < kk; ++k) {
          for (int r = 0; r < mr; ++r) {
            const float av = g.a_col_major ? ablk[k * g.lda + r] : ablk[r * g.lda + k];
            for (int v = 0; v < nc; ++v) acc[r][v] += av * b[k * g.ldb + n0 + v];
          }
        }
      }
      for (int r = 0; r < mr; ++r) {
        float* crow = g.c + (m0 + r) * g.ldc + n0;
        const float rs = g.row_scale ? g.row_scale[m0 + r] : 1.0f;
        for (int v = 0; v < nc; ++v) {
          float x = g.accumulate ? rs * crow[v] + acc[r][v] : g.alpha * acc[r][v];
          if (!g.accumulate && g.diag != kNoDiag && m0 + r >= n0 + v + g.diag) x = -kInf;
          crow[v] = x;
          if (g.col_max) g.col_max[n0 + v] = std::max(g.col_max[n0 + v], x);
        }
      }
      if (pf) g.prefetch->issue(pf);
    }
  }
}

}  // namespace cpu
}  // namespace pyfastattn
