// FlashAttention-2-class forward kernel for sm_80 and newer (mma.sync).
//
// One CTA of 4 warps computes O and LSE for kBlockM query rows of one (head,
// sequence). Q stays in shared memory; K and V stream through in kBlockN-row
// tiles. Each warp owns kBlockM / 4 query rows and keeps their O accumulator
// and running softmax statistics in registers; no state is shared across warps
// except the K/V tiles, so the only block-wide barriers are the two per key
// block that hand a filled tile to all warps.
//
// Pipeline (one K buffer, one V buffer, every copy overlapping compute):
//
//   issue Q, K[first]                                   group
//   for each visible key block n:
//     wait all; barrier   K[n] (and Q) visible to all warps; V and mask buffers
//                         free (every warp is past P V[n-1])
//     issue V[n] (+ attn_mask tile n)                   group -- lands during Q K^T
//     S = Q K[n]^T; scale / softcap
//     wait all; barrier   V[n] and the mask tile visible; K buffer free
//     issue K[n+1]                                      group -- lands during softmax, P V
//     mask S; online softmax (S -> P, rescale O); O += P V[n]
//
// A copy is always in flight while the other tile is read, the overlap of
// double-buffering K and V separately, at 3 tiles of shared memory instead of
// 5: d = 128 needs 48 KB, so 3 CTAs per SM fit on A100 by shared memory
// (registers allow 2).
//
// Shared-memory tiles are row-major [rows][head_dim] with the 16-byte chunks of
// each row XOR-swizzled (SwizzledRows), so ldmatrix, cp.async and the output
// staging are free of bank conflicts. The attn_mask tile is staged in shared
// memory too (cp.async), so applying it costs shared loads, not global loads
// held in registers next to S and O.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "../../attention/params.h"
#include "attention_fwd_traits.h"
#include "sm80_primitives.cuh"

