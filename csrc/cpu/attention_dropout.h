// Dropout on the CPU kernels' tiles (issue 17). The keep decision is
// dropout_keep (csrc/attention/dropout.h), evaluated here 16 query lanes at a
// time: one Philox call per (lane, group of 4 keys), in plain loops over the
// lanes that the compiler vectorises (vpmuludq) inside the per-instruction-set
// task functions.
//
// The tile of keep masks is S^T-shaped, keep[j][i] = ~0u (kept) or 0, and is
// applied where each step needs it:
//   forward : P (the exp2 tile, fp32 or bf16 pairs) is zeroed where dropped;
//             the 1 / (1 - p) rescale is folded into O = acc / l at the end.
//   backward: dP = keep ? dP / (1 - p) : 0 before dS = P (dP - D); the P^T
//             that feeds dV is zeroed where dropped and dV is rescaled at the
//             end (store_dkdv).
// No mask is stored between the forward and the backward: the backward
// regenerates it.
#pragma once

#include <cstring>

#include "attention_schedule.h"

namespace pyfastattn {
namespace cpu {

// keep[(j - j0) * ld + i] for keys j0 .. j0 + n - 1 and query lanes 0 .. mp - 1
// (rows i0 + lane) of head h, sequence b.
PFA_INLINE void fill_keep_tile(const Ctx& c, int b, int h, int i0, int mp, int j0, int n, uint32_t* keep,
                               int64_t ld) {
  const DropoutKey& d = c.p->dropout;
  const uint32_t k0 = uint32_t(d.seed), k1 = uint32_t(d.seed >> 32);
  const bool drop_all = d.threshold > 0xFFFFFFFFull;
  const uint32_t thr = uint32_t(d.threshold);
  const int64_t g_begin = j0 >> 2, g_end = (int64_t(j0) + n + 3) >> 2;
  for (int c0 = 0; c0 < mp; c0 += kLanes) {
    for (int64_t g = g_begin; g < g_end; ++g) {
      const Philox4 base = dropout_counter(d, b, h, i0 + c0, g);
      alignas(64) uint32_t x0[kLanes], x1[kLanes], x2[kLanes], x3[kLanes];
      for (int l = 0; l < kLanes; ++l) {
        x0[l] = base.x[0];
        x1[l] = base.x[1];
        x2[l] = base.x[2] + uint32_t(l);
        x3[l] = base.x[3];
      }
      uint32_t r0 = k0, r1 = k1;
      for (int r = 0; r < kPhiloxRounds; ++r) {
        for (int l = 0; l < kLanes; ++l) {
          const uint64_t p0 = uint64_t(kPhiloxM0) * x0[l];
          const uint64_t p1 = uint64_t(kPhiloxM1) * x2[l];
          const uint32_t y0 = uint32_t(p1 >> 32) ^ x1[l] ^ r0;
          const uint32_t y2 = uint32_t(p0 >> 32) ^ x3[l] ^ r1;
          x1[l] = uint32_t(p1);
          x3[l] = uint32_t(p0);
          x0[l] = y0;
          x2[l] = y2;
        }
        r0 += kPhiloxW0;
        r1 += kPhiloxW1;
      }
      const uint32_t* words[4] = {x0, x1, x2, x3};
      for (int x = 0; x < 4; ++x) {
        const int64_t j = 4 * g + x - j0;
        if (j < 0 || j >= n) continue;
        uint32_t* PFA_RESTRICT out = keep + j * ld + c0;
        const uint32_t* PFA_RESTRICT w = words[x];
        for (int l = 0; l < kLanes; ++l) out[l] = (!drop_all && w[l] >= thr) ? ~0u : 0u;
      }
    }
  }
}

// fp32 tile t[j][i] (P^T): zero where dropped.
PFA_INLINE void keep_f32(float* t, const uint32_t* keep, int64_t ld, int n, int mp) {
  for (int j = 0; j < n; ++j) {
    uint32_t* PFA_RESTRICT tr = reinterpret_cast<uint32_t*>(t + j * ld);
    const uint32_t* PFA_RESTRICT kr = keep + j * ld;
    for (int i = 0; i < mp; ++i) tr[i] &= kr[i];
  }
}

// fp32 tile dP^T: dP * rescale where kept, 0 where dropped.
PFA_INLINE void keep_scaled_f32(float* t, const uint32_t* keep, int64_t ld, int n, int mp, float rescale) {
  for (int j = 0; j < n; ++j) {
    float* PFA_RESTRICT tr = t + j * ld;
    const uint32_t* PFA_RESTRICT kr = keep + j * ld;
    for (int i = 0; i < mp; ++i) {
      const float v = tr[i] * rescale;
      uint32_t bits;
      std::memcpy(&bits, &v, 4);
      bits &= kr[i];
      std::memcpy(tr + i, &bits, 4);
    }
  }
}

// bf16 rows t[j][i] (P^T for the dV product): zero where dropped.
PFA_INLINE void keep_bf16_rows(uint16_t* t, const uint32_t* keep, int64_t ld, int n, int mp) {
  for (int j = 0; j < n; ++j) {
    uint16_t* PFA_RESTRICT tr = t + j * ld;
    const uint32_t* PFA_RESTRICT kr = keep + j * ld;
    for (int i = 0; i < mp; ++i) tr[i] &= uint16_t(kr[i]);
  }
}

// bf16 pairs along keys, t[j / 2][i] = (P[j][i], P[j + 1][i]): zero the halves
// that are dropped.
PFA_INLINE void keep_pairs(uint32_t* t, const uint32_t* keep, int64_t ld, int n, int mp) {
  for (int j = 0; j < n; j += 2) {
    uint32_t* PFA_RESTRICT tr = t + (j / 2) * ld;
    const uint32_t* PFA_RESTRICT k0 = keep + j * ld;
    if (j + 1 < n) {
      const uint32_t* PFA_RESTRICT k1 = keep + (j + 1) * ld;
      for (int i = 0; i < mp; ++i) tr[i] &= (k0[i] & 0xFFFFu) | (k1[i] & 0xFFFF0000u);
    } else {
      for (int i = 0; i < mp; ++i) tr[i] &= k0[i] & 0xFFFFu;
    }
  }
}

}  // namespace cpu
}  // namespace pyfastattn
