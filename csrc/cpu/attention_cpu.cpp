// Fused CPU attention, forward and backward, over the shared params struct
// (csrc/attention/params.h defines every field's meaning).
//
// Algorithm: FlashAttention-2 tiling with an online softmax, in fp32.
//   forward : one task per (sequence, query head, block of kBlockQ queries);
//             it walks the key tiles that its rows can see, keeps a running
//             max and sum per row, and never holds more than one key tile of
//             scores.
//   backward: pass 1, per (sequence, query head, query block): D = rowsum(dO*O)
//             and dQ; pass 2, per (sequence, kv head, key block): dK and dV,
//             looping over the query heads of the GQA group and the query rows
//             whose window reaches the block. Every output element has one
//             owner task, so the result is bit-identical for any thread count.
//
// Layout of a tile. Scores are held transposed, S^T[key][query], so that the
// per-query softmax statistics (max, sum) run down the columns: every
// elementwise step is a loop over contiguous queries, 16 per vector, with no
// horizontal reductions. The two products per tile are then
//   S^T = K Q^T          (A = key rows,       B = Q^T, packed once per block)
//   O  += P V            (A = P read by column from S^T, B = value rows)
// and the backward ones follow the same pattern (see bwd_*_block).
//
// Products: a small register-blocked GEMM (C[M x N] += A[M x K] B[K x N]).
// On AVX-512 it is written with intrinsics, in fp32 (fp32 and fp16 inputs) or
// with AVX512-BF16 dot products (bf16 inputs, fp32 accumulation); elsewhere a
// portable fp32 version is used. PyTorch's at::native::cpublas::gemm is not
// exported from libtorch_cpu (only brgemm is), and MKL sgemm reaches
// 107 GFLOP/s on one Zen 5 core against a 263 GFLOP/s FMA peak, so owning the
// inner kernel is both possible and worth it (see kMr below).
//
// Elementwise code (softmax, conversions, packing) is written as loops over
// kLanes = 16 contiguous floats with compile-time trip counts; they are
// inlined into per-ISA task functions, so one source compiles to AVX-512 in
// the AVX-512 path and to the baseline ISA in the portable path.
#include "attention_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PFA_X86_AVX512 1
#include <immintrin.h>
#else
#define PFA_X86_AVX512 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PFA_INLINE inline __attribute__((always_inline))
#define PFA_RESTRICT __restrict__
#else
#define PFA_INLINE inline
#define PFA_RESTRICT
#endif

#if PFA_X86_AVX512
// The AVX-512 path: Skylake-X and later, Zen 4 and later. F16C comes with
// every AVX-512 CPU; BF16 dot products are a separate feature (Cooper Lake,
// Sapphire Rapids, Zen 4+) and get their own attribute.
#define PFA_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define PFA_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))
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

// 2^x for x <= 127; exactly 0 below -126 (so -inf, a masked score, gives 0).
// n = round(x) by the 1.5 * 2^23 trick, f = x - n in [-0.5, 0.5], and 2^f by
// its degree-7 Taylor polynomial in f*ln2 (|f*ln2| <= 0.347): truncation error
// 0.347^8 / 8! = 5e-9 relative, below fp32 rounding, so exp2 is good to 2 ulp.
PFA_INLINE float exp2_approx(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  const float xc = std::min(std::max(x, -126.0f), 127.0f);
  const float n = (xc + kRound) - kRound;
  const float f = xc - n;
  // c_k = ln(2)^k / k!
  float p = 1.5252733804059840e-5f;
  p = p * f + 1.5403530393381608e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
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
  bool accumulate;
};

#if PFA_X86_AVX512
// Register block: kMr rows x kNv vectors of 16 columns = 24 accumulators of
// the 32 zmm registers. Measured on Zen 5 for the tile shapes used here
// (M, N, K in 64..256): 8 x 3 gives 198 GFLOP/s on one core (75% of the
// 263 GFLOP/s FMA peak) against 12 x 2: 178, 6 x 4: 190 and 8 x 2: 171.
constexpr int kMr = 8;
constexpr int kNv = 3;

PFA_AVX512 PFA_INLINE __mmask16 tail_mask(int64_t cols) {
  return cols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1u);
}

