// Fused CPU attention, forward and backward, over the shared params struct
// (csrc/attention/params.h defines every field's meaning).
//
// Algorithm: FlashAttention-2 tiling with an online softmax, accumulating in
// fp32; scores are kept in log2 units (scale * log2(e) folded in) so that
// every exponential is an exp2.
//   forward : one task per (sequence, query head, query block); it walks the
//             key tiles its rows can see (tiles outside the window of the
//             whole block are never touched), keeps a running max and sum per
//             row, and holds one key tile of scores at a time.
//   backward: pass 1, per (sequence, query head, query block): D = rowsum(dO O)
//             and dQ; pass 2, per (sequence, kv head, key block): dK and dV,
//             looping over the query heads of the GQA group and the query rows
//             whose window reaches the block. Every output element has one
//             owner task, and block sizes depend on the shape only, so results
//             are bit-identical for any thread count. The price is 7 tile
//             products per (query block, key tile) instead of FlashAttention's
//             5 (S and dP are computed in both passes), with no atomics and no
//             O(seqlen^2) or per-thread dQ buffers.
//             Where the shape allows (fused_chunks), one pass instead: per
//             (sequence, kv head, chunk of key blocks), 5 products per tile,
//             dQ summed per chunk in fp32 and the chunks added in a fixed
//             order (bwd_fused_block, bwd_reduce_block): still deterministic.
//   decode  : one query row on AVX-512 takes decode_row (dot products from
//             the K rows) instead of the tile products.
// Tasks are handed out longest first from a shared counter inside
// at::parallel_for, so torch.set_num_threads applies and causal work balances.
//
// Layout of a tile. Scores are held transposed, S^T[key][query], so that the
// per-query softmax statistics (max, sum) run down the columns: each
// elementwise step works on 16 contiguous queries per vector, with no
// horizontal reductions. The products per tile are then
//   S^T = K Q^T        (A = key rows, B = Q^T packed once per query block)
//   O   = a O + P V    (A = P read by column from S^T, B = value rows)
// and the backward ones follow the same pattern (see bwd_*_block). A tile that
// every row of the block sees whole, without softcap or attn_mask, gets its
// scale and column max in the S^T product's epilogue and skips the score pass.
//
// Products: our own register-blocked GEMM micro-kernels (C[M x N] +=
// A[M x K] B[K x N], fp32 accumulation), chosen at run time:
//   AVX-512        fp32 FMA for fp32 and fp16 inputs (fp16 converted to fp32);
//   AVX512-BF16    bf16 dot products for bf16 inputs (P and dS rounded to bf16
//                  for their products, as PyTorch's bf16 matmuls do);
//   AVX2 + FMA     fp32 for every dtype;
//   anything else  portable C++ in fp32.
// at::native::cpublas::gemm (what PyTorch's CPU flash attention calls) is not
// exported from libtorch_cpu, and MKL sgemm reaches 107 GFLOP/s on one Zen 5
// core against a 263 GFLOP/s FMA peak; the AVX-512 micro-kernels below run
// this kernel's tile shapes at 247-260.
//
// On one Zen 5 core (B1 H8 S1024 D64, GFLOP/s from CPU time): forward 212
// fp32 / 375 bf16 against 93 / 90 for PyTorch's flash SDPA; backward 144 / 266
// against 89 / 151.
#include "attention_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

// With PyTorch's OpenMP backend, at::parallel_for is inline code in
// ATen/ParallelOpenMP.h: without -fopenmp on this file it quietly runs on
// one thread.
#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#warning "attention_cpu.cpp compiled without -fopenmp: the CPU attention kernels will use one thread"
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PFA_X86 1
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their internal
// _mm512_undefined_* operands (GCC bug 105593); silence it for them only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#else
#define PFA_X86 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PFA_INLINE inline __attribute__((always_inline))
#define PFA_RESTRICT __restrict__
#else
#define PFA_INLINE inline
#define PFA_RESTRICT
#endif

#if PFA_X86
// The AVX-512 path: Skylake-X and later, Zen 4 and later. F16C comes with
// every AVX-512 CPU; BF16 dot products are a separate feature (Cooper Lake,
// Sapphire Rapids, Zen 4+) and get their own attribute.
#define PFA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define PFA_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))
// AVX2 + FMA without AVX-512: Haswell to Alder Lake, Zen 1 to 3.
#define PFA_AVX2 __attribute__((target("avx2,fma,f16c")))
#if defined(__GNUC__) && !defined(__clang__)
// The tile functions are written once for every instruction set and pass
// VecAvx512 / VecAvx2 values; they only ever run inlined (flatten) into
// functions compiled for that set, so GCC's note about the vector ABI of
// their generic bodies does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#endif

namespace pyfastattn {
namespace cpu {
namespace {

constexpr float kLog2e = 1.44269504088896340736f;
constexpr float kLn2 = 0.69314718055994530942f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Width of every elementwise loop: one 512-bit vector of fp32. Buffers along
// the query axis are padded to a multiple of it.
constexpr int kLanes = 16;

// Query rows per task and keys per tile (see choose_blocks for the numbers).
struct Blocks {
  int q;  // rows of a query block, a multiple of kLanes
  int k;  // keys of a key tile, even (bf16 pairs)
};

PFA_INLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// ---------------------------------------------------------------------------
// Scalar building blocks, written branch-free so that lane loops vectorise.
// ---------------------------------------------------------------------------

PFA_INLINE float bits_to_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
PFA_INLINE uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// 2^x = 2^n 2^f with n = round(x), f in [-0.5, 0.5], and 2^f by its degree-6
// Taylor polynomial in f ln2 (|f ln2| <= 0.347): truncation error
// 0.347^7 / 7! = 1.2e-7 relative, about 2 ulp.
constexpr int kExp2Degree = 6;
constexpr float kExp2Poly[kExp2Degree + 1] = {  // ln(2)^k / k!, k = 6 .. 0
    1.5403530393381608e-4f,
    1.3333558146428443e-3f,
    9.6181291076284772e-3f,
    5.5504108664821580e-2f,
    2.4022650695910071e-1f,
    6.9314718055994531e-1f,
    1.0f};

// Scalar form, for x <= 127: exactly 0 below -126 (so -inf, a masked score,
// gives 0). n by the 1.5 * 2^23 rounding trick, 2^n by building the exponent.
PFA_INLINE float exp2_approx(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float xc = std::min(std::max(x, -126.0f), 127.0f);
  const float n = (xc + kRound) - kRound;
  const float f = xc - n;
  float p = kExp2Poly[0];
  for (int i = 1; i < kExp2Degree + 1; ++i) p = p * f + kExp2Poly[i];
  const float scale = bits_to_f32(uint32_t(int32_t(n) + 127) << 23);
  return x < -126.0f ? 0.0f : p * scale;
}

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1]. The absolute
// error is about 1e-7, the same as std::tanh's rounding near |tanh| = 1, and
// what a softcapped score needs is absolute accuracy (it feeds exp).
PFA_INLINE float tanh_approx(float x) {
  const float e = exp2_approx(-2.0f * kLog2e * std::fabs(x));
  const float t = (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}

PFA_INLINE float bf16_bits_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// Round to nearest even; NaN stays NaN (a plain rounding add could carry a
// NaN with a small payload into infinity).
PFA_INLINE uint16_t f32_to_bf16_bits(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0) : uint16_t(r);
}

// fp16 -> fp32 without branches: shift exponent+mantissa into fp32 position
// and multiply by 2^112 to move the exponent bias from 15 to 127 (exact, and
// it normalises fp16 subnormals); infinities and NaNs are patched after.
PFA_INLINE float f16_bits_to_f32(uint16_t h) {
  const uint32_t em = uint32_t(h & 0x7FFFu) << 13;
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t finite = f32_to_bits(bits_to_f32(em) * 0x1p112f);
  const uint32_t r = em >= (0x7C00u << 13) ? (em | 0x7F800000u) : finite;
  return bits_to_f32(r | sign);
}

PFA_INLINE float to_f32(float x) { return x; }
PFA_INLINE float to_f32(c10::BFloat16 x) { return bf16_bits_to_f32(x.x); }
PFA_INLINE float to_f32(c10::Half x) { return f16_bits_to_f32(x.x); }

template <typename T>
PFA_INLINE T from_f32(float x);
template <>
PFA_INLINE float from_f32<float>(float x) {
  return x;
}
template <>
PFA_INLINE c10::BFloat16 from_f32<c10::BFloat16>(float x) {
  return c10::BFloat16(f32_to_bf16_bits(x), c10::BFloat16::from_bits());
}
template <>
PFA_INLINE c10::Half from_f32<c10::Half>(float x) {
  return c10::Half(x);
}

// attn_mask entry as a log2-unit additive bias. Bool: 0 or -inf, built from
// the bit pattern so that the per-key loop vectorises (a select did not).
PFA_INLINE float mask_bias(uint8_t allowed) { return bits_to_f32(uint32_t(allowed == 0) * 0xFF800000u); }
template <typename T>
PFA_INLINE float mask_bias(T additive) {
  return to_f32(additive) * kLog2e;
}

// Two bf16 values of consecutive k as one 32-bit word: the operand unit of
// the AVX512-BF16 dot product (low half = even k).
PFA_INLINE uint32_t bf16_pair(float lo, float hi) {
  return uint32_t(f32_to_bf16_bits(lo)) | (uint32_t(f32_to_bf16_bits(hi)) << 16);
}
template <typename T>
PFA_INLINE uint16_t raw_bits(T x) {
  return x.x;
}

// ---------------------------------------------------------------------------
// GEMM micro-kernels: C[M x N] (=|+=) A[M x K] B[K x N], fp32 accumulation.
// A is read by element: row-major (A(r, k) = a[r * lda + k]) or column-major
// (A(r, k) = a[k * lda + r]); B is row-major with leading dimension ldb; C is
// row-major with ldc. In the bf16 variant every K index is a pair of bf16
// values packed in a uint32 (A pairs along k; B "VNNI": row k2 holds, for
// each column, the pair (B[2 k2][c], B[2 k2 + 1][c])).
// ---------------------------------------------------------------------------

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
};

// What a micro-kernel does around its K loop (pointers already offset to
// the block).
struct Epilogue {
  bool accumulate;
  bool scale;
  float alpha;
  const float* row_scale;
  float* col_max;
};

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
  for (int64_t n0 = 0; n0 < g.n; n0 += kPanel) {
    const int cols = int(std::min<int64_t>(kPanel, g.n - n0));
    const int nv = (cols + F::kWidth - 1) / F::kWidth;
    const int last = cols - F::kWidth * (nv - 1);
    for (int64_t m0 = 0; m0 < g.m; m0 += F::kMr) {
      const int mr = int(std::min<int64_t>(F::kMr, g.m - m0));
      const E* ablk = g.a_col_major ? a + m0 : a + m0 * g.lda;
      const MicroFn<E> fn = g.a_col_major ? kCol.fn[mr - 1][nv - 1] : kRow.fn[mr - 1][nv - 1];
      const Epilogue e{g.accumulate, scale, g.alpha, g.row_scale ? g.row_scale + m0 : nullptr,
                       g.col_max ? g.col_max + n0 : nullptr};
      fn(g.k, ablk, g.lda, b + n0, g.ldb, g.c + m0 * g.ldc + n0, g.ldc, last, e);
    }
  }
}

bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}
bool cpu_has_avx512_bf16() {
  static const bool ok = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}
