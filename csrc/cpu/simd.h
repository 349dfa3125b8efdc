// SIMD building blocks of the CPU kernels (attention and FFN): compiler and
// instruction-set macros, the run-time CPU feature checks, scalar conversions
// between fp32 and the 16-bit storage types, the exp2 / tanh approximations,
// and the 16-lane fp32 vector types the attention's elementwise tile steps are
// written in (portable C++, AVX-512, AVX2).
//
// Everything here is inline (most of it always_inline) and neutral: a kernel
// instantiates it inside a function compiled with an instruction set's target
// attribute (PFA_AVX512, ...), where it is inlined and compiled for that set.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PFA_X86 1
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their internal
// _mm512_undefined_* operands (GCC bug 105593); silence it for them only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <cpuid.h>
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

constexpr float kLog2e = 1.44269504088896340736f;
constexpr float kLn2 = 0.69314718055994530942f;
constexpr float kInf = std::numeric_limits<float>::infinity();

// Width of every elementwise loop: one 512-bit vector of fp32. Buffers along
// the query axis are padded to a multiple of it.
constexpr int kLanes = 16;

// ---------------------------------------------------------------------------
// What this CPU supports (the kernels pick their path once, from these and
// their environment caps).
// ---------------------------------------------------------------------------

#if PFA_X86
inline bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}
inline bool cpu_has_avx512_bf16() {
  static const bool ok = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}
// The family of an AMD CPU as CPUID reports it (0x19: Zen 3 / Zen 4, 0x1A:
// Zen 5); 0 on any other vendor. Kernels whose best memory access differs by
// generation (the KV-cache kernel's prefetch level) key on it.
inline int cpu_amd_family() {
  static const int fam = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return 0;
    const bool amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
    if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const int base = (a >> 8) & 0xF;
    return base == 0xF ? base + int((a >> 20) & 0xFF) : base;
  }();
  return fam;
}
// Where the kernels that stream from memory (the KV-cache kernel's cache
// rows, the decode-size FFN's weight rows) put their software prefetches:
// L2 (prefetcht2) on AMD family 19h (Zen 4; 32 KB L1D), where prefetches into
// L1 evicted what the kernels were using and the FFN's dot tiles waited on
// memory without them (PERF_NOTES.md, KV cache v18, FFN "Session 10"); the
// measured-best choice of each kernel elsewhere (Zen 5: the KV-cache rows
// into L1, the FFN's dot tiles on the hardware prefetchers alone).
// PYFASTATTN_CPU_PREFETCH=l1|l2 overrides it (read once per process; a
// prefetch changes no result bit, only timing).
inline bool cpu_stream_prefetch_to_l2() {
  static const bool l2 = [] {
    const char* env = std::getenv("PYFASTATTN_CPU_PREFETCH");
    const std::string v = env ? env : "";
    TORCH_CHECK_VALUE(v.empty() || v == "auto" || v == "l1" || v == "l2",
                      "PYFASTATTN_CPU_PREFETCH must be 'auto' (the default), 'l1' or 'l2', got '", v, "'");
    if (v == "l1" || v == "l2") return v == "l2";
    return cpu_amd_family() == 0x19;
  }();
  return l2;
}
inline bool cpu_has_avx2() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}
#endif  // PFA_X86

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

// 2^x = 2^n 2^f with n = round(x), f in [-0.5, 0.5], and 2^f by a degree-5
// polynomial with p(0) = 1, fitted for the least maximum relative error on
// [-0.5, 0.5] by scripts/fit_exp2_poly.py (tests/test_exp2_poly.py checks
// it): 1.1e-7 in exact arithmetic, 1.7e-7 evaluated by fp32 FMAs (Horner),
// where the degree-6 Taylor polynomial it replaced (ln(2)^k / k!) had
// 1.6e-7 / 2.2e-7: one FMA fewer per exponential and slightly more accurate
// (PERF_NOTES.md, "Session 6: the fp32 exponential").
constexpr int kExp2Degree = 5;
constexpr float kExp2Poly[kExp2Degree + 1] = {  // f^5 .. f^0
    1.326469821e-03f, 9.671509266e-03f, 5.550733954e-02f, 2.402224243e-01f, 6.931470037e-01f, 1.0f};

