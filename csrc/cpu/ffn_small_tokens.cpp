// The FFN forward at decode sizes (a few tokens), fused: see ffn_small_tokens.h.
//
// Why a kernel of its own. At T <= 16 tokens, bf16 gated D1024 F2816, the
// weights are 17.3 MB per call and the arithmetic 2 T 8.65M = 277 MFLOP: at
// this box's 33-45 GB/s the call is bound by reading the weights once
// (~0.45 ms), and the arithmetic needs about half the bf16 dot-product peak
// in that time. ATen's GEMMs (the op's path for larger T) plus the
// elementwise pass ran at 0.91-0.95x eager there (issue 21).
//
// What it does. nn.Linear weights are [out, in] row-major, so each output
// feature's weights are one contiguous row, and a feature's value for a
// token is a dot product of that row with the token's input row:
//   layer 1: tasks of kFeatBlock features; for each block of rows of W1
//            (and W3), every token's dot products, in fp32 registers; the
//            task's pre-activations [T, kFeatBlock] stay in a stack array,
//            get the bias and the activation (and the gate product) there
//            (ffn_act_fp32, the FFN step's vectorised code) and are written
//            once into h [T, d_ff] (packed for the broadcast form), a
//            per-call buffer held by the calling thread (bf16 for bf16
//            inputs, else fp32; 90 KB at T16 F2816 bf16: it stays in L2
//            for layer 2).
//   layer 2: tasks of kOutBlock rows of W2, the same dot products against
//            h's rows, + b2, rounded once into y.
// at::parallel_for hands each thread one contiguous range of tasks, so the
// two cores stream disjoint, contiguous stretches of every weight matrix.
// Every output element is one dot product computed by one thread in one
// fixed order (lanes over the reduced dimension, then a fixed tree; in the
// broadcast form each lane's steps in order): the result does not depend
// on the thread count.
//
// The dot-product tile (AVX-512). R weight rows x TT tokens (8 x 2; 8 x 1 for
// one token), one 512-bit accumulator per pair, the reduced dimension in
// steps of one vector: per step R weight loads + TT token loads feed R TT
// multiply-adds (vdpbf16ps for bf16: 32 products each). Each weight line
// comes from memory once, for the first token tile, and from L1 for the
// others; the token rows (T16 x D1024 bf16 = 32 KB, copied with padded rows)
// stay in L1/L2. The token tiles of a block share the software prefetch of
// the block two ahead. Rows and tokens past the end repeat the last valid
// one (results dropped); the reduced dimension's tail is a masked
// (zero-filled) load. The sums leave the registers through a
// transpose-and-add tree, four accumulators to one xmm. The dot-product
// tiles run T = 1-2 (bf16, fp16), 1-7 (fp32) and 17-32; 3 (fp32: 8) to 16
// tokens take the broadcast form instead (below its own comment): the
// tiles re-read each weight line from L1 once per token tile and were
// compute-bound at T16 with the memory time added on top (PERF_NOTES.md).
#include "ffn_small_tokens.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "ffn_cpu.h"
#include "simd.h"