namespace pyfastattn {
namespace cuda {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

PFA_HOST_DEVICE constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
PFA_HOST_DEVICE constexpr int min_int(int a, int b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------
// Shared-memory layout
// ---------------------------------------------------------------------------

// A tile of rows of kCols 16-bit elements, row-major, with the 16-byte chunk
// index of each row XORed by a function of the row. Shared memory serves a
// 16-byte-per-lane access in phases of 8 lanes over 8 bank groups of 16 bytes,
// so the 8 rows that one 8x8 ldmatrix matrix (or one cp.async phase) touches
// must land in 8 different bank groups (byte offset / 16 mod 8):
//   rows of 8k chunks (d = 64, 128, 256): every row starts in bank group 0;
//     chunk ^ (row % 8) spreads 8 consecutive rows over all 8 groups.
//   rows of 4 or 12 chunks (d = 32, 96): odd rows start half a window later,
//     so row parity already separates two groups of 4; chunk ^ ((row / 2) % 4)
//     spreads the 4 rows of each parity. The XOR stays inside an aligned group
//     of 4 chunks, so it never leaves the row.
// Both swizzles depend on row % 8 only.
template <int kCols>
struct SwizzledRows {
  static constexpr int kChunks = kCols / 8;
  static constexpr int kRowBytes = kCols * 2;
  static_assert(kChunks % 4 == 0, "rows must be a multiple of 4 16-byte chunks (32 elements)");
  // Chunks permuted among themselves by the XOR: 8 (d = 64, 128, 256) or 4.
  static constexpr int kWindow = kChunks % 8 == 0 ? 8 : 4;

  PFA_HOST_DEVICE static constexpr int swizzle(int row) {
    return kWindow == 8 ? (row & 7) : ((row >> 1) & 3);
  }
  // Byte offset of 16-byte chunk `chunk` of row `row`.
  PFA_HOST_DEVICE static constexpr uint32_t offset(int row, int chunk) {
    return static_cast<uint32_t>(row * kRowBytes + ((chunk ^ swizzle(row)) << 4));
  }
};

// One lane's ldmatrix addresses into a swizzled tile, for every k16 step.
// ldmatrix.x4 over a 16 x 16 block has each lane name one 16-byte row piece:
// row `row` (+ a multiple of 8, which keeps its swizzle) and logical chunk
// 2 * step + half, half in {0, 1}. With W = kWindow that chunk is stored at
//   (2 * step + half) ^ sw = W * (step / (W/2)) + ((2 * (step % (W/2)) + half) ^ sw),
// so W/2 registers hold all steps' addresses up to an immediate offset, which
// ldmatrix takes for free. (Materialising each step's address instead costs a
// register per step per operand, hoisted out of the key loop: 80 registers
// for d = 128, and spills.)
template <int kCols>
struct LdmatrixAddrs {
  using Tile = SwizzledRows<kCols>;
  static constexpr int kBases = Tile::kWindow / 2;
  uint32_t base[kBases];

  PFA_ATTN_DEVICE LdmatrixAddrs(uint32_t tile, int row, int half) {
    const int sw = Tile::swizzle(row);
#pragma unroll
    for (int r = 0; r < kBases; ++r)
      base[r] = tile + static_cast<uint32_t>(row * Tile::kRowBytes + (((2 * r + half) ^ sw) << 4));
  }
  // Address for k16 step `step` (chunks 2 * step, 2 * step + 1) of the row
  // `rows_down` (a multiple of 8) below the lane's row.
  PFA_ATTN_DEVICE uint32_t at(int step, int rows_down) const {
    return base[step % kBases] +
           static_cast<uint32_t>((step / kBases) * Tile::kWindow * 16 + rows_down * Tile::kRowBytes);
  }
};

// ---------------------------------------------------------------------------
// Register tiles of one warp
// ---------------------------------------------------------------------------

// S (scores, then probabilities) and O accumulators: [m16 tile][n8 tile][4] in
// the mma C layout, so each lane holds rows g and g + 8 of every m16 tile.
template <typename T>
using ScoreTile = float[T::kMTiles][T::kNTilesS][4];
template <typename T>
using OutTile = float[T::kMTiles][T::kNTilesO][4];
// Per-row running max (log2 units) and partial sum: [m16 tile][row g, row g+8].
template <typename T>
using RowStats = float[T::kMTiles][2];

// ---------------------------------------------------------------------------
// Tile steps
// ---------------------------------------------------------------------------

// Copies kRows rows of head_dim elements starting at `g_rows` into the swizzled
// tile at `s_tile`, 16 bytes per cp.async. Rows >= valid_rows and columns >=
// head_dim (a head dim below the compiled one) are zero-filled without reading
// global memory; `safe` (a valid global address) stands in as their source.
//
// Thread t copies chunk t % kSpan of rows t / kSpan + i * (kNThreads / kSpan),
// kSpan = kRowChunks rounded up to a power of two (16 for d = 96: its threads
// with chunk >= 12 idle), so that each thread's chunk and row % 8 (its
// swizzle) are fixed and its addresses advance by constants: no per-copy
// division, no per-copy address registers. Consecutive threads take
// consecutive chunks of a row: coalesced reads.
template <typename T, int kRows>
PFA_ATTN_DEVICE void load_rows_async(uint32_t s_tile, const typename T::Element* g_rows,
                                     int64_t row_stride, int valid_rows, int head_dim,
                                     const void* safe) {
  using Tile = SwizzledRows<T::kHeadDim>;
  constexpr int kChunks = T::kRowChunks;
  constexpr int kSpan = kChunks <= 4 ? 4 : kChunks <= 8 ? 8 : kChunks <= 16 ? 16 : 32;
  constexpr int kRowsPerPass = T::kNThreads / kSpan;
  static_assert(kRows % kRowsPerPass == 0, "a tile is a whole number of passes");
  const int chunk = static_cast<int>(threadIdx.x) % kSpan;
  const int row = static_cast<int>(threadIdx.x) / kSpan;
  if (kSpan != kChunks && chunk >= kChunks) return;
  const bool chunk_valid = chunk * 8 < head_dim;
  const typename T::Element* src = g_rows + row * row_stride + chunk * 8;
  const int64_t pass_stride = kRowsPerPass * row_stride;
#pragma unroll
  for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
    const int r = row + pass * kRowsPerPass;
    const bool valid = chunk_valid && r < valid_rows;
    sm80::cp_async_16(s_tile + Tile::offset(r, chunk), valid ? static_cast<const void*>(src) : safe,
                      valid);
    src += pass_stride;
  }
}

// Lane addresses for the ldmatrix.x4 loads of all three operands. Every load
// covers a 16 x 16 block as four 8x8 matrices, lanes 8m..8m+7 addressing the
// rows of matrix m, in the same order for Q, K and V:
//   matrix 0: rows 0-7, cols 0-7     matrix 1: rows 8-15, cols 0-7
//   matrix 2: rows 0-7, cols 8-15    matrix 3: rows 8-15, cols 8-15
// so lane l addresses row (l % 8) + 8 * ((l / 8) % 2), chunk half l / 16.
//   Q (A of S = Q K^T, row-major): registers 0..3 are a0..a3.
//   K (B of S; K is [key][d] = B^T row-major; rows = keys, cols = k):
//     registers 0, 2 are b0, b1 of keys 0-7; registers 1, 3 of keys 8-15.
//   V (B of O = P V; V is [key][d], B is k-major, read with .trans; rows =
//     keys = k, cols = d): registers 0, 1 are b0, b1 of d 0-7; 2, 3 of d 8-15.
template <int kCols>
PFA_ATTN_DEVICE LdmatrixAddrs<kCols> frag_addrs(uint32_t tile, int row0, int lane) {
  return LdmatrixAddrs<kCols>(tile, row0 + (lane & 7) + ((lane >> 3) & 1) * 8, lane >> 4);
}

// S = Q K^T for this warp's rows and the kBlockN keys of the K tile.
// Per k16 step: one ldmatrix.x4 per m16 tile of Q (A), then one ldmatrix.x4
// per 16 keys of K (B for two n8 tiles), each B fragment feeding kMTiles MMAs.
template <typename T>
PFA_ATTN_DEVICE void gemm_qk(ScoreTile<T>& s, const LdmatrixAddrs<T::kHeadDim>& q_addr,
                             const LdmatrixAddrs<T::kHeadDim>& k_addr) {
  using Element = typename T::Element;
#pragma unroll
  for (int mt = 0; mt < T::kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < T::kNTilesS; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) s[mt][nt][r] = 0.f;
#pragma unroll
  for (int ks = 0; ks < T::kKStepsQK; ++ks) {
    uint32_t a[T::kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < T::kMTiles; ++mt)
      sm80::ldmatrix_x4(a[mt], q_addr.at(ks, mt * 16));
#pragma unroll
    for (int np = 0; np < T::kNTilesS / 2; ++np) {
      uint32_t b[4];
      sm80::ldmatrix_x4(b, k_addr.at(ks, np * 16));
#pragma unroll
      for (int mt = 0; mt < T::kMTiles; ++mt) {
        sm80::mma_m16n8k16<Element>(s[mt][2 * np], a[mt], b[0], b[2]);
        sm80::mma_m16n8k16<Element>(s[mt][2 * np + 1], a[mt], b[1], b[3]);
      }
    }
  }
}

// Scores to log2 units, s * scale * log2(e), so that softmax runs on exp2.
// With softcap: s = softcap * tanh(s * scale / softcap), then * log2(e).
template <typename T>
PFA_ATTN_DEVICE void scores_to_log2(ScoreTile<T>& s, const AttentionFwdParams& p) {
  if (p.softcap > 0.f) {
    const float pre = sm80::fast_div(p.scale, p.softcap);
    const float post = p.softcap * kLog2e;
#pragma unroll
    for (int mt = 0; mt < T::kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < T::kNTilesS; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) s[mt][nt][r] = post * sm80::fast_tanh(s[mt][nt][r] * pre);
  } else {
#pragma unroll
    for (int mt = 0; mt < T::kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < T::kNTilesS; ++nt)
#pragma unroll
        for (int r = 0; r < 4; ++r) s[mt][nt][r] *= p.scale_log2;
  }
}

// Copies the attn_mask values of this CTA's rows for keys [n0, n0 + kBlockN)
// into the staging tile at `s_mask` (row r at r * kMaskRowBytes). Mask rows
// have any alignment (sk is arbitrary), and cp.async needs an aligned source,
// so each row is copied as the aligned 4-byte words that cover it: the row's
// first key sits `mask_lead` bytes into its staging row. Bytes past the
// block's last key below len_k, and whole rows past len_q, are zero-filled
// without being read; the up-to-3 bytes before the first key share its
// aligned word, so reading them stays inside mapped memory.
template <typename T, int kElemBytes>
PFA_ATTN_DEVICE void load_mask_async(uint32_t s_mask, const AttentionFwdParams& p,
                                     const SeqInfo& seq, int h, int m0, int rows_q, int n0) {
  constexpr int kWords = T::kBlockN * kElemBytes / 4 + 1;
  constexpr int kThreadsPerRow = T::kNThreads / T::kBlockM;
  static_assert(T::kNThreads % T::kBlockM == 0, "mask rows are split evenly over the threads");
  static_assert(kWords * 4 <= T::kMaskRowBytes, "mask staging row too short");
  const int r = static_cast<int>(threadIdx.x) % T::kBlockM;
  const int w0 = static_cast<int>(threadIdx.x) / T::kBlockM;
  const char* row = static_cast<const char*>(p.mask) +
                    (int64_t(seq.bi) * p.mask_batch_stride + int64_t(h) * p.mask_head_stride +
                     int64_t(m0 + r) * p.mask_row_stride + n0) *
                        kElemBytes;
  const int lead = static_cast<int>(reinterpret_cast<uintptr_t>(row) & 3u);
  const char* word0 = row - lead;
  const char* safe = static_cast<const char*>(p.mask) - (reinterpret_cast<uintptr_t>(p.mask) & 3u);
  const int valid_bytes = r < rows_q ? lead + min_int(T::kBlockN, seq.len_k - n0) * kElemBytes : 0;
  const uint32_t dst = s_mask + static_cast<uint32_t>(r * T::kMaskRowBytes);
#pragma unroll
  for (int k = 0; k < (kWords + kThreadsPerRow - 1) / kThreadsPerRow; ++k) {
    const int w = w0 + k * kThreadsPerRow;
    if (w < kWords) {
      const int rest = valid_bytes - 4 * w;
      const int bytes = rest < 0 ? 0 : (rest > 4 ? 4 : rest);
      sm80::cp_async_4(dst + 4 * w, bytes > 0 ? word0 + 4 * w : safe, bytes);
    }
  }
}

// Byte offset of key n0 inside the staging row of sequence row i (see
// load_mask_async): the low two bits of its global address. 32-bit arithmetic
// gives the same low bits as the 64-bit address computation.
template <int kElemBytes>
PFA_ATTN_DEVICE uint32_t mask_lead(const AttentionFwdParams& p, const SeqInfo& seq, int h, int i,
                                   int n0) {
  const uint32_t elem = uint32_t(seq.bi) * uint32_t(p.mask_batch_stride) +
                        uint32_t(h) * uint32_t(p.mask_head_stride) +
                        uint32_t(i) * uint32_t(p.mask_row_stride) + uint32_t(n0);
  return (uint32_t(reinterpret_cast<uintptr_t>(p.mask)) + elem * kElemBytes) & 3u;
}

// x + bias for an additive-mask value `bias` (natural units), in log2 units.
// -inf stays -inf (a hidden key). A finite sum is clamped at -FLT_MAX instead
// of overflowing: bf16's lowest value (-3.39e38, a common "masked" bias) times
// log2(e) is beyond fp32, and an fp32 reference keeps such scores finite (a row
// hidden only by such biases then averages its V rows, as the reference does).
PFA_ATTN_DEVICE float add_bias_log2(float x, float bias) {
  return bias == -INFINITY ? -INFINITY : fmaxf(x + bias * kLog2e, -FLT_MAX);
}

// Sets hidden scores to -inf and adds an additive mask, for one key block
// starting at key n0. Row i of the sequence (0-based) sees key j iff
// key_lo(i) <= j < key_hi(i) (window, causal and len_k folded together by
// SeqInfo) and the attn_mask allows it. `row0` is this lane's first row;
// `s_mask_row` its row of the staged mask tile (kMaskKind != kNone).
template <typename T, MaskKind kMaskKind>
PFA_ATTN_DEVICE void mask_scores(ScoreTile<T>& s, const AttentionFwdParams& p, const SeqInfo& seq,
                                 int h, int row0, int n0, int lane, uint32_t s_mask_row) {
  using Element = typename T::Element;
  constexpr int kElemBytes = kMaskKind == MaskKind::kBool ? 1 : 2;
  const int col = 2 * (lane & 3);  // this lane's first key, relative to n0
#pragma unroll
  for (int mt = 0; mt < T::kMTiles; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int i = row0 + mt * 16 + hh * 8;
      const int lo = seq.key_lo(p, i) - n0;
      const int hi = seq.key_hi(p, i) - n0;
      uint32_t m_addr = 0;
      if constexpr (kMaskKind != MaskKind::kNone)
        m_addr = s_mask_row + static_cast<uint32_t>((mt * 16 + hh * 8) * T::kMaskRowBytes) +
                 mask_lead<kElemBytes>(p, seq, h, i, n0);
#pragma unroll
      for (int nt = 0; nt < T::kNTilesS; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = col + nt * 8 + e;
          float& x = s[mt][nt][2 * hh + e];
          bool visible = j >= lo && j < hi;
          if constexpr (kMaskKind == MaskKind::kBool) {
            visible = visible && sm80::ld_shared_u8(m_addr + j) != 0;
          } else if constexpr (kMaskKind == MaskKind::kAdditive) {
            x = add_bias_log2(x, sm80::bits_to_float<Element>(sm80::ld_shared_u16(m_addr + 2 * j)));
          }
          x = visible ? x : -INFINITY;
        }
      }
    }
  }
}