bool cpu_has_avx2() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
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
  for (int64_t n0 = 0; n0 < g.n; n0 += kLanes) {
    const int nc = int(std::min<int64_t>(kLanes, g.n - n0));
    for (int64_t m0 = 0; m0 < g.m; m0 += kR) {
      const int mr = int(std::min<int64_t>(kR, g.m - m0));
      float acc[kR][kLanes] = {};
      const float* ablk = g.a_col_major ? a + m0 : a + m0 * g.lda;
      if (mr == kR && nc == kLanes) {
        if (g.a_col_major) {
          portable_block<kR, true>(g.k, ablk, g.lda, b + n0, g.ldb, acc);
        } else {
          portable_block<kR, false>(g.k, ablk, g.lda, b + n0, g.ldb, acc);
        }
      } else {
        for (int64_t k = 0; k < g.k; ++k) {
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
          const float x = g.accumulate ? rs * crow[v] + acc[r][v] : g.alpha * acc[r][v];
          crow[v] = x;
          if (g.col_max) g.col_max[n0 + v] = std::max(g.col_max[n0 + v], x);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------
// 16-lane vectors for the elementwise work of a tile (exp2, gradients, mask
// conversion): intrinsics on AVX-512 and AVX2, plain arrays elsewhere.
// Writing them with intrinsics took the bf16 forward from 296 to 393 GFLOP/s
// (exp2 by vscalefps, bf16 pairs by vcvtne2ps2bf16 instead of integer
// rounding); the compiler's own vectorisation of the same loops was slower.
// ---------------------------------------------------------------------------

struct VecPortable {
  struct V {
    float x[kLanes];
  };
  static V load(const float* p) {
    V r;
    for (int v = 0; v < kLanes; ++v) r.x[v] = p[v];
    return r;
  }
  static void store(float* p, const V& a) {
    for (int v = 0; v < kLanes; ++v) p[v] = a.x[v];
  }
  static V zero() { return V{}; }
  static V add(const V& a, const V& b) {
    V r;
    for (int v = 0; v < kLanes; ++v) r.x[v] = a.x[v] + b.x[v];
    return r;
  }
  static V sub(const V& a, const V& b) {
    V r;
    for (int v = 0; v < kLanes; ++v) r.x[v] = a.x[v] - b.x[v];
    return r;
  }
  static V mul(const V& a, const V& b) {
    V r;
    for (int v = 0; v < kLanes; ++v) r.x[v] = a.x[v] * b.x[v];
    return r;
  }
  static V exp2(const V& a) {
    V r;
    for (int v = 0; v < kLanes; ++v) r.x[v] = exp2_approx(a.x[v]);
    return r;
  }
  static void store_pairs(uint32_t* p, const V& lo, const V& hi) {
    for (int v = 0; v < kLanes; ++v) p[v] = bf16_pair(lo.x[v], hi.x[v]);
  }
  static void store_bf16(uint16_t* p, const V& a) {
    for (int v = 0; v < kLanes; ++v) p[v] = f32_to_bf16_bits(a.x[v]);
  }
  // 16 attn_mask entries as log2-unit additive bias.
  template <typename M>
  static void mask_bias16(const M* row, float* out) {
    for (int v = 0; v < kLanes; ++v) out[v] = mask_bias(row[v]);
  }
  // out[b * ld + a] = in[a][b] for the first `rows` b of a 16 x 16 block.
  static void transpose16(const float (&in)[kLanes][kLanes], float* out, int64_t ld, int rows) {
    for (int b = 0; b < rows; ++b) {
      for (int a = 0; a < kLanes; ++a) out[b * ld + a] = in[a][b];
    }
  }
};

#if PFA_X86
struct VecAvx512 {
  using V = __m512;
  PFA_AVX512 static inline V load(const float* p) { return _mm512_loadu_ps(p); }
  PFA_AVX512 static inline void store(float* p, V a) { _mm512_storeu_ps(p, a); }
  PFA_AVX512 static inline V zero() { return _mm512_setzero_ps(); }
  PFA_AVX512 static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  PFA_AVX512 static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  PFA_AVX512 static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  // 2^x as exp2_approx, with the exponent applied by vscalefps: x is clamped
  // to -150, where p * 2^-150 (p = 1) rounds to exactly 0, so -inf gives 0.
  // x is the *second* operand: vmaxps returns it when it is NaN, so a NaN
  // score stays NaN (as in the reference) instead of becoming probability 0.
  PFA_AVX512 static inline V exp2(V x) {
    x = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);
    const V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_sub_ps(x, n);
    V p = _mm512_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 8
    for (int i = 1; i < kExp2Degree + 1; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExp2Poly[i]));
    return _mm512_scalef_ps(p, n);
  }
  // Pairs (lo[i], hi[i]) as bf16, round to nearest even: one conversion of
  // both vectors and one word shuffle.
  PFA_AVX512_BF16 static inline void store_pairs(uint32_t* p, V lo, V hi) {
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // words 0-15: lo, 16-31: hi
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                         22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    _mm512_storeu_si512(p, _mm512_permutexvar_epi16(idx, both));
  }
  PFA_AVX512_BF16 static inline void store_bf16(uint16_t* p, V a) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(a));
  }
  template <typename M>
  PFA_AVX512 static inline void mask_bias16(const M* row, float* out) {
    if constexpr (std::is_same<M, uint8_t>::value) {
      const __mmask16 blocked =
          _mm_cmpeq_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)), _mm_setzero_si128());
      _mm512_storeu_ps(out, _mm512_maskz_mov_ps(blocked, _mm512_set1_ps(-kInf)));
    } else {
      __m512 x;
      if constexpr (std::is_same<M, float>::value) {
        x = _mm512_loadu_ps(row);
      } else if constexpr (std::is_same<M, c10::BFloat16>::value) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
        x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      } else {
        x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
      }
      _mm512_storeu_ps(out, _mm512_mul_ps(x, _mm512_set1_ps(kLog2e)));
    }
  }
  // 16 x 16 transpose in registers: pairs of rows interleaved (unpack ps),
  // then pairs of pairs (unpack pd), then 128-bit lanes (two shuffles).
  PFA_AVX512 static inline void transpose16(const float (&in)[kLanes][kLanes], float* out, int64_t ld,
                                            int rows) {
    __m512 t[kLanes], u[kLanes];
    for (int k = 0; k < 8; ++k) {
      const __m512 r0 = _mm512_loadu_ps(in[2 * k]), r1 = _mm512_loadu_ps(in[2 * k + 1]);
      t[2 * k] = _mm512_unpacklo_ps(r0, r1);      // per 128-bit lane: a0 b0 a1 b1
      t[2 * k + 1] = _mm512_unpackhi_ps(r0, r1);  //                   a2 b2 a3 b3
    }
    for (int k = 0; k < 4; ++k) {
      const __m512d lo0 = _mm512_castps_pd(t[4 * k]), lo1 = _mm512_castps_pd(t[4 * k + 2]);
      const __m512d hi0 = _mm512_castps_pd(t[4 * k + 1]), hi1 = _mm512_castps_pd(t[4 * k + 3]);
      u[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(lo0, lo1));      // column 4L + 0 of rows 4k..4k+3
      u[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(lo0, lo1));  // column 4L + 1
      u[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(hi0, hi1));  // column 4L + 2
      u[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(hi0, hi1));  // column 4L + 3
    }
    for (int e = 0; e < 4; ++e) {
      const __m512 x0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x44),
                   x1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xEE);
      const __m512 y0 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x44);
      const __m512 y1 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xEE);
      const __m512 col[4] = {_mm512_shuffle_f32x4(x0, y0, 0x88), _mm512_shuffle_f32x4(x0, y0, 0xDD),
                             _mm512_shuffle_f32x4(x1, y1, 0x88), _mm512_shuffle_f32x4(x1, y1, 0xDD)};
      for (int l = 0; l < 4; ++l) {
        if (4 * l + e < rows) _mm512_storeu_ps(out + (4 * l + e) * ld, col[l]);
      }
    }
  }
};

// Two ymm registers per 16 lanes; exp2 builds 2^n in the exponent bits (no
// vscalefps): n = -127 gives exponent 0, so -inf (clamped there) gives 0.
struct VecAvx2 {
  struct V {
    __m256 lo, hi;
  };
  PFA_AVX2 static inline V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  PFA_AVX2 static inline void store(float* p, const V& a) {
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + 8, a.hi);
  }
  PFA_AVX2 static inline V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  PFA_AVX2 static inline V add(const V& a, const V& b) {
    return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
  }
  PFA_AVX2 static inline V sub(const V& a, const V& b) {
    return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)};
  }
  PFA_AVX2 static inline V mul(const V& a, const V& b) {
    return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
  }
  PFA_AVX2 static inline __m256 exp2_8(__m256 x) {
    // x second in both: vmaxps/vminps return the second operand when it is NaN.
    x = _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), x));
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(kExp2Poly[0]);
#pragma GCC unroll 8
    for (int i = 1; i < kExp2Degree + 1; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[i]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  }
  PFA_AVX2 static inline V exp2(const V& a) { return {exp2_8(a.lo), exp2_8(a.hi)}; }
  template <typename M>
  static void mask_bias16(const M* row, float* out) {
    VecPortable::mask_bias16(row, out);
  }
  static void transpose16(const float (&in)[kLanes][kLanes], float* out, int64_t ld, int rows) {
    VecPortable::transpose16(in, out, ld, rows);
  }
};
#endif

// The instruction sets. A task body is instantiated per set and compiled
// inside a function with that set's target attribute.
struct IsaPortable {
  using Vec = VecPortable;
  static constexpr bool kAvx512 = false;
  static void gemm_f32(const GemmArgs& g) { gemm_portable(g); }
  static void gemm_bf16(const GemmArgs&) {}  // never reached: no bf16 compute here
};
#if PFA_X86
struct IsaAvx512 {
  using Vec = VecAvx512;
  static constexpr bool kAvx512 = true;
  static void gemm_f32(const GemmArgs& g) { gemm_tiled<MicroF32Avx512>(g); }
  static void gemm_bf16(const GemmArgs& g) { gemm_tiled<MicroBf16Avx512>(g); }
};
struct IsaAvx2 {
  using Vec = VecAvx2;
  static constexpr bool kAvx512 = false;
  static void gemm_f32(const GemmArgs& g) { gemm_tiled<MicroF32Avx2>(g); }
  static void gemm_bf16(const GemmArgs&) {}  // never reached: bf16 runs as fp32 here
};
#endif

// ---------------------------------------------------------------------------
// Per-thread scratch: one 64-byte aligned block carved into tiles.
// ---------------------------------------------------------------------------

class Arena {
 public:
  explicit Arena(int64_t floats) {
    bytes_ = size_t(std::max<int64_t>(floats, 1)) * sizeof(float);
    data_ = static_cast<float*>(::operator new(bytes_, std::align_val_t(64)));
    std::memset(data_, 0, bytes_);  // stale lanes past a tile's edge stay finite
  }
  ~Arena() { ::operator delete(data_, std::align_val_t(64)); }
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  float* data() const { return data_; }

 private:
  float* data_;
  size_t bytes_;
};

// Hands out 64-byte aligned sub-arrays; run once with base = nullptr to size.
class Carver {
 public:
  explicit Carver(float* base) : base_(base) {}
  float* take(int64_t floats) {
    float* p = base_ ? base_ + used_ : nullptr;
    used_ += round_up(floats, 16);
    return p;
  }
  int64_t used() const { return used_; }

 private:
  float* base_;
  int64_t used_ = 0;
};

// ---------------------------------------------------------------------------
// Shared context of one call.
// ---------------------------------------------------------------------------

struct Ctx {
  const AttentionFwdParams* p;
  const AttentionBwdParams* pb;  // backward only
  Blocks blk;
  int group;          // query heads per kv head
  int d, dv;          // head dims
  float score_scale;  // raw dot -> log2 units (no softcap) or tanh argument
  float cap_log2;     // softcap * log2(e); 0 when off
  bool softcap;
  float* dsum;  // backward: D = rowsum(dO * O), see dsum_index
  // One-pass backward (chunks > 0, see fused_chunks): dQ partial sums of each
  // key chunk, [chunks][rows][d] fp32 with rows indexed like dsum, and per
  // chunk and row whether that chunk wrote it (0: its partial is zero).
  int chunks;
  int64_t part_rows;
  float* dq_part;
  uint8_t* dq_touched;
  // One-pass backward: Q^T, dO^T, Q and dO of every query block in the
  // products' B layouts (bq_pack), packed once by the prep pass instead of
  // once per tile; nullptr when over kMaxPackBytes (then per tile).
  // pack_first[b]: the sequence's first block index, per head, see
  // pack_index.
  float* qo_pack;
  int64_t pack_floats;  // per query block
  const int64_t* pack_first;
};

// Offset of row i of (sequence, head) in a [b, hq, sq] / [hq, total_q] float
// array with row stride 1; used for the backward D buffer.
PFA_INLINE int64_t dsum_index(const Ctx& c, const SeqInfo& si, int h, int i) {
  const AttentionFwdParams& p = *c.p;
  const int64_t total_q = si.varlen ? p.cu_seqlens_q[p.batch] : 0;
  return si.varlen ? int64_t(h) * total_q + si.q_start + i
                   : (int64_t(si.bi) * p.num_heads + h) * p.seqlen_q + i;
}

// Visible keys of query rows i0 .. i0 + m - 1 (nondecreasing in the row).
struct RowRanges {
  int* lo;
  int* hi;
  int m;
  int first() const { return lo[0]; }
  int last() const { return hi[m - 1]; }
};

PFA_INLINE void fill_ranges(const AttentionFwdParams& p, const SeqInfo& si, int i0, RowRanges& rr) {
  for (int r = 0; r < rr.m; ++r) {
    rr.lo[r] = si.key_lo(p, i0 + r);
    rr.hi[r] = si.key_hi(p, i0 + r);
  }
}

// Sweeps key rows in increasing order and returns, for each, the query lanes
// [begin, end) that see it: hi > key (a suffix) and lo <= key (a prefix).
class LaneWindow {
 public:
  explicit LaneWindow(const RowRanges& rr) : rr_(rr) {}
  void advance(int key) {
    while (begin_ < rr_.m && rr_.hi[begin_] <= key) ++begin_;
    while (end_ < rr_.m && rr_.lo[end_] <= key) ++end_;
  }
  int begin() const { return begin_; }
  int end() const { return end_; }

 private:
  const RowRanges& rr_;
  int begin_ = 0, end_ = 0;
};

// ---------------------------------------------------------------------------
// Tile loaders: source rows of dtype T -> compute layout.
//   CT = float   : rows of fp32, leading dimension `ld`.
//   CT = uint32_t: bf16 pairs along the row ("A" operand rows), or VNNI pairs
//                  across two rows ("B" operand), zero-padded to full pairs.
// ---------------------------------------------------------------------------

template <typename T>
PFA_INLINE void load_rows_f32(const T* src, int64_t stride, int rows, int cols, float* dst, int64_t ld) {
  for (int r = 0; r < rows; ++r) {
    const T* PFA_RESTRICT s = src + r * stride;
    float* PFA_RESTRICT o = dst + r * ld;
    for (int c = 0; c < cols; ++c) o[c] = to_f32(s[c]);
  }
}