template <int MR, int NV, bool kColA>
PFA_AVX512 void micro_f32(int64_t kk, const float* a, int64_t lda, const float* b, int64_t ldb,
                          float* c, int64_t ldc, __mmask16 last, bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xFFFF);
      acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(mk, c + r * ldc + 16 * v) : _mm512_setzero_ps();
    }
  }
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
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xFFFF);
      _mm512_mask_storeu_ps(c + r * ldc + 16 * v, mk, acc[r][v]);
    }
  }
}

template <int MR, int NV, bool kColA>
PFA_AVX512_BF16 void micro_bf16(int64_t kk, const uint32_t* a, int64_t lda, const uint32_t* b,
                                int64_t ldb, float* c, int64_t ldc, __mmask16 last,
                                bool accumulate) {
  __m512 acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xFFFF);
      acc[r][v] = accumulate ? _mm512_maskz_loadu_ps(mk, c + r * ldc + 16 * v) : _mm512_setzero_ps();
    }
  }
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
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __mmask16 mk = v == NV - 1 ? last : __mmask16(0xFFFF);
      _mm512_mask_storeu_ps(c + r * ldc + 16 * v, mk, acc[r][v]);
    }
  }
}

// Function tables over (rows 1..kMr, vectors 1..kNv, A layout), so that the
// edge blocks of a product use exactly sized kernels.
template <typename E>
using MicroFn = void (*)(int64_t, const E*, int64_t, const E*, int64_t, float*, int64_t, __mmask16,
                         bool);

template <typename E, bool kColA, int MR, int NV>
constexpr MicroFn<E> micro_entry() {
  if constexpr (std::is_same<E, float>::value) {
    return &micro_f32<MR, NV, kColA>;
  } else {
    return &micro_bf16<MR, NV, kColA>;
  }
}

template <typename E, bool kColA>
struct MicroTable {
  MicroFn<E> fn[kMr][kNv];
  constexpr MicroTable() : fn() { fill<1>(); }
  template <int MR>
  constexpr void fill() {
    fill_row<MR, 1>();
    if constexpr (MR < kMr) fill<MR + 1>();
  }
  template <int MR, int NV>
  constexpr void fill_row() {
    fn[MR - 1][NV - 1] = micro_entry<E, kColA, MR, NV>();
    if constexpr (NV < kNv) fill_row<MR, NV + 1>();
  }
};