// ALiBi (issue 17): S -= slope * log2(e) * |i + len_k - len_q - j| for this
// lane's rows i and keys j of the block at n0. Hidden scores stay -inf.
template <typename T>
PFA_ATTN_DEVICE void add_alibi(ScoreTile<T>& s, const AttentionFwdParams& p, const SeqInfo& seq, int h,
                               int row0, int n0, int lane) {
  const float slope = p.alibi_slopes[int64_t(seq.bi) * p.alibi_batch_stride + h] * kLog2e;
  const int col = n0 + 2 * (lane & 3);
#pragma unroll
  for (int mt = 0; mt < T::kMTiles; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int diag = row0 + mt * 16 + hh * 8 + seq.len_k - seq.len_q - col;
#pragma unroll
      for (int nt = 0; nt < T::kNTilesS; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float& x = s[mt][nt][2 * hh + e];
          x -= slope * fabsf(float(diag - nt * 8 - e));
        }
      }
    }
  }
}

// The dropout key of this call: (seed, offset) from device memory when the
// pair lives there (drawn on the GPU), else from the params.
PFA_ATTN_DEVICE DropoutKey dropout_key(const AttentionFwdParams& p) {
  DropoutKey key = p.dropout;
  if (p.dropout_rng != nullptr) {
    key.seed = static_cast<uint64_t>(p.dropout_rng[0]);
    key.offset = static_cast<uint64_t>(p.dropout_rng[1]);
  }
  return key;
}