template <typename T>
PFA_INLINE void load_rows_pairs(const T* src, int64_t stride, int rows, int cols, uint32_t* dst, int64_t ld) {
  const int c2 = cols / 2;
  if (cols % 2 == 0) {  // a row of pairs is the row's bits (little-endian: low half first)
    for (int r = 0; r < rows; ++r) std::memcpy(dst + r * ld, src + r * stride, size_t(cols) * sizeof(T));
    return;
  }
  for (int r = 0; r < rows; ++r) {
    const T* PFA_RESTRICT s = src + r * stride;
    uint32_t* PFA_RESTRICT o = dst + r * ld;
    for (int c = 0; c < c2; ++c)
      o[c] = uint32_t(raw_bits(s[2 * c])) | (uint32_t(raw_bits(s[2 * c + 1])) << 16);
    if (cols & 1) o[c2] = raw_bits(s[cols - 1]);
  }
}

// B operand in VNNI form from `rows` source rows (the K axis) of `cols` values.
template <typename T>
PFA_INLINE void load_vnni(const T* src, int64_t stride, int rows, int cols, uint32_t* dst, int64_t ld) {
  for (int r2 = 0; r2 < rows / 2; ++r2) {
    const T* PFA_RESTRICT s0 = src + (2 * r2) * stride;
    const T* PFA_RESTRICT s1 = s0 + stride;
    uint32_t* PFA_RESTRICT o = dst + r2 * ld;
    for (int c = 0; c < cols; ++c) o[c] = uint32_t(raw_bits(s0[c])) | (uint32_t(raw_bits(s1[c])) << 16);
  }
  if (rows & 1) {
    const T* PFA_RESTRICT s0 = src + (rows - 1) * stride;
    uint32_t* PFA_RESTRICT o = dst + (rows / 2) * ld;
    for (int c = 0; c < cols; ++c) o[c] = raw_bits(s0[c]);
  }
}

// Transposed B operand: dst[c][r] (fp32) or dst[c2][r] (pairs of c) from
// `rows` source rows of `cols` values; used for Q^T and dO^T.
template <typename T>
PFA_INLINE void load_t_f32(const T* src, int64_t stride, int rows, int cols, float* dst, int64_t ld) {
  for (int r = 0; r < rows; ++r) {
    const T* PFA_RESTRICT s = src + r * stride;
    for (int c = 0; c < cols; ++c) dst[c * ld + r] = to_f32(s[c]);
  }
}

template <typename T>
PFA_INLINE void load_t_pairs(const T* src, int64_t stride, int rows, int cols, uint32_t* dst, int64_t ld) {
  const int c2 = cols / 2;
  for (int r = 0; r < rows; ++r) {
    const T* PFA_RESTRICT s = src + r * stride;
    for (int c = 0; c < c2; ++c)
      dst[c * ld + r] = uint32_t(raw_bits(s[2 * c])) | (uint32_t(raw_bits(s[2 * c + 1])) << 16);
    if (cols & 1) dst[c2 * ld + r] = raw_bits(s[cols - 1]);
  }
}

// Compute-type traits: how a dtype's tiles are laid out for the products.
template <typename T, typename CT>
struct Tiles;

template <typename T>
struct Tiles<T, float> {
  static constexpr bool kPairs = false;
  static int kdim(int d) { return d; }  // K-axis length of a product over a head dim
  // A operand rows (keys / values), ld = cols.
  static void a_rows(const T* s, int64_t st, int rows, int cols, float* dst) {
    load_rows_f32(s, st, rows, cols, dst, cols);
  }
  // B operand rows (K axis = rows), ld = cols.
  static void b_rows(const T* s, int64_t st, int rows, int cols, float* dst) {
    load_rows_f32(s, st, rows, cols, dst, cols);
  }
  // B operand transposed (K axis = cols), ld given.
  static void b_t(const T* s, int64_t st, int rows, int cols, float* dst, int64_t ld) {
    load_t_f32(s, st, rows, cols, dst, ld);
  }
};

template <typename T>
struct Tiles<T, uint32_t> {
  static constexpr bool kPairs = true;
  static int kdim(int d) { return (d + 1) / 2; }
  static void a_rows(const T* s, int64_t st, int rows, int cols, float* dst) {
    load_rows_pairs(s, st, rows, cols, reinterpret_cast<uint32_t*>(dst), (cols + 1) / 2);
  }
  static void b_rows(const T* s, int64_t st, int rows, int cols, float* dst) {
    load_vnni(s, st, rows, cols, reinterpret_cast<uint32_t*>(dst), cols);
  }
  static void b_t(const T* s, int64_t st, int rows, int cols, float* dst, int64_t ld) {
    load_t_pairs(s, st, rows, cols, reinterpret_cast<uint32_t*>(dst), ld);
  }
};

template <class Isa, typename CT>
PFA_INLINE void gemm(const GemmArgs& g) {
  if constexpr (std::is_same<CT, float>::value) {
    Isa::gemm_f32(g);
  } else {
    Isa::gemm_bf16(g);
  }
}

// ---------------------------------------------------------------------------
// Scores of one tile: raw dot products S^T[j][i] -> log2-unit scores with
// softcap, attn_mask and the window applied.
// ---------------------------------------------------------------------------

// attn_mask of a tile in log2-unit additive form (bool: 0 or -inf).
struct MaskTile {
  const float* bias;  // nullptr: no mask
  bool per_key;       // bias[j] for every query (mask row stride 0), else bias[j][i]
};

// A mask with row stride 0 (a key-padding mask, [b, h, 1, sk]) is the same
// for every query row: one value per key. Otherwise the tile is transposed
// into bias[j][i] in 16 x 16 blocks, reading mask rows contiguously. (A
// scalar transpose cost ~6 cycles per score and halved the speed of a
// fully masked forward.)
template <class Vec, typename M>
PFA_INLINE MaskTile load_mask_tile_as(const AttentionFwdParams& p, const M* mk, int m, int n, float* bias,
                                      int64_t ld) {
  if (p.mask_row_stride == 0) {
    for (int j = 0; j < n; ++j) bias[j] = mask_bias(mk[j]);
    return MaskTile{bias, true};
  }
  float blk[kLanes][kLanes] = {};
  for (int ib = 0; ib < m; ib += kLanes) {
    const int mi = std::min(kLanes, m - ib);
    for (int jb = 0; jb < n; jb += kLanes) {
      const int nj = std::min(kLanes, n - jb);
      for (int a = 0; a < mi; ++a) {
        const M* row = mk + int64_t(ib + a) * p.mask_row_stride + jb;
        if (nj == kLanes) {
          Vec::mask_bias16(row, blk[a]);
        } else {
          for (int b = 0; b < nj; ++b) blk[a][b] = mask_bias(row[b]);
        }
      }
      Vec::transpose16(blk, bias + jb * ld + ib, ld, nj);
    }
  }
  return MaskTile{bias, false};
}

template <class Vec, typename T>
PFA_INLINE MaskTile load_mask_tile(const AttentionFwdParams& p, int bi, int h, int i0, int m, int j0, int n,
                                   float* bias, int64_t ld) {
  const int64_t at = int64_t(bi) * p.mask_batch_stride + int64_t(h) * p.mask_head_stride +
                     int64_t(i0) * p.mask_row_stride + j0;
  switch (p.mask_kind) {
    case MaskKind::kBool:
      return load_mask_tile_as<Vec>(p, static_cast<const uint8_t*>(p.mask) + at, m, n, bias, ld);
    case MaskKind::kAdditive:
      return load_mask_tile_as<Vec>(p, static_cast<const T*>(p.mask) + at, m, n, bias, ld);
    case MaskKind::kNone:
    default:
      return MaskTile{nullptr, false};
  }
}

// Scores of a tile that needs more than a scale (softcap, attn_mask, or a
// window edge crossing it), row by row, in place:
//   t = scale * raw (log2 units)  or  cap * tanh(raw * scale / softcap),
//   t += bias, and t = -inf for query lanes outside the key's window.
// Optionally fills col_max and, with a softcap, dtanh = 1 - tanh^2 (the
// derivative factor the backward needs), both [n][ld] like S^T.
PFA_INLINE void score_tile(const Ctx& c, const RowRanges& rr, int j0, int n, int mp, float* s, int64_t ld,
                           const MaskTile& mask, float* dtanh, float* col_max) {
  const float scale = c.score_scale, cap = c.cap_log2;
  LaneWindow lw(rr);
  for (int j = 0; j < n; ++j) {
    lw.advance(j0 + j);
    float* PFA_RESTRICT sr = s + j * ld;
    if (c.softcap && dtanh) {
      float* PFA_RESTRICT dt = dtanh + j * ld;
      for (int i = 0; i < mp; ++i) {
        const float th = tanh_approx(sr[i] * scale);
        sr[i] = cap * th;
        dt[i] = 1.0f - th * th;
      }
    } else if (c.softcap) {
      for (int i = 0; i < mp; ++i) sr[i] = cap * tanh_approx(sr[i] * scale);
    } else {
      for (int i = 0; i < mp; ++i) sr[i] *= scale;
    }
    if (mask.bias && mask.per_key) {
      const float bj = mask.bias[j];
      for (int i = 0; i < mp; ++i) sr[i] += bj;
    } else if (mask.bias) {
      const float* PFA_RESTRICT br = mask.bias + j * ld;
      for (int i = 0; i < mp; ++i) sr[i] += br[i];
    }
    const int lane_end = std::min(lw.end(), rr.m);
    for (int i = 0; i < lw.begin(); ++i) sr[i] = -kInf;
    for (int i = std::max(lane_end, 0); i < mp; ++i) sr[i] = -kInf;
    if (col_max) {
      float* PFA_RESTRICT cm = col_max;
      for (int i = 0; i < mp; ++i) cm[i] = std::max(cm[i], sr[i]);
    }
  }
}

// Whether every query row of the block sees every key of [j0, j0 + n): then
// a tile without softcap or attn_mask needs only the scale, which the S^T
// product applies in its epilogue (with the column max), and no score pass.
PFA_INLINE bool tile_inside(const RowRanges& rr, int j0, int n) {
  return rr.lo[rr.m - 1] <= j0 && rr.hi[0] >= j0 + n;
}

#if PFA_X86
// ---------------------------------------------------------------------------
// Decode: one query row against a long key range (Sq = 1), AVX-512 only.
// The tile path computes S^T = K Q^T with the 16 query lanes of a vector
// holding 1 row: 16x the FMAs, an A broadcast per key and head-dim element
// (~140 instructions per key), plus the tile copies of K and V. Here each
// score is a dot product read straight from the K row (D/16 FMAs or D/32 bf16
// dot products and one horizontal sum), the softmax runs over 16 keys per
// vector, and O += p V reads the V rows straight from the input.
// ---------------------------------------------------------------------------

PFA_AVX512 inline __mmask16 mask16(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }

// 16 values of a row as fp32; lanes outside `k` are 0.
template <typename T>
PFA_AVX512 inline __m512 load16_f32(const T* p, __mmask16 k) {
  if constexpr (std::is_same<T, float>::value) {
    return _mm512_maskz_loadu_ps(k, p);
  } else if constexpr (std::is_same<T, c10::BFloat16>::value) {
    const __m256i h = _mm256_maskz_loadu_epi16(k, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
  }
}

// dot(k row, q) in fp32, q given as nq fp32 vectors (zero past d).
template <typename T>
PFA_AVX512 inline float decode_dot(const T* k, const __m512* qv, int d) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int x = 0, v = 0;
  for (; x + 32 <= d; x += 32, v += 2) {
    a0 = _mm512_fmadd_ps(load16_f32(k + x, 0xFFFF), qv[v], a0);
    a1 = _mm512_fmadd_ps(load16_f32(k + x + 16, 0xFFFF), qv[v + 1], a1);
  }
  if (x < d) a0 = _mm512_fmadd_ps(load16_f32(k + x, mask16(d - x)), qv[v], a0);
  if (x + 16 < d) a1 = _mm512_fmadd_ps(load16_f32(k + x + 16, mask16(d - x - 16)), qv[v + 1], a1);
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

// The same with bf16 dot products: a bf16 row in memory already is pairs
// along the head dim (low half = even element), the operand format.
PFA_AVX512_BF16 inline float decode_dot_bf16(const c10::BFloat16* k, const __m512i* qp, int d) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  int x = 0, v = 0;
  for (; x + 64 <= d; x += 64, v += 2) {
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(k + x), (__m512bh)qp[v]);
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(k + x + 32), (__m512bh)qp[v + 1]);
  }
  for (; x < d; x += 32, ++v) {
    const int left = d - x;
    const __mmask32 msk = left >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << left) - 1);
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(msk, k + x), (__m512bh)qp[v]);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

