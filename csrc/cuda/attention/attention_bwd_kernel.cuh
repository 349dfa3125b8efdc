// FlashAttention-2-class backward kernels for sm_80 and newer (mma.sync).
//
// Notation per (query row i, key j) of one head: s = q.k * scale (softcapped:
// softcap * tanh(s / softcap)), P = exp(s + bias - lse_i), dP = dO_i . v_j,
// D_i = dO_i . O_i, dS = P * (dP - D_i) (* (1 - tanh^2) with softcap); then
//   dV_j = sum_i P dO_i,   dK_j = scale * sum_i dS q_i,   dQ_i = scale * sum_j dS k_j.
//
// Main kernel: one CTA of 4 warps per (key block of kBlockN keys, kv head,
// sequence). K and V stay in shared memory; dK and dV stay in registers for
// the CTA's life. Query blocks of kBlockM rows of every query head of the GQA
// group stream through a 2-stage cp.async pipeline (Q, dO, lse, D and the
// attn_mask tile), so the group's sum into dK/dV needs no atomics and the
// kv head is read once. Per step (one query block of one head):
//
//   wait; barrier       step t's tiles visible; every warp is past step t-1,
//                       so stage (t+1)%2 and the P / dS tiles are free
//   issue step t+1 into stage (t+1)%2                       -- lands during t
//     (with dropout, the CTA also writes step t+1's keep bits there:
//     stage_keep_bits; the next barrier publishes them)
//   A: S^T = K Q^T, dP^T = V dO^T      (registers, keys x queries)
//      P = exp2(S * scale * log2e - lse * log2e), masked; dS = P (dP - D)
//      -> P^T and dS^T to shared memory (16-bit, [key][query])
//   barrier
//   C: dQ_partial = dS K -> red.global.add.f32 into the fp32 accumulator
//      (deterministic mode: after this CTA's turn for the query block)
//   B: dV += P^T dO, dK += dS^T Q     (registers)
//
// The products are computed transposed (keys as MMA rows) so that each warp's
// S^T / dP^T rows are its own keys; P and dS go through shared memory because
// products B and C need them in other fragment layouts (B with keys as rows
// and queries as k, C with queries as rows and keys as k). All shared tiles are
// swizzled rows (SwizzledRows, as in the forward): ldmatrix, cp.async and the
// 4-byte fragment stores are free of bank conflicts.
//
// Blocks that causal / window masking leaves empty are skipped: a key block
// visits only the query rows [i_begin, i_end) that see one of its keys.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "../../attention/params.h"
#include "attention_bwd.h"
#include "attention_bwd_traits.h"
#include "attention_fwd_kernel.cuh"
#include "sm80_primitives.cuh"