// Dropout (issue 17) on P after online_softmax took its row sums: zero where
// dropout_keep (csrc/attention/dropout.h) drops. A lane holds keys 2c, 2c + 1
// (c = lane & 3) of each n8 tile: the two halves of one Philox word.
template <typename T>
PFA_ATTN_DEVICE void apply_dropout(ScoreTile<T>& s, const DropoutKey& key, const SeqInfo& seq, int h, int row0,
                                   int n0, int lane) {
  static_assert(2 * T::kNTilesS <= 64, "one 64-bit keep mask per row");
  const int col = n0 + 2 * (lane & 3);
#pragma unroll
  for (int mt = 0; mt < T::kMTiles; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int i = row0 + mt * 16 + hh * 8;
      // The keep bits of the row first, one Philox call at a time (a loop
      // kept rolled, so its temporaries do not pile up on the score tile's
      // registers: unrolled, the hdim64 kernel spilled 136 bytes), then
      // applied to the unrolled tile.
      uint64_t drop = 0;
#pragma unroll 1
      for (int nt = 0; nt < T::kNTilesS; ++nt) {
        const int j = col + nt * 8;  // even: keys j, j + 1 are the halves of one word
        const Philox4 w = dropout_words(key, seq.bi, h, i, j >> 3);
        const uint32_t x = (j & 4) ? ((j & 2) ? w.x[3] : w.x[2]) : ((j & 2) ? w.x[1] : w.x[0]);
        drop |= uint64_t((x & 0xFFFFu) < key.threshold) << (2 * nt);
        drop |= uint64_t((x >> 16) < key.threshold) << (2 * nt + 1);
      }
#pragma unroll
      for (int nt = 0; nt < T::kNTilesS; ++nt) {
        if ((drop >> (2 * nt)) & 1) s[mt][nt][2 * hh] = 0.f;
        if ((drop >> (2 * nt + 1)) & 1) s[mt][nt][2 * hh + 1] = 0.f;
      }
    }
  }
}