// Raw scores sc[j] = scale * dot(K row j0 + j, q) for j < n.
template <typename T>
PFA_AVX512 inline void decode_scores(const Ctx& c, const T* q, const T* krow, int n, float* sc) {
  const int d = c.d;
  __m512 qv[16];
  for (int v = 0; v * 16 < d; ++v) qv[v] = load16_f32(q + 16 * v, mask16(d - 16 * v));
  for (int j = 0; j < n; ++j) sc[j] = decode_dot(krow + int64_t(j) * c.p->k_row_stride, qv, d) * c.score_scale;
}
PFA_AVX512_BF16 inline void decode_scores_bf16(const Ctx& c, const c10::BFloat16* q,
                                                   const c10::BFloat16* krow, int n, float* sc) {
  const int d = c.d;
  __m512i qp[8];
  for (int v = 0; v * 32 < d; ++v) {
    const int left = d - 32 * v;
    const __mmask32 msk = left >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << left) - 1);
    qp[v] = _mm512_maskz_loadu_epi16(msk, q + 32 * v);
  }
  for (int j = 0; j < n; ++j)
    sc[j] = decode_dot_bf16(krow + int64_t(j) * c.p->k_row_stride, qp, d) * c.score_scale;
}

// One tile of the online softmax from its scores: updates mrun and lrun,
// O = alpha O + sum_j p_j V_j (64 columns, 4 vectors, at a time).
template <typename T>
PFA_AVX512 inline void decode_softmax_pv(const Ctx& c, const T* vrow0, int n, float* sc, float* oacc,
                                             float& mrun, float& lrun) {
  const int dv = c.dv;
  __m512 mx = _mm512_set1_ps(-kInf);
  for (int j = 0; j < n; j += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, mask16(n - j), sc + j));
  const float mnew = std::max(mrun, _mm512_reduce_max_ps(mx));
  const float use = mnew == -kInf ? 0.0f : mnew;  // as fwd_block: empty stays 0, not NaN
  const float alpha = exp2_approx(mrun - use);
  mrun = mnew;
  const __m512 u = _mm512_set1_ps(use);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = mask16(n - j);
    const __m512 e =
        _mm512_maskz_mov_ps(k, VecAvx512::exp2(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + j), u)));
    sum = _mm512_add_ps(sum, e);
    _mm512_storeu_ps(sc + j, e);
  }
  lrun = lrun * alpha + _mm512_reduce_add_ps(sum);
  const __m512 a = _mm512_set1_ps(alpha);
  for (int x0 = 0; x0 < dv; x0 += 64) {
    __mmask16 km[4];
    __m512 o[4];
    for (int v = 0; v < 4; ++v) {
      km[v] = x0 + 16 * v < dv ? mask16(dv - x0 - 16 * v) : __mmask16(0);
      o[v] = _mm512_mul_ps(a, _mm512_maskz_loadu_ps(km[v], oacc + x0 + 16 * v));
    }
    for (int j = 0; j < n; ++j) {
      const T* vr = vrow0 + int64_t(j) * c.p->v_row_stride + x0;
      const __m512 pj = _mm512_set1_ps(sc[j]);
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) o[v] = _mm512_fmadd_ps(pj, load16_f32(vr + 16 * v, km[v]), o[v]);
    }
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(oacc + x0 + 16 * v, km[v], o[v]);
  }
}

// The online softmax of one query row over keys [key_begin, key_end) (every
// one visible: no attn_mask, no softcap) into mrun, lrun and oacc[dv] (not
// yet divided by lrun), as fwd_block's tile loop does; sc holds blk.k floats.
template <typename T, bool kDp>
PFA_INLINE void decode_row(const Ctx& c, const T* q, const T* kbase, const T* vbase, int key_begin,
                           int key_end, float* sc, float* oacc, float& mrun, float& lrun) {
  const AttentionFwdParams& p = *c.p;
  mrun = -kInf;
  lrun = 0.0f;
  for (int j0 = key_begin; j0 < key_end; j0 += c.blk.k) {
    const int n = std::min(c.blk.k, key_end - j0);
    const T* krow = kbase + int64_t(j0) * p.k_row_stride;
    if constexpr (kDp) {
      decode_scores_bf16(c, q, krow, n, sc);
    } else {
      decode_scores<T>(c, q, krow, n, sc);
    }
    decode_softmax_pv<T>(c, vbase + int64_t(j0) * p.v_row_stride, n, sc, oacc, mrun, lrun);
  }
}
#endif

// ---------------------------------------------------------------------------
// Forward: one query block of one (sequence, head).
// ---------------------------------------------------------------------------

struct FwdScratch {
  float* qt;     // B operand Q^T: [kdim(d)][blk.q]
  float* s;      // S^T / P^T: [blk.k][blk.q] fp32
  float* ppair;  // P as bf16 pairs along keys: [blk.k / 2][blk.q]
  float* ka;     // key rows: [blk.k][kdim(d)]
  float* vb;     // value rows (B operand): [blk.k][dv] or VNNI [blk.k / 2][dv]
  float* bias;   // attn_mask tile: [blk.k][blk.q]
  float* oacc;   // [blk.q][dv]
  float* mrun;   // running max (log2 units), [blk.q]
  float* lrun;   // running sum, [blk.q]
  float* tmax;   // tile column max, then the max subtracted in exp2, [blk.q]
  float* tsum;   // tile column sum, [blk.q]
  float* alpha;  // rescale of the running sum and output, [blk.q]
  int* lo;
  int* hi;
};

PFA_INLINE FwdScratch carve_fwd(Carver& cv, const Ctx& c) {
  const int64_t bq = c.blk.q, bk = c.blk.k;
  FwdScratch w;
  w.qt = cv.take(int64_t(c.d) * bq);
  w.s = cv.take(bk * bq);
  w.ppair = cv.take(bk / 2 * bq + bq);
  w.ka = cv.take(bk * c.d);
  w.vb = cv.take(bk * c.dv);
  w.bias = cv.take(c.p->mask_kind != MaskKind::kNone ? bk * bq : 0);
  w.oacc = cv.take(bq * c.dv);
  w.mrun = cv.take(bq);
  w.lrun = cv.take(bq);
  w.tmax = cv.take(bq);
  w.tsum = cv.take(bq);
  w.alpha = cv.take(bq);
  w.lo = reinterpret_cast<int*>(cv.take(bq));
  w.hi = reinterpret_cast<int*>(cv.take(bq));
  return w;
}

struct Task {
  int b, h, i0;  // sequence, head (query head fwd / dQ, kv head dK dV), first row
};

// P = exp2(S - use) over a tile, lanes outside (16 queries at a time, all
// keys inside) so that the column sums stay in a register. P goes back into
// S (fp32 product) or, with kPairs, to bf16 pairs along keys, pairs[j/2][i].
template <class Vec, bool kPairs>
PFA_INLINE void exp_tile(float* s, int64_t ld, int n, int mp, const float* use, uint32_t* pairs,
                         float* tsum) {
  using V = typename Vec::V;
  for (int c0 = 0; c0 < mp; c0 += kLanes) {
    const V u = Vec::load(use + c0);
    V sum = Vec::zero();
    if constexpr (kPairs) {
      int j = 0;
      for (; j + 1 < n; j += 2) {
        const V e0 = Vec::exp2(Vec::sub(Vec::load(s + j * ld + c0), u));
        const V e1 = Vec::exp2(Vec::sub(Vec::load(s + (j + 1) * ld + c0), u));
        sum = Vec::add(sum, Vec::add(e0, e1));
        Vec::store_pairs(pairs + (j / 2) * ld + c0, e0, e1);
      }
      if (j < n) {
        const V e0 = Vec::exp2(Vec::sub(Vec::load(s + j * ld + c0), u));
        sum = Vec::add(sum, e0);
        Vec::store_pairs(pairs + (j / 2) * ld + c0, e0, Vec::zero());
      }
    } else {
      for (int j = 0; j < n; ++j) {
        float* sr = s + j * ld + c0;
        const V e = Vec::exp2(Vec::sub(Vec::load(sr), u));
        sum = Vec::add(sum, e);
        Vec::store(sr, e);
      }
    }
    Vec::store(tsum + c0, sum);
  }
}

template <class Isa, typename T, typename CT>
PFA_INLINE void fwd_block(const Ctx& c, const FwdScratch& w, const Task& t) {
  using TL = Tiles<T, CT>;
  const AttentionFwdParams& p = *c.p;
  const SeqInfo si(p, t.b);
  const int h = t.h, hk = h / c.group, i0 = t.i0;
  const int m = std::min(c.blk.q, si.len_q - i0);
  const int mp = int(round_up(m, kLanes));
  const int64_t ldq = c.blk.q;
  const int kd = TL::kdim(c.d);
  const bool masked = p.mask_kind != MaskKind::kNone;

  RowRanges rr{w.lo, w.hi, m};
  fill_ranges(p, si, i0, rr);
  for (int i = 0; i < mp; ++i) {
    w.mrun[i] = -kInf;
    w.lrun[i] = 0.0f;
  }
  std::fill(w.oacc, w.oacc + int64_t(m) * c.dv, 0.0f);

  const T* q = static_cast<const T*>(p.q) + si.q_row(i0, p.q_batch_stride, p.q_row_stride) +
               int64_t(h) * p.q_head_stride;
  const T* kbase = static_cast<const T*>(p.k) + si.k_row(0, p.k_batch_stride, p.k_row_stride) +
                   int64_t(hk) * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + si.k_row(0, p.v_batch_stride, p.v_row_stride) +
                   int64_t(hk) * p.v_head_stride;

  const int key_begin = rr.first(), key_end = rr.last();
  bool decoded = false;
#if PFA_X86
  if constexpr (Isa::kAvx512) {
    // One row sees exactly [key_begin, key_end): no window edge in any tile.
    if (m == 1 && !masked && !c.softcap && c.d <= 256) {
      if (key_begin < key_end) decode_row<T, TL::kPairs>(c, q, kbase, vbase, key_begin, key_end, w.s, w.oacc, w.mrun[0], w.lrun[0]);
      decoded = true;
    }
  }
#endif
  if (!decoded && key_begin < key_end) TL::b_t(q, p.q_row_stride, m, c.d, w.qt, ldq);

  for (int j0 = decoded ? key_end : key_begin; j0 < key_end; j0 += c.blk.k) {
    const int n = std::min(c.blk.k, key_end - j0);
    const bool fused = !masked && !c.softcap && tile_inside(rr, j0, n);
    for (int i = 0; i < mp; ++i) w.tmax[i] = -kInf;
    // S^T = K Q^T; then scores and their column max.
    TL::a_rows(kbase + int64_t(j0) * p.k_row_stride, p.k_row_stride, n, c.d, w.ka);
    GemmArgs qk{n, m, kd, w.ka, kd, false, w.qt, ldq, w.s, ldq, false};
    if (fused) {
      qk.alpha = c.score_scale;
      qk.col_max = w.tmax;
    }
    gemm<Isa, CT>(qk);
    if (!fused) {
      const MaskTile mask = load_mask_tile<typename Isa::Vec, T>(p, t.b, h, i0, m, j0, n, w.bias, ldq);
      score_tile(c, rr, j0, n, mp, w.s, ldq, mask, nullptr, w.tmax);
    }
    // New running max; `use` (kept in tmax) is 0 for rows still empty, so
    // that exp2(-inf - use) = 0 instead of NaN.
    {
      float* PFA_RESTRICT mrun = w.mrun;
      float* PFA_RESTRICT tmax = w.tmax;
      float* PFA_RESTRICT alpha = w.alpha;
      for (int i = 0; i < mp; ++i) {
        const float mnew = std::max(mrun[i], tmax[i]);
        const float use = mnew == -kInf ? 0.0f : mnew;
        alpha[i] = exp2_approx(mrun[i] - use);
        mrun[i] = mnew;
        tmax[i] = use;
      }
    }
    exp_tile<typename Isa::Vec, TL::kPairs>(w.s, ldq, n, mp, w.tmax, reinterpret_cast<uint32_t*>(w.ppair),
                                            w.tsum);
    for (int i = 0; i < m; ++i) w.lrun[i] = w.lrun[i] * w.alpha[i] + w.tsum[i];
    // O = alpha O + P V
    TL::b_rows(vbase + int64_t(j0) * p.v_row_stride, p.v_row_stride, n, c.dv, w.vb);
    const int64_t pk = TL::kPairs ? (n + 1) / 2 : n;  // K axis: keys, or key pairs
    const float* pa = TL::kPairs ? w.ppair : w.s;
    GemmArgs pv{m, c.dv, pk, pa, ldq, true, w.vb, c.dv, w.oacc, c.dv, true};
    pv.row_scale = w.alpha;
    gemm<Isa, CT>(pv);
  }

  // O = acc / l and lse = ln(2) (max + log2 l); empty rows: O = 0, lse = -inf.
  T* o = static_cast<T*>(p.o) + si.q_row(i0, p.o_batch_stride, p.o_row_stride) + int64_t(h) * p.o_head_stride;
  for (int i = 0; i < m; ++i) {
    // A NaN sum (NaN or inf in the inputs) is not empty: it propagates.
    const bool empty = w.mrun[i] == -kInf || w.lrun[i] == 0.0f;
    const float inv = empty ? 0.0f : 1.0f / w.lrun[i];
    const float* PFA_RESTRICT acc = w.oacc + int64_t(i) * c.dv;
    T* PFA_RESTRICT orow = o + int64_t(i) * p.o_row_stride;
    for (int x = 0; x < c.dv; ++x) orow[x] = from_f32<T>(acc[x] * inv);
    p.lse[si.lse_index(p, h, i0 + i)] = empty ? -kInf : (w.mrun[i] + std::log2(w.lrun[i])) * kLn2;
  }
}