namespace pyfastattn {
namespace cuda {
namespace attention {

// Offset of row i's entry in the lse_log2 / dsum workspace.
PFA_HOST_DEVICE int64_t ws_index(const AttentionBwdKernelParams& p, const SeqInfo& seq, int h,
                                 int i) {
  return seq.varlen ? int64_t(h) * p.ws_head_stride + seq.q_start + i
                    : int64_t(seq.bi) * p.ws_batch_stride + int64_t(h) * p.ws_head_stride + i;
}

// ---------------------------------------------------------------------------
// Preprocess and convert: one thread group of 8 per query row
// ---------------------------------------------------------------------------

constexpr int kRowKernelThreads = 128;
constexpr int kRowKernelRows = kRowKernelThreads / 8;  // query rows per CTA

// Grid: x = block of kRowKernelRows rows, (y, z) = head + num_heads * sequence
// (the forward's split). Returns false for CTAs with nothing to do.
struct RowKernelCoords {
  int h, i, part;
  bool valid;
};

// D = rowsum(dO * O) in fp32, lse_log2 = lse * log2(e) (+inf where that is
// -inf: such a row sees no key, and exp2(s - inf) = 0 gives it P = 0), and the
// row's dQ accumulator zeroed.
template <typename Element>
__global__ void __launch_bounds__(kRowKernelThreads)
    attention_bwd_preprocess_kernel(const __grid_constant__ AttentionBwdKernelParams p) {
  const uint32_t head_seq = blockIdx.z * gridDim.y + blockIdx.y;
  if (head_seq >= uint32_t(p.num_heads) * uint32_t(p.batch)) return;
  const int h = static_cast<int>(head_seq % uint32_t(p.num_heads));
  const SeqInfo seq(p, static_cast<int>(head_seq / uint32_t(p.num_heads)));
  const int row0 = static_cast<int>(blockIdx.x) * kRowKernelRows;
  if (row0 >= seq.len_q) return;
  const int i = row0 + static_cast<int>(threadIdx.x) / 8;
  const int part = static_cast<int>(threadIdx.x) % 8;
  const bool valid = i < seq.len_q;
  const int chunks = p.head_dim / 8;
  float acc = 0.f;
  if (valid) {
    const Element* o = static_cast<const Element*>(p.o) +
                       seq.q_row(i, p.o_batch_stride, p.o_row_stride) + int64_t(h) * p.o_head_stride;
    const Element* d_o = static_cast<const Element*>(p.dout) +
                         seq.q_row(i, p.do_batch_stride, p.do_row_stride) +
                         int64_t(h) * p.do_head_stride;
    for (int c = part; c < chunks; c += 8) {
      const uint4 a = sm80::ld_global_nc_v4(o + 8 * c);
      const uint4 b = sm80::ld_global_nc_v4(d_o + 8 * c);
      const uint32_t wa[4] = {a.x, a.y, a.z, a.w}, wb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int w = 0; w < 4; ++w)
        acc += sm80::bits_to_float<Element>(wa[w] & 0xffffu) *
                   sm80::bits_to_float<Element>(wb[w] & 0xffffu) +
               sm80::bits_to_float<Element>(wa[w] >> 16) * sm80::bits_to_float<Element>(wb[w] >> 16);
    }
  }
  acc += sm80::shfl_xor(acc, 1);
  acc += sm80::shfl_xor(acc, 2);
  acc += sm80::shfl_xor(acc, 4);
  if (!valid) return;
  if (part == 0) {
    const float lse2 = p.lse[seq.lse_index(p, h, i)] * kLog2e;
    const int64_t w = ws_index(p, seq, h, i);
    sm80::st_global_f32(p.lse_log2 + w, lse2 == -INFINITY ? INFINITY : lse2);
    sm80::st_global_f32(p.dsum + w, acc);
  }
  float* dqa = p.dq_accum + seq.q_row(i, p.dqa_batch_stride, p.dqa_row_stride) +
               int64_t(h) * p.dqa_head_stride;
  for (int c = part; c < p.head_dim / 4; c += 8) sm80::st_global_v4(dqa + 4 * c, make_uint4(0, 0, 0, 0));
}

// dQ = accumulator * scale, in the output dtype, for the rows each sequence owns.
template <typename Element>
__global__ void __launch_bounds__(kRowKernelThreads)
    attention_bwd_convert_dq_kernel(const __grid_constant__ AttentionBwdKernelParams p) {
  const uint32_t head_seq = blockIdx.z * gridDim.y + blockIdx.y;
  if (head_seq >= uint32_t(p.num_heads) * uint32_t(p.batch)) return;
  const int h = static_cast<int>(head_seq % uint32_t(p.num_heads));
  const SeqInfo seq(p, static_cast<int>(head_seq / uint32_t(p.num_heads)));
  const int i = static_cast<int>(blockIdx.x) * kRowKernelRows + static_cast<int>(threadIdx.x) / 8;
  if (i >= seq.len_q) return;
  const float* dqa = p.dq_accum + seq.q_row(i, p.dqa_batch_stride, p.dqa_row_stride) +
                     int64_t(h) * p.dqa_head_stride;
  Element* dq = static_cast<Element*>(p.dq) + seq.q_row(i, p.dq_batch_stride, p.dq_row_stride) +
                int64_t(h) * p.dq_head_stride;
  for (int c = static_cast<int>(threadIdx.x) % 8; c < p.head_dim / 8; c += 8) {
    const uint4 a = sm80::ld_global_nc_v4(dqa + 8 * c);
    const uint4 b = sm80::ld_global_nc_v4(dqa + 8 * c + 4);
    const uint32_t w[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    float f[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = sm80::u32_as_float(w[e]) * p.scale;
    sm80::st_global_v4(dq + 8 * c, make_uint4(sm80::pack2<Element>(f[0], f[1]),
                                              sm80::pack2<Element>(f[2], f[3]),
                                              sm80::pack2<Element>(f[4], f[5]),
                                              sm80::pack2<Element>(f[6], f[7])));
  }
}

// ---------------------------------------------------------------------------
// Main kernel: register tiles and products
// ---------------------------------------------------------------------------

// S^T and dP^T of one warp: [key m16 tile][query n8 tile][4], mma C layout
// (lane 4g + c holds keys g, g + 8 and queries 2c, 2c + 1 of each tile).
template <typename T>
using KeyQueryTile = float[T::kKeyTilesA][T::kQueryTilesA][4];
// dK or dV of one warp: [key m16 tile][d n8 tile][4].
template <typename T>
using KeyDimTile = float[T::kKeyTilesB][T::kDimTilesB][4];
// One chunk of dQ of one warp: [query m16 tile][d n8 tile of the chunk][4].
template <typename T>
using DqChunk = float[T::kQueryTilesC][T::kDimTilesChunkC][4];

template <int kMT, int kNT>
PFA_ATTN_DEVICE void zero_tile(float (&t)[kMT][kNT][4]) {
#pragma unroll
  for (int a = 0; a < kMT; ++a)
#pragma unroll
    for (int b = 0; b < kNT; ++b)
#pragma unroll
      for (int r = 0; r < 4; ++r) t[a][b][r] = 0.f;
}

// Product A for one operand pair: acc = X Y^T with X = K or V (keys x d, rows
// key_row0.. of the tile) and Y = Q or dO (queries x d, rows query_row0..).
// Both are [row][d] tiles, read with plain ldmatrix: X as the A operand, Y as
// the "col" B operand (registers 0, 2 are b0, b1 of queries 0-7; 1, 3 of 8-15).
template <typename T>
PFA_ATTN_DEVICE void gemm_key_query(KeyQueryTile<T>& acc, uint32_t s_x, int key_row0, uint32_t s_y,
                                    int query_row0, int lane) {
  using Element = typename T::Element;
  zero_tile(acc);
  const LdmatrixAddrs<T::kHeadDim> x_addr = frag_addrs<T::kHeadDim>(s_x, key_row0, lane);
  const LdmatrixAddrs<T::kHeadDim> y_addr = frag_addrs<T::kHeadDim>(s_y, query_row0, lane);
#pragma unroll
  for (int ks = 0; ks < T::kHeadDim / 16; ++ks) {
    uint32_t a[T::kKeyTilesA][4];
#pragma unroll
    for (int mt = 0; mt < T::kKeyTilesA; ++mt) sm80::ldmatrix_x4(a[mt], x_addr.at(ks, mt * 16));
#pragma unroll
    for (int np = 0; np < T::kQueryTilesA / 2; ++np) {
      uint32_t b[4];
      sm80::ldmatrix_x4(b, y_addr.at(ks, np * 16));
#pragma unroll
      for (int mt = 0; mt < T::kKeyTilesA; ++mt) {
        sm80::mma_m16n8k16<Element>(acc[mt][2 * np], a[mt], b[0], b[2]);
        sm80::mma_m16n8k16<Element>(acc[mt][2 * np + 1], a[mt], b[1], b[3]);
      }
    }
  }
}

// Product B for one operand pair: acc += X^T Y with X^T = P^T or dS^T (the
// [key][query] tile, rows key_row0.., read with plain ldmatrix as the A
// operand, queries as k) and Y = dO or Q ([query][d], read with
// ldmatrix.trans as the B operand; s_y already offset to the warp's first d
// column, a whole number of swizzle windows).
template <typename T>
PFA_ATTN_DEVICE void gemm_key_dim(KeyDimTile<T>& acc, uint32_t s_xt, int key_row0, uint32_t s_y,
                                  int lane) {
  using Element = typename T::Element;
  const LdmatrixAddrs<T::kBlockM> x_addr = frag_addrs<T::kBlockM>(s_xt, key_row0, lane);
  const LdmatrixAddrs<T::kHeadDim> y_addr = frag_addrs<T::kHeadDim>(s_y, 0, lane);
#pragma unroll
  for (int kk = 0; kk < T::kBlockM / 16; ++kk) {
    uint32_t a[T::kKeyTilesB][4];
#pragma unroll
    for (int mt = 0; mt < T::kKeyTilesB; ++mt) sm80::ldmatrix_x4(a[mt], x_addr.at(kk, mt * 16));
#pragma unroll
    for (int dp = 0; dp < T::kDimTilesB / 2; ++dp) {
      uint32_t b[4];
      sm80::ldmatrix_x4_trans(b, y_addr.at(dp, kk * 16));
#pragma unroll
      for (int mt = 0; mt < T::kKeyTilesB; ++mt) {
        sm80::mma_m16n8k16<Element>(acc[mt][2 * dp], a[mt], b[0], b[1]);
        sm80::mma_m16n8k16<Element>(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// Product C, one chunk of kDimTilesChunkC n8 tiles of d (one swizzle window,
// so the chunk moves the K addresses by a plain byte offset, chunk_bytes): acc = dS K for the
// warp's query rows. dS is read from the dS^T tile ([key][query]) with
// ldmatrix.trans as the A operand: lanes 8m..8m+7 address key rows
// (lane & 7) + 8 * (lane / 16) and query chunk (lane / 8) % 2, so that matrix
// m is (queries 0-7 | 8-15) x (keys 0-7 | 8-15) in a0..a3 order. `a_base[mt]`
// is that lane address for query tile mt at key 0; keys advance by whole rows.
// K ([key][d], s_k offset to the warp's first d column) is the B operand, read
// with ldmatrix.trans like V in the forward.
template <typename T>
PFA_ATTN_DEVICE void gemm_query_dim_chunk(DqChunk<T>& acc, const uint32_t (&a_base)[T::kQueryTilesC],
                                          const LdmatrixAddrs<T::kHeadDim>& k_addr,
                                          uint32_t chunk_bytes) {
  using Element = typename T::Element;
  constexpr int kRowBytes = SwizzledRows<T::kBlockM>::kRowBytes;
  zero_tile(acc);
#pragma unroll
  for (int ks = 0; ks < T::kBlockN / 16; ++ks) {
    uint32_t a[T::kQueryTilesC][4];
#pragma unroll
    for (int mt = 0; mt < T::kQueryTilesC; ++mt)
      sm80::ldmatrix_x4_trans(a[mt], a_base[mt] + static_cast<uint32_t>(ks * 16 * kRowBytes));
#pragma unroll
    for (int dp = 0; dp < T::kDimTilesChunkC / 2; ++dp) {
      uint32_t b[4];
      sm80::ldmatrix_x4_trans(b, k_addr.at(dp, ks * 16) + chunk_bytes);
#pragma unroll
      for (int mt = 0; mt < T::kQueryTilesC; ++mt) {
        sm80::mma_m16n8k16<Element>(acc[mt][2 * dp], a[mt], b[0], b[1]);
        sm80::mma_m16n8k16<Element>(acc[mt][2 * dp + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// Everything one step needs to know about its query block.
struct StepInfo {
  int h;         // query head
  int m_block;   // query block index inside the sequence
  int m0;        // first query row
  int rows_q;    // rows present (<= kBlockM)
};

// Dropout (issue 17): the keep bits of one step's [kBlockM queries x kBlockN
// keys] block, staged in shared memory by the whole CTA when the step's loads
// are issued, so that step A reads one bit per element instead of running
// Philox on the tile's registers. Byte n of query row q holds keys
// n0 + 8n .. n0 + 8n + 7 (bit g: key n0 + 8n + g), which is exactly one call
// of dropout_words (csrc/attention/dropout.h): a call per byte, none wasted,
// where step A's layout (a lane holds keys g and g + 8 of each m16 tile) would
// need a call per element. Each thread packs 4 bytes into one 32-bit store
// (consecutive words across a warp: no bank conflicts). Rows and keys past
// the sequence get bits too; step A never reads them as visible.
template <typename T>
PFA_ATTN_DEVICE void stage_keep_bits(uint32_t s_drop, const AttentionBwdKernelParams& p,
                                     const SeqInfo& seq, const StepInfo& st, int n0) {
  constexpr int kBytesPerRow = T::kBlockN / 8;
  constexpr int kWords = T::kSmemDropBytes / 4;
  DropoutKey key = p.dropout;
  if (p.dropout_rng != nullptr) {  // the (seed, offset) pair drawn on the device
    key.seed = static_cast<uint64_t>(p.dropout_rng[0]);
    key.offset = static_cast<uint64_t>(p.dropout_rng[1]);
  }
  const int64_t group0 = n0 / 8;
  // Whole warps take a word or skip (kWords is a multiple of 32 or below it
  // at d = 256, where warp 0 alone stages the block's 32 words).
#pragma unroll 1
  for (int w = static_cast<int>(threadIdx.x); w < kWords; w += T::kNThreads) {
    uint32_t word = 0;
#pragma unroll 1
    for (int b = 0; b < 4; ++b) {
      const int byte = 4 * w + b;
      const int q = byte / kBytesPerRow, n = byte % kBytesPerRow;
      const Philox4 r = dropout_words(key, seq.bi, st.h, st.m0 + q, group0 + n);
      uint32_t bits = 0;
#pragma unroll
      for (int x = 0; x < 4; ++x) {
        bits |= uint32_t((r.x[x] & 0xFFFFu) >= key.threshold) << (2 * x);
        bits |= uint32_t((r.x[x] >> 16) >= key.threshold) << (2 * x + 1);
      }
      word |= bits << (8 * b);
    }
    sm80::st_shared_u32(s_drop + 4 * w, word);
  }
}

// S^T, dP^T (raw q.k and dO.v) -> P and dS in place, for one warp's tile.
// kBounds: apply the window / causal / length visibility per element (blocks
// that cross an edge); kMaskKind: read the staged attn_mask tile too.
// ALiBi adds -slope * |i + len_k - len_q - j| (log2 units, after softcap, like
// an additive mask). Dropout (keep bits staged in s_drop by stage_keep_bits):
// with Z = keep / (1 - p), P^T for dV holds Z P and dS = P (Z dP - D), the
// derivative of O = sum_j Z_j P_j v_j (D = dO . O already carries Z).
template <typename T, MaskKind kMaskKind, bool kBounds>
PFA_ATTN_DEVICE void scores_to_grads(KeyQueryTile<T>& s, KeyQueryTile<T>& dp,
                                     const AttentionBwdKernelParams& p, const SeqInfo& seq,
                                     const StepInfo& st, int n0, int key_row0, int query_row0,
                                     uint32_t s_stat, uint32_t s_mask, uint32_t s_drop, int lane) {
  using Element = typename T::Element;
  constexpr int kElemBytes = kMaskKind == MaskKind::kBool ? 1 : 2;
  const bool softcap = p.softcap > 0.f;
  const float pre = softcap ? sm80::fast_div(p.scale, p.softcap) : 0.f;
  const float post = p.softcap * kLog2e;
  const int g = lane >> 2, c2 = 2 * (lane & 3);
  const bool alibi = p.alibi_slopes != nullptr;
  const float slope =
      alibi ? p.alibi_slopes[int64_t(seq.bi) * p.alibi_batch_stride + st.h] * kLog2e : 0.f;
  // |i + alibi_diag - j| for key n0 + j.
  const int alibi_diag = seq.len_k - seq.len_q - n0;
  const bool dropout = p.dropout_p > 0.f;
#pragma unroll
  for (int nt = 0; nt < T::kQueryTilesA; ++nt) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int q_local = query_row0 + nt * 8 + c2 + e;
      const int i = st.m0 + q_local;
      const float lse2 = sm80::ld_shared_f32(s_stat + 4 * q_local);
      const float dsum = sm80::ld_shared_f32(s_stat + 4 * (T::kBlockM + q_local));
      int lo = 0, hi = 0;
      if constexpr (kBounds || kMaskKind != MaskKind::kNone) {
        lo = seq.key_lo(p, i) - n0;
        hi = q_local < st.rows_q ? seq.key_hi(p, i) - n0 : lo;  // rows past len_q see nothing
      }
      uint32_t m_addr = 0;
      if constexpr (kMaskKind != MaskKind::kNone)
        m_addr = s_mask + static_cast<uint32_t>(q_local * T::kMaskRowBytes) +
                 mask_lead<kElemBytes>(p, seq, st.h, i, n0);
#pragma unroll
      for (int mt = 0; mt < T::kKeyTilesA; ++mt) {
        // Keys key_row0 + 16 mt .. + 15 of this row: two bytes, bit 8 hh + g.
        const uint32_t keep_bits =
            dropout ? sm80::ld_shared_u16(s_drop + static_cast<uint32_t>(
                                                       q_local * (T::kBlockN / 8) + (key_row0 + mt * 16) / 8))
                    : 0xFFFFu;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int j = key_row0 + mt * 16 + hh * 8 + g;  // key, relative to n0
          const int r = 2 * hh + e;
          float x = s[mt][nt][r];
          float dtanh = 1.f;
          if (softcap) {
            const float t = sm80::fast_tanh(x * pre);
            x = t * post;
            dtanh = 1.f - t * t;
          } else {
            x *= p.scale_log2;
          }
          bool visible = true;
          if constexpr (kBounds || kMaskKind != MaskKind::kNone) visible = j >= lo && j < hi;
          if constexpr (kMaskKind == MaskKind::kBool) {
            visible = visible && sm80::ld_shared_u8(m_addr + j) != 0;
          } else if constexpr (kMaskKind == MaskKind::kAdditive) {
            x = add_bias_log2(x, sm80::bits_to_float<Element>(sm80::ld_shared_u16(m_addr + 2 * j)));
          }
          if (alibi) x -= slope * fabsf(float(i + alibi_diag - j));
          const float pr = visible ? sm80::fast_exp2(x - lse2) : 0.f;
          // Z = keep / (1 - p) (1 without dropout).
          const float z = (keep_bits >> (8 * hh + g)) & 1u ? (dropout ? p.dropout_rescale : 1.f) : 0.f;
          s[mt][nt][r] = pr * z;
          dp[mt][nt][r] = pr * (dp[mt][nt][r] * z - dsum) * dtanh;
        }
      }
    }
  }
}

// Writes one warp's [key][query] register tile into a swizzled [key][query]
// shared tile as 16-bit values.
template <typename T>
PFA_ATTN_DEVICE void store_key_query(const KeyQueryTile<T>& t, uint32_t s_tile, int key_row0,
                                     int query_row0, int lane) {
  using Tile = SwizzledRows<T::kBlockM>;
  using Element = typename T::Element;
#pragma unroll
  for (int mt = 0; mt < T::kKeyTilesA; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
      for (int nt = 0; nt < T::kQueryTilesA; ++nt) {
        const int row = key_row0 + mt * 16 + hh * 8 + (lane >> 2);
        sm80::st_shared_u32(s_tile + Tile::offset(row, query_row0 / 8 + nt) + (lane & 3) * 4,
                            sm80::pack2<Element>(t[mt][nt][2 * hh], t[mt][nt][2 * hh + 1]));
      }
}

// Stages one warp's dK or dV tile (16-bit) in a swizzled [key][d] tile.
template <typename T>
PFA_ATTN_DEVICE void stage_key_dim(const KeyDimTile<T>& t, float scale, uint32_t s_tile,
                                   int key_row0, int dim0, int lane) {
  using Tile = SwizzledRows<T::kHeadDim>;
  using Element = typename T::Element;
#pragma unroll
  for (int mt = 0; mt < T::kKeyTilesB; ++mt)
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
#pragma unroll
      for (int nt = 0; nt < T::kDimTilesB; ++nt) {
        const int row = key_row0 + mt * 16 + hh * 8 + (lane >> 2);
        sm80::st_shared_u32(
            s_tile + Tile::offset(row, dim0 / 8 + nt) + (lane & 3) * 4,
            sm80::pack2<Element>(t[mt][nt][2 * hh] * scale, t[mt][nt][2 * hh + 1] * scale));
      }
}

// Copies a staged [key][d] tile to global memory, 16 bytes per thread and
// copy, rows < valid_rows and columns < head_dim only.
template <typename T>
PFA_ATTN_DEVICE void store_key_rows(uint32_t s_tile, typename T::Element* g_rows, int64_t row_stride,
                                    int valid_rows, int head_dim) {
  using Tile = SwizzledRows<T::kHeadDim>;
  constexpr int kChunks = T::kRowChunks;
#pragma unroll
  for (int it = 0; it < T::kBlockN * kChunks / T::kNThreads; ++it) {
    const int idx = it * T::kNThreads + static_cast<int>(threadIdx.x);
    const int row = idx / kChunks, chunk = idx % kChunks;
    const uint4 v = sm80::ld_shared_v4(s_tile + Tile::offset(row, chunk));
    if (row < valid_rows && chunk * 8 < head_dim)
      sm80::st_global_v4(g_rows + row * row_stride + chunk * 8, v);
  }
}

// ---------------------------------------------------------------------------
// The main kernel
// ---------------------------------------------------------------------------

// Grid: x = key block, (y, z) = flattened (kv head, sequence) index
// y + gridDim.y * z = h_k + num_heads_k * bi, i.e. linear CTA index
// x + gridDim.x * (kv head, sequence). In deterministic mode a key block
// waits for the smaller key blocks of its (kv head, sequence), so the CTA's
// linear index is its start ticket (sm80::cta_start_ticket) rather than its
// blockIdx: it then waits only for CTAs that started before it, whatever
// order the hardware dispatches them in. (With blockIdx, a CTA dispatched
// before a smaller x could spin on a multiprocessor that CTA needs: a hang.)
template <typename T>
__global__ void __launch_bounds__(T::kNThreads)
    attention_bwd_kernel(const __grid_constant__ AttentionBwdKernelParams p) {
  using Element = typename T::Element;
  constexpr int kBlockM = T::kBlockM;
  constexpr int kBlockN = T::kBlockN;

  const uint32_t smem = sm80::smem_u32(sm80::dynamic_smem());
  uint32_t head_seq, n_block_u;
  if (p.deterministic) {
    // The P^T tile's first bytes pass the ticket on; step A first writes them
    // after the step loop's first barrier. 32-bit arithmetic: the launcher
    // declines deterministic grids of 2^32 CTAs or more (a 64-bit division
    // here compiled to a subroutine call and cost ~45 registers).
    const uint32_t ticket = sm80::cta_start_ticket(p.cta_ticket, smem + T::kOffP);
    head_seq = ticket / gridDim.x;
    n_block_u = ticket % gridDim.x;
  } else {
    head_seq = blockIdx.z * gridDim.y + blockIdx.y;
    n_block_u = blockIdx.x;
  }
  if (head_seq >= uint32_t(p.num_heads_k) * uint32_t(p.batch)) return;  // grid rounding
  const int h_k = static_cast<int>(head_seq % uint32_t(p.num_heads_k));
  const SeqInfo seq(p, static_cast<int>(head_seq / uint32_t(p.num_heads_k)));
  const int n_block = static_cast<int>(n_block_u);
  const int n0 = n_block * kBlockN;
  if (n0 >= seq.len_k) return;  // varlen / seqused_k: shorter than max_seqlen_k
  const int rows_k = min_int(kBlockN, seq.len_k - n0);
  const int group = p.num_heads / p.num_heads_k;

  // Query rows that see some key of [n0, n0 + rows_k): key_hi(i) > n0 and
  // key_lo(i) < n0 + rows_k (both bounds non-decreasing in i).
  int64_t i_begin = 0, i_end = seq.len_q;
  if (p.window_right >= 0) i_begin = int64_t(n0) - seq.offset - p.window_right;
  if (p.window_left >= 0) i_end = int64_t(n0) + rows_k - seq.offset + p.window_left;
  i_begin = i_begin < 0 ? 0 : (i_begin > seq.len_q ? seq.len_q : i_begin);
  i_end = i_end < i_begin ? i_begin : (i_end > seq.len_q ? seq.len_q : i_end);
  const int m_begin = static_cast<int>(i_begin / kBlockM);
  const int m_end = i_end > i_begin ? ceil_div(static_cast<int>(i_end), kBlockM) : m_begin;
  const int steps_per_head = m_end - m_begin;
  const int steps = steps_per_head * group;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  // Each warp's place in the three products.
  const int key_row0_a = (warp % T::kWarpsKeyA) * (kBlockN / T::kWarpsKeyA);
  const int query_row0_a = (warp / T::kWarpsKeyA) * (kBlockM / T::kWarpsQueryA);
  const int key_row0_b = (warp % T::kWarpsKeyB) * (kBlockN / T::kWarpsKeyB);
  const int dim0_b = (warp / T::kWarpsKeyB) * (T::kHeadDim / T::kWarpsDimB);
  const int query_row0_c = (warp % T::kWarpsQueryC) * (kBlockM / T::kWarpsQueryC);
  const int dim0_c = (warp / T::kWarpsQueryC) * (T::kHeadDim / T::kWarpsDimC);

  const uint32_t sK = smem + T::kOffK, sV = smem + T::kOffV;
  const uint32_t sP = smem + T::kOffP, sdS = smem + T::kOffDS;

  const Element* k_rows = static_cast<const Element*>(p.k) +
                          seq.k_row(n0, p.k_batch_stride, p.k_row_stride) +
                          int64_t(h_k) * p.k_head_stride;
  const Element* v_rows = static_cast<const Element*>(p.v) +
                          seq.k_row(n0, p.v_batch_stride, p.v_row_stride) +
                          int64_t(h_k) * p.v_head_stride;

  // Step t covers head h_k * group + t / steps_per_head, query block
  // m_begin + t % steps_per_head; `next` walks that order one step ahead.
  auto step_info = [&](int h, int m_block) {
    StepInfo st;
    st.h = h;
    st.m_block = m_block;
    st.m0 = m_block * kBlockM;
    st.rows_q = min_int(kBlockM, seq.len_q - st.m0);
    return st;
  };
  auto issue_step = [&](const StepInfo& st, int stage) {
    const Element* q_rows = static_cast<const Element*>(p.q) +
                            seq.q_row(st.m0, p.q_batch_stride, p.q_row_stride) +
                            int64_t(st.h) * p.q_head_stride;
    const Element* do_rows = static_cast<const Element*>(p.dout) +
                             seq.q_row(st.m0, p.do_batch_stride, p.do_row_stride) +
                             int64_t(st.h) * p.do_head_stride;
    load_rows_async<T, kBlockM>(smem + T::kOffQ + stage * T::kSmemQBytes, q_rows, p.q_row_stride,
                                st.rows_q, p.head_dim, p.q);
    load_rows_async<T, kBlockM>(smem + T::kOffDO + stage * T::kSmemQBytes, do_rows,
                                p.do_row_stride, st.rows_q, p.head_dim, p.dout);
    if (tid < 2 * kBlockM) {  // lse_log2 (threads 0..M-1), then D
      const int r = tid % kBlockM;
      const float* src = (tid < kBlockM ? p.lse_log2 : p.dsum) + ws_index(p, seq, st.h, st.m0 + r);
      const bool valid = r < st.rows_q;
      sm80::cp_async_4(smem + T::kOffStat + stage * T::kSmemStatBytes + 4 * tid,
                       valid ? static_cast<const void*>(src) : static_cast<const void*>(p.dsum),
                       valid ? 4 : 0);
    }
    const uint32_t s_mask = smem + T::kOffMask + stage * T::kSmemMaskBytes;
    if (p.mask_kind == MaskKind::kBool)
      load_mask_async<T, 1>(s_mask, p, seq, st.h, st.m0, st.rows_q, n0);
    else if (p.mask_kind == MaskKind::kAdditive)
      load_mask_async<T, 2>(s_mask, p, seq, st.h, st.m0, st.rows_q, n0);
    if (p.dropout_p > 0.f)
      stage_keep_bits<T>(smem + T::kOffDrop + stage * T::kSmemDropBytes, p, seq, st, n0);
  };

  KeyDimTile<T> dk, dv;
  zero_tile(dk);
  zero_tile(dv);

  if (steps > 0) {
    load_rows_async<T, kBlockN>(sK, k_rows, p.k_row_stride, rows_k, p.head_dim, p.k);
    load_rows_async<T, kBlockN>(sV, v_rows, p.v_row_stride, rows_k, p.head_dim, p.v);
    issue_step(step_info(h_k * group, m_begin), 0);
    sm80::cp_async_commit();
  }
  int cur_h = h_k * group, cur_m = m_begin;
  // Product C's A-operand lane addresses (see gemm_query_dim_chunk) and B.
  uint32_t dq_a_base[T::kQueryTilesC];
#pragma unroll
  for (int mt = 0; mt < T::kQueryTilesC; ++mt)
    dq_a_base[mt] = sdS + SwizzledRows<kBlockM>::offset(
                              (lane & 7) + 8 * (lane >> 4),
                              (query_row0_c + mt * 16) / 8 + ((lane >> 3) & 1));
  const LdmatrixAddrs<T::kHeadDim> dq_k_addr = frag_addrs<T::kHeadDim>(sK + 2 * dim0_c, 0, lane);

  for (int t = 0; t < steps; ++t) {
    const int stage = t & 1;
    const StepInfo st = step_info(cur_h, cur_m);
    if (++cur_m == m_end) {
      cur_m = m_begin;
      ++cur_h;
    }
    sm80::cp_async_wait<0>();
    sm80::sync_threads();  // step t visible; all warps past step t-1
    if (t + 1 < steps) {
      issue_step(step_info(cur_h, cur_m), stage ^ 1);
      sm80::cp_async_commit();
    }
    const uint32_t sQ = smem + T::kOffQ + stage * T::kSmemQBytes;
    const uint32_t sdO = smem + T::kOffDO + stage * T::kSmemQBytes;
    const uint32_t s_stat = smem + T::kOffStat + stage * T::kSmemStatBytes;
    const uint32_t s_mask = smem + T::kOffMask + stage * T::kSmemMaskBytes;
    const uint32_t s_drop = smem + T::kOffDrop + stage * T::kSmemDropBytes;

    // ---- A: S^T, dP^T -> P^T, dS^T in shared memory -------------------------
    {
      KeyQueryTile<T> s, dp;
      gemm_key_query<T>(s, sK, key_row0_a, sQ, query_row0_a, lane);
      gemm_key_query<T>(dp, sV, key_row0_a, sdO, query_row0_a, lane);
      // Every (query, key) pair of the block visible, before the attn_mask?
      const bool inside = st.rows_q == kBlockM && rows_k == kBlockN &&
                          seq.key_lo(p, st.m0 + kBlockM - 1) <= n0 &&
                          seq.key_hi(p, st.m0) >= n0 + kBlockN;
      if (p.mask_kind == MaskKind::kBool)
        scores_to_grads<T, MaskKind::kBool, true>(s, dp, p, seq, st, n0, key_row0_a, query_row0_a,
                                                  s_stat, s_mask, s_drop, lane);
      else if (p.mask_kind == MaskKind::kAdditive)
        scores_to_grads<T, MaskKind::kAdditive, true>(s, dp, p, seq, st, n0, key_row0_a,
                                                      query_row0_a, s_stat, s_mask, s_drop, lane);
      else if (!inside)
        scores_to_grads<T, MaskKind::kNone, true>(s, dp, p, seq, st, n0, key_row0_a, query_row0_a,
                                                  s_stat, s_mask, s_drop, lane);
      else
        scores_to_grads<T, MaskKind::kNone, false>(s, dp, p, seq, st, n0, key_row0_a,
                                                   query_row0_a, s_stat, s_mask, s_drop, lane);
      store_key_query<T>(s, sP, key_row0_a, query_row0_a, lane);
      store_key_query<T>(dp, sdS, key_row0_a, query_row0_a, lane);
    }
    sm80::sync_threads();  // P^T, dS^T visible

    // ---- C: dQ += dS K into the fp32 accumulator ------------------------------
    int32_t* sem = nullptr;
    if (p.deterministic) {
      // Key blocks add to query block m in increasing order: this CTA's turn
      // comes after the key blocks from the first one query block m sees.
      sem = p.dq_semaphore + (int64_t(seq.bi) * p.num_heads + st.h) * p.m_blocks + st.m_block;
      if (tid == 0) sm80::spin_wait_equal(sem, n_block - seq.key_lo(p, st.m0) / kBlockN);
      sm80::sync_threads();
    }
    {
      float* dqa = p.dq_accum + seq.q_row(st.m0, p.dqa_batch_stride, p.dqa_row_stride) +
                   int64_t(st.h) * p.dqa_head_stride;
      const int g = lane >> 2, c2 = 2 * (lane & 3);
      auto add_chunk = [&](const DqChunk<T>& acc, int chunk) {
#pragma unroll
        for (int mt = 0; mt < T::kQueryTilesC; ++mt)
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int row = query_row0_c + mt * 16 + hh * 8 + g;
            if (row >= st.rows_q) continue;
            float* dst = dqa + int64_t(row) * p.dqa_row_stride;
#pragma unroll
            for (int nt = 0; nt < T::kDimTilesChunkC; ++nt) {
              const int col = dim0_c + (chunk * T::kDimTilesChunkC + nt) * 8 + c2;
              if (col < p.head_dim) {  // head_dim % 8 == 0: col + 1 < head_dim too
                sm80::red_add_f32(dst + col, acc[mt][nt][2 * hh]);
                sm80::red_add_f32(dst + col + 1, acc[mt][nt][2 * hh + 1]);
              }
            }
          }
      };
      // One chunk (a swizzle window of d) at a time: unrolling would let the
      // scheduler overlap chunks and hold several accumulators (spills).
#pragma unroll 1
      for (int chunk = 0; chunk < T::kDimTilesC / T::kDimTilesChunkC; ++chunk) {
        DqChunk<T> acc;
        gemm_query_dim_chunk<T>(acc, dq_a_base, dq_k_addr,
                                static_cast<uint32_t>(chunk * T::kDimTilesChunkC * 16));
        add_chunk(acc, chunk);
      }
    }
    if (p.deterministic) {
      sm80::fence_gpu();
      sm80::sync_threads();  // every thread's adds ordered before the release
      if (tid == 0) {
        sm80::fence_gpu();
        sm80::red_release_add_s32(sem, 1);
      }
    }

    // ---- B: dV += P^T dO, dK += dS^T Q ----------------------------------------
    gemm_key_dim<T>(dv, sP, key_row0_b, sdO + 2 * dim0_b, lane);
    gemm_key_dim<T>(dk, sdS, key_row0_b, sQ + 2 * dim0_b, lane);
  }

  // ---- dK (times scale) and dV out: registers -> K / V tiles -> global --------
  sm80::sync_threads();  // every warp is done reading K and V
  stage_key_dim<T>(dk, p.scale, sK, key_row0_b, dim0_b, lane);
  stage_key_dim<T>(dv, 1.f, sV, key_row0_b, dim0_b, lane);
  sm80::sync_threads();
  Element* dk_rows = static_cast<Element*>(p.dk) + seq.k_row(n0, p.dk_batch_stride, p.dk_row_stride) +
                     int64_t(h_k) * p.dk_head_stride;
  Element* dv_rows = static_cast<Element*>(p.dv) + seq.k_row(n0, p.dv_batch_stride, p.dv_row_stride) +
                     int64_t(h_k) * p.dv_head_stride;
  store_key_rows<T>(sK, dk_rows, p.dk_row_stride, rows_k, p.head_dim);
  store_key_rows<T>(sV, dv_rows, p.dv_row_stride, rows_k, p.head_dim);
}

}  // namespace attention
}  // namespace cuda
}  // namespace pyfastattn