// 2^f for a value rounded to bf16 next (the AVX512-BF16 backward's P and dS,
// grad_tile): degree 3 with p(0) = 1, fitted for the least maximum relative
// error on [-0.5, 0.5]: 1.01e-4, against 2^-9 = 1.95e-3 for the bf16 rounding,
// so the rounded value is the same or one bf16 ulp off; three FMAs fewer per
// exponential than kExp2Poly. (The forward tried it for its P in 0df1d71 and
// reverted it: its lse, which is not rounded, lost accuracy; the backward
// computes no lse.)
constexpr int kExp2Bf16Degree = 3;
constexpr float kExp2Bf16Poly[kExp2Bf16Degree + 1] = {5.500872061e-02f, 2.422104627e-01f, 6.932829022e-01f,
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

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1], for |x| >=
// 1/8: an absolute error of about 1e-7, a relative one below 4e-7. Below 1/8,
// where 1 - e cancels (e -> 1), the odd Taylor polynomial to x^9 (truncation
// < 1e-11 relative). The error has to be relative: a softcapped score is
// softcap * tanh(s / softcap), so an absolute error of 1e-7 in tanh became
// softcap * 1e-7 in the score (0.1 at softcap 1e6; at 1e30 every tanh was 0
// and the softmax uniform), where the exact value is ~s.
PFA_INLINE float tanh_approx(float x) {
  const float ax = std::fabs(x);
  const float e = exp2_approx(-2.0f * kLog2e * ax);
  const float x2 = x * x;
  const float poly =
      ax * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f + x2 * (62.0f / 2835.0f)))));
  const float t = ax < 0.125f ? poly : (1.0f - e) / (1.0f + e);
  return x < 0.0f ? -t : t;
}

// ---------------------------------------------------------------------------
// fp32 <-> bf16 / fp16 on raw bits, exact, branch-free (selects only), so that
// the loops over them vectorise. The one copy for every CPU kernel.
// ---------------------------------------------------------------------------

PFA_INLINE float bf16_bits_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// Round to nearest even; NaN stays NaN, 0x7FC0 as c10::BFloat16 (a plain
// rounding add could carry a NaN with a small payload into infinity).
PFA_INLINE uint16_t f32_to_bf16_bits(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0) : uint16_t(r);
}

// IEEE half -> float without F16C, exact for every value including
// subnormals, inf and NaN (the FP16 library's algorithm, as in c10::Half). No
// step computes on an fp32 subnormal, so it stays exact with denormals
// flushed (torch.set_flush_denormal).
PFA_INLINE float f16_bits_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t magnitude = two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized);
  return bits_to_f32(sign | magnitude);
}

// Round to nearest even, inf -> inf, NaN -> quiet NaN (0x7E00 | sign); the
// select form of F. Giesen's float_to_half_fast3_rtne. Checked against
// _Float16 and c10::Half(float) for all 2^32 inputs.
PFA_INLINE uint16_t f32_to_f16_bits(float f) {
  const uint32_t x = f32_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t mag = x & 0x7FFFFFFFu;
  const uint32_t inf_nan = mag > 0x7F800000u ? 0x7E00u : 0x7C00u;
  // |f| < 2^-14, a half subnormal or zero: align the 10 mantissa bits at the
  // bottom of a float with one round-to-nearest-even addition.
  const float denorm_magic = bits_to_f32(((127u - 15u) + (23u - 10u) + 1u) << 23);
  const uint32_t subnormal = f32_to_bits(bits_to_f32(mag) + denorm_magic) - f32_to_bits(denorm_magic);
  // Normal: rebias the exponent and round the 13 dropped bits to even.
  const uint32_t normal = (mag - ((127u - 15u) << 23) + 0xFFFu + ((mag >> 13) & 1u)) >> 13;
  uint32_t h = mag < (113u << 23) ? subnormal : normal;
  h = mag >= ((127u + 16u) << 23) ? inf_nan : h;
  return uint16_t(h | sign);
}