// ---------------------------------------------------------------------------
// Backward.
// ---------------------------------------------------------------------------

struct BwdScratch {
  float* qt;     // B operand Q^T  [kdim(d)][blk.q]
  float* dot;    // B operand dO^T [kdim(dv)][blk.q]
  float* qb;     // B operand Q rows  (pass 2): [blk.q][d] or VNNI [blk.q / 2][d]
  float* dob;    // B operand dO rows (pass 2): [blk.q][dv] or VNNI
  float* s;      // S^T -> P^T [blk.k][blk.q]
  float* dp;     // dP^T -> dS^T [blk.k][blk.q]
  float* pout;   // bf16: P^T rows (pass 2)
  float* dsout;  // bf16: dS pairs along keys (pass 1) or dS^T rows (pass 2)
  float* dspair; // bf16, one-pass backward: dS pairs along keys [blk.k / 2][blk.q]
  float* ka;     // A operand key rows   [blk.k][kdim(d)]
  float* va;     // A operand value rows [blk.k][kdim(dv)]
  float* kb;     // B operand key rows, VNNI (pass 1, bf16)
  float* bias;   // attn_mask tile [blk.k][blk.q]
  float* dtanh;  // softcap: 1 - tanh^2 [blk.k][blk.q]
  float* acc1;   // dQ acc [blk.q][d] (pass 1) or dK acc [blk.k][d] (pass 2)
  float* acc2;   // dV acc [blk.k][dv] (pass 2)
  float* lse2;   // lse in log2 units, +inf for empty rows [blk.q]
  float* dsum;   // D [blk.q]
  int* lo;
  int* hi;
};

PFA_INLINE BwdScratch carve_bwd(Carver& cv, const Ctx& c) {
  const int64_t bq = c.blk.q, bk = c.blk.k;
  const int64_t d = c.d, dv = c.dv;
  BwdScratch w;
  const bool packed = c.qo_pack != nullptr;  // one-pass: Q / dO operands in qo_pack
  w.qt = cv.take(packed ? 0 : d * bq);
  w.dot = cv.take(packed ? 0 : dv * bq);
  w.qb = cv.take(packed ? 0 : bq * d);
  w.dob = cv.take(packed ? 0 : bq * dv);
  w.s = cv.take(bk * bq);
  w.dp = cv.take(bk * bq);
  w.pout = cv.take(bk * bq / 2);
  w.dsout = cv.take(bk * bq / 2 + bq);
  w.dspair = cv.take(c.chunks > 0 ? bk * bq / 2 + bq : 0);
  w.ka = cv.take(bk * d);
  w.va = cv.take(bk * dv);
  w.kb = cv.take(bk * d);
  w.bias = cv.take(c.p->mask_kind != MaskKind::kNone ? bk * bq : 0);
  w.dtanh = cv.take(c.softcap ? bk * bq : 0);
  w.acc1 = cv.take(std::max(bq, bk) * d);
  w.acc2 = cv.take(bk * dv);
  w.lse2 = cv.take(bq);
  w.dsum = cv.take(bq);
  w.lo = reinterpret_cast<int*>(cv.take(bq));
  w.hi = reinterpret_cast<int*>(cv.take(bq));
  return w;
}

// Where P and dS of a backward tile go.
enum class BwdOut {
  kInPlace,   // fp32: P^T into S^T, dS^T into dP^T
  kDsPairs,   // bf16 pass 1: dS as pairs along keys, [j / 2][i]
  kRowsBf16,  // bf16 pass 2: P^T and dS^T as bf16 rows, [j][i]
  kAllBf16,   // bf16 one pass: kRowsBf16's rows and kDsPairs's pairs (dspair)
};

// P = exp2(S - lse2) and dS = P (dP - D) [* (1 - tanh^2)] over a tile, lanes
// outside like exp_tile. lse2 is +inf for empty rows, so P = 0 there. The
// softmax scale is applied to dQ and dK at the end.
template <class Vec, BwdOut kOut, bool kSoftcap>
PFA_INLINE void grad_tile(float* s, float* dp, const float* dtanh, int64_t ld, int n, int mp,
                          const float* lse2, const float* dsum, uint16_t* pout, uint32_t* dsout,
                          uint32_t* dspair) {
  using V = typename Vec::V;
  for (int c0 = 0; c0 < mp; c0 += kLanes) {
    const V l = Vec::load(lse2 + c0);
    const V dd = Vec::load(dsum + c0);
    if constexpr (kOut == BwdOut::kAllBf16) {
      uint16_t* dsrows = reinterpret_cast<uint16_t*>(dsout);
      for (int j = 0; j < n; j += 2) {
        const V e0 = Vec::exp2(Vec::sub(Vec::load(s + j * ld + c0), l));
        V g0 = Vec::mul(e0, Vec::sub(Vec::load(dp + j * ld + c0), dd));
        if constexpr (kSoftcap) g0 = Vec::mul(g0, Vec::load(dtanh + j * ld + c0));
        Vec::store_bf16(pout + j * ld + c0, e0);
        Vec::store_bf16(dsrows + j * ld + c0, g0);
        V g1 = Vec::zero();
        if (j + 1 < n) {
          const int64_t at = (j + 1) * ld + c0;
          const V e1 = Vec::exp2(Vec::sub(Vec::load(s + at), l));
          g1 = Vec::mul(e1, Vec::sub(Vec::load(dp + at), dd));
          if constexpr (kSoftcap) g1 = Vec::mul(g1, Vec::load(dtanh + at));
          Vec::store_bf16(pout + at, e1);
          Vec::store_bf16(dsrows + at, g1);
        }
        Vec::store_pairs(dspair + (j / 2) * ld + c0, g0, g1);
      }
    } else if constexpr (kOut == BwdOut::kDsPairs) {
      for (int j = 0; j < n; j += 2) {
        V e = Vec::exp2(Vec::sub(Vec::load(s + j * ld + c0), l));
        V g0 = Vec::mul(e, Vec::sub(Vec::load(dp + j * ld + c0), dd));
        if constexpr (kSoftcap) g0 = Vec::mul(g0, Vec::load(dtanh + j * ld + c0));
        V g1 = Vec::zero();
        if (j + 1 < n) {
          const int64_t at = (j + 1) * ld + c0;
          e = Vec::exp2(Vec::sub(Vec::load(s + at), l));
          g1 = Vec::mul(e, Vec::sub(Vec::load(dp + at), dd));
          if constexpr (kSoftcap) g1 = Vec::mul(g1, Vec::load(dtanh + at));
        }
        Vec::store_pairs(dsout + (j / 2) * ld + c0, g0, g1);
      }
    } else {
      for (int j = 0; j < n; ++j) {
        const int64_t at = j * ld + c0;
        const V e = Vec::exp2(Vec::sub(Vec::load(s + at), l));
        V g = Vec::mul(e, Vec::sub(Vec::load(dp + at), dd));
        if constexpr (kSoftcap) g = Vec::mul(g, Vec::load(dtanh + at));
        if constexpr (kOut == BwdOut::kInPlace) {
          Vec::store(s + at, e);
          Vec::store(dp + at, g);
        } else {
          Vec::store_bf16(pout + at, e);
          Vec::store_bf16(reinterpret_cast<uint16_t*>(dsout) + at, g);
        }
      }
    }
  }
}

template <class Vec, BwdOut kOut>
PFA_INLINE void grad_tile(const Ctx& c, const BwdScratch& w, int n, int mp) {
  const int64_t ld = c.blk.q;
  uint16_t* pout = reinterpret_cast<uint16_t*>(w.pout);
  uint32_t* dsout = reinterpret_cast<uint32_t*>(w.dsout);
  uint32_t* dspair = reinterpret_cast<uint32_t*>(w.dspair);
  if (c.softcap) {
    grad_tile<Vec, kOut, true>(w.s, w.dp, w.dtanh, ld, n, mp, w.lse2, w.dsum, pout, dsout, dspair);
  } else {
    grad_tile<Vec, kOut, false>(w.s, w.dp, nullptr, ld, n, mp, w.lse2, w.dsum, pout, dsout, dspair);
  }
}

// S^T and dP^T of a tile: S^T = K Q^T (scaled in the product's epilogue when
// nothing else applies, else by score_tile), dP^T = V dO^T.
template <class Isa, typename T, typename CT>
PFA_INLINE void bwd_scores(const Ctx& c, const BwdScratch& w, const RowRanges& rr, int bi, int h, int i0,
                           int j0, int n, int mp) {
  using TL = Tiles<T, CT>;
  const AttentionFwdParams& p = *c.p;
  const int64_t ldq = c.blk.q;
  const int kd = TL::kdim(c.d), kdv = TL::kdim(c.dv);
  const bool masked = p.mask_kind != MaskKind::kNone;
  const bool fused = !masked && !c.softcap && tile_inside(rr, j0, n);
  GemmArgs qk{n, rr.m, kd, w.ka, kd, false, w.qt, ldq, w.s, ldq, false};
  if (fused) qk.alpha = c.score_scale;
  gemm<Isa, CT>(qk);
  gemm<Isa, CT>(GemmArgs{n, rr.m, kdv, w.va, kdv, false, w.dot, ldq, w.dp, ldq, false});
  if (!fused) {
    const MaskTile mask = load_mask_tile<typename Isa::Vec, T>(p, bi, h, i0, rr.m, j0, n, w.bias, ldq);
    score_tile(c, rr, j0, n, mp, w.s, ldq, mask, w.dtanh, nullptr);
  }
}

// Per-row inputs of a query block: lse in log2 units (+inf when the row is
// empty, so P = exp2(-inf or finite - inf) = 0) and D. Returns whether any
// row has a visible key.
PFA_INLINE bool load_row_stats(const Ctx& c, const BwdScratch& w, const SeqInfo& si, int h, int i0, int m,
                               int mp) {
  const AttentionFwdParams& p = *c.p;
  bool any = false;
  for (int i = 0; i < mp; ++i) {
    if (i < m) {
      const float l = p.lse[si.lse_index(p, h, i0 + i)];
      const bool empty = l == -kInf;
      any = any || !empty;
      w.lse2[i] = empty ? kInf : l * kLog2e;
      w.dsum[i] = c.dsum[dsum_index(c, si, h, i0 + i)];
    } else {
      w.lse2[i] = kInf;
      w.dsum[i] = 0.0f;
    }
  }
  return any;
}

// D = rowsum(dO * O) for rows i0 .. i0 + m - 1 of (sequence, head h). With
// fp32 products (kLaneSums false) each row is summed in order x = 0, 1, ...,
// the K order of the dP product, so that dP - D is exactly 0 where P is
// one-hot; bf16 dot products (vdpbf16ps) add pairs in their own order anyway.
template <typename T, bool kLaneSums = false>
PFA_INLINE void fill_dsum(const Ctx& c, const SeqInfo& si, int h, int i0, int m, const T* o, const T* dout) {
  const AttentionBwdParams& p = *c.pb;
  for (int i = 0; i < m; ++i) {
    const T* PFA_RESTRICT orow = o + int64_t(i) * p.o_row_stride;
    const T* PFA_RESTRICT grow = dout + int64_t(i) * p.do_row_stride;
    float acc = 0.0f;
    if constexpr (kLaneSums) {
      // kLanes partial sums (one vector), added pairwise at the end: a serial
      // float sum does not vectorise and is bound by the adds' latency.
      float lane[kLanes] = {};
      int x = 0;
      for (; x + kLanes <= c.dv; x += kLanes) {
        for (int l = 0; l < kLanes; ++l) lane[l] += to_f32(orow[x + l]) * to_f32(grow[x + l]);
      }
      for (; x < c.dv; ++x) lane[x - (x / kLanes) * kLanes] += to_f32(orow[x]) * to_f32(grow[x]);
      for (int half = kLanes / 2; half > 0; half /= 2) {
        for (int l = 0; l < half; ++l) lane[l] += lane[l + half];
      }
      acc = lane[0];
    } else {
      for (int x = 0; x < c.dv; ++x) acc += to_f32(orow[x]) * to_f32(grow[x]);
    }
    c.dsum[dsum_index(c, si, h, i0 + i)] = acc;
  }
}