namespace pyfastattn {
namespace cpu {
namespace {

constexpr int64_t kFeatBlock = 64;  // layer-1 features per task (44 tasks at F2816)
constexpr int64_t kOutBlock = 32;   // layer-2 outputs per task (32 tasks at D1024)
// Tiles (weight rows x tokens): AVX-512 8 x 2 for T >= 2 (measured against
// 4 x 4: bf16 T16 1.83 vs 2.07 ms, T8 1.51 vs 1.85; fp32 T16 4.04 vs 4.38,
// one thread: eight weight rows in flight keep more lines coming from
// memory), 8 x 1 for T = 1; the generic code's 4 x 2 (x 16 lanes: AVX2 has
// 16 ymm registers).
constexpr int kWideRows = 8, kWideTokens = 2;
constexpr int kGenericRows = 4, kGenericTokens = 2;
constexpr int kOneRows = 8;
// How many row blocks ahead of the one being computed the tiles prefetch
// (bf16 T16, one thread: 1.83 ms with 2 or 8, 1.99 with none).
constexpr int64_t kPrefetchBlocks = 2;

// c[t * ldc + (r - r0)] = sum_i a[t][i] w[r][i] for t < tokens, r in [r0, r1):
// a [tokens, k] rows lda apart, w rows ldw apart (elements).
struct DotRows {
  const void* a;
  int64_t lda, tokens;
  const void* w;
  int64_t ldw, r0, r1, k;
  float* c;
  int64_t ldc;
  int64_t pf_blocks;  // prefetch this many row blocks ahead (0: none)
  int64_t pf_end;     // rows of w that exist (prefetches stop there, not at r1)
};
using RowsFn = void (*)(const DotRows&);

struct RowsSet {
  RowsFn many;  // T >= 2
  RowsFn one;   // T = 1
};

// The loop over row blocks and token tiles, around a Tile policy:
//   Tile::A, Tile::B              element types of a and w
//   Tile::run<R, TT>(a, b, k, pf, pf_ld, pf_rows, out, ldo)
//     out[t * ldo + r] = sum_i a[t][i] b[r][i] (TT token and R weight row
//     pointers), prefetching pf_rows rows pf_ld bytes apart from pf.
// Rows and tokens past the end repeat the last valid one; such edge tiles
// go through a small buffer, full ones store straight into c.
template <class Tile, int R, int TT>
PFA_INLINE void rows_loop(const DotRows& d) {
  using A = typename Tile::A;
  using B = typename Tile::B;
  const A* abase = static_cast<const A*>(d.a);
  const B* wbase = static_cast<const B*>(d.w);
  // The token tiles of a row block share the prefetching of the block
  // pf_blocks ahead: pass j asks for rows [j pf_rows, (j + 1) pf_rows) of
  // it, one line per row per step, so the requests spread evenly over the
  // block's compute instead of bunching in its first pass.
  const int64_t passes = (d.tokens + TT - 1) / TT;
  const int64_t pf_rows = (R + passes - 1) / passes;
  const int64_t pf_ld = d.ldw * int64_t(sizeof(B));
  alignas(64) float edge[R * TT];
  for (int64_t r = d.r0; r < d.r1; r += R) {
    const int64_t nr = std::min<int64_t>(R, d.r1 - r);
    const B* b[R];
    for (int rr = 0; rr < R; ++rr) b[rr] = wbase + (r + std::min<int64_t>(rr, nr - 1)) * d.ldw;
    const int64_t pf_block = r + d.pf_blocks * R;
    for (int64_t t = 0, pass = 0; t < d.tokens; t += TT, ++pass) {
      const int64_t nt = std::min<int64_t>(TT, d.tokens - t);
      const A* a[TT];
      for (int tt = 0; tt < TT; ++tt) a[tt] = abase + (t + std::min<int64_t>(tt, nt - 1)) * d.lda;
      const int64_t first = pf_block + pass * pf_rows;
      const int64_t pf_last = std::min(d.pf_end, pf_block + R);  // one past the block's last row
      const int64_t n_pf = d.pf_blocks > 0 ? std::max<int64_t>(0, std::min(pf_rows, pf_last - first)) : 0;
      const char* pf = n_pf > 0 ? reinterpret_cast<const char*>(wbase + first * d.ldw) : nullptr;
      const bool full = nr == R && nt == TT;
      float* out = full ? d.c + t * d.ldc + (r - d.r0) : edge;
      Tile::template run<R, TT>(a, b, d.k, pf, pf_ld, int(n_pf), out, full ? d.ldc : R);
      if (!full) {
        for (int64_t tt = 0; tt < nt; ++tt)
          for (int64_t rr = 0; rr < nr; ++rr) d.c[(t + tt) * d.ldc + (r - d.r0) + rr] = edge[tt * R + rr];
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Portable (and AVX2, by gcc's vectoriser): 16 fp32 lanes per accumulator.
// ---------------------------------------------------------------------------

PFA_INLINE float to_float(float v) { return v; }
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};
PFA_INLINE float to_float(Bf16 v) { return bf16_bits_to_f32(v.bits); }
PFA_INLINE float to_float(F16 v) { return f16_bits_to_f32(v.bits); }

// Sum of 16 lanes in a fixed tree (8 + 4 + 2 + 1 pairs).
PFA_INLINE float lane_sum(const float* v) {
  float s[kLanes];
  for (int i = 0; i < kLanes; ++i) s[i] = v[i];
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) s[i] += s[i + w];
  return s[0];
}

template <class AT, class BT>
struct GenericTile {
  using A = AT;
  using B = BT;
  template <int R, int TT>
  PFA_INLINE static void run(const A* const* a, const B* const* b, int64_t k, const char*, int64_t,
                             int, float* out, int64_t ldo) {
    float acc[R][TT][kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= k; i += kLanes) {
      for (int r = 0; r < R; ++r) {
        float bv[kLanes];
        for (int l = 0; l < kLanes; ++l) bv[l] = to_float(b[r][i + l]);
        for (int t = 0; t < TT; ++t)
          for (int l = 0; l < kLanes; ++l) acc[r][t][l] += to_float(a[t][i + l]) * bv[l];
      }
    }
    for (int l = 0; i + l < k; ++l)
      for (int r = 0; r < R; ++r)
        for (int t = 0; t < TT; ++t) acc[r][t][l] += to_float(a[t][i + l]) * to_float(b[r][i + l]);
    for (int t = 0; t < TT; ++t)
      for (int r = 0; r < R; ++r) out[t * ldo + r] = lane_sum(acc[r][t]);
  }
};

#define PFA_GENERIC_ROWS(SUFFIX, ATTR)                               \
  template <class Tile, int R, int TT>                               \
  ATTR __attribute__((flatten)) void rows_##SUFFIX(const DotRows& d) { \
    rows_loop<Tile, R, TT>(d);                                       \
  }

PFA_GENERIC_ROWS(portable, )
#if PFA_X86 && defined(__GNUC__) && !defined(__clang__)
#define PFA_SMALL_TOKENS_AVX2 1
PFA_GENERIC_ROWS(avx2, PFA_AVX2)
#else
#define PFA_SMALL_TOKENS_AVX2 0
#endif
#undef PFA_GENERIC_ROWS

template <class A, class B>
RowsSet generic_rows(bool avx2) {
  using T = GenericTile<A, B>;
#if PFA_SMALL_TOKENS_AVX2
  if (avx2) return {&rows_avx2<T, kGenericRows, kGenericTokens>, &rows_avx2<T, kOneRows, 1>};
#endif
  (void)avx2;
  return {&rows_portable<T, kGenericRows, kGenericTokens>, &rows_portable<T, kOneRows, 1>};
}

// ---------------------------------------------------------------------------
// AVX-512. One "Ops" struct per (token, weight) element pair: a step of the
// reduced dimension, the loads (full and masked tail), the multiply-add.
// Every member is an inline function with its target attribute (never a raw
// intrinsic in the neutral template below): `flatten` inlines them into the
// per-target row functions.
// ---------------------------------------------------------------------------

#if PFA_X86

// fp32 tokens, fp32 weights.
struct OpsF32 {
  using A = float;
  using B = float;
  using AV = __m512;
  using BV = __m512;
  using Mask = __mmask16;
  static constexpr int kStep = 16;
  PFA_AVX512 static inline Mask tail(int64_t n) { return Mask((1u << n) - 1u); }
  PFA_AVX512 static inline AV load_a(const A* p) { return _mm512_loadu_ps(p); }
  PFA_AVX512 static inline AV load_a(const A* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  PFA_AVX512 static inline BV load_b(const B* p) { return _mm512_loadu_ps(p); }
  PFA_AVX512 static inline BV load_b(const B* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  PFA_AVX512 static inline __m512 madd(__m512 acc, AV a, BV b) { return _mm512_fmadd_ps(a, b, acc); }
};

// fp32 tokens (converted once), fp16 weights converted per load (vcvtph2ps).
struct OpsF16 {
  using A = float;
  using B = uint16_t;
  using AV = __m512;
  using BV = __m512;
  using Mask = __mmask16;
  static constexpr int kStep = 16;
  PFA_AVX512 static inline Mask tail(int64_t n) { return Mask((1u << n) - 1u); }
  PFA_AVX512 static inline AV load_a(const A* p) { return _mm512_loadu_ps(p); }
  PFA_AVX512 static inline AV load_a(const A* p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
  PFA_AVX512 static inline BV load_b(const B* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  PFA_AVX512 static inline BV load_b(const B* p, Mask m) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
  PFA_AVX512 static inline __m512 madd(__m512 acc, AV a, BV b) { return _mm512_fmadd_ps(a, b, acc); }
};

// bf16 both, widened to fp32 (AVX-512 without the BF16 extension).
struct OpsBf16Wide {
  using A = uint16_t;
  using B = uint16_t;
  using AV = __m512;
  using BV = __m512;
  using Mask = __mmask16;
  static constexpr int kStep = 16;
  PFA_AVX512 static inline __m512 widen(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  PFA_AVX512 static inline Mask tail(int64_t n) { return Mask((1u << n) - 1u); }
  PFA_AVX512 static inline AV load_a(const A* p) {
    return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  PFA_AVX512 static inline AV load_a(const A* p, Mask m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
  PFA_AVX512 static inline BV load_b(const B* p) { return load_a(p); }
  PFA_AVX512 static inline BV load_b(const B* p, Mask m) { return load_a(p, m); }
  PFA_AVX512 static inline __m512 madd(__m512 acc, AV a, BV b) { return _mm512_fmadd_ps(a, b, acc); }
};

// bf16 both, vdpbf16ps: lane l gets a[2l] b[2l] + a[2l+1] b[2l+1].
struct OpsBf16Dot {
  using A = uint16_t;
  using B = uint16_t;
  using AV = __m512bh;
  using BV = __m512bh;
  using Mask = __mmask32;
  static constexpr int kStep = 32;
  PFA_AVX512_BF16 static inline Mask tail(int64_t n) { return Mask((uint64_t(1) << n) - 1u); }
  PFA_AVX512_BF16 static inline AV load_a(const A* p) { return (__m512bh)_mm512_loadu_si512(p); }
  PFA_AVX512_BF16 static inline AV load_a(const A* p, Mask m) {
    return (__m512bh)_mm512_maskz_loadu_epi16(m, p);
  }
  PFA_AVX512_BF16 static inline BV load_b(const B* p) { return load_a(p); }
  PFA_AVX512_BF16 static inline BV load_b(const B* p, Mask m) { return load_a(p, m); }
  PFA_AVX512_BF16 static inline __m512 madd(__m512 acc, AV a, BV b) { return _mm512_dpbf16_ps(acc, a, b); }
};

// What every AVX-512 tile shares: zero, and the exit of four
// accumulators' lane sums as one xmm (pairs interleaved and added, then the
// 128-bit lanes added: a fixed order).
struct Avx512 {
  PFA_AVX512 static inline __m512 zero() { return _mm512_setzero_ps(); }
  PFA_AVX512 static inline void store_sum4(float* out, __m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(s), _mm512_extractf32x8_ps(s, 1));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }
};

// R weight rows x TT tokens, one zmm accumulator each; one step of the
// reduced dimension loads R weight vectors and TT token vectors and does
// R TT multiply-adds. kPf: software prefetch into L2 (prefetcht2) of the
// block pf_blocks ahead, one 64-byte line per row per step for fp32 and bf16
// weights (fp16 asks for each line twice; a prefetch of a present line is
// nearly free); without it the tiles run on the hardware prefetchers alone.
// Which one runs is the CPU generation's (cpu_stream_prefetch_to_l2, simd.h):
// on Zen 4 the L2 prefetches took bf16 T1 from 1.35-1.40 to 0.96-1.09 ms on
// one thread and 0.74-0.85 to 0.54-0.61 on two; on Zen 5 a T0 prefetch here
// was slower (T1 0.55 -> 0.61 ms, T2 0.61 -> 0.69, fp32 T1 0.95 -> 1.21;
// PERF_NOTES.md), so the tiles there go without (an earlier form of this
// prefetch, through _mm_prefetch in a target-attributed helper, was silently
// dropped by gcc 12 inside this neutral template: __builtin_prefetch is not).
template <class Ops, bool kPf>
struct Avx512Tile {
  using A = typename Ops::A;
  using B = typename Ops::B;
  template <int R, int TT>
  PFA_INLINE static void run(const A* const* a, const B* const* b, int64_t k, const char* pf,
                             int64_t pf_ld, int pf_rows, float* out, int64_t ldo) {
    static_assert(R % 4 == 0, "rows leave the registers four at a time");
    constexpr int S = Ops::kStep;
    __m512 acc[R][TT];
    #pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
      #pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) acc[r][t] = Avx512::zero();
    int64_t i = 0;
    for (; i + S <= k; i += S) {
      if (kPf && pf != nullptr) {
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r)
          if (r < pf_rows) __builtin_prefetch(pf + r * pf_ld + i * int64_t(sizeof(B)), 0, 1);
      }
      typename Ops::BV bv[R];
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) bv[r] = Ops::load_b(b[r] + i);
      #pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) {
        const typename Ops::AV av = Ops::load_a(a[t] + i);
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) acc[r][t] = Ops::madd(acc[r][t], av, bv[r]);
      }
    }
    if (i < k) {
      const typename Ops::Mask m = Ops::tail(k - i);
      typename Ops::BV bv[R];
      #pragma GCC unroll 16
      for (int r = 0; r < R; ++r) bv[r] = Ops::load_b(b[r] + i, m);
      #pragma GCC unroll 16
      for (int t = 0; t < TT; ++t) {
        const typename Ops::AV av = Ops::load_a(a[t] + i, m);
        #pragma GCC unroll 16
        for (int r = 0; r < R; ++r) acc[r][t] = Ops::madd(acc[r][t], av, bv[r]);
      }
    }
    #pragma GCC unroll 16
    for (int t = 0; t < TT; ++t)
      #pragma GCC unroll 16
      for (int r = 0; r < R; r += 4)
        Avx512::store_sum4(out + t * ldo + r, acc[r][t], acc[r + 1][t], acc[r + 2][t], acc[r + 3][t]);
  }
};

template <class Tile, int R, int TT>
PFA_AVX512 __attribute__((flatten)) void rows_avx512(const DotRows& d) {
  rows_loop<Tile, R, TT>(d);
}
template <class Tile, int R, int TT>
PFA_AVX512_BF16 __attribute__((flatten)) void rows_avx512_bf16(const DotRows& d) {
  rows_loop<Tile, R, TT>(d);
}

template <class Ops, bool kPf>
RowsSet avx512_rows() {
  using T = Avx512Tile<Ops, kPf>;
  return {&rows_avx512<T, kWideRows, kWideTokens>, &rows_avx512<T, kOneRows, 1>};
}
template <class Ops>
RowsSet avx512_rows() {
  return cpu_stream_prefetch_to_l2() ? avx512_rows<Ops, true>() : avx512_rows<Ops, false>();
}
// The same for the BF16 dot products (their tiles need the BF16 target).
template <class Ops, bool kPf>
RowsSet avx512_bf16_rows() {
  using T = Avx512Tile<Ops, kPf>;
  return {&rows_avx512_bf16<T, kWideRows, kWideTokens>, &rows_avx512_bf16<T, kOneRows, 1>};
}

// ---------------------------------------------------------------------------
// The broadcast form (bcast_min_tokens <= T <= 16; written for bf16 and
// vdpbf16ps, below; fp32 and fp16 weights the same with one fp32 element per
// lane in place of a pair and vfmadd231ps). The
// 16 lanes of a vector are 16 / G tokens x G consecutive pairs of the
// reduced dimension (G = 1 for 9-16 tokens, 2 for 5-8, 4 for up to 4). The
// token side is packed once per call: apack[j][t G + q] holds token t's
// pair j G + q (elements 2 (j G + q), +1; tokens past T and elements past k
// are zero), so one vector holds every token's step j (2 G elements). A
// weight row's step j, 4 G bytes, broadcast to all 16 / G token groups
// (G = 1: the {1to16} memory operand of vdpbf16ps; 2: vpbroadcastq; 4:
// vbroadcasti32x4), then
//   acc[r] += vdpbf16ps(apack[j], broadcast of W[r, 2 G j .. 2 G j + 2 G))
// gives each of R rows one step for every token: per step one token load
// serves R multiply-adds, each weight element is read once (every row in
// address order), and there are no horizontal sums over the reduced
// dimension: lane t G + q sums token t's pairs q, G + q, 2 G + q, ... in
// order, and the G lanes of a token are added at the end in a fixed order.
// ---------------------------------------------------------------------------

constexpr int kBcastRows = 16;  // weight rows (accumulators) per block
constexpr int64_t kFlushLines = 8;  // row-buffer lines summed in registers before tmp

struct BcastRows {
  const uint32_t* a;  // packed [steps][16], steps = ceil(k / (G kE))
  const void* w;      // rows ldw apart (elements)
  int64_t ldw, r0, r1, k;
  float* c;  // c[t * ldc + (r - r0)], t < tokens
  int64_t ldc, tokens;
  int64_t pf_end;  // rows of w that exist (the next block's prefetch stops there)
};

// What the broadcast form does per element type. A lane is 4 bytes of the
// token side: a bf16 pair (kE = 2 elements, vdpbf16ps) or one fp32 element
// (kE = 1, vfmadd231ps; fp16 weights are widened to fp32 when their line is
// copied into the row buffer). A step is G lanes of every token; a row
// buffer line is 16 lanes, 16 kE elements of the row.
//   madd_buf<G>(acc, x, p): acc += x * (the 4 G bytes at p, broadcast)
//   madd(acc, x, w):        acc += x * w (w already broadcast)
//   copy_line(src, dst):    16 lanes of a row into the row buffer
//   group<G>(row, e, k):    elements [e, min(e + G kE, k)) of a row as G
//                           lanes, zero past k, broadcast to 16 lanes
struct BcastBf16 {
  using W = uint16_t;
  static constexpr int kE = 2;
  // The {1to16} broadcast as vdpbf16ps's memory operand: gcc keeps
  // _mm512_set1_epi32 of a load a separate vpbroadcastd.
  PFA_AVX512_BF16 static inline __m512 madd_mem32(__m512 acc, __m512i x, const int32_t* p) {
    asm("vdpbf16ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(x), "m"(*p));
    return acc;
  }
  PFA_AVX512_BF16 static inline __m512 madd(__m512 acc, __m512i x, __m512i w) {
    return _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)w);
  }
  PFA_AVX512_BF16 static inline void copy_line(const W* src, int32_t* dst) {
    _mm512_store_si512(dst, _mm512_loadu_si512(src));
  }
  PFA_AVX512_BF16 static inline __m128i load_elems(const W* p, int64_t n) {
    return _mm_maskz_loadu_epi16(__mmask8((1u << n) - 1u), p);
  }
};

struct BcastF32 {
  using W = float;
  static constexpr int kE = 1;
  PFA_AVX512 static inline __m512 madd_mem32(__m512 acc, __m512i x, const int32_t* p) {
    const __m512 xf = _mm512_castsi512_ps(x);
    asm("vfmadd231ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(xf), "m"(*p));
    return acc;
  }
  PFA_AVX512 static inline __m512 madd(__m512 acc, __m512i x, __m512i w) {
    return _mm512_fmadd_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(w), acc);
  }
  PFA_AVX512 static inline void copy_line(const W* src, int32_t* dst) {
    _mm512_store_si512(dst, _mm512_loadu_si512(src));
  }
  PFA_AVX512 static inline __m128i load_elems(const W* p, int64_t n) {
    return _mm_castps_si128(_mm_maskz_loadu_ps(__mmask8((1u << n) - 1u), p));
  }
};

struct BcastF16 {
  using W = uint16_t;
  static constexpr int kE = 1;
  PFA_AVX512 static inline __m512 madd_mem32(__m512 acc, __m512i x, const int32_t* p) {
    return BcastF32::madd_mem32(acc, x, p);
  }
  PFA_AVX512 static inline __m512 madd(__m512 acc, __m512i x, __m512i w) { return BcastF32::madd(acc, x, w); }
  PFA_AVX512 static inline void copy_line(const W* src, int32_t* dst) {
    _mm512_store_ps(dst, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))));
  }
  PFA_AVX512 static inline __m128i load_elems(const W* p, int64_t n) {  // n <= 4
    return _mm_castps_si128(_mm_cvtph_ps(_mm_maskz_loadu_epi16(__mmask8((1u << n) - 1u), p)));
  }
};

// The raw AVX-512 steps of the broadcast form's loop, as attribute-bearing
// inline functions (the loop itself is a neutral template that `flatten`
// inlines into each target's function, like the dot-product tiles').
struct Bc {
  PFA_AVX512 static inline __m512 zero() { return _mm512_setzero_ps(); }
  PFA_AVX512 static inline __m512i load(const uint32_t* p) { return _mm512_load_si512(p); }
  PFA_AVX512 static inline void store(float* p, __m512 v) { _mm512_store_ps(p, v); }
  PFA_AVX512 static inline void add_into(float* p, __m512 v) {
    _mm512_store_ps(p, _mm512_add_ps(_mm512_load_ps(p), v));
  }
  // The 4 G bytes at p (G = 2, 4) broadcast to 16 lanes.
  template <int G>
  PFA_AVX512 static inline __m512i bcast_buf(const int32_t* p) {
    if (G == 2) {
      int64_t v;
      std::memcpy(&v, p, 8);
      return _mm512_set1_epi64(v);
    }
    return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  // v's first G lanes broadcast to 16.
  template <int G>
  PFA_AVX512 static inline __m512i bcast_lanes(__m128i v) {
    if (G == 1) return _mm512_broadcastd_epi32(v);
    if (G == 2) return _mm512_broadcastq_epi64(v);
    return _mm512_broadcast_i32x4(v);
  }
};

// A block's results out of the registers: row rr's lane l (token l / G's
// lane l % G) is lane l of acc[rr] + tmp[rr], so a 16 x 16 transpose
// (unpack ps, unpack pd, two rounds of 128-bit lane shuffles: 64 shuffles)
// gives lane l of the 16 rows as one vector; token t's G of them are added,
// (v0 + v1) + (v2 + v3) for G = 4, and stored masked into c[t * ldc + rr],
// rr < nr. This replaced tmp stores + 16 gathers, which waited for the
// stores: for G = 1 first, then for G = 2 and 4 (PERF_NOTES.md).
struct BcT {
  PFA_AVX512 static inline __m512 add(__m512 a, const float* p) { return _mm512_add_ps(a, _mm512_load_ps(p)); }
  PFA_AVX512 static inline __m512 add2(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
  PFA_AVX512 static inline __m512 lo_ps(__m512 a, __m512 b) { return _mm512_unpacklo_ps(a, b); }
  PFA_AVX512 static inline __m512 hi_ps(__m512 a, __m512 b) { return _mm512_unpackhi_ps(a, b); }
  PFA_AVX512 static inline __m512 lo_pd(__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  }
  PFA_AVX512 static inline __m512 hi_pd(__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  }
  PFA_AVX512 static inline __m512 even128(__m512 a, __m512 b) { return _mm512_shuffle_f32x4(a, b, 0x88); }
  PFA_AVX512 static inline __m512 odd128(__m512 a, __m512 b) { return _mm512_shuffle_f32x4(a, b, 0xDD); }
  PFA_AVX512 static inline void store(float* p, __mmask16 keep, __m512 v) { _mm512_mask_storeu_ps(p, keep, v); }
};

// o[c] lane i = r[i] lane c (32-bit lanes; shuffles only, bits unchanged).
PFA_INLINE void transpose16(const __m512* r, __m512* o) {
  __m512 t[16], u[16];
  #pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // t[2i]: r0 r1 interleaved, columns 4L, 4L+1; t[2i+1]: 4L+2, 4L+3
    t[2 * i] = BcT::lo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = BcT::hi_ps(r[2 * i], r[2 * i + 1]);
  }
  #pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // u[4i + k]: rows 4i .. 4i+3 of column 4L + k in 128-bit lane L
    u[4 * i + 0] = BcT::lo_pd(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = BcT::hi_pd(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = BcT::lo_pd(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = BcT::hi_pd(t[4 * i + 1], t[4 * i + 3]);
  }
  #pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    const __m512 v0 = BcT::even128(u[k], u[4 + k]), w0 = BcT::odd128(u[k], u[4 + k]);
    const __m512 v1 = BcT::even128(u[8 + k], u[12 + k]), w1 = BcT::odd128(u[8 + k], u[12 + k]);
    o[k] = BcT::even128(v0, v1);
    o[8 + k] = BcT::odd128(v0, v1);
    o[4 + k] = BcT::even128(w0, w1);
    o[12 + k] = BcT::odd128(w0, w1);
  }
}

template <int R, int G>
PFA_INLINE void out_tokens_transposed(const __m512* acc, const float (*tmp)[16], int64_t tokens, int64_t nr,
                                      float* c, int64_t ldc) {
  static_assert(R == 16, "a 16 x 16 transpose");
  __m512 r[16], o[16];
  #pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = BcT::add(acc[i], tmp[i]);
  transpose16(r, o);
  const __mmask16 keep = __mmask16((uint32_t(1) << nr) - 1u);
  #pragma GCC unroll 16
  for (int t = 0; t < 16 / G; ++t) {
    __m512 sum = o[t * G];
    if (G == 2) sum = BcT::add2(o[t * G], o[t * G + 1]);
    if (G == 4) sum = BcT::add2(BcT::add2(o[t * G], o[t * G + 1]), BcT::add2(o[t * G + 2], o[t * G + 3]));
    if (t < tokens) BcT::store(c + t * ldc, keep, sum);
  }
}

template <class Ops, int G>
PFA_INLINE __m512 madd_buf(__m512 acc, __m512i x, const int32_t* p) {
  if (G == 1) return Ops::madd_mem32(acc, x, p);
  return Ops::madd(acc, x, Bc::bcast_buf<G>(p));
}

template <class Ops, int G>
PFA_INLINE __m512i group(const typename Ops::W* row, int64_t e, int64_t k) {
  return Bc::bcast_lanes<G>(Ops::load_elems(row + e, std::min<int64_t>(G * Ops::kE, k - e)));
}

template <class Ops, int R, int G>
PFA_INLINE void bcast_rows_body(const BcastRows& d) {
  using W = typename Ops::W;
  constexpr int kE = Ops::kE;
  constexpr int kSteps = 16 / G;  // steps per row buffer line
  const int64_t steps = d.k / (G * kE);  // full steps; the rest of k is the tail
  const W* wbase = static_cast<const W*>(d.w);
  alignas(64) float tmp[R][16];
  for (int64_t r = d.r0; r < d.r1; r += R) {
    const int64_t nr = std::min<int64_t>(R, d.r1 - r);
    const W* b[R];
    #pragma GCC unroll 32
    for (int rr = 0; rr < R; ++rr) b[rr] = wbase + (r + std::min<int64_t>(rr, nr - 1)) * d.ldw;
    // The next block's rows, one line per row per line of this block's (to
    // L2; none: T16 1.29 ms instead of 0.97, to L1: the same).
    const int64_t pf_rows = std::max<int64_t>(0, std::min<int64_t>(R, d.pf_end - (r + R)));
    const char* pf = reinterpret_cast<const char*>(wbase + (r + R) * d.ldw);
    const int64_t pf_ld = d.ldw * int64_t(sizeof(W));
    // Branch-free in the loop: one base and one stride; when the next block
    // is short (the last two blocks of a range) the one row that surely
    // exists (its first, else this block's first) is asked for R times.
    const char* pfb = pf_rows > 0 ? pf : reinterpret_cast<const char*>(b[0]);
    const int64_t pfs = pf_rows == R ? pf_ld : 0;
    constexpr int64_t kLineBytes = 16 * kE * int64_t(sizeof(W));  // of the row per buffer line
    // Each lane sums kFlushLines lines' steps in acc, then adds that into
    // tmp (and acc restarts at 0): a chain of K / (G kE) additions in one
    // fp32 register cost fp32 accuracy (D4096 F11008 T16: max error 1.2e-5
    // against torch's 1.5e-6 and the dot tiles' 2.0e-6).
    __m512 acc[R];
    #pragma GCC unroll 32
    for (int rr = 0; rr < R; ++rr) {
      acc[rr] = Bc::zero();
      Bc::store(tmp[rr], acc[rr]);
    }
    // The rows' lines are copied into rowbuf first, one vector each
    // (double-buffered, a line ahead): rows ldw apart are often a multiple
    // of 2 KiB apart (D1024 bf16), so the broadcasts straight from the rows
    // would all hit the same two L1 sets and conflict (a scratch test at 16
    // rows: 1.8 G multiply-adds/s with the rows 2 KiB apart, 5.7 with 2112
    // B apart, 7.3 from registers); rowbuf's rows are 64 bytes apart.
    alignas(64) int32_t rowbuf[2][R][16];
    int64_t j = 0;
    int cur = 0;
    // A full block's rows are one base and one stride (row rr at wrow + rr
    // ldb: a few registers, where the 16 clamped pointers b[] spilled to
    // xmm registers and cost a vmovq per row per line); an edge block uses
    // b[] (its rows past nr repeat the last one).
    const bool full = nr == R;
    const char* wrow = reinterpret_cast<const char*>(b[0]);
    const int64_t ldb = d.ldw * int64_t(sizeof(W));
    const auto copy_lines = [&](int64_t e, int32_t(*dst)[16]) {
      if (full) {
        const char* q = wrow + e * int64_t(sizeof(W));
        #pragma GCC unroll 32
        for (int rr = 0; rr < R; ++rr) Ops::copy_line(reinterpret_cast<const W*>(q + rr * ldb), dst[rr]);
      } else {
        #pragma GCC unroll 32
        for (int rr = 0; rr < R; ++rr) Ops::copy_line(b[rr] + e, dst[rr]);
      }
    };
    if (kSteps <= steps) copy_lines(0, rowbuf[0]);
    for (; j + kSteps <= steps; j += kSteps, cur ^= 1) {
      if (j + 2 * kSteps <= steps) copy_lines((j + kSteps) * G * kE, rowbuf[cur ^ 1]);
      // __builtin_prefetch (locality 2: prefetcht1) in the loop below: gcc 12 drops
      // a prefetch that reaches this neutral loop through an inlined
      // target-attributed function (_mm_prefetch in Bc, as did an earlier form
      // of the dot tiles' prefetch: the object file had no prefetch instruction).
      const int32_t* rb = rowbuf[cur][0];  // one base register, constant displacements
      #pragma GCC unroll 16
      for (int s = 0; s < kSteps; ++s) {
        // The next block's line of rows s, s + kSteps, ..., spread over the
        // steps instead of bunched at the line's start.
        // G = 1 (T 9-16, compute-bound) branch-free; G = 2, 4 with the test
        // per row, which measured faster there (T4 0.54 vs 0.63 ms,
        // PERF_NOTES.md).
        #pragma GCC unroll 16
        for (int rr = s; rr < R; rr += kSteps) {
          if (G == 1) {
            __builtin_prefetch(pfb + rr * pfs + j / kSteps * kLineBytes, 0, 2);
          } else if (rr < pf_rows) {
            __builtin_prefetch(pf + rr * pf_ld + j / kSteps * kLineBytes, 0, 2);
          }
        }
        const __m512i xv = Bc::load(d.a + (j + s) * 16);
        #pragma GCC unroll 32
        for (int rr = 0; rr < R; ++rr) acc[rr] = madd_buf<Ops, G>(acc[rr], xv, rb + rr * 16 + s * G);
      }
      if ((j / kSteps) % kFlushLines == kFlushLines - 1) {
        #pragma GCC unroll 32
        for (int rr = 0; rr < R; ++rr) {
          Bc::add_into(tmp[rr], acc[rr]);
          acc[rr] = Bc::zero();
        }
      }
    }
    // The last full steps (fewer than a line) and the tail, zero-filled past
    // k (the token side is zero there too).
    for (; j * G * kE < d.k; ++j) {
      const __m512i xv = Bc::load(d.a + j * 16);
      #pragma GCC unroll 32
      for (int rr = 0; rr < R; ++rr) acc[rr] = Ops::madd(acc[rr], xv, group<Ops, G>(b[rr], j * G * kE, d.k));
    }
    out_tokens_transposed<R, G>(acc, tmp, d.tokens, nr, d.c + (r - d.r0), d.ldc);
  }
}

template <class Ops, int R, int G>
PFA_AVX512 __attribute__((flatten)) void bcast_rows_avx512(const BcastRows& d) {
  bcast_rows_body<Ops, R, G>(d);
}
template <class Ops, int R, int G>
PFA_AVX512_BF16 __attribute__((flatten)) void bcast_rows_avx512_bf16(const BcastRows& d) {
  bcast_rows_body<Ops, R, G>(d);
}

// h for the broadcast form: the task's [T][n] fp32 values (features f0 ..
// f0 + n, f0 a multiple of 2 G) as bf16 pairs in pack_tokens' layout (pair p
// of token t at hp[(p / G) * 16 + t G + p % G]; tokens T .. 16 / G zero).
// Rounded to nearest even by vcvtne2ps2bf16, as the FFN step stores bf16.
template <int G>
PFA_AVX512_BF16 void pack_h_bf16(const float* g, int64_t tokens, int64_t n, int64_t f0, uint32_t* hp) {
  alignas(64) uint32_t pairs[16][32];  // [token][pair of the task], n <= 64
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t c = 0; c < n; c += 32) {
      const int64_t left = std::min<int64_t>(32, n - c);
      const __mmask16 m_lo = __mmask16((1u << std::min<int64_t>(16, left)) - 1u);
      const __mmask16 m_hi = left > 16 ? __mmask16((1u << (left - 16)) - 1u) : __mmask16(0);
      const __m512 lo = _mm512_maskz_loadu_ps(m_lo, g + t * n + c);
      const __m512 hi = _mm512_maskz_loadu_ps(m_hi, g + t * n + c + 16);
      _mm512_store_si512(pairs[t] + c / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
  }
  const int64_t task_pairs = (n + 1) / 2;
  for (int64_t c2 = 0; c2 < task_pairs; ++c2) {
    const int64_t pr = f0 / 2 + c2;
    uint32_t* lane = hp + pr / G * 16 + pr % G;
    for (int64_t t = 0; t < 16 / G; ++t) lane[t * G] = t < tokens ? pairs[t][c2] : 0u;
  }
}

// x for the broadcast form, bf16 and G = 1 (9-16 tokens): pack_tokens'
// layout is then x viewed as [T][k / 2] pairs, transposed: per 16 pairs,
// the tokens' 64-byte slices (masked 16-bit loads: an odd k's last pair gets
// a zero high half; tokens >= T zero) through transpose16. The scalar loop
// was ~3% of a T16 call (PERF_NOTES.md).
PFA_AVX512_BF16 __attribute__((flatten)) void pack_x_bf16_g1(const uint16_t* src, int64_t ld, int64_t tokens,
                                                             int64_t k, uint32_t* dst) {
  const int64_t pairs = (k + 1) / 2;
  for (int64_t b = 0; b * 16 < pairs; ++b) {
    const int64_t e0 = b * 32, n = std::min<int64_t>(32, k - e0);
    const __mmask32 m = n == 32 ? ~__mmask32(0) : __mmask32((uint32_t(1) << n) - 1u);
    __m512 r[16], o[16];
    #pragma GCC unroll 16
    for (int t = 0; t < 16; ++t)
      r[t] = t < tokens ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(m, src + t * ld + e0)) : _mm512_setzero_ps();
    transpose16(r, o);
    #pragma GCC unroll 16
    for (int i = 0; i < 16; ++i)
      if (b * 16 + i < pairs) _mm512_store_ps(reinterpret_cast<float*>(dst + (b * 16 + i) * 16), o[i]);
  }
}

#endif  // PFA_X86

// ---------------------------------------------------------------------------
// Instruction-set choice: the widest this CPU has, lowered by
// PYFASTATTN_FFN_ISA=avx512|avx2|portable (read once), as ffn_cpu.cpp's.
// ---------------------------------------------------------------------------

enum class Isa { kPortable, kAvx2, kAvx512, kAvx512Bf16 };

Isa detect_isa() {
  const char* step = ffn_cpu_isa();  // the FFN step's choice, after the same cap
  Isa i = Isa::kPortable;
#if PFA_X86
  if (std::strcmp(step, "avx512") == 0) {
    // PYFASTATTN_FFN_ISA=avx512 leaves out the BF16 dot products (tests run
    // the widening path with it on a CPU that has them).
    const char* cap = std::getenv("PYFASTATTN_FFN_ISA");
    const bool no_dot = cap != nullptr && std::strcmp(cap, "avx512") == 0;
    i = cpu_has_avx512_bf16() && !no_dot ? Isa::kAvx512Bf16 : Isa::kAvx512;
  } else if (std::strcmp(step, "avx2") == 0) {
    i = PFA_SMALL_TOKENS_AVX2 ? Isa::kAvx2 : Isa::kPortable;
  }
#endif
  return i;
}

Isa isa() {
  static const Isa value = detect_isa();
  return value;
}

RowsSet rows_for(DType dt) {
  const Isa i = isa();
#if PFA_X86
  if (i == Isa::kAvx512 || i == Isa::kAvx512Bf16) {
    switch (dt) {
      case DType::kFloat32:
        return avx512_rows<OpsF32>();
      case DType::kFloat16:
        return avx512_rows<OpsF16>();
      case DType::kBFloat16:
      default:
        if (i == Isa::kAvx512Bf16)
          return cpu_stream_prefetch_to_l2() ? avx512_bf16_rows<OpsBf16Dot, true>()
                                             : avx512_bf16_rows<OpsBf16Dot, false>();
        return avx512_rows<OpsBf16Wide>();
    }
  }
#endif
  const bool avx2 = i == Isa::kAvx2;
  switch (dt) {
    case DType::kFloat32:
      return generic_rows<float, float>(avx2);
    case DType::kFloat16:
      return generic_rows<float, F16>(avx2);
    case DType::kBFloat16:
    default:
      return generic_rows<Bf16, Bf16>(avx2);
  }
}

// ---------------------------------------------------------------------------
// The two layers.
// ---------------------------------------------------------------------------

float load_f32(DType dt, const void* base, int64_t i) {
  switch (dt) {
    case DType::kFloat32:
      return static_cast<const float*>(base)[i];
    case DType::kBFloat16:
      return bf16_bits_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::kFloat16:
    default:
      return f16_bits_to_f32(static_cast<const uint16_t*>(base)[i]);
  }
}

// base[i0 + c] = v[c] for c < n, rounded once to dt: one plain loop per
// dtype (a switch per element in layer 2's epilogue cost ~2% of a T8 call,
// PERF_NOTES.md "Session 13").
void store_row_f32(DType dt, void* base, int64_t i0, const float* v, int64_t n) {
  switch (dt) {
    case DType::kFloat32:
      std::memcpy(static_cast<float*>(base) + i0, v, size_t(n) * 4);
      return;
    case DType::kBFloat16: {
      uint16_t* o = static_cast<uint16_t*>(base) + i0;
      for (int64_t c = 0; c < n; ++c) o[c] = f32_to_bf16_bits(v[c]);
      return;
    }
    case DType::kFloat16:
    default: {
      uint16_t* o = static_cast<uint16_t*>(base) + i0;
      for (int64_t c = 0; c < n; ++c) o[c] = f32_to_f16_bits(v[c]);
    }
  }
}

// c[t * ldc + (r - r0)] = sum_i a[t][i] w[r][i] for t < tokens, r in [r0, r1).
void dot_rows(const RowsSet& rs, const void* a, int64_t lda, int64_t tokens, const void* w,
              int64_t ldw, int64_t rows, int64_t r0, int64_t r1, int64_t k, float* c, int64_t ldc,
              int64_t pf_blocks) {
  const DotRows d{a, lda, tokens, w, ldw, r0, r1, k, c, ldc, pf_blocks, rows};
  (tokens == 1 ? rs.one : rs.many)(d);
}

// The broadcast form's range of tokens: bf16 with the BF16 dot products,
// fp32 and fp16 with AVX-512; above 16 the tokens do not fit one vector.
// Below the minimum the dot-product tiles are as fast or faster (one
// thread, gated D1024 F2816, dot vs broadcast form, A/B of builds,
// PERF_NOTES.md): bf16 T1 0.54 vs 0.59 ms, T2 0.53 vs 0.57, T3 0.62 vs
// 0.57; fp32 T4 1.30 vs 1.35, T6 1.51 vs 1.35; fp16 T1 0.64 vs 0.63, T2
// 0.69 vs 0.65.
int64_t bcast_min_tokens(DType dt) { return dt == DType::kFloat32 ? 5 : dt == DType::kFloat16 ? 2 : 3; }

bool use_bcast(DType dt, int64_t tokens) {
#if PFA_X86
  if (tokens > 16 || tokens < bcast_min_tokens(dt)) return false;
  if (dt == DType::kBFloat16) return isa() == Isa::kAvx512Bf16;
  return isa() == Isa::kAvx512 || isa() == Isa::kAvx512Bf16;
#else
  (void)dt;
  (void)tokens;
  return false;
#endif
}

// The broadcast form's lanes per token group for T tokens: 16 / G >= T.
int64_t bcast_group(int64_t tokens) { return tokens > 8 ? 1 : tokens > 4 ? 2 : 4; }

// Elements per 32-bit lane: bf16 pairs, else one fp32 value.
int64_t lane_elems(DType dt) { return dt == DType::kBFloat16 ? 2 : 1; }

// 32-bit lanes of the packed [ceil(k / (G e))][16] form, e = lane_elems.
int64_t packed_lanes(int64_t k, int64_t g, int64_t e) { return (k + g * e - 1) / (g * e) * 16; }

// The token side of the broadcast form: lane L = i / e (i the element, e =
// lane_elems) of token t at dst[(L / G) * 16 + t G + L % G]; bf16 elements
// as pairs (element 2 L in the low half), fp32 and fp16 as fp32. Zero for
// tokens >= tokens and past k (src rows ld apart).
void pack_tokens(DType dt, const void* src, int64_t ld, int64_t tokens, int64_t k, int64_t g, uint32_t* dst) {
#if PFA_X86
  if (dt == DType::kBFloat16 && g == 1 && isa() == Isa::kAvx512Bf16) {
    pack_x_bf16_g1(static_cast<const uint16_t*>(src), ld, tokens, k, dst);
    return;
  }
#endif
  const int64_t e = lane_elems(dt);
  std::memset(dst, 0, size_t(packed_lanes(k, g, e)) * 4);
  if (dt != DType::kFloat16) {
    // bf16 and fp32 keep their bytes: a step of a token (G lanes, 4 G bytes)
    // is one copy; the last one of an odd k (bf16) or of k not a multiple
    // of G e is shorter (the rest stays zero).
    const int64_t esize = dt == DType::kBFloat16 ? 2 : 4, step = g * e;
    for (int64_t t = 0; t < tokens; ++t) {
      const char* row = static_cast<const char*>(src) + t * ld * esize;
      for (int64_t i = 0, j = 0; i < k; i += step, ++j)
        std::memcpy(dst + j * 16 + t * g, row + i * esize, size_t(std::min(step, k - i) * esize));
    }
    return;
  }
  // fp16: widened element by element (g is 1, 2 or 4: shifts, not divisions).
  const int gs = g == 1 ? 0 : g == 2 ? 1 : 2;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t i = 0; i < k; ++i) {
      const float v = load_f32(dt, src, t * ld + i);
      std::memcpy(dst + (i >> gs) * 16 + t * g + (i & (g - 1)), &v, 4);
    }
  }
}

// c[t * ldc + (r - r0)] = sum_i a[t][i] w[r][i] for t < tokens, r in [r0, r1),
// a packed by pack_tokens with bcast_group(tokens).
void bcast_rows(DType dt, const void* a, int64_t tokens, const void* w, int64_t ldw, int64_t rows, int64_t r0,
                int64_t r1, int64_t k, float* c, int64_t ldc) {
#if PFA_X86
  const BcastRows d{static_cast<const uint32_t*>(a), w, ldw, r0, r1, k, c, ldc, tokens, rows};
  const int64_t g = bcast_group(tokens);
  if (dt == DType::kBFloat16) {
    if (g == 1) bcast_rows_avx512_bf16<BcastBf16, kBcastRows, 1>(d);
    if (g == 2) bcast_rows_avx512_bf16<BcastBf16, kBcastRows, 2>(d);
    if (g == 4) bcast_rows_avx512_bf16<BcastBf16, kBcastRows, 4>(d);
  } else if (dt == DType::kFloat32) {
    if (g == 1) bcast_rows_avx512<BcastF32, kBcastRows, 1>(d);
    if (g == 2) bcast_rows_avx512<BcastF32, kBcastRows, 2>(d);
    if (g == 4) bcast_rows_avx512<BcastF32, kBcastRows, 4>(d);
  } else {
    if (g == 1) bcast_rows_avx512<BcastF16, kBcastRows, 1>(d);
    if (g == 2) bcast_rows_avx512<BcastF16, kBcastRows, 2>(d);
    if (g == 4) bcast_rows_avx512<BcastF16, kBcastRows, 4>(d);
  }
#else
  (void)dt, (void)a, (void)tokens, (void)w, (void)ldw, (void)rows, (void)r0, (void)r1, (void)k, (void)c,
      (void)ldc;
#endif
}

// A layer-1 task's h (g: [T][n] fp32, features f0 .. f0 + n, f0 a multiple
// of G e) into the packed form of pack_tokens, and when the task is the last
// (f0 + n = d_ff) the lanes past d_ff up to a whole step zeroed.
void pack_h(DType dt, const float* g, int64_t tokens, int64_t n, int64_t f0, int64_t d_ff, int64_t bg,
            uint32_t* hp) {
  if (dt == DType::kBFloat16) {
#if PFA_X86
    if (bg == 1) pack_h_bf16<1>(g, tokens, n, f0, hp);
    if (bg == 2) pack_h_bf16<2>(g, tokens, n, f0, hp);
    if (bg == 4) pack_h_bf16<4>(g, tokens, n, f0, hp);
#endif
  } else {
    for (int64_t c = 0; c < n; ++c) {
      const int64_t l = f0 + c;
      uint32_t* lane = hp + l / bg * 16 + l % bg;
      for (int64_t t = 0; t < 16 / bg; ++t) {
        uint32_t v = 0;
        if (t < tokens) std::memcpy(&v, g + t * n + c, 4);
        lane[t * bg] = v;
      }
    }
  }
  if (f0 + n == d_ff) {
    const int64_t e = lane_elems(dt);
    for (int64_t l = (d_ff + e - 1) / e; l % bg != 0; ++l)
      for (int64_t t = 0; t < 16 / bg; ++t) hp[l / bg * 16 + t * bg + l % bg] = 0u;
  }
}

// The calling thread's buffer for one call's h, the fp32 copy of x (fp16)
// and the fp32 biases: held between calls (at most ~1.5 MB at T32 F11008
// fp32), so no call page-faults in fresh memory.
float* call_scratch(int64_t floats) {
  thread_local std::unique_ptr<float[]> buf;
  thread_local int64_t size = 0;
  if (floats > size) {
    buf.reset();
    buf.reset(new float[size_t(floats)]);
    size = floats;
  }
  return buf.get();
}

// act_in[0 (gate), 1 (up)][t][f0 + c] = g / u [t][c], in the storage dtype.
void save_pre_activations(const FfnSmallTokensParams& p, const float* g, const float* u, int64_t f0,
                          int64_t n) {
  const int64_t T = p.tokens, F = p.d_ff;
  for (int64_t t = 0; t < T; ++t) {
    store_row_f32(p.dtype, p.act_in, t * F + f0, g + t * n, n);
    if (p.gated) store_row_f32(p.dtype, p.act_in, T * F + t * F + f0, u + t * n, n);
  }
}

}  // namespace

void ffn_fwd_small_tokens(const FfnSmallTokensParams& p) {
  const int64_t T = p.tokens, D = p.d_model, F = p.d_ff, O = p.d_out;
  if (T == 0 || O == 0) return;
  const DType dt = p.dtype;
  const RowsSet rs = rows_for(dt);
  const int64_t pf = kPrefetchBlocks;
  // Token-side operands: bf16 stays bf16 (vdpbf16ps pairs); fp16 tokens and
  // h are fp32 (the fp16 weights are widened per load).
  const bool a_bf16 = dt == DType::kBFloat16;
  const int64_t a_size = a_bf16 ? 2 : 4;
  // x and h are copied with padded rows (ld_pad): with D1024 bf16 the rows
  // of x are 2 KiB apart, so a tile's 4 token lines at one step, and the
  // same step of every other token, land in 2 of L1's 64 sets; one extra
  // line per row spreads them over 16.
  const auto ld_pad = [&](int64_t n) { return (n + 31) / 32 * 32 + 64 / a_size; };
  const int64_t ldx = ld_pad(D), ldh = ld_pad(F);
  // The broadcast form (use_bcast) takes x and h packed instead
  // (pack_tokens): [steps][16] 32-bit lanes.
  const bool bcast = use_bcast(dt, T);
  const auto round16 = [](int64_t n) { return (n + 15) / 16 * 16; };  // whole 64-byte lines
  const int64_t bg = bcast_group(T), be = lane_elems(dt);
  const int64_t h_floats = round16(bcast ? packed_lanes(F, bg, be) : (T * ldh * a_size + 3) / 4);
  const int64_t x_floats = round16(bcast ? packed_lanes(D, bg, be) : (T * ldx * a_size + 3) / 4);
  float* scratch = call_scratch(h_floats + x_floats + 2 * F + O + 16);
  scratch += (16 - (reinterpret_cast<uintptr_t>(scratch) / 4) % 16) % 16;  // 64-byte aligned
  void* h = scratch;
  void* xa = scratch + h_floats;
  float* b1 = scratch + h_floats + x_floats;
  float* b3 = b1 + F;
  float* b2 = b3 + F;
  for (int64_t f = 0; f < F; ++f) {
    b1[f] = p.b1 ? load_f32(dt, p.b1, f) : 0.0f;
    b3[f] = p.b3 ? load_f32(dt, p.b3, f) : 0.0f;
  }
  for (int64_t o = 0; o < O; ++o) b2[o] = p.b2 ? load_f32(dt, p.b2, o) : 0.0f;
  // Token-side operands: bf16 stays bf16 (vdpbf16ps pairs); fp16 tokens and
  // h are fp32 (the fp16 weights are widened per load).
  if (bcast) pack_tokens(dt, p.x, p.x_row_stride, T, D, bg, static_cast<uint32_t*>(xa));
  for (int64_t t = 0; t < T && !bcast; ++t) {
    if (dt == DType::kFloat16) {
      float* row = static_cast<float*>(xa) + t * ldx;
      for (int64_t d = 0; d < D; ++d) row[d] = load_f32(dt, p.x, t * p.x_row_stride + d);
    } else {  // same element type: a row copy
      std::memcpy(static_cast<char*>(xa) + t * ldx * a_size,
                  static_cast<const char*>(p.x) + t * p.x_row_stride * a_size, size_t(D * a_size));
    }
  }
  const int64_t lda = ldx;

  // Layer 1: h[:, f0:f1] = act(x W1^T + b1) [* (x W3^T + b3)].
  if (F > 0) {
    const int64_t tasks = (F + kFeatBlock - 1) / kFeatBlock;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      alignas(64) float g[kFfnSmallTokensMax * kFeatBlock];
      alignas(64) float u[kFfnSmallTokensMax * kFeatBlock];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t f0 = task * kFeatBlock, f1 = std::min(F, f0 + kFeatBlock), n = f1 - f0;
        if (bcast) {
          bcast_rows(dt, xa, T, p.w1, D, F, f0, f1, D, g, n);
          if (p.gated) bcast_rows(dt, xa, T, p.w3, D, F, f0, f1, D, u, n);
        } else {
          dot_rows(rs, xa, lda, T, p.w1, D, F, f0, f1, D, g, n, pf);
          if (p.gated) dot_rows(rs, xa, lda, T, p.w3, D, F, f0, f1, D, u, n, pf);
        }
        if (p.act_in != nullptr && !p.act_in_bias) save_pre_activations(p, g, u, f0, n);
        for (int64_t t = 0; t < T; ++t) {
          for (int64_t c = 0; c < n; ++c) {
            g[t * n + c] += b1[f0 + c];
            if (p.gated) u[t * n + c] += b3[f0 + c];
          }
        }
        if (p.act_in != nullptr && p.act_in_bias) save_pre_activations(p, g, u, f0, n);
        ffn_act_fp32(p.act, g, p.gated ? u : nullptr, T * n);
        if (bcast) pack_h(dt, g, T, n, f0, F, bg, static_cast<uint32_t*>(h));
        for (int64_t t = 0; t < T && !bcast; ++t) {
          if (a_bf16) {
            uint16_t* hr = static_cast<uint16_t*>(h) + t * ldh + f0;
            for (int64_t c = 0; c < n; ++c) hr[c] = f32_to_bf16_bits(g[t * n + c]);
          } else {
            std::memcpy(static_cast<float*>(h) + t * ldh + f0, g + t * n, size_t(n) * 4);
          }
        }
      }
    });
  }

  // Layer 2: y[:, o0:o1] = h W2^T + b2 (h = 0 when d_ff = 0: y = b2).
  const int64_t tasks = (O + kOutBlock - 1) / kOutBlock;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float y[kFfnSmallTokensMax * kOutBlock];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t o0 = task * kOutBlock, o1 = std::min(O, o0 + kOutBlock), n = o1 - o0;
      if (F > 0 && bcast) {
        bcast_rows(dt, h, T, p.w2, F, O, o0, o1, F, y, n);
      } else if (F > 0) {
        dot_rows(rs, h, ldh, T, p.w2, F, O, o0, o1, F, y, n, pf);
      } else {
        std::fill(y, y + T * n, 0.0f);
      }
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t c = 0; c < n; ++c) y[t * n + c] += b2[o0 + c];
        store_row_f32(dt, p.out, t * O + o0, y + t * n, n);
      }
    }
  });
}