// The same on the c10 storage types (the attention kernel's element types).
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
  return c10::Half(f32_to_f16_bits(x), c10::Half::from_bits());
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
  static V set1(float x) {
    V r;
    for (int v = 0; v < kLanes; ++v) r.x[v] = x;
    return r;
  }
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
  // a where the 32-bit mask m is ~0, +0 where it is 0 (dropout's keep masks).
  static V keep(const V& a, const uint32_t* m) {
    V r;
    for (int v = 0; v < kLanes; ++v) {
      uint32_t bits;
      std::memcpy(&bits, &a.x[v], 4);
      bits &= m[v];
      std::memcpy(&r.x[v], &bits, 4);
    }
    return r;
  }
  static void store_pairs(uint32_t* p, const V& lo, const V& hi) {
    for (int v = 0; v < kLanes; ++v) p[v] = bf16_pair(lo.x[v], hi.x[v]);
  }
  static void store_bf16(uint16_t* p, const V& a) {
    for (int v = 0; v < kLanes; ++v) p[v] = f32_to_bf16_bits(a.x[v]);
  }
  // 16 bf16 values (raw bits) widened to fp32, exactly.
  static V load_bf16(const uint16_t* p) {
    V r;
    for (int v = 0; v < kLanes; ++v) r.x[v] = bf16_bits_to_f32(p[v]);
    return r;
  }
  // The lanes' sum by halves: lane l += lane l + 8 (l < 8), then + 4, + 2, + 1.
  static float sum_halves(V a) {
    for (int half = kLanes / 2; half > 0; half /= 2) {
      for (int v = 0; v < half; ++v) a.x[v] += a.x[v + half];
    }
    return a.x[0];
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
  PFA_AVX512 static inline V set1(float x) { return _mm512_set1_ps(x); }
  PFA_AVX512 static inline V add(V a, V b) { return _mm512_add_ps(a, b); }
  PFA_AVX512 static inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  PFA_AVX512 static inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  PFA_AVX512 static inline V keep(V a, const uint32_t* m) {
    return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), _mm512_loadu_si512(m)));
  }
  // 2^x as exp2_approx, with the exponent applied by vscalefps: x is clamped
  // to -150, where p * 2^-150 (p = 1) rounds to exactly 0, so -inf gives 0.
  // x is the *second* operand: vmaxps returns it when it is NaN, so a NaN
  // score stays NaN (as in the reference) instead of becoming probability 0.
  // Degree kDeg polynomial `poly` (highest power first) on the fraction.
  template <int kDeg>
  PFA_AVX512 static inline V exp2_poly(V x, const float (&poly)[kDeg + 1]) {
    x = _mm512_max_ps(_mm512_set1_ps(-150.0f), x);
    const V n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const V f = _mm512_sub_ps(x, n);
    V p = _mm512_set1_ps(poly[0]);
#pragma GCC unroll 8
    for (int i = 1; i < kDeg + 1; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(poly[i]));
    return _mm512_scalef_ps(p, n);
  }
  PFA_AVX512 static inline V exp2(V x) { return exp2_poly<kExp2Degree>(x, kExp2Poly); }
  // exp2 with kExp2Bf16Poly: for values rounded to bf16 next.
  PFA_AVX512 static inline V exp2_bf16(V x) { return exp2_poly<kExp2Bf16Degree>(x, kExp2Bf16Poly); }
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
  PFA_AVX512 static inline V load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // VecPortable::sum_halves's order, in registers.
  PFA_AVX512 static inline float sum_halves(V a) {
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
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
  PFA_AVX2 static inline V set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
  PFA_AVX2 static inline V add(const V& a, const V& b) {
    return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
  }
  PFA_AVX2 static inline V sub(const V& a, const V& b) {
    return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)};
  }
  PFA_AVX2 static inline V mul(const V& a, const V& b) {
    return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
  }
  PFA_AVX2 static inline V keep(const V& a, const uint32_t* m) {
    const float* f = reinterpret_cast<const float*>(m);
    return {_mm256_and_ps(a.lo, _mm256_loadu_ps(f)), _mm256_and_ps(a.hi, _mm256_loadu_ps(f + 8))};
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

}  // namespace cpu
}  // namespace pyfastattn