// Pass 1: D for the block's rows, then dQ = scale * sum_j dS K.
template <class Isa, typename T, typename CT>
PFA_INLINE void bwd_dq_block(const Ctx& c, const BwdScratch& w, const Task& t) {
  using TL = Tiles<T, CT>;
  const AttentionBwdParams& p = *c.pb;
  const SeqInfo si(p, t.b);
  const int h = t.h, hk = h / c.group, i0 = t.i0;
  const int m = std::min(c.blk.q, si.len_q - i0);
  const int mp = int(round_up(m, kLanes));
  const int64_t ldq = c.blk.q;

  const T* q = static_cast<const T*>(p.q) + si.q_row(i0, p.q_batch_stride, p.q_row_stride) +
               int64_t(h) * p.q_head_stride;
  const T* o = static_cast<const T*>(p.o) + si.q_row(i0, p.o_batch_stride, p.o_row_stride) +
               int64_t(h) * p.o_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + si.q_row(i0, p.do_batch_stride, p.do_row_stride) +
                  int64_t(h) * p.do_head_stride;
  const T* kbase = static_cast<const T*>(p.k) + si.k_row(0, p.k_batch_stride, p.k_row_stride) +
                   int64_t(hk) * p.k_head_stride;
  const T* vbase = static_cast<const T*>(p.v) + si.k_row(0, p.v_batch_stride, p.v_row_stride) +
                   int64_t(hk) * p.v_head_stride;

  fill_dsum<T, TL::kPairs>(c, si, h, i0, m, o, dout);

  RowRanges rr{w.lo, w.hi, m};
  fill_ranges(p, si, i0, rr);
  const bool any = load_row_stats(c, w, si, h, i0, m, mp);
  std::fill(w.acc1, w.acc1 + int64_t(m) * c.d, 0.0f);
  const int key_begin = rr.first(), key_end = any ? rr.last() : rr.first();
  if (key_begin < key_end) {
    TL::b_t(q, p.q_row_stride, m, c.d, w.qt, ldq);
    TL::b_t(dout, p.do_row_stride, m, c.dv, w.dot, ldq);
  }
  for (int j0 = key_begin; j0 < key_end; j0 += c.blk.k) {
    const int n = std::min(c.blk.k, key_end - j0);
    const T* krows = kbase + int64_t(j0) * p.k_row_stride;
    TL::a_rows(krows, p.k_row_stride, n, c.d, w.ka);
    TL::a_rows(vbase + int64_t(j0) * p.v_row_stride, p.v_row_stride, n, c.dv, w.va);
    bwd_scores<Isa, T, CT>(c, w, rr, t.b, h, i0, j0, n, mp);
    // dQ += dS K (A = dS read by column from dS^T, or bf16 pairs along keys).
    if constexpr (TL::kPairs) {
      grad_tile<typename Isa::Vec, BwdOut::kDsPairs>(c, w, n, mp);
      TL::b_rows(krows, p.k_row_stride, n, c.d, w.kb);
      gemm<Isa, CT>(GemmArgs{m, c.d, (n + 1) / 2, w.dsout, ldq, true, w.kb, c.d, w.acc1, c.d, true});
    } else {
      grad_tile<typename Isa::Vec, BwdOut::kInPlace>(c, w, n, mp);
      gemm<Isa, CT>(GemmArgs{m, c.d, n, w.dp, ldq, true, w.ka, c.d, w.acc1, c.d, true});
    }
  }

  T* dq = static_cast<T*>(p.dq) + si.q_row(i0, p.dq_batch_stride, p.dq_row_stride) +
          int64_t(h) * p.dq_head_stride;
  const float scale = c.p->scale;
  for (int i = 0; i < m; ++i) {
    const float* PFA_RESTRICT acc = w.acc1 + int64_t(i) * c.d;
    T* PFA_RESTRICT row = dq + int64_t(i) * p.dq_row_stride;
    for (int x = 0; x < c.d; ++x) row[x] = from_f32<T>(acc[x] * scale);
  }
}

// First query row whose visible keys reach key j (hi > j), and one past the
// last row whose visible keys start at or before key j_last (lo <= j_last).
PFA_INLINE int first_row_reaching(const AttentionFwdParams& p, const SeqInfo& si, int j) {
  int lo = 0, hi = si.len_q;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (si.key_hi(p, mid) > j) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}
