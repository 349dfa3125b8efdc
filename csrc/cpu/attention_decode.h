// Decode: one query row against a long key range (Sq = 1), AVX-512 only.
// fwd_block (attention_fwd.cpp) takes this path for a block of one row with
// no attn_mask and no softcap; everything here is inlined into its AVX-512
// entry points.
//
// The tile path computes S^T = K Q^T with the 16 query lanes of a vector
// holding 1 row: 16x the FMAs, an A broadcast per key and head-dim element
// (~140 instructions per key), plus the tile copies of K and V. Here each
// score is a dot product read straight from the K row (D/16 FMAs or D/32 bf16
// dot products and one horizontal sum), the softmax runs over 16 keys per
// vector, and O += p V reads the V rows straight from the input.
#pragma once

#include "attention_schedule.h"

namespace pyfastattn {
namespace cpu {

#if PFA_X86
PFA_AVX512 inline __mmask16 mask16(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

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

// The K row kDecodePrefetch keys ahead of key j of the tile at krow, every
// line: rows of one kv head lie hk x d elements apart, so the hardware
// prefetchers do not stream them (the KV-cache kernel measured 2.5x the CPU
// time per step without its software prefetches, PERF_NOTES.md v5).
constexpr int kDecodePrefetch = 16;
template <typename T>
PFA_INLINE void decode_prefetch(const Ctx& c, const T* krow, int j, int n) {
  if (j + kDecodePrefetch >= n) return;
  const char* r = reinterpret_cast<const char*>(krow + int64_t(j + kDecodePrefetch) * c.p->k_row_stride);
  for (int b = 0; b < int(c.d * sizeof(T)); b += 64) _mm_prefetch(r + b, _MM_HINT_T0);
}

// Raw scores sc[j] = scale * dot(K row j0 + j, q) for j < n.
template <typename T>
PFA_AVX512 inline void decode_scores(const Ctx& c, const T* q, const T* krow, int n, float* sc) {
  const int d = c.d;
  __m512 qv[16];
  for (int v = 0; v * 16 < d; ++v) qv[v] = load16_f32(q + 16 * v, mask16(d - 16 * v));
  for (int j = 0; j < n; ++j) {
    decode_prefetch(c, krow, j, n);
    sc[j] = decode_dot(krow + int64_t(j) * c.p->k_row_stride, qv, d) * c.score_scale;
  }
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
  for (int j = 0; j < n; ++j) {
    decode_prefetch(c, krow, j, n);
    sc[j] = decode_dot_bf16(krow + int64_t(j) * c.p->k_row_stride, qp, d) * c.score_scale;
  }
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
      if (x0 == 0 && j + kDecodePrefetch < n) {
        const char* r = reinterpret_cast<const char*>(vrow0 + int64_t(j + kDecodePrefetch) * c.p->v_row_stride);
        for (int b = 0; b < int(dv * sizeof(T)); b += 64) _mm_prefetch(r + b, _MM_HINT_T0);
      }
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

}  // namespace cpu
}  // namespace pyfastattn