// Online softmax over one key block. S (log2 units, hidden = -inf) becomes the
// unnormalised probabilities P = exp2(S - running max); O and the partial row
// sums are rescaled by exp2(old max - new max). A row has 4 lanes (a quad), so
// the row max is reduced with two xor-shuffles; the row sum stays per lane
// until finalize_rows (every lane of a row rescales by the same factor).
template <typename T>
PFA_ATTN_DEVICE void online_softmax(ScoreTile<T>& s, OutTile<T>& o, RowStats<T>& row_max,
                                    RowStats<T>& row_sum) {
#pragma unroll
  for (int mt = 0; mt < T::kMTiles; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float mx = row_max[mt][hh];
#pragma unroll
      for (int nt = 0; nt < T::kNTilesS; ++nt)
        mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hh], s[mt][nt][2 * hh + 1]));
      mx = fmaxf(mx, sm80::shfl_xor(mx, 1));
      mx = fmaxf(mx, sm80::shfl_xor(mx, 2));
      // A row that has seen no visible key yet keeps max -inf. Subtracting 0
      // instead keeps every exp2 at exp2(-inf) = 0 and never forms -inf - -inf.
      const float base = mx == -INFINITY ? 0.f : mx;
      const float alpha = sm80::fast_exp2(row_max[mt][hh] - base);  // 0 on a row's first keys
      row_max[mt][hh] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < T::kNTilesS; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pr = sm80::fast_exp2(s[mt][nt][2 * hh + e] - base);
          s[mt][nt][2 * hh + e] = pr;
          sum += pr;
        }
      }
      row_sum[mt][hh] = row_sum[mt][hh] * alpha + sum;