PFA_INLINE int end_row_starting_by(const AttentionFwdParams& p, const SeqInfo& si, int j_last) {
  int lo = 0, hi = si.len_q;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (si.key_lo(p, mid) <= j_last) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Number of key rows sequence `bi` owns in k/v (and dk/dv): all of them get
// written, the ones past len_k (seqused_k) with zeros.
PFA_INLINE int owned_keys(const AttentionFwdParams& p, const SeqInfo& si) {
  return si.varlen ? p.cu_seqlens_k[si.bi + 1] - p.cu_seqlens_k[si.bi] : p.seqlen_k;
}

// dK = scale * acc1 and dV = acc2 for key rows j0 .. j0 + owned - 1 of kv
// head hk; rows from n on (past len_k) get zeros.
template <typename T>
PFA_INLINE void store_dkdv(const Ctx& c, const BwdScratch& w, const SeqInfo& si, int hk, int j0, int owned,
                           int n) {
  const AttentionBwdParams& p = *c.pb;
  T* dk = static_cast<T*>(p.dk) + si.k_row(j0, p.dk_batch_stride, p.dk_row_stride) +
          int64_t(hk) * p.dk_head_stride;
  T* dv = static_cast<T*>(p.dv) + si.k_row(j0, p.dv_batch_stride, p.dv_row_stride) +
          int64_t(hk) * p.dv_head_stride;
  const float scale = c.p->scale;
  for (int j = 0; j < owned; ++j) {
    T* PFA_RESTRICT krow = dk + int64_t(j) * p.dk_row_stride;
    T* PFA_RESTRICT vrow = dv + int64_t(j) * p.dv_row_stride;
    if (j < n) {
      const float* PFA_RESTRICT ak = w.acc1 + int64_t(j) * c.d;
      const float* PFA_RESTRICT av = w.acc2 + int64_t(j) * c.dv;
      for (int x = 0; x < c.d; ++x) krow[x] = from_f32<T>(ak[x] * scale);
      for (int x = 0; x < c.dv; ++x) vrow[x] = from_f32<T>(av[x]);
    } else {
      for (int x = 0; x < c.d; ++x) krow[x] = from_f32<T>(0.0f);
      for (int x = 0; x < c.dv; ++x) vrow[x] = from_f32<T>(0.0f);
    }
  }
}

// Pass 2: dK and dV of one key block, summed over the query heads of the
// kv head's group and all query rows that see the block.
template <class Isa, typename T, typename CT>
PFA_INLINE void bwd_dkdv_block(const Ctx& c, const BwdScratch& w, const Task& t) {
  using TL = Tiles<T, CT>;
  const AttentionBwdParams& p = *c.pb;
  const SeqInfo si(p, t.b);
  const int hk = t.h, j0 = t.i0;
  const int owned = std::min(c.blk.k, owned_keys(p, si) - j0);
  const int n = std::max(0, std::min(owned, si.len_k - j0));
  const int64_t ldq = c.blk.q;

  std::fill(w.acc1, w.acc1 + int64_t(n) * c.d, 0.0f);
  std::fill(w.acc2, w.acc2 + int64_t(n) * c.dv, 0.0f);
  const T* krows = static_cast<const T*>(p.k) + si.k_row(j0, p.k_batch_stride, p.k_row_stride) +
                   int64_t(hk) * p.k_head_stride;
  const T* vrows = static_cast<const T*>(p.v) + si.k_row(j0, p.v_batch_stride, p.v_row_stride) +
                   int64_t(hk) * p.v_head_stride;
  if (n > 0) {
    TL::a_rows(krows, p.k_row_stride, n, c.d, w.ka);
    TL::a_rows(vrows, p.v_row_stride, n, c.dv, w.va);
    const int row_begin = first_row_reaching(p, si, j0);
    const int row_end = end_row_starting_by(p, si, j0 + n - 1);
    for (int h = hk * c.group; h < (hk + 1) * c.group; ++h) {
      const T* qh = static_cast<const T*>(p.q) + si.q_row(0, p.q_batch_stride, p.q_row_stride) +
                    int64_t(h) * p.q_head_stride;
      const T* doh = static_cast<const T*>(p.dout) + si.q_row(0, p.do_batch_stride, p.do_row_stride) +
                     int64_t(h) * p.do_head_stride;
      for (int i0 = row_begin; i0 < row_end; i0 += c.blk.q) {
        const int m = std::min(c.blk.q, row_end - i0);
        const int mp = int(round_up(m, kLanes));
        if (!load_row_stats(c, w, si, h, i0, m, mp)) continue;
        RowRanges rr{w.lo, w.hi, m};
        fill_ranges(p, si, i0, rr);
        const T* q = qh + int64_t(i0) * p.q_row_stride;
        const T* dout = doh + int64_t(i0) * p.do_row_stride;
        TL::b_t(q, p.q_row_stride, m, c.d, w.qt, ldq);
        TL::b_t(dout, p.do_row_stride, m, c.dv, w.dot, ldq);
        bwd_scores<Isa, T, CT>(c, w, rr, t.b, h, i0, j0, n, mp);
        // dV += P^T dO, dK += dS^T Q (K axis = query rows).
        TL::b_rows(dout, p.do_row_stride, m, c.dv, w.dob);
        TL::b_rows(q, p.q_row_stride, m, c.d, w.qb);
        if constexpr (TL::kPairs) {
          // bf16 rows of P^T / dS^T are pairs along the query axis; lanes
          // past m hold P = dS = 0, which pads an odd m.
          grad_tile<typename Isa::Vec, BwdOut::kRowsBf16>(c, w, n, mp);
          const int m2 = (m + 1) / 2;
          if (m & 1) {
            // The pad lane of the last pair must be 0, not a stale value.
            for (int j = 0; j < n; ++j) {
              reinterpret_cast<uint16_t*>(w.pout)[j * ldq + m] = 0;
              reinterpret_cast<uint16_t*>(w.dsout)[j * ldq + m] = 0;
            }
          }
          gemm<Isa, CT>(GemmArgs{n, c.dv, m2, w.pout, ldq / 2, false, w.dob, c.dv, w.acc2, c.dv, true});
          gemm<Isa, CT>(GemmArgs{n, c.d, m2, w.dsout, ldq / 2, false, w.qb, c.d, w.acc1, c.d, true});
        } else {
          grad_tile<typename Isa::Vec, BwdOut::kInPlace>(c, w, n, mp);
          gemm<Isa, CT>(GemmArgs{n, c.dv, m, w.s, ldq, false, w.dob, c.dv, w.acc2, c.dv, true});
          gemm<Isa, CT>(GemmArgs{n, c.d, m, w.dp, ldq, false, w.qb, c.d, w.acc1, c.d, true});
        }
      }
    }
  }

  store_dkdv<T>(c, w, si, hk, j0, owned, n);
}

// One-pass backward: a query block's Q^T, dO^T (B operands of S^T and dP^T)
// and Q, dO rows (B operands of dK and dV) inside its Ctx::qo_pack block.
struct QoPack {
  float* qt;
  float* dot;
  float* qb;
  float* dob;
};

template <typename T, typename CT>
PFA_INLINE int64_t pack_floats(const Ctx& c) {
  using TL = Tiles<T, CT>;
  const int64_t bq = c.blk.q, rows = TL::kPairs ? bq / 2 : bq;  // VNNI: pairs of rows
  return (TL::kdim(c.d) + TL::kdim(c.dv)) * bq + rows * (c.d + c.dv);
}

template <typename T, typename CT>
PFA_INLINE QoPack pack_parts(const Ctx& c, const SeqInfo& si, int h, int i0) {
  using TL = Tiles<T, CT>;
  const int64_t first = c.pack_first[si.bi], blocks = c.pack_first[si.bi + 1] - first;
  const int64_t at = first * c.p->num_heads + h * blocks + i0 / c.blk.q;
  const int64_t bq = c.blk.q, rows = TL::kPairs ? bq / 2 : bq;
  QoPack k;
  k.qt = c.qo_pack + at * c.pack_floats;
  k.dot = k.qt + TL::kdim(c.d) * bq;
  k.qb = k.dot + TL::kdim(c.dv) * bq;
  k.dob = k.qb + rows * c.d;
  return k;
}

// One-pass backward (chosen by fused_chunks): one task per (sequence, kv
// head, chunk of key blocks) computes S, dP, P and dS of each tile once and
// all three products from them, 5 tile products instead of 7. dK and dV are
// owned by the task; dQ is summed per chunk into dq_part (fp32) and the
// chunks are added in chunk order by bwd_reduce_block. Chunks, blocks and
// the order inside a task depend on the shape only, so the result is still
// bit-identical for any thread count. Query blocks are aligned to blk.q (rows
// before the first one reaching the key block get P = 0 from the window), so
// that every chunk writes whole blocks of dq_part: the first write of a block
// overwrites (no clearing pass) and marks its rows in dq_touched.
template <class Isa, typename T, typename CT>
PFA_INLINE void bwd_fused_block(const Ctx& c, const BwdScratch& w, const Task& t) {
  using TL = Tiles<T, CT>;
  const AttentionBwdParams& p = *c.pb;
  const SeqInfo si(p, t.b);
  const int hk = t.h, chunk = t.i0;
  const int all_owned = owned_keys(p, si);
  const int nkb = (all_owned + c.blk.k - 1) / c.blk.k;
  const int per = (nkb + c.chunks - 1) / c.chunks;
  const int kb_end = std::min(nkb, (chunk + 1) * per);
  const int64_t ldq = c.blk.q;
  float* part = c.dq_part + int64_t(chunk) * c.part_rows * c.d;
  uint8_t* touched = c.dq_touched + int64_t(chunk) * c.part_rows;

  for (int kb = chunk * per; kb < kb_end; ++kb) {
    const int j0 = kb * c.blk.k;
    const int owned = std::min(c.blk.k, all_owned - j0);
    const int n = std::max(0, std::min(owned, si.len_k - j0));
    std::fill(w.acc1, w.acc1 + int64_t(n) * c.d, 0.0f);
    std::fill(w.acc2, w.acc2 + int64_t(n) * c.dv, 0.0f);
    if (n > 0) {
      const T* krows = static_cast<const T*>(p.k) + si.k_row(j0, p.k_batch_stride, p.k_row_stride) +
                       int64_t(hk) * p.k_head_stride;
      const T* vrows = static_cast<const T*>(p.v) + si.k_row(j0, p.v_batch_stride, p.v_row_stride) +
                       int64_t(hk) * p.v_head_stride;
      TL::a_rows(krows, p.k_row_stride, n, c.d, w.ka);
      TL::a_rows(vrows, p.v_row_stride, n, c.dv, w.va);
      if constexpr (TL::kPairs) TL::b_rows(krows, p.k_row_stride, n, c.d, w.kb);
      const int row_begin = first_row_reaching(p, si, j0) / c.blk.q * c.blk.q;
      const int row_end = end_row_starting_by(p, si, j0 + n - 1);
      for (int h = hk * c.group; h < (hk + 1) * c.group; ++h) {
        const T* qh = static_cast<const T*>(p.q) + si.q_row(0, p.q_batch_stride, p.q_row_stride) +
                      int64_t(h) * p.q_head_stride;
        const T* doh = static_cast<const T*>(p.dout) + si.q_row(0, p.do_batch_stride, p.do_row_stride) +
                       int64_t(h) * p.do_head_stride;
        for (int i0 = row_begin; i0 < row_end; i0 += c.blk.q) {
          const int m = std::min(c.blk.q, si.len_q - i0);
          const int mp = int(round_up(m, kLanes));
          if (!load_row_stats(c, w, si, h, i0, m, mp)) continue;
          RowRanges rr{w.lo, w.hi, m};
          fill_ranges(p, si, i0, rr);
          BwdScratch wq = w;
          if (c.qo_pack) {
            const QoPack k = pack_parts<T, CT>(c, si, h, i0);
            wq.qt = k.qt;
            wq.dot = k.dot;
            wq.qb = k.qb;
            wq.dob = k.dob;
          } else {
            const T* q = qh + int64_t(i0) * p.q_row_stride;
            const T* dout = doh + int64_t(i0) * p.do_row_stride;
            TL::b_t(q, p.q_row_stride, m, c.d, w.qt, ldq);
            TL::b_t(dout, p.do_row_stride, m, c.dv, w.dot, ldq);
            TL::b_rows(dout, p.do_row_stride, m, c.dv, w.dob);
            TL::b_rows(q, p.q_row_stride, m, c.d, w.qb);
          }
          bwd_scores<Isa, T, CT>(c, wq, rr, t.b, h, i0, j0, n, mp);
          const int64_t row0 = dsum_index(c, si, h, i0);
          const bool first = touched[row0] == 0;
          float* dq = part + row0 * c.d;
          if constexpr (TL::kPairs) {
            grad_tile<typename Isa::Vec, BwdOut::kAllBf16>(c, w, n, mp);
            const int m2 = (m + 1) / 2;
            if (m & 1) {
              for (int j = 0; j < n; ++j) {
                reinterpret_cast<uint16_t*>(w.pout)[j * ldq + m] = 0;
                reinterpret_cast<uint16_t*>(w.dsout)[j * ldq + m] = 0;
              }
            }
            gemm<Isa, CT>(GemmArgs{n, c.dv, m2, w.pout, ldq / 2, false, wq.dob, c.dv, w.acc2, c.dv, true});
            gemm<Isa, CT>(GemmArgs{n, c.d, m2, w.dsout, ldq / 2, false, wq.qb, c.d, w.acc1, c.d, true});
            gemm<Isa, CT>(GemmArgs{m, c.d, (n + 1) / 2, w.dspair, ldq, true, w.kb, c.d, dq, c.d, !first});
          } else {
            grad_tile<typename Isa::Vec, BwdOut::kInPlace>(c, w, n, mp);
            gemm<Isa, CT>(GemmArgs{n, c.dv, m, w.s, ldq, false, wq.dob, c.dv, w.acc2, c.dv, true});
            gemm<Isa, CT>(GemmArgs{n, c.d, m, w.dp, ldq, false, wq.qb, c.d, w.acc1, c.d, true});
            gemm<Isa, CT>(GemmArgs{m, c.d, n, w.dp, ldq, true, w.ka, c.d, dq, c.d, !first});
          }
          if (first) std::fill(touched + row0, touched + row0 + m, uint8_t(1));
        }
      }
    }
    store_dkdv<T>(c, w, si, hk, j0, owned, n);
  }
}

// Tiles<T, CT>::b_t (Q^T, dO^T) in 16 x 16 blocks through Vec::transpose16
// (the scalar b_t writes one value per row of dst); the columns from `rows`
// to the next multiple of kLanes are written as zeros, so ld >= that.
// Odd head dims in pairs take the scalar b_t.
template <class Vec, typename T, typename CT>
PFA_INLINE void pack_t(const T* src, int64_t stride, int rows, int cols, float* dst, int64_t ld) {
  using TL = Tiles<T, CT>;
  if (TL::kPairs && cols % 2 != 0) {
    TL::b_t(src, stride, rows, cols, dst, ld);
    return;
  }
  const int kc = TL::kdim(cols);
  alignas(64) float in[kLanes][kLanes];
  for (int r0 = 0; r0 < rows; r0 += kLanes) {
    const int nr = std::min(kLanes, rows - r0);
    for (int c0 = 0; c0 < kc; c0 += kLanes) {
      const int nc = std::min(kLanes, kc - c0);
      for (int a = 0; a < kLanes; ++a) {
        int b = 0;
        if (a < nr) {
          const T* PFA_RESTRICT s = src + int64_t(r0 + a) * stride;
          if constexpr (TL::kPairs) {
            std::memcpy(in[a], s + 2 * c0, size_t(nc) * 2 * sizeof(T));
            b = nc;
          } else {
            for (; b < nc; ++b) in[a][b] = to_f32(s[c0 + b]);
          }
        }
        for (; b < kLanes; ++b) in[a][b] = 0.0f;
      }
      Vec::transpose16(in, dst + int64_t(c0) * ld + r0, ld, nc);
    }
  }
}

// One-pass backward, before it: D for one query block, and its Q / dO
// operands packed (when qo_pack is set).
template <class Vec, typename T, typename CT>
PFA_INLINE void bwd_prep_block(const Ctx& c, const Task& t) {
  using TL = Tiles<T, CT>;
  const AttentionBwdParams& p = *c.pb;
  const SeqInfo si(p, t.b);
  const int m = std::min(c.blk.q, si.len_q - t.i0);
  const T* o = static_cast<const T*>(p.o) + si.q_row(t.i0, p.o_batch_stride, p.o_row_stride) +
               int64_t(t.h) * p.o_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + si.q_row(t.i0, p.do_batch_stride, p.do_row_stride) +
                  int64_t(t.h) * p.do_head_stride;
  fill_dsum<T, TL::kPairs>(c, si, t.h, t.i0, m, o, dout);
  if (!c.qo_pack) return;
  const T* q = static_cast<const T*>(p.q) + si.q_row(t.i0, p.q_batch_stride, p.q_row_stride) +
               int64_t(t.h) * p.q_head_stride;
  const QoPack k = pack_parts<T, CT>(c, si, t.h, t.i0);
  pack_t<Vec, T, CT>(q, p.q_row_stride, m, c.d, k.qt, c.blk.q);
  pack_t<Vec, T, CT>(dout, p.do_row_stride, m, c.dv, k.dot, c.blk.q);
  TL::b_rows(q, p.q_row_stride, m, c.d, k.qb);
  TL::b_rows(dout, p.do_row_stride, m, c.dv, k.dob);
}

// One-pass backward, after it: dQ = scale * (sum of the chunks' partials in
// chunk order) for one query block.
template <typename T>
PFA_INLINE void bwd_reduce_block(const Ctx& c, float* acc_row, const Task& t) {
  const AttentionBwdParams& p = *c.pb;
  const SeqInfo si(p, t.b);
  const int m = std::min(c.blk.q, si.len_q - t.i0);
  T* dq = static_cast<T*>(p.dq) + si.q_row(t.i0, p.dq_batch_stride, p.dq_row_stride) +
          int64_t(t.h) * p.dq_head_stride;
  const float scale = c.p->scale;
  float* PFA_RESTRICT acc = acc_row;  // [d]
  for (int i = 0; i < m; ++i) {
    const int64_t row = dsum_index(c, si, t.h, t.i0 + i);
    std::fill(acc, acc + c.d, 0.0f);
    for (int ch = 0; ch < c.chunks; ++ch) {
      const int64_t at = int64_t(ch) * c.part_rows + row;
      if (!c.dq_touched[at]) continue;
      const float* PFA_RESTRICT src = c.dq_part + at * c.d;
      for (int x = 0; x < c.d; ++x) acc[x] += src[x];
    }
    T* PFA_RESTRICT out = dq + int64_t(i) * p.dq_row_stride;
    for (int x = 0; x < c.d; ++x) out[x] = from_f32<T>(acc[x] * scale);
  }
}

// ---------------------------------------------------------------------------
// Per-ISA task entry points. The task bodies are always_inline and neutral;
// `flatten` inlines them, and through them the VecAvx512 / VecAvx2
// primitives (which need the target), into these functions, so every
// instantiation is compiled for its instruction set.
// ---------------------------------------------------------------------------

enum class Kind { kFwd, kBwdDq, kBwdDkDv, kBwdPrep, kBwdFused, kBwdReduce };

template <class Isa, typename T, typename CT>
PFA_INLINE void run_block(Kind kind, const Ctx& c, float* scratch, const Task& t) {
  Carver cv(scratch);
  if (kind == Kind::kFwd) {
    fwd_block<Isa, T, CT>(c, carve_fwd(cv, c), t);
  } else if (kind == Kind::kBwdDq) {
    bwd_dq_block<Isa, T, CT>(c, carve_bwd(cv, c), t);
  } else if (kind == Kind::kBwdDkDv) {
    bwd_dkdv_block<Isa, T, CT>(c, carve_bwd(cv, c), t);
  } else if (kind == Kind::kBwdPrep) {
    bwd_prep_block<typename Isa::Vec, T, CT>(c, t);
  } else if (kind == Kind::kBwdFused) {
    bwd_fused_block<Isa, T, CT>(c, carve_bwd(cv, c), t);
  } else {
    bwd_reduce_block<T>(c, scratch, t);
  }
}

using BlockFn = void (*)(Kind, const Ctx&, float*, const Task&);

template <typename T>
void block_portable(Kind kind, const Ctx& c, float* scratch, const Task& t) {
  run_block<IsaPortable, T, float>(kind, c, scratch, t);
}
#if PFA_X86
// CPUs with AVX2 + FMA but no AVX-512 (Haswell to Alder Lake, Zen 1-3).
template <typename T>
PFA_AVX2 __attribute__((flatten)) void block_avx2(Kind kind, const Ctx& c, float* scratch, const Task& t) {
  run_block<IsaAvx2, T, float>(kind, c, scratch, t);
}
template <typename T>
PFA_AVX512 __attribute__((flatten)) void block_avx512(Kind kind, const Ctx& c, float* scratch,
                                                      const Task& t) {
  run_block<IsaAvx512, T, float>(kind, c, scratch, t);
}
// bf16 inputs on a CPU with AVX512-BF16: products as bf16 dot products.
PFA_AVX512_BF16 __attribute__((flatten)) void block_avx512_bf16(Kind kind, const Ctx& c, float* scratch,
                                                                const Task& t) {
  run_block<IsaAvx512, c10::BFloat16, uint32_t>(kind, c, scratch, t);
}
#endif

// The best path this CPU supports, capped by PYFASTATTN_CPU_ISA (read once):
//   avx512bf16 (default) > avx512 (bf16 inputs through fp32 products) > avx2 >
//   portable. The cap lets the tests run every fallback on an AVX-512 machine;
// an unknown value is an error rather than a silent choice.
enum class IsaCap : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3 };

IsaCap isa_cap() {
  static const IsaCap cap = [] {
    const char* env = std::getenv("PYFASTATTN_CPU_ISA");
    const std::string v = env ? env : "";
    if (v.empty() || v == "avx512bf16") return IsaCap::kAvx512Bf16;
    if (v == "avx512") return IsaCap::kAvx512;
    if (v == "avx2") return IsaCap::kAvx2;
    if (v == "portable") return IsaCap::kPortable;
    TORCH_CHECK_VALUE(false, "PYFASTATTN_CPU_ISA must be one of avx512bf16, avx512, avx2, portable; got '",
                      v, "'");
  }();
  return cap;
}

template <typename T>
BlockFn pick_block_fn() {
  const IsaCap cap = isa_cap();
#if PFA_X86
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (cap >= IsaCap::kAvx512Bf16 && cpu_has_avx512_bf16()) return &block_avx512_bf16;
  }
  if (cap >= IsaCap::kAvx512 && cpu_has_avx512()) return &block_avx512<T>;
  if (cap >= IsaCap::kAvx2 && cpu_has_avx2()) return &block_avx2<T>;
#endif
  (void)cap;
  return &block_portable<T>;
}

BlockFn block_fn(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return pick_block_fn<c10::Half>();
    case DType::kBFloat16:
      return pick_block_fn<c10::BFloat16>();
    case DType::kFloat32:
    default:
      return pick_block_fn<float>();
  }
}

