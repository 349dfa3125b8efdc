// Peak probes (see peak_probe.h). Each loop body is a block of independent
// multiply-adds on 16 accumulators held in registers: on Zen 4 (two 256-bit
// FMA pipes, 4-cycle latency) 8 would do, 16 leaves room for wider cores.
// The operands come from the caller at run time and the accumulators are
// returned, so the compiler can neither fold nor drop the work; the
// per-iteration growth (acc * a + b with a = 1 - 2^-20) stays bounded and
// normal, so no denormal slow path is timed.
#include "cpu/peak_probe.h"

#include <cmath>
#include <cstring>

#include "cpu/simd.h"

namespace pyfastattn {
namespace cpu {
namespace {

constexpr int kAcc = 16;

bool is_kind(const char* kind, const char* name) { return std::strcmp(kind, name) == 0; }

float portable_fma_loop(int64_t iters, float a, float b) {
  float acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = float(i);
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < kAcc; ++i) acc[i] = std::fma(acc[i], a, b);
  float s = 0.f;
  for (int i = 0; i < kAcc; ++i) s += acc[i];
  return s;
}

#if PFA_X86
PFA_AVX512 float avx512_fma_loop(int64_t iters, float a, float b) {
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(float(i));
  const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_fmadd_ps(acc[i], va, vb);
  }
  __m512 s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

PFA_AVX512_BF16 float avx512_bf16_dot_loop(int64_t iters, float a, float b) {
  __m512 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_set1_ps(float(i));
  // 32 bf16 values per operand: acc += x[2k] y[2k] + x[2k+1] y[2k+1] per lane.
  const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_set1_ps(a), _mm512_set1_ps(a));
  const __m512bh y = _mm512_cvtne2ps_pbh(_mm512_set1_ps(b), _mm512_set1_ps(b));
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], x, y);
  }
  __m512 s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = _mm512_add_ps(s, acc[i]);
  return _mm512_reduce_add_ps(s);
}

PFA_AVX2 float avx2_fma_loop(int64_t iters, float a, float b) {
  __m256 acc[kAcc];
  for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_set1_ps(float(i));
  const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
  for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
    for (int i = 0; i < kAcc; ++i) acc[i] = _mm256_fmadd_ps(acc[i], va, vb);
  }
  __m256 s = acc[0];
  for (int i = 1; i < kAcc; ++i) s = _mm256_add_ps(s, acc[i]);
  float lanes[8];
  _mm256_storeu_ps(lanes, s);
  float t = 0.f;
  for (float l : lanes) t += l;
  return t;
}

#endif  // PFA_X86

// The read loop, written once over simd.h's 16-lane vector types: four
// independent sums of 16 floats, so the loads are never a dependency chain.
// pf > 0: each 64-byte line is also asked for pf floats ahead with a
// software prefetch into L2 (prefetcht2), up to the end of the slice.
template <typename Vec>
PFA_INLINE float read_sum(const float* p, size_t n, size_t pf) {
  typename Vec::V s0 = Vec::zero(), s1 = s0, s2 = s0, s3 = s0;
  size_t i = 0;
  const auto step = [&](size_t j) {
    s0 = Vec::add(s0, Vec::load(p + j));
    s1 = Vec::add(s1, Vec::load(p + j + kLanes));
    s2 = Vec::add(s2, Vec::load(p + j + 2 * kLanes));
    s3 = Vec::add(s3, Vec::load(p + j + 3 * kLanes));
  };
  if (pf > 0) {
    for (; i + pf + 4 * kLanes <= n; i += 4 * kLanes) {
      // kLanes floats = one 64-byte line (16 lanes of 4 bytes)
      __builtin_prefetch(p + i + pf, 0, 1);
      __builtin_prefetch(p + i + pf + kLanes, 0, 1);
      __builtin_prefetch(p + i + pf + 2 * kLanes, 0, 1);
      __builtin_prefetch(p + i + pf + 3 * kLanes, 0, 1);
      step(i);
    }
  }
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) step(i);
  float lanes[kLanes];
  Vec::store(lanes, Vec::add(Vec::add(s0, s1), Vec::add(s2, s3)));
  float t = 0.f;
  for (float l : lanes) t += l;
  for (; i < n; ++i) t += p[i];
  return t;
}

#if PFA_X86
PFA_AVX512 __attribute__((flatten)) float avx512_read(const float* p, size_t n, size_t pf) {
  return read_sum<VecAvx512>(p, n, pf);
}
PFA_AVX2 __attribute__((flatten)) float avx2_read(const float* p, size_t n, size_t pf) {
  return read_sum<VecAvx2>(p, n, pf);
}
#endif

}  // namespace

const char* peak_probe_isa(const char* kind) {
  const bool bf16 = is_kind(kind, "bf16_dot");
  if (!bf16 && !is_kind(kind, "fp32_fma")) return nullptr;
#if PFA_X86
  if (bf16 && cpu_has_avx512_bf16()) return "vdpbf16ps zmm (AVX512_BF16)";
  if (cpu_has_avx512()) return "vfmadd231ps zmm (AVX-512)";
  if (cpu_has_avx2()) return "vfmadd231ps ymm (AVX2)";
#endif
  return "fmaf (portable)";
}

double peak_probe_run(const char* kind, int64_t iters) {
  const bool bf16 = is_kind(kind, "bf16_dot");
  // a = 1 - 2^-20: the accumulators decay towards b / 2^-20 and stay normal.
  const float a = 1.0f - 1.0f / (1 << 20), b = 1.0f / (1 << 10);
  volatile float sink = 0.f;
  double lanes = 1.0, flops_per_lane = 2.0;
#if PFA_X86
  if (bf16 && cpu_has_avx512_bf16()) {
    sink = avx512_bf16_dot_loop(iters, a, b);
    lanes = 16.0, flops_per_lane = 4.0;  // two bf16 products and their sum, added to fp32
  } else if (cpu_has_avx512()) {
    sink = avx512_fma_loop(iters, a, b);
    lanes = 16.0;
  } else if (cpu_has_avx2()) {
    sink = avx2_fma_loop(iters, a, b);
    lanes = 8.0;
  } else {
    sink = portable_fma_loop(iters, a, b);
  }
#else
  sink = portable_fma_loop(iters, a, b);
#endif
  (void)sink;
  return double(iters) * kAcc * lanes * flops_per_lane;
}

float read_probe_run(const float* p, size_t n, size_t prefetch_floats) {
#if PFA_X86
  if (cpu_has_avx512()) return avx512_read(p, n, prefetch_floats);
  if (cpu_has_avx2()) return avx2_read(p, n, prefetch_floats);
#endif
  return read_sum<VecPortable>(p, n, prefetch_floats);
}

}  // namespace cpu
}  // namespace pyfastattn
