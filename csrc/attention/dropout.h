// The dropout keep decision: one pure function of (seed, offset, b, h, i, j),
// shared by the CPU kernel, the CUDA kernels and the debug `dropout_mask` op
// (pyfastattn/reference.py has the same function in pure PyTorch).
//
// Plain C++ (no torch headers), host and device.
//
// Generator: Philox 4x32-10 (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11), the counter-based generator torch's CUDA generator and
// FlashAttention use. One call maps a 128-bit counter and a 64-bit key to four
// 32-bit words, eight 16-bit halves; they decide eight consecutive keys
// j = 8g .. 8g + 7 (FlashAttention uses 8-bit pieces, 16 keys per call; 16
// bits keep p exact to 2^-17 and still halve the Philox work of 32 bits,
// which cost the CPU kernel 25-36% of a causal fwd+bwd, PERF_NOTES.md).
//
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(t), hi32(t), i, h)   with t = offset + b * 2^29 + (j >> 3)
//   word    = philox(counter, key)[(j >> 1) & 3]
//   u16     = j odd ? word >> 16 : word & 0xffff
//   keep    = u16 >= threshold,  threshold = round(p * 2^16) (p = 1 gives
//             2^16, which no u16 reaches: everything is dropped)
//
// (b, i, j) are the sequence, the query row and the key column inside the
// sequence (varlen: relative to cu_seqlens), h the query head. j >> 3 < 2^29
// for every sequence the kernels accept, so (b, j >> 3) never collide inside
// one call; calls get independent (seed, offset) pairs (see
// pyfastattn/functional.py, `draw_dropout_rng`).
//
// Kept weights are scaled by 1 / (1 - p), as torch.nn.functional.dropout does;
// the forward's row sum (and so lse) is taken before dropout.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PFA_PHILOX_FN __host__ __device__ __forceinline__
#else
#define PFA_PHILOX_FN inline
#endif

namespace pyfastattn {

struct Philox4 {
  uint32_t x[4];
};

// Philox round constants (Random123): multipliers and Weyl key increments.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

PFA_PHILOX_FN void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t prod = uint64_t(a) * uint64_t(b);
  hi = uint32_t(prod >> 32);
  lo = uint32_t(prod);
}

// Philox 4x32-10 of one counter under one key.
PFA_PHILOX_FN Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kPhiloxM0, c.x[0], hi0, lo0);
    philox_mulhilo(kPhiloxM1, c.x[2], hi1, lo1);
    c = Philox4{{hi1 ^ c.x[1] ^ k0, lo1, hi0 ^ c.x[3] ^ k1, lo0}};
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return c;
}

// Dropout state of one call, filled by csrc/attention/api.cpp.
struct DropoutKey {
  uint64_t seed;
  uint64_t offset;
  uint64_t threshold;  // round(p * 2^16); a 16-bit piece u is kept iff u >= threshold
};

// Threshold of a drop probability p in [0, 1] (2^16 for p = 1).
PFA_PHILOX_FN uint64_t dropout_threshold(double p) {
  if (!(p > 0.0)) return 0;
  if (p >= 1.0) return uint64_t(1) << 16;
  return uint64_t(p * 65536.0 + 0.5);
}

// The counter of keys 8g .. 8g + 7 of query row i, head h, sequence b.
PFA_PHILOX_FN Philox4 dropout_counter(const DropoutKey& d, int64_t b, int64_t h, int64_t i, int64_t g) {
  const uint64_t t = d.offset + (uint64_t(b) << 29) + uint64_t(g);
  return Philox4{{uint32_t(t), uint32_t(t >> 32), uint32_t(i), uint32_t(h)}};
}

// The four words deciding keys 8g .. 8g + 7 (word x: keys 8g + 2x, 8g + 2x + 1).
PFA_PHILOX_FN Philox4 dropout_words(const DropoutKey& d, int64_t b, int64_t h, int64_t i, int64_t g) {
  return philox4x32_10(dropout_counter(d, b, h, i, g), uint32_t(d.seed), uint32_t(d.seed >> 32));
}

// Whether query row i of head h, sequence b keeps key j.
PFA_PHILOX_FN bool dropout_keep(const DropoutKey& d, int64_t b, int64_t h, int64_t i, int64_t j) {
  const Philox4 w = dropout_words(d, b, h, i, j >> 3);
  // Selects, not w.x[(j >> 1) & 3]: a dynamic index puts w in (CUDA) local memory.
  const uint32_t x = (j & 4) ? ((j & 2) ? w.x[3] : w.x[2]) : ((j & 2) ? w.x[1] : w.x[0]);
  return uint64_t((j & 1) ? x >> 16 : x & 0xFFFFu) >= d.threshold;
}

}  // namespace pyfastattn