// Column panels of kNv vectors outside, row blocks of kMr inside: the B panel
// (k x 48 floats, at most 48 KiB for k = 256) stays in L1 across row blocks.
template <typename E>
PFA_AVX512 void gemm_avx512(const GemmArgs& g) {
  static constexpr MicroTable<E, false> kRow{};
  static constexpr MicroTable<E, true> kCol{};
  const MicroTable<E, false>& rt = kRow;
  const MicroTable<E, true>& ct = kCol;
  const E* a = static_cast<const E*>(g.a);
  const E* b = static_cast<const E*>(g.b);
  for (int64_t n0 = 0; n0 < g.n; n0 += 16 * kNv) {
    const int64_t cols = std::min<int64_t>(16 * kNv, g.n - n0);
    const int nv = int((cols + 15) / 16);
    const __mmask16 last = tail_mask(cols - 16 * (nv - 1));
    for (int64_t m0 = 0; m0 < g.m; m0 += kMr) {
      const int mr = int(std::min<int64_t>(kMr, g.m - m0));
      const E* ablk = g.a_col_major ? a + m0 : a + m0 * g.lda;
      const MicroFn<E> fn = g.a_col_major ? ct.fn[mr - 1][nv - 1] : rt.fn[mr - 1][nv - 1];
      fn(g.k, ablk, g.lda, b + n0, g.ldb, g.c + m0 * g.ldc + n0, g.ldc, last, g.accumulate);
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
#endif  // PFA_X86_AVX512

// Portable fp32 product: 4 x 16 register-style blocks in local arrays.
void gemm_portable(const GemmArgs& g) {
  constexpr int kR = 4;
  const float* a = static_cast<const float*>(g.a);
  const float* b = static_cast<const float*>(g.b);
  for (int64_t m0 = 0; m0 < g.m; m0 += kR) {
    const int mr = int(std::min<int64_t>(kR, g.m - m0));
    for (int64_t n0 = 0; n0 < g.n; n0 += kLanes) {
      const int nc = int(std::min<int64_t>(kLanes, g.n - n0));
      float acc[kR][kLanes] = {};
      for (int64_t k = 0; k < g.k; ++k) {
        float bv[kLanes] = {};
        for (int v = 0; v < nc; ++v) bv[v] = b[k * g.ldb + n0 + v];
        for (int r = 0; r < mr; ++r) {
          const int64_t row = m0 + r;
          const float av = g.a_col_major ? a[k * g.lda + row] : a[row * g.lda + k];
          for (int v = 0; v < kLanes; ++v) acc[r][v] += av * bv[v];
        }
      }
      for (int r = 0; r < mr; ++r) {
        float* crow = g.c + (m0 + r) * g.ldc + n0;
        for (int v = 0; v < nc; ++v) crow[v] = g.accumulate ? crow[v] + acc[r][v] : acc[r][v];
      }
    }
  }
}

// The two instruction sets. A task body is instantiated per set and compiled
// inside a function with that set's target attribute.
struct IsaPortable {
  static void gemm_f32(const GemmArgs& g) { gemm_portable(g); }
  static void gemm_bf16(const GemmArgs&) {}  // never reached: no bf16 compute here
};
#if PFA_X86_AVX512
struct IsaAvx512 {
  static void gemm_f32(const GemmArgs& g) { gemm_avx512<float>(g); }
  static void gemm_bf16(const GemmArgs& g) { gemm_avx512<uint32_t>(g); }
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
  int d2, dv2;        // pairs, bf16 compute
  float score_scale;  // raw dot -> log2 units (no softcap) or tanh argument
  float cap_log2;     // softcap * log2(e); 0 when off
  bool softcap;
  float* dsum;  // backward: D = rowsum(dO * O), indexed like lse (dense_lse_index)
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
  for (int r = 0; r < rows; ++r) {
    const T* PFA_RESTRICT s = src + r * stride;
    uint32_t* PFA_RESTRICT o = dst + r * ld;
    for (int c = 0; c < c2; ++c) o[c] = uint32_t(raw_bits(s[2 * c])) | (uint32_t(raw_bits(s[2 * c + 1])) << 16);
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

// attn_mask of a tile, transposed into log2-unit additive form: bias[j][i].
template <typename T>
PFA_INLINE void load_mask_tile(const AttentionFwdParams& p, int bi, int h, int i0, int m, int j0, int n,
                               float* bias, int64_t ld) {
  const int64_t base = int64_t(bi) * p.mask_batch_stride + int64_t(h) * p.mask_head_stride +
                       int64_t(i0) * p.mask_row_stride + j0;
  if (p.mask_kind == MaskKind::kBool) {
    const uint8_t* mk = static_cast<const uint8_t*>(p.mask) + base;
    for (int i = 0; i < m; ++i) {
      const uint8_t* row = mk + int64_t(i) * p.mask_row_stride;
      for (int j = 0; j < n; ++j) bias[j * ld + i] = row[j] ? 0.0f : -kInf;
    }
  } else {
    const T* mk = static_cast<const T*>(p.mask) + base;
    for (int i = 0; i < m; ++i) {
      const T* row = mk + int64_t(i) * p.mask_row_stride;
      for (int j = 0; j < n; ++j) bias[j * ld + i] = to_f32(row[j]) * kLog2e;
    }
  }
}

// One key row of scores, in place: t = score(raw) + bias, -inf outside the
// lanes [lane_begin, lane_end). With `dtanh` set (backward) it also stores
// 1 - tanh^2, the softcap's derivative factor. Returns nothing; the caller
// reduces. Lanes run over [0, mp).
PFA_INLINE void score_row(const Ctx& c, float* PFA_RESTRICT s, const float* PFA_RESTRICT bias,
                          float* PFA_RESTRICT dtanh, int lane_begin, int lane_end, int mp) {
  const float scale = c.score_scale, cap = c.cap_log2;
  for (int i0 = 0; i0 < mp; i0 += kLanes) {
    float* PFA_RESTRICT sv = s + i0;
    if (c.softcap) {
      for (int v = 0; v < kLanes; ++v) {
        const float th = tanh_approx(sv[v] * scale);
        sv[v] = cap * th;
        if (dtanh) dtanh[i0 + v] = 1.0f - th * th;
      }
    } else {
      for (int v = 0; v < kLanes; ++v) sv[v] *= scale;
    }
    if (bias) {
      for (int v = 0; v < kLanes; ++v) sv[v] += bias[i0 + v];
    }
    for (int v = 0; v < kLanes; ++v) {
      const int i = i0 + v;
      sv[v] = (i >= lane_begin && i < lane_end) ? sv[v] : -kInf;
    }
  }
}

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
  float* tmax;   // per-tile column max / sum, [blk.q]
  float* tsum;
  float* alpha;
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
  if (key_begin < key_end) TL::b_t(q, p.q_row_stride, m, c.d, w.qt, ldq);

  for (int j0 = key_begin; j0 < key_end; j0 += c.blk.k) {
    const int n = std::min(c.blk.k, key_end - j0);
    // S^T = K Q^T
    TL::a_rows(kbase + int64_t(j0) * p.k_row_stride, p.k_row_stride, n, c.d, w.ka);
    gemm<Isa, CT>(GemmArgs{n, m, kd, w.ka, kd, false, w.qt, ldq, w.s, ldq, false});

    const bool masked = p.mask_kind != MaskKind::kNone;
    if (masked) load_mask_tile<T>(p, t.b, h, i0, m, j0, n, w.bias, ldq);

    // Scores and their column max.
    for (int i = 0; i < mp; ++i) w.tmax[i] = -kInf;
    LaneWindow lw(rr);
    for (int j = 0; j < n; ++j) {
      lw.advance(j0 + j);
      float* PFA_RESTRICT srow = w.s + j * ldq;
      score_row(c, srow, masked ? w.bias + j * ldq : nullptr, nullptr, lw.begin(), std::min(lw.end(), m), mp);
      float* PFA_RESTRICT tmax = w.tmax;
      for (int i = 0; i < mp; ++i) tmax[i] = std::max(tmax[i], srow[i]);
    }
    // New running max; `use` is 0 for rows that are still empty so that
    // exp2(-inf - use) = 0 instead of NaN.
    {
      float* PFA_RESTRICT mrun = w.mrun;
      float* PFA_RESTRICT tmax = w.tmax;
      float* PFA_RESTRICT alpha = w.alpha;
      float* PFA_RESTRICT tsum = w.tsum;
      for (int i = 0; i < mp; ++i) {
        const float mnew = std::max(mrun[i], tmax[i]);
        const float use = mnew == -kInf ? 0.0f : mnew;
        alpha[i] = exp2_approx(mrun[i] - use);
        mrun[i] = mnew;
        tmax[i] = use;
        tsum[i] = 0.0f;
      }
    }
    // P = exp2(S - max), its column sums, and P in the product's layout.
    for (int j = 0; j < n; ++j) {
      float* PFA_RESTRICT srow = w.s + j * ldq;
      const float* PFA_RESTRICT use = w.tmax;
      float* PFA_RESTRICT tsum = w.tsum;
      for (int i = 0; i < mp; ++i) {
        const float e = exp2_approx(srow[i] - use[i]);
        srow[i] = e;
        tsum[i] += e;
      }
    }
    if constexpr (TL::kPairs) {
      uint32_t* pp = reinterpret_cast<uint32_t*>(w.ppair);
      for (int j = 0; j < n; j += 2) {
        const float* PFA_RESTRICT s0 = w.s + j * ldq;
        const float* PFA_RESTRICT s1 = s0 + ldq;
        uint32_t* PFA_RESTRICT o = pp + (j / 2) * ldq;
        if (j + 1 < n) {
          for (int i = 0; i < mp; ++i) o[i] = bf16_pair(s0[i], s1[i]);
        } else {
          for (int i = 0; i < mp; ++i) o[i] = bf16_pair(s0[i], 0.0f);
        }
      }
    }
    for (int i = 0; i < m; ++i) {
      w.lrun[i] = w.lrun[i] * w.alpha[i] + w.tsum[i];
      if (w.alpha[i] != 1.0f) {
        float* PFA_RESTRICT orow = w.oacc + int64_t(i) * c.dv;
        const float a = w.alpha[i];
        for (int x = 0; x < c.dv; ++x) orow[x] *= a;
      }
    }
    // O += P V
    TL::b_rows(vbase + int64_t(j0) * p.v_row_stride, p.v_row_stride, n, c.dv, w.vb);
    if constexpr (TL::kPairs) {
      gemm<Isa, CT>(GemmArgs{m, c.dv, (n + 1) / 2, w.ppair, ldq, true, w.vb, c.dv, w.oacc, c.dv, true});
    } else {
      gemm<Isa, CT>(GemmArgs{m, c.dv, n, w.s, ldq, true, w.vb, c.dv, w.oacc, c.dv, true});
    }
  }

  // O = acc / l and lse = ln(2) (max + log2 l); empty rows: O = 0, lse = -inf.
  T* o = static_cast<T*>(p.o) + si.q_row(i0, p.o_batch_stride, p.o_row_stride) + int64_t(h) * p.o_head_stride;
  for (int i = 0; i < m; ++i) {
    const bool empty = w.mrun[i] == -kInf || !(w.lrun[i] > 0.0f);
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
  float* pp;     // bf16 P^T / dS rows or pairs
  float* dsp;
  float* ka;     // A operand key rows   [blk.k][kdim(d)]
  float* va;     // A operand value rows [blk.k][kdim(dv)]
  float* kb;     // B operand key rows (pass 1): [blk.k][d] or VNNI
  float* bias;
  float* dtanh;  // one row of 1 - tanh^2
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
  w.qt = cv.take(d * bq);
  w.dot = cv.take(dv * bq);
  w.qb = cv.take(bq * d);
  w.dob = cv.take(bq * dv);
  w.s = cv.take(bk * bq);
  w.dp = cv.take(bk * bq);
  w.pp = cv.take(bk * bq);
  w.dsp = cv.take(bk * bq);
  w.ka = cv.take(bk * d);
  w.va = cv.take(bk * dv);
  w.kb = cv.take(bk * d);
  w.bias = cv.take(c.p->mask_kind != MaskKind::kNone ? bk * bq : 0);
  w.dtanh = cv.take(bq);
  w.acc1 = cv.take(std::max(bq, bk) * d);
  w.acc2 = cv.take(bk * dv);
  w.lse2 = cv.take(bq);
  w.dsum = cv.take(bq);
  w.lo = reinterpret_cast<int*>(cv.take(bq));
  w.hi = reinterpret_cast<int*>(cv.take(bq));
  return w;
}

// P^T and dS^T of one tile from S^T (raw) and dP^T (raw), in place:
//   P = exp2(t - lse2), dS = P (dP - D) [* (1 - tanh^2) with softcap].
// The softmax scale is applied to dQ and dK at the end.
template <typename T>
PFA_INLINE void bwd_tile_ew(const Ctx& c, const BwdScratch& w, const RowRanges& rr, int bi, int h, int i0,
                            int j0, int n, int mp) {
  const AttentionFwdParams& p = *c.p;
  const int64_t ldq = c.blk.q;
  const bool masked = p.mask_kind != MaskKind::kNone;
  if (masked) load_mask_tile<T>(p, bi, h, i0, rr.m, j0, n, w.bias, ldq);
  LaneWindow lw(rr);
  for (int j = 0; j < n; ++j) {
    lw.advance(j0 + j);
    float* PFA_RESTRICT srow = w.s + j * ldq;
    float* PFA_RESTRICT dprow = w.dp + j * ldq;
    score_row(c, srow, masked ? w.bias + j * ldq : nullptr, c.softcap ? w.dtanh : nullptr, lw.begin(),
              std::min(lw.end(), rr.m), mp);
    const float* PFA_RESTRICT lse2 = w.lse2;
    const float* PFA_RESTRICT dsum = w.dsum;
    for (int i = 0; i < mp; ++i) {
      const float e = exp2_approx(srow[i] - lse2[i]);
      srow[i] = e;
      dprow[i] = e * (dprow[i] - dsum[i]);
    }
    if (c.softcap) {
      const float* PFA_RESTRICT dt = w.dtanh;
      for (int i = 0; i < mp; ++i) dprow[i] *= dt[i];
    }
  }
}

// Per-row inputs of a query block: lse in log2 units (+inf when the row is
// empty, so P = exp2(-inf or finite - inf) = 0) and D. Returns whether any
// row has a visible key.
PFA_INLINE bool load_row_stats(const Ctx& c, const BwdScratch& w, const SeqInfo& si, int h, int i0, int m, int mp) {
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
  const int kd = TL::kdim(c.d), kdv = TL::kdim(c.dv);

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

  for (int i = 0; i < m; ++i) {
    const T* PFA_RESTRICT orow = o + int64_t(i) * p.o_row_stride;
    const T* PFA_RESTRICT grow = dout + int64_t(i) * p.do_row_stride;
    float acc = 0.0f;
    for (int x = 0; x < c.dv; ++x) acc += to_f32(orow[x]) * to_f32(grow[x]);
    c.dsum[dsum_index(c, si, h, i0 + i)] = acc;
  }

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
    gemm<Isa, CT>(GemmArgs{n, m, kd, w.ka, kd, false, w.qt, ldq, w.s, ldq, false});
    gemm<Isa, CT>(GemmArgs{n, m, kdv, w.va, kdv, false, w.dot, ldq, w.dp, ldq, false});
    bwd_tile_ew<T>(c, w, rr, t.b, h, i0, j0, n, mp);
    // dQ += dS K (A = dS read by column from dS^T).
    if constexpr (TL::kPairs) {
      uint32_t* dsp = reinterpret_cast<uint32_t*>(w.dsp);
      for (int j = 0; j < n; j += 2) {
        const float* PFA_RESTRICT d0 = w.dp + j * ldq;
        const float* PFA_RESTRICT d1 = d0 + ldq;
        uint32_t* PFA_RESTRICT out = dsp + (j / 2) * ldq;
        if (j + 1 < n) {
          for (int i = 0; i < mp; ++i) out[i] = bf16_pair(d0[i], d1[i]);
        } else {
          for (int i = 0; i < mp; ++i) out[i] = bf16_pair(d0[i], 0.0f);
        }
      }
      TL::b_rows(krows, p.k_row_stride, n, c.d, w.kb);
      gemm<Isa, CT>(GemmArgs{m, c.d, (n + 1) / 2, w.dsp, ldq, true, w.kb, c.d, w.acc1, c.d, true});
    } else {
      gemm<Isa, CT>(GemmArgs{m, c.d, n, w.dp, ldq, true, w.ka, c.d, w.acc1, c.d, true});
    }
  }

  T* dq = static_cast<T*>(p.dq) + si.q_row(i0, p.dq_batch_stride, p.dq_row_stride) + int64_t(h) * p.dq_head_stride;
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
  const int kd = TL::kdim(c.d), kdv = TL::kdim(c.dv);

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
        gemm<Isa, CT>(GemmArgs{n, m, kd, w.ka, kd, false, w.qt, ldq, w.s, ldq, false});
        gemm<Isa, CT>(GemmArgs{n, m, kdv, w.va, kdv, false, w.dot, ldq, w.dp, ldq, false});
        bwd_tile_ew<T>(c, w, rr, t.b, h, i0, j0, n, mp);
        // dV += P^T dO, dK += dS^T Q (K axis = query rows).
        TL::b_rows(dout, p.do_row_stride, m, c.dv, w.dob);
        TL::b_rows(q, p.q_row_stride, m, c.d, w.qb);
        if constexpr (TL::kPairs) {
          // Rows of P^T / dS^T as bf16 pairs along the query axis; lanes past
          // m are 0 (P = 0 there), so an odd m pads with zero.
          const int m2 = (m + 1) / 2;
          uint32_t* pp = reinterpret_cast<uint32_t*>(w.pp);
          uint32_t* dsp = reinterpret_cast<uint32_t*>(w.dsp);
          for (int j = 0; j < n; ++j) {
            const float* PFA_RESTRICT srow = w.s + j * ldq;
            const float* PFA_RESTRICT drow = w.dp + j * ldq;
            uint32_t* PFA_RESTRICT po = pp + j * (ldq / 2);
            uint32_t* PFA_RESTRICT dso = dsp + j * (ldq / 2);
            for (int i = 0; i < mp / 2; ++i) {
              po[i] = bf16_pair(srow[2 * i], srow[2 * i + 1]);
              dso[i] = bf16_pair(drow[2 * i], drow[2 * i + 1]);
            }
          }
          gemm<Isa, CT>(GemmArgs{n, c.dv, m2, w.pp, ldq / 2, false, w.dob, c.dv, w.acc2, c.dv, true});
          gemm<Isa, CT>(GemmArgs{n, c.d, m2, w.dsp, ldq / 2, false, w.qb, c.d, w.acc1, c.d, true});
        } else {
          gemm<Isa, CT>(GemmArgs{n, c.dv, m, w.s, ldq, false, w.dob, c.dv, w.acc2, c.dv, true});
          gemm<Isa, CT>(GemmArgs{n, c.d, m, w.dp, ldq, false, w.qb, c.d, w.acc1, c.d, true});
        }
      }
    }
  }

  T* dk = static_cast<T*>(p.dk) + si.k_row(j0, p.dk_batch_stride, p.dk_row_stride) + int64_t(hk) * p.dk_head_stride;
  T* dv = static_cast<T*>(p.dv) + si.k_row(j0, p.dv_batch_stride, p.dv_row_stride) + int64_t(hk) * p.dv_head_stride;
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

// ---------------------------------------------------------------------------
// Per-ISA task entry points. The bodies above are always_inline, so each
// instantiation here is compiled for its target.
// ---------------------------------------------------------------------------

enum class Kind { kFwd, kBwdDq, kBwdDkDv };

template <class Isa, typename T, typename CT>
PFA_INLINE void run_block(Kind kind, const Ctx& c, float* scratch, const Task& t) {
  Carver cv(scratch);
  if (kind == Kind::kFwd) {
    fwd_block<Isa, T, CT>(c, carve_fwd(cv, c), t);
  } else if (kind == Kind::kBwdDq) {
    bwd_dq_block<Isa, T, CT>(c, carve_bwd(cv, c), t);
  } else {
    bwd_dkdv_block<Isa, T, CT>(c, carve_bwd(cv, c), t);
  }
}

using BlockFn = void (*)(Kind, const Ctx&, float*, const Task&);

template <typename T>
void block_portable(Kind kind, const Ctx& c, float* scratch, const Task& t) {
  run_block<IsaPortable, T, float>(kind, c, scratch, t);
}
#if PFA_X86_AVX512
template <typename T, typename CT>
PFA_AVX512 void block_avx512(Kind kind, const Ctx& c, float* scratch, const Task& t) {
  run_block<IsaAvx512, T, CT>(kind, c, scratch, t);
}
#endif

template <typename T>
BlockFn pick_block_fn() {
#if PFA_X86_AVX512
  if (std::is_same<T, c10::BFloat16>::value && cpu_has_avx512_bf16()) return &block_avx512<T, uint32_t>;
  if (cpu_has_avx512()) return &block_avx512<T, float>;
#endif
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
  } else {
    carve_bwd(cv, c);
  }
  return cv.used();
}

// Runs tasks in order of decreasing estimated cost (longest first), handed
// out one at a time from a shared counter, so causal blocks balance across
// threads. The order only affects which thread runs a task, never its result.
void run_tasks(const Ctx& c, Kind kind, std::vector<Task>& tasks, std::vector<int64_t>& cost) {
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

// Block sizes. Query rows per task: 64 when that still yields >= 4 tasks per
// thread, else smaller so short sequences spread over the threads. Keys per
// tile: 256. See PERF notes at the top of the file for the measurements.
Blocks choose_blocks(const AttentionFwdParams& p) {
  Blocks b;
  b.q = 64;
  b.k = 256;
  const int64_t rows = int64_t(p.batch) * p.num_heads * p.seqlen_q;
  const int64_t threads = at::get_num_threads();
  while (b.q > kLanes && rows / b.q < 4 * threads) b.q /= 2;
  return b;
}

Ctx make_ctx(const AttentionFwdParams& p) {
  Ctx c{};
  c.p = &p;
  c.pb = nullptr;
  c.blk = choose_blocks(p);
  c.group = p.num_heads / p.num_heads_k;
  c.d = p.head_dim;
  c.dv = p.head_dim_v;
  c.d2 = (c.d + 1) / 2;
  c.dv2 = (c.dv + 1) / 2;
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

}  // namespace

void attention_fwd(const AttentionFwdParams& p) {
  if (p.batch <= 0 || p.num_heads <= 0) return;
  const Ctx c = make_ctx(p);
  std::vector<Task> tasks;
  std::vector<int64_t> cost;
  query_tasks(c, tasks, cost);
  run_tasks(c, Kind::kFwd, tasks, cost);
}

void attention_bwd(const AttentionBwdParams& p) {
  if (p.batch <= 0 || p.num_heads <= 0) return;
  Ctx c = make_ctx(p);
  c.pb = &p;
  // D = rowsum(dO * O) per (sequence, head, row), filled by pass 1.
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int64_t rows = varlen ? int64_t(p.cu_seqlens_q[p.batch]) * p.num_heads
                              : int64_t(p.batch) * p.num_heads * p.seqlen_q;
  std::vector<float> dsum(size_t(std::max<int64_t>(rows, 1)));
  c.dsum = dsum.data();

  std::vector<Task> tasks;
  std::vector<int64_t> cost;
  query_tasks(c, tasks, cost);
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
        const int rows_seen = std::max(0, end_row_starting_by(p, si, j0 + n - 1) - first_row_reaching(p, si, j0));
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