// ---------------------------------------------------------------------------
// Scheduling.
// ---------------------------------------------------------------------------

int64_t scratch_floats(const Ctx& c, Kind kind) {
  Carver cv(nullptr);
  if (kind == Kind::kFwd) {
    carve_fwd(cv, c);
  } else if (kind == Kind::kBwdPrep) {
    return 0;
  } else if (kind == Kind::kBwdReduce) {
    return c.d;  // bwd_reduce_block's row accumulator
  } else {
    carve_bwd(cv, c);
  }
  return cv.used();
}

// Runs tasks in order of decreasing estimated cost (longest first), handed
// out one at a time from a shared counter, so causal blocks balance across
// threads. The order only affects which thread runs a task, never its result.
void run_tasks(const Ctx& c, Kind kind, const std::vector<Task>& tasks, const std::vector<int64_t>& cost) {
  if (tasks.empty()) return;
  std::vector<int64_t> order(tasks.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = int64_t(i);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return cost[x] > cost[y]; });
  const BlockFn fn = block_fn(c.p->dtype);
  const int64_t floats = scratch_floats(c, kind);
  std::atomic<int64_t> next{0};
  const int64_t n = int64_t(tasks.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    Arena arena(floats);
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      fn(kind, c, arena.data(), tasks[size_t(order[size_t(i)])]);
    }
  });
}

// Block sizes depend on the shape only, never on the thread count: the
// summation order follows the blocks, so any thread count gives the same
// bits. Measured on one Zen 5 core (GFLOP/s from CPU time, B1 H4 S2048,
// fp32 / bf16; query rows x keys per tile):
//   forward,  D = 64 : 64x256 189 / 365, 128x256 217 / 395, 128x512 218 / 393
//   forward,  D = 256: 64x256 193 / 386, 128x256 192 / 355
//   backward, D = 64 : 64x256 146 / 268, 128x256 150 / 272, 256x256 107 / 273
//   backward, D = 128: 64x256 152 / 290, 128x256 121 / 287
// so 256 keys per tile, and 128 query rows unless the head dim makes the
// per-block buffers too large for L2 (backward: Q^T, dO^T, Q, dO blocks).
// Short sequences get smaller blocks (less scratch to clear), and problems
// with few blocks get smaller ones so that 32 threads find work (query blocks
// for the forward and backward pass 1, key blocks for backward pass 2).
// The backward without a window asks for 16: with 32, B1 H8 S256 D64 got
// 64 x 64 tiles, where the fixed costs per tile weigh most (bf16 backward, 2
// threads: 0.56-0.62 ms with 64 x 64, 0.52-0.54 with 128 x 128); causal
// keeps 32 (S512 causal: 1.33-1.37 ms with 32, 1.41-1.43 with 16, the larger
// diagonal tiles). PERF_NOTES.md.
PFA_INLINE int64_t min_tasks_bwd(const AttentionFwdParams& p) {
  return p.window_left < 0 && p.window_right < 0 ? 16 : 32;
}
Blocks choose_blocks(const AttentionFwdParams& p, bool backward) {
  const int64_t kMinTasks = backward ? min_tasks_bwd(p) : 32;
  const int d = std::max(p.head_dim, p.head_dim_v);
  Blocks b;
  b.q = (backward ? d <= 64 : d <= 128) ? 128 : 64;
  b.k = 256;
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t rows =
      (varlen ? int64_t(p.cu_seqlens_q[p.batch]) : int64_t(p.batch) * p.seqlen_q) * p.num_heads;
  const int64_t keys =
      (varlen ? int64_t(p.cu_seqlens_k[p.batch]) : int64_t(p.batch) * p.seqlen_k) * p.num_heads_k;
  while (b.q > 32 && rows < kMinTasks * b.q) b.q /= 2;
  while (backward && b.k > 64 && keys < kMinTasks * b.k) b.k /= 2;
  b.q = int(std::min<int64_t>(b.q, round_up(std::max(p.seqlen_q, 1), kLanes)));
  b.k = int(std::min<int64_t>(b.k, round_up(std::max(p.seqlen_k, 1), kLanes)));
  return b;
}

Ctx make_ctx(const AttentionFwdParams& p, bool backward) {
  Ctx c{};
  c.p = &p;
  c.pb = nullptr;
  c.blk = choose_blocks(p, backward);
  c.group = p.num_heads / p.num_heads_k;
  c.d = p.head_dim;
  c.dv = p.head_dim_v;
  c.softcap = p.softcap > 0.0f;
  c.score_scale = c.softcap ? p.scale / p.softcap : p.scale * kLog2e;
  c.cap_log2 = c.softcap ? p.softcap * kLog2e : 0.0f;
  c.dsum = nullptr;
  return c;
}

// Query-block tasks of every (sequence, query head); cost = rows x keys seen.
void query_tasks(const Ctx& c, std::vector<Task>& tasks, std::vector<int64_t>& cost) {
  const AttentionFwdParams& p = *c.p;
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo si(p, b);
    for (int i0 = 0; i0 < si.len_q; i0 += c.blk.q) {
      const int m = std::min(c.blk.q, si.len_q - i0);
      const int64_t keys = std::max(0, si.key_hi(p, i0 + m - 1) - si.key_lo(p, i0));
      for (int h = 0; h < p.num_heads; ++h) {
        tasks.push_back(Task{b, h, i0});
        cost.push_back(int64_t(m) * keys + m);
      }
    }
  }
}

// Key-block chunks per (sequence, kv head) for the one-pass backward, or 0
// for the two-pass one. Enough chunks that there are kMinTasks tasks (as
// choose_blocks), at most one per key block; two-pass when that would take
// more than kMaxChunks partial dQ copies (few kv heads and many key blocks)
// or more than kMaxPartBytes of them.
int fused_chunks(const AttentionFwdParams& p, const Blocks& blk) {
  const int64_t kMinTasks = min_tasks_bwd(p);
  constexpr int64_t kMaxChunks = 8, kMaxPartBytes = int64_t(512) << 20;
  const bool varlen = p.cu_seqlens_q != nullptr;
  int64_t max_keys = p.seqlen_k;
  if (varlen) {
    max_keys = 0;
    for (int b = 0; b < p.batch; ++b)
      max_keys = std::max<int64_t>(max_keys, p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b]);
  }
  const int64_t nkb = std::max<int64_t>(1, (max_keys + blk.k - 1) / blk.k);
  const int64_t kv_heads = int64_t(p.batch) * p.num_heads_k;
  const int64_t chunks = std::min(nkb, (kMinTasks + kv_heads - 1) / kv_heads);
  const int64_t rows =
      (varlen ? int64_t(p.cu_seqlens_q[p.batch]) : int64_t(p.batch) * p.seqlen_q) * p.num_heads;
  if (chunks > kMaxChunks || chunks * rows * p.head_dim * int64_t(sizeof(float)) > kMaxPartBytes) return 0;
  return int(chunks);
}

// Buffer for dq_part and qo_pack of the one-pass backward, kept per calling
// thread between calls up to kKeepBytes (else `temp`, freed by the caller):
// fresh multi-MiB buffers are page-faulted in on every call once glibc hands
// them back to the system (B1 H8 S1024 bf16, 2 threads: ~2000 faults per
// call, 10 ms instead of 7.6).
float* bwd_buffer(int64_t floats, std::unique_ptr<float[]>& temp) {
  constexpr int64_t kKeepBytes = int64_t(64) << 20;
  thread_local std::unique_ptr<float[]> kept;
  thread_local int64_t kept_floats = 0;
  if (floats * int64_t(sizeof(float)) > kKeepBytes) {
    temp.reset(new float[size_t(floats)]);
    return temp.get();
  }
  if (floats > kept_floats) {
    kept.reset(new float[size_t(floats)]);
    kept_floats = floats;
  }
  return kept.get();
}

// The one-pass backward: D (query-block tasks), the fused tasks, then the
// dQ reduction (query-block tasks again).
void fused_bwd(Ctx& c, int64_t rows, const std::vector<Task>& qtasks, const std::vector<int64_t>& qcost) {
  const AttentionBwdParams& p = *c.pb;
  c.part_rows = rows;
  const int64_t part_floats = int64_t(c.chunks) * rows * p.head_dim;
  std::vector<uint8_t> touched(size_t(c.chunks) * size_t(rows), 0);
  c.dq_touched = touched.data();
  // Q / dO operands packed once per query block (see Ctx::qo_pack), for the
  // bf16 dot-product path only: fp32 operands are twice the size and their
  // conversions cheap, and reading them from the pack instead of rebuilding
  // them in the L1-resident scratch was slower (fp32 causal S512, 2 threads:
  // 2.52-2.72 -> 2.95-3.2 ms; PERF_NOTES.md).
  constexpr int64_t kMaxPackBytes = int64_t(512) << 20;
  std::vector<int64_t> first(size_t(p.batch) + 1, 0);
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo si(p, b);
    first[size_t(b) + 1] = first[size_t(b)] + (si.len_q + c.blk.q - 1) / c.blk.q;
  }
#if PFA_X86
  const bool pairs = block_fn(p.dtype) == &block_avx512_bf16;
#else
  const bool pairs = false;
#endif
  c.pack_floats = pairs ? pack_floats<c10::BFloat16, uint32_t>(c) : 0;
  int64_t pack_total = first[size_t(p.batch)] * p.num_heads * c.pack_floats;
  if (pack_total * int64_t(sizeof(float)) > kMaxPackBytes) pack_total = 0;
  std::unique_ptr<float[]> temp;
  c.dq_part = bwd_buffer(part_floats + pack_total, temp);
  c.qo_pack = pack_total > 0 ? c.dq_part + part_floats : nullptr;
  c.pack_first = first.data();
  run_tasks(c, Kind::kBwdPrep, qtasks, qcost);
  std::vector<Task> tasks;
  std::vector<int64_t> cost;
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo si(p, b);
    const int owned = owned_keys(p, si);
    const int nkb = (owned + c.blk.k - 1) / c.blk.k;
    const int per = (nkb + c.chunks - 1) / c.chunks;
    for (int ch = 0; ch * per < nkb; ++ch) {
      int64_t work = 1;
      for (int kb = ch * per; kb < std::min(nkb, (ch + 1) * per); ++kb) {
        const int j0 = kb * c.blk.k;
        const int n = std::max(0, std::min(std::min(c.blk.k, owned - j0), si.len_k - j0));
        if (n > 0) {
          const int rows_seen =
              std::max(0, end_row_starting_by(p, si, j0 + n - 1) - first_row_reaching(p, si, j0));
          work += int64_t(rows_seen) * n * c.group;
        }
      }
      for (int hk = 0; hk < p.num_heads_k; ++hk) {
        tasks.push_back(Task{b, hk, ch});
        cost.push_back(work);
      }
    }
  }
  run_tasks(c, Kind::kBwdFused, tasks, cost);
  run_tasks(c, Kind::kBwdReduce, qtasks, qcost);
}

}  // namespace

void attention_fwd(const AttentionFwdParams& p) {
  if (p.batch <= 0 || p.num_heads <= 0) return;
  const Ctx c = make_ctx(p, false);
  std::vector<Task> tasks;
  std::vector<int64_t> cost;
  query_tasks(c, tasks, cost);
  run_tasks(c, Kind::kFwd, tasks, cost);
}

void attention_bwd(const AttentionBwdParams& p) {
  if (p.batch <= 0 || p.num_heads <= 0) return;
  Ctx c = make_ctx(p, true);
  c.pb = &p;
  c.chunks = fused_chunks(p, c.blk);
  // D = rowsum(dO * O) per (sequence, head, row), filled by pass 1.
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t rows =
      varlen ? int64_t(p.cu_seqlens_q[p.batch]) * p.num_heads : int64_t(p.batch) * p.num_heads * p.seqlen_q;
  std::vector<float> dsum(size_t(std::max<int64_t>(rows, 1)));
  c.dsum = dsum.data();

  std::vector<Task> tasks;
  std::vector<int64_t> cost;
  query_tasks(c, tasks, cost);
  if (c.chunks > 0) {
    fused_bwd(c, rows, tasks, cost);
    return;
  }
  run_tasks(c, Kind::kBwdDq, tasks, cost);

  // Pass 2: key blocks of every (sequence, kv head), including key rows past
  // len_k, which are zero-filled.
  tasks.clear();
  cost.clear();
  for (int b = 0; b < p.batch; ++b) {
    const SeqInfo si(p, b);
    const int owned = owned_keys(p, si);
    for (int j0 = 0; j0 < owned; j0 += c.blk.k) {
      const int n = std::max(0, std::min(std::min(c.blk.k, owned - j0), si.len_k - j0));
      int64_t work = 1;
      if (n > 0) {
        const int rows_seen =
            std::max(0, end_row_starting_by(p, si, j0 + n - 1) - first_row_reaching(p, si, j0));
        work += int64_t(rows_seen) * n * c.group;
      }
      for (int hk = 0; hk < p.num_heads_k; ++hk) {
        tasks.push_back(Task{b, hk, j0});
        cost.push_back(work);
      }
    }
  }
  run_tasks(c, Kind::kBwdDkDv, tasks, cost);
}

}  // namespace cpu
}  // namespace pyfastattn