#pragma unroll
      for (int nt = 0; nt < T::kNTilesO; ++nt) {
        o[mt][nt][2 * hh] *= alpha;
        o[mt][nt][2 * hh + 1] *= alpha;
      }
    }
  }
}

// O += P V. P comes from registers: the C fragments of n8 tiles 2k and 2k + 1
// of S are exactly the A fragment of k16 step k (rows g / g + 8, keys 2c.. and
// 2c+8..), packed to 16 bits. Each ldmatrix.x4.trans of V gives the B
// fragments of two d tiles, each feeding kMTiles MMAs.
template <typename T>
PFA_ATTN_DEVICE void gemm_pv(OutTile<T>& o, const ScoreTile<T>& s,
                             const LdmatrixAddrs<T::kHeadDim>& v_addr) {
  using Element = typename T::Element;
#pragma unroll
  for (int kk = 0; kk < T::kKStepsPV; ++kk) {
    uint32_t a[T::kMTiles][4];
#pragma unroll
    for (int mt = 0; mt < T::kMTiles; ++mt) {
      a[mt][0] = sm80::pack2<Element>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
      a[mt][1] = sm80::pack2<Element>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
      a[mt][2] = sm80::pack2<Element>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
      a[mt][3] = sm80::pack2<Element>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < T::kNTilesO / 2; ++dp) {
      uint32_t b[4];
      sm80::ldmatrix_x4_trans(b, v_addr.at(dp, kk * 16));
#pragma unroll
      for (int mt = 0; mt < T::kMTiles; ++mt) {
        sm80::mma_m16n8k16<Element>(o[mt][2 * dp], a[mt], b[0], b[1]);
        sm80::mma_m16n8k16<Element>(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// Normalises O by the row sums and writes LSE. A row with no visible key has
// sum 0: O stays 0 and LSE is -inf. LSE = (max + log2(sum)) * ln(2), natural log.
template <typename T>
PFA_ATTN_DEVICE void finalize_rows(OutTile<T>& o, const RowStats<T>& row_max,
                                   const RowStats<T>& row_sum, const AttentionFwdParams& p,
                                   const SeqInfo& seq, int h, int row0, int lane) {
  const float rescale = p.dropout_p > 0.f ? p.dropout_rescale : 1.f;
#pragma unroll
  for (int mt = 0; mt < T::kMTiles; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      float sum = row_sum[mt][hh];
      sum += sm80::shfl_xor(sum, 1);
      sum += sm80::shfl_xor(sum, 2);
      // sum >= 1 when > 0; dropout's 1 / (1 - p) is folded in here.
      const float inv = sum > 0.f ? rescale * sm80::fast_rcp(sum) : 0.f;
#pragma unroll
      for (int nt = 0; nt < T::kNTilesO; ++nt) {
        o[mt][nt][2 * hh] *= inv;
        o[mt][nt][2 * hh + 1] *= inv;
      }
      const int i = row0 + mt * 16 + hh * 8;
      if (p.lse != nullptr && (lane & 3) == 0 && i < seq.len_q) {
        const float lse = sum > 0.f ? (row_max[mt][hh] + sm80::fast_log2(sum)) * kLn2 : -INFINITY;
        sm80::st_global_f32(p.lse + seq.lse_index(p, h, i), lse);
      }
    }
  }
}

// Writes this warp's rows of O: registers -> (16-bit) swizzled staging rows in
// shared memory -> 16-byte coalesced global stores. The staging rows are this
// warp's own rows of the Q tile, which no other warp reads, so warp-level
// synchronisation suffices. Rows >= len_q and columns >= head_dim are never
// written.
template <typename T>
PFA_ATTN_DEVICE void store_out(const OutTile<T>& o, uint32_t s_stage, typename T::Element* g_rows,
                               int64_t row_stride, int valid_rows, int head_dim, int warp_row0,
                               int lane) {
  using Tile = SwizzledRows<T::kHeadDim>;
  using Element = typename T::Element;
  sm80::sync_warp();  // all lanes are done reading Q from these rows
#pragma unroll
  for (int mt = 0; mt < T::kMTiles; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
      for (int nt = 0; nt < T::kNTilesO; ++nt) {
        const int row = warp_row0 + mt * 16 + hh * 8 + (lane >> 2);
        sm80::st_shared_u32(s_stage + Tile::offset(row, nt) + (lane & 3) * 4,
                            sm80::pack2<Element>(o[mt][nt][2 * hh], o[mt][nt][2 * hh + 1]));
      }
  sm80::sync_warp();
  constexpr int kChunks = T::kRowChunks;
  constexpr int kPerLane = T::kWarpRows * kChunks / 32;
#pragma unroll
  for (int it = 0; it < kPerLane; ++it) {
    const int idx = it * 32 + lane;
    const int row = warp_row0 + idx / kChunks;
    const int chunk = idx % kChunks;
    const uint4 v = sm80::ld_shared_v4(s_stage + Tile::offset(row, chunk));
    if (row < valid_rows && chunk * 8 < head_dim)
      sm80::st_global_v4(g_rows + row * row_stride + chunk * 8, v);
  }
}

// ---------------------------------------------------------------------------
// The kernel
// ---------------------------------------------------------------------------

// Grid: x = query block, (y, z) = flattened (head, sequence) index
// y + gridDim.y * z = h + num_heads * bi, so batch * heads may exceed 65535.
template <typename T>
__global__ void __launch_bounds__(T::kNThreads)
    attention_fwd_kernel(const __grid_constant__ AttentionFwdParams p) {
  using Element = typename T::Element;
  constexpr int kBlockM = T::kBlockM;
  constexpr int kBlockN = T::kBlockN;

  // y, z <= 65535, so the index fits 32 bits (a 64-bit division is a CALL).
  const uint32_t head_seq = blockIdx.z * gridDim.y + blockIdx.y;
  if (head_seq >= uint32_t(p.num_heads) * uint32_t(p.batch)) return;  // grid rounding
  const int h = static_cast<int>(head_seq % uint32_t(p.num_heads));
  const SeqInfo seq(p, static_cast<int>(head_seq / uint32_t(p.num_heads)));
  const int m0 = static_cast<int>(blockIdx.x) * kBlockM;  // first query row of this CTA
  if (m0 >= seq.len_q) return;  // varlen: this sequence is shorter than max_seqlen_q
  const int rows_q = min_int(kBlockM, seq.len_q - m0);
  const int h_k = h / (p.num_heads / p.num_heads_k);

  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp_row0 = (static_cast<int>(threadIdx.x) >> 5) * T::kWarpRows;
  const int row0 = m0 + warp_row0 + (lane >> 2);  // this lane's first row, in the sequence

  // Keys visible to some row of this block: key_lo/key_hi are non-decreasing
  // in the row, so the union is [key_lo(first row), key_hi(last row)).
  const int key_begin = seq.key_lo(p, m0);
  const int key_end = seq.key_hi(p, m0 + rows_q - 1);
  const int n_begin = key_begin / kBlockN;
  const int n_end = key_end > key_begin ? ceil_div(key_end, kBlockN) : n_begin;
  // Keys visible to every row: blocks inside [lo of last row, hi of first row)
  // need no window / length masking.
  const int all_rows_lo = seq.key_lo(p, m0 + rows_q - 1);
  const int all_rows_hi = seq.key_hi(p, m0);

  const uint32_t sQ = sm80::smem_u32(sm80::dynamic_smem());
  const uint32_t sK = sQ + T::kSmemQBytes;
  const uint32_t sV = sK + T::kSmemKVBytes;
  const uint32_t sMask = sV + T::kSmemKVBytes;  // allocated only when p.mask_kind != kNone
  const LdmatrixAddrs<T::kHeadDim> q_addr = frag_addrs<T::kHeadDim>(sQ, warp_row0, lane);
  const LdmatrixAddrs<T::kHeadDim> k_addr = frag_addrs<T::kHeadDim>(sK, 0, lane);
  const LdmatrixAddrs<T::kHeadDim> v_addr = frag_addrs<T::kHeadDim>(sV, 0, lane);
  const uint32_t s_mask_row = sMask + static_cast<uint32_t>((warp_row0 + (lane >> 2)) * T::kMaskRowBytes);

  const Element* q_rows = static_cast<const Element*>(p.q) +
                          seq.q_row(m0, p.q_batch_stride, p.q_row_stride) +
                          int64_t(h) * p.q_head_stride;
  const Element* k_rows = static_cast<const Element*>(p.k) +
                          seq.k_row(0, p.k_batch_stride, p.k_row_stride) +
                          int64_t(h_k) * p.k_head_stride;
  const Element* v_rows = static_cast<const Element*>(p.v) +
                          seq.k_row(0, p.v_batch_stride, p.v_row_stride) +
                          int64_t(h_k) * p.v_head_stride;

  OutTile<T> o;
  RowStats<T> row_max, row_sum;
#pragma unroll
  for (int mt = 0; mt < T::kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < T::kNTilesO; ++nt)
#pragma unroll
      for (int r = 0; r < 4; ++r) o[mt][nt][r] = 0.f;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      row_max[mt][hh] = -INFINITY;
      row_sum[mt][hh] = 0.f;
    }
  }

  const DropoutKey dkey = dropout_key(p);
  if (n_begin < n_end) {
    load_rows_async<T, kBlockM>(sQ, q_rows, p.q_row_stride, rows_q, p.head_dim, p.q);
    load_rows_async<T, kBlockN>(sK, k_rows + int64_t(n_begin) * kBlockN * p.k_row_stride,
                                p.k_row_stride, seq.len_k - n_begin * kBlockN, p.head_dim, p.k);
    sm80::cp_async_commit();

    for (int n = n_begin; n < n_end; ++n) {
      const int n0 = n * kBlockN;
      sm80::cp_async_wait<0>();
      sm80::sync_threads();  // K[n] (and Q) visible; every warp is past P V[n-1]
      load_rows_async<T, kBlockN>(sV, v_rows + int64_t(n0) * p.v_row_stride, p.v_row_stride,
                                  seq.len_k - n0, p.head_dim, p.v);
      if (p.mask_kind == MaskKind::kBool)
        load_mask_async<T, 1>(sMask, p, seq, h, m0, rows_q, n0);
      else if (p.mask_kind == MaskKind::kAdditive)
        load_mask_async<T, 2>(sMask, p, seq, h, m0, rows_q, n0);
      sm80::cp_async_commit();

      ScoreTile<T> s;
      gemm_qk<T>(s, q_addr, k_addr);
      scores_to_log2<T>(s, p);

      sm80::cp_async_wait<0>();
      sm80::sync_threads();  // V[n] and the mask tile visible; every warp is past Q K[n]^T
      if (n + 1 < n_end) {
        load_rows_async<T, kBlockN>(sK, k_rows + int64_t(n0 + kBlockN) * p.k_row_stride,
                                    p.k_row_stride, seq.len_k - n0 - kBlockN, p.head_dim, p.k);
        sm80::cp_async_commit();
      }

      if (p.mask_kind == MaskKind::kBool)
        mask_scores<T, MaskKind::kBool>(s, p, seq, h, row0, n0, lane, s_mask_row);
      else if (p.mask_kind == MaskKind::kAdditive)
        mask_scores<T, MaskKind::kAdditive>(s, p, seq, h, row0, n0, lane, s_mask_row);
      else if (n0 < all_rows_lo || n0 + kBlockN > all_rows_hi)  // block crosses a row's window edge or len_k
        mask_scores<T, MaskKind::kNone>(s, p, seq, h, row0, n0, lane, s_mask_row);
      if (p.alibi_slopes != nullptr) add_alibi<T>(s, p, seq, h, row0, n0, lane);
      online_softmax<T>(s, o, row_max, row_sum);
      if (p.dropout_p > 0.f) apply_dropout<T>(s, dkey, seq, h, row0, n0, lane);
      gemm_pv<T>(o, s, v_addr);
    }
  }

  finalize_rows<T>(o, row_max, row_sum, p, seq, h, row0, lane);
  Element* o_rows = static_cast<Element*>(p.o) + seq.q_row(m0, p.o_batch_stride, p.o_row_stride) +
                    int64_t(h) * p.o_head_stride;
  store_out<T>(o, sQ, o_rows, p.o_row_stride, rows_q, p.head_dim, warp_row0, lane);
}

}  // namespace attention
}  // namespace cuda
}  // namespace pyfastattn
