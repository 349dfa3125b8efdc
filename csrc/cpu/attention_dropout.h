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


#include <algorithm>

#include "attention_schedule.h"
#include "attention_tile.h"

namespace pyfastattn {
namespace cpu {

#if PFA_X86
// Philox 4x32-10 of 16 counters that differ only in word 2 (x2 = base + lane),
// in AVX-512, and the keep masks of the 8 keys the call decides, written
// straight from the registers: keep[(8g + x - j0) * ld + lane] for the keys
// inside [j0, j0 + n).
// Layout: lanes 0-7 in the 64-bit elements of one set of four registers (a),
// lanes 8-15 in another (b), each 32-bit word in the low half of its element.
// vpmuludq multiplies exactly those low halves, so a round is, per set, two
// vpmuludq, two 64-bit shifts (the high product down) and two vpternlogd
// (hi ^ x ^ round key): 12 vector instructions for 16 lanes. The high halves
// carry junk that no instruction reads into a low half. v4's form kept 16
// lanes in 32-bit elements and recombined even and odd products with shifts
// and blends, 18 a round (PERF_NOTES.md, dropout v5). The round keys come
// precomputed (round_keys: k0, k1 of round 0, then of round 1, ...), as
// broadcast memory operands. At the end one vpermt2d per word gathers the 16
// low halves into 32-bit lanes; a key's mask is one unsigned compare of its
// 16-bit piece with the threshold and one masked move of all-ones (16 lanes).
// Not inlined: inlined, its constants and temporaries stayed live across the
// block functions' loops and cost the bf16 backward without dropout ~3%.
PFA_AVX512 inline __attribute__((noinline)) void philox16_keep_avx512(const Philox4& base, const uint32_t* round_keys,
                                                                      uint32_t threshold, int64_t g, int j0, int n,
                                                                      uint32_t* keep, int64_t ld) {
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i a0 = _mm512_set1_epi64(base.x[0]), a1 = _mm512_set1_epi64(base.x[1]);
  __m512i a2 = _mm512_add_epi64(_mm512_set1_epi64(base.x[2]), lane), a3 = _mm512_set1_epi64(base.x[3]);
  __m512i b0 = a0, b1 = a1, b3 = a3;
  __m512i b2 = _mm512_add_epi64(_mm512_set1_epi64(uint64_t(base.x[2]) + 8), lane);
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
#pragma GCC unroll 10
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const __m512i k0 = _mm512_set1_epi32(int(round_keys[2 * r])), k1 = _mm512_set1_epi32(int(round_keys[2 * r + 1]));
    const __m512i pa0 = _mm512_mul_epu32(a0, m0), pa1 = _mm512_mul_epu32(a2, m1);
    const __m512i pb0 = _mm512_mul_epu32(b0, m0), pb1 = _mm512_mul_epu32(b2, m1);
    a0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(pa1, 32), a1, k0, 0x96);
    a2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(pa0, 32), a3, k1, 0x96);
    b0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(pb1, 32), b1, k0, 0x96);
    b2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(pb0, 32), b3, k1, 0x96);
    a1 = pa1;
    a3 = pa0;
    b1 = pb1;
    b3 = pb0;
  }
  const __m512i low = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i words[4] = {_mm512_permutex2var_epi32(a0, low, b0), _mm512_permutex2var_epi32(a1, low, b1),
                            _mm512_permutex2var_epi32(a2, low, b2), _mm512_permutex2var_epi32(a3, low, b3)};
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
// rr: the rows' key ranges (rr.m = the block's rows). A group of 8 keys that
// no row of a 16-lane group attends (the far side of the causal diagonal or
// of a window, keys past a varlen row's end) gets no Philox call: its masks
// are stored as 0. Those scores are -inf, so P there is 0 whatever its mask
// (the forward's exp2, the backward's P and P^T alike); on the diagonal tiles
// of a causal call at S512 this skips ~45% of the calls (PERF_NOTES, dropout v5).
template <bool kAvx512>
PFA_INLINE void fill_keep_tile(const Ctx& c, int b, int h, int i0, const RowRanges& rr, int mp, int j0, int n,
                               uint32_t* keep, int64_t ld) {
  const DropoutKey& d = c.p->dropout;
  const uint32_t k0 = uint32_t(d.seed), k1 = uint32_t(d.seed >> 32);
  const uint32_t thr = uint32_t(d.threshold);  // <= 2^16: compared with 16-bit pieces
  alignas(64) uint32_t round_keys[2 * kPhiloxRounds];
  for (int r = 0; r < kPhiloxRounds; ++r) {
    round_keys[2 * r] = k0 + uint32_t(r) * kPhiloxW0;
    round_keys[2 * r + 1] = k1 + uint32_t(r) * kPhiloxW1;
  }
  const int64_t g_begin = j0 >> 3, g_end = (int64_t(j0) + n + 7) >> 3;
  alignas(64) uint32_t words[4][kLanes];
  for (int c0 = 0; c0 < mp; c0 += kLanes) {
    // The keys any row of this lane group attends lie in [glo, ghi): the
    // rows' lo and hi are nondecreasing (attention_tile.h), so the group's
    // first row has the least lo and its last row the greatest hi.
    const RowRanges group{rr.lo + c0, rr.hi + c0, std::min(kLanes, rr.m - c0)};
    const int glo = group.first(), ghi = group.last();
    const int64_t gs = glo < ghi ? std::max(g_begin, int64_t(glo) >> 3) : g_end;
    const int64_t ge = glo < ghi ? std::min(g_end, (int64_t(ghi) + 7) >> 3) : g_end;
    // Keys [wb, we) of the tile get their masks from the Philox calls below;
    // the rest are stored as 0.
    const int64_t wb = gs < ge ? std::max<int64_t>(j0, 8 * gs) : j0;
    const int64_t we = gs < ge ? std::min<int64_t>(int64_t(j0) + n, 8 * ge) : j0;
    const auto zero = [&](int64_t from, int64_t to) {
      for (int64_t j = from; j < to; ++j) {
        uint32_t* PFA_RESTRICT out = keep + (j - j0) * ld + c0;
        for (int l = 0; l < kLanes; ++l) out[l] = 0u;
      }
    };
    zero(j0, wb);
    zero(we, int64_t(j0) + n);
    for (int64_t g = gs; g < ge; ++g) {
      const Philox4 base = dropout_counter(d, b, h, i0 + c0, g);
#if PFA_X86
      if constexpr (kAvx512) {
        philox16_keep_avx512(base, round_keys, thr, g, j0, n, keep + c0, ld);
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
