// Dropout on the CPU kernels' tiles (issue 17). The keep decision is
// dropout_keep (csrc/attention/dropout.h), evaluated here 16 query lanes at a
// time: one Philox call per (lane, group of 8 keys), in AVX-512 intrinsics
// (philox16_avx512) or plain loops over the lanes elsewhere.
//
// The tile of keep masks is S^T-shaped, keep[j][i] = ~0u (kept) or 0, and is
// applied (Vec::keep, an AND) where the values are in registers anyway:
//   forward : exp_tile zeroes P (fp32 or bf16 pairs) where dropped, after the
//             row sums; the 1 / (1 - p) rescale is folded into O = acc / l.
//   backward: grad_tile takes dP = keep ? dP / (1 - p) : 0 for dS = P (dP - D)
//             and zeroes the P^T that feeds dV where dropped; dV is rescaled
//             at the end (store_dkdv).
// No mask is stored between the forward and the backward: the backward
// regenerates it.
#pragma once


#include "attention_schedule.h"

namespace pyfastattn {
namespace cpu {

#if PFA_X86
// Philox 4x32-10 of 16 counters that differ only in word 2 (x2 = base + lane),
// in AVX-512, and the keep masks of the 8 keys the call decides, written
// straight from the registers: keep[(8g + x - j0) * ld + lane] for the keys
// inside [j0, j0 + n). Each 32 x 32 -> 64 product is a vpmuludq of the even
// lanes and one of the odd lanes shifted down, recombined by two blends
// (about 18 instructions a round for 16 lanes x 8 keys). A key's mask is one
// unsigned compare of its 16-bit piece with the threshold and one masked move
// of all-ones (16 lanes); the scalar loop it replaced (per lane: shift, and,
// compare, negate, arithmetic shift, store) was a third of the one-pass
// backward's instructions with dropout (perf annotate; PERF_NOTES.md).
// Not inlined: inlined, its constants and temporaries stayed live across the
// block functions' loops and cost the bf16 backward without dropout ~3%.
PFA_AVX512 inline __attribute__((noinline)) void philox16_keep_avx512(const Philox4& base, uint32_t k0, uint32_t k1, uint32_t threshold,
                                           int64_t g, int j0, int n, uint32_t* keep, int64_t ld) {
  __m512i x0 = _mm512_set1_epi32(int(base.x[0]));
  __m512i x1 = _mm512_set1_epi32(int(base.x[1]));
  __m512i x2 = _mm512_add_epi32(_mm512_set1_epi32(int(base.x[2])),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i x3 = _mm512_set1_epi32(int(base.x[3]));
  const __m512i m0 = _mm512_set1_epi32(int(kPhiloxM0)), m1 = _mm512_set1_epi32(int(kPhiloxM1));
  constexpr __mmask16 kOdd = 0xAAAA;
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const __m512i e0 = _mm512_mul_epu32(x0, m0), o0 = _mm512_mul_epu32(_mm512_srli_epi64(x0, 32), m0);
    const __m512i e1 = _mm512_mul_epu32(x2, m1), o1 = _mm512_mul_epu32(_mm512_srli_epi64(x2, 32), m1);
    const __m512i lo0 = _mm512_mask_blend_epi32(kOdd, e0, _mm512_slli_epi64(o0, 32));
    const __m512i hi0 = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(e0, 32), o0);
    const __m512i lo1 = _mm512_mask_blend_epi32(kOdd, e1, _mm512_slli_epi64(o1, 32));
    const __m512i hi1 = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(e1, 32), o1);
    x0 = _mm512_xor_si512(_mm512_xor_si512(hi1, x1), _mm512_set1_epi32(int(k0)));
    x2 = _mm512_xor_si512(_mm512_xor_si512(hi0, x3), _mm512_set1_epi32(int(k1)));
    x1 = lo1;
    x3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  const __m512i words[4] = {x0, x1, x2, x3};
  const __m512i thr = _mm512_set1_epi32(int(threshold)), low16 = _mm512_set1_epi32(0xFFFF);
  const __m512i ones = _mm512_set1_epi32(-1);
  for (int x = 0; x < 8; ++x) {
    const int64_t j = 8 * g + x - j0;
    if (j < 0 || j >= n) continue;
    const __m512i w = words[x >> 1];
    const __m512i piece = (x & 1) ? _mm512_srli_epi32(w, 16) : _mm512_and_si512(w, low16);
    const __mmask16 kept = _mm512_cmpge_epu32_mask(piece, thr);
    _mm512_storeu_si512(keep + j * ld, _mm512_maskz_mov_epi32(kept, ones));
  }
}
#endif

// The same for any instruction set: plain loops over the lanes.
PFA_INLINE void philox16(const Philox4& base, uint32_t k0, uint32_t k1, uint32_t* x0, uint32_t* x1,
                         uint32_t* x2, uint32_t* x3) {
  for (int l = 0; l < kLanes; ++l) {
    x0[l] = base.x[0];
    x1[l] = base.x[1];
    x2[l] = base.x[2] + uint32_t(l);
    x3[l] = base.x[3];
  }
  for (int r = 0; r < kPhiloxRounds; ++r) {
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t p0 = uint64_t(kPhiloxM0) * x0[l];
      const uint64_t p1 = uint64_t(kPhiloxM1) * x2[l];
      const uint32_t y0 = uint32_t(p1 >> 32) ^ x1[l] ^ k0;
      const uint32_t y2 = uint32_t(p0 >> 32) ^ x3[l] ^ k1;
      x1[l] = uint32_t(p1);
      x3[l] = uint32_t(p0);
      x0[l] = y0;
      x2[l] = y2;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

// keep[(j - j0) * ld + i] for keys j0 .. j0 + n - 1 and query lanes 0 .. mp - 1
// (rows i0 + lane) of head h, sequence b: dropout_keep of
// csrc/attention/dropout.h, one Philox call per (lane, group of 8 keys).
template <bool kAvx512>
PFA_INLINE void fill_keep_tile(const Ctx& c, int b, int h, int i0, int mp, int j0, int n, uint32_t* keep,
                               int64_t ld) {
  const DropoutKey& d = c.p->dropout;
  const uint32_t k0 = uint32_t(d.seed), k1 = uint32_t(d.seed >> 32);
  const uint32_t thr = uint32_t(d.threshold);  // <= 2^16: compared with 16-bit pieces
  const int64_t g_begin = j0 >> 3, g_end = (int64_t(j0) + n + 7) >> 3;
  alignas(64) uint32_t words[4][kLanes];
  for (int c0 = 0; c0 < mp; c0 += kLanes) {
    for (int64_t g = g_begin; g < g_end; ++g) {
      const Philox4 base = dropout_counter(d, b, h, i0 + c0, g);
#if PFA_X86
      if constexpr (kAvx512) {
        philox16_keep_avx512(base, k0, k1, thr, g, j0, n, keep + c0, ld);
        continue;
      }
#endif
      philox16(base, k0, k1, words[0], words[1], words[2], words[3]);
      for (int x = 0; x < 8; ++x) {
        const int64_t j = 8 * g + x - j0;
        if (j < 0 || j >= n) continue;
        uint32_t* PFA_RESTRICT out = keep + j * ld + c0;
        const uint32_t* PFA_RESTRICT w = words[x >> 1];
        const int shift = (x & 1) * 16;
        for (int l = 0; l < kLanes; ++l) out[l] = ((w[l] >> shift) & 0xFFFFu) >= thr ? ~0u : 0u;
      }
    }
  }
}

}  // namespace cpu
}  // namespace pyfastattn