int64_t ffn_small_tokens_limit(DType dt) {
  // Defaults: the crossovers measured (PERF_NOTES.md, "CPU feed-forward at
  // decode sizes", one thread, gated D1024 F2816): bf16 1.05x eager at T16,
  // 0.96x at T20; fp32 still 1.55x at T32, fp16 5.9x (eager fp16 has no fast
  // CPU GEMM), so those run it up to the kernel's maximum.
  const int64_t fallback = dt == DType::kBFloat16 ? 16 : kFfnSmallTokensMax;
  const char* env = std::getenv("PYFASTATTN_CPU_FFN_SMALL_TOKENS");
  if (env == nullptr || *env == '\0') return fallback;
  // A whole non-negative decimal number, or an error: "16x" or "-1" must not
  // quietly turn the kernel off (atoll read garbage as 0).
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && errno == 0 && v >= 0,
                    "PYFASTATTN_CPU_FFN_SMALL_TOKENS must be a token count >= 0 (0 turns the kernel off), got '",
                    env, "'");
  return std::min<int64_t>(int64_t(v), kFfnSmallTokensMax);
}

const char* ffn_small_tokens_isa() {
  switch (isa()) {
    case Isa::kAvx512Bf16:
      return "avx512_bf16";
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    default:
      return "portable";
  }
}

}  // namespace cpu
}  // namespace pyfastattn
