// The one params struct shared by the CPU and CUDA attention kernels.
//
// Plain data, no torch headers: kernels in .cu files include this alone.
// Every field is filled by csrc/attention/api.cpp from validated tensors, so a
// kernel may trust it: pointers are valid for every index the fields imply.
//
// Canonical layout (both public APIs meet here, see DESIGN.md):
//   dense : q [b, sq, hq, d], k [b, sk, hk, d], v [b, sk, hk, dv], o [b, sq, hq, dv]
//   varlen: q [total_q, hq, d], k [total_k, hk, d], ...; sequence `bi` owns rows
//           cu_seqlens_q[bi] .. cu_seqlens_q[bi+1]-1 (batch strides unused).
// The last dimension of every tensor is contiguous (stride 1).
//
// Masking is one mechanism (FlashAttention's window formulation). For a query
// row i (0-based inside its sequence) and key column j, with
//   offset = bottom_right ? (len_k - len_q) : 0
// key j is visible iff
//   j < len_k
//   and (window_left  < 0 or j >= i + offset - window_left)
//   and (window_right < 0 or j <= i + offset + window_right)
//   and the optional attn_mask allows it.
// Causal attention is window_right = 0. SDPA's top-left causal is
// bottom_right = false; the native API's KV-cache causal is bottom_right = true.
// A row with no visible key outputs 0 and has lse = -inf (never NaN).
//
// Scores: s = q.k * scale; with softcap > 0, s = softcap * tanh(s / softcap);
// then s += mask (additive) or s = -inf where a bool mask is false.
#pragma once

#include <cstdint>

#include "../dtype.h"
#include "dropout.h"

namespace pyfastattn {

enum class MaskKind : int32_t {
  kNone = 0,
  kBool = 1,      // uint8/bool, nonzero = attend (SDPA convention)
  kAdditive = 2,  // same dtype as q, added to the scores
};

struct AttentionFwdParams {
  // ---- inputs -------------------------------------------------------------
  const void* q;  // [b, sq, hq, d]     or [total_q, hq, d]
  const void* k;  // [b, sk, hk, d]     or [total_k, hk, d]
  const void* v;  // [b, sk, hk, dv]    or [total_k, hk, dv]
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;

  // ---- outputs ------------------------------------------------------------
  void* o;     // [b, sq, hq, dv]  or [total_q, hq, dv], dtype of q
  float* lse;  // [b, hq, sq] or [hq, total_q], fp32, natural-log units
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  int64_t lse_batch_stride, lse_head_stride;  // row stride is 1; varlen: batch stride unused

  // ---- sizes --------------------------------------------------------------
  int32_t batch;        // number of sequences
  int32_t seqlen_q;     // dense: sq; varlen: max_seqlen_q (an upper bound)
  int32_t seqlen_k;     // dense: sk; varlen: max_seqlen_k (an upper bound)
  int32_t num_heads;    // hq
  int32_t num_heads_k;  // hk, divides hq (GQA / MQA); query head h reads kv head h / (hq / hk)
  int32_t head_dim;     // d
  int32_t head_dim_v;   // dv
  DType dtype;          // of q, k, v, o (and an additive mask)

  // ---- variable length (nullptr when dense) -------------------------------
  const int32_t* cu_seqlens_q;  // [batch + 1], monotone, cu[0] = 0; set together
  const int32_t* cu_seqlens_k;  // [batch + 1]                     with cu_seqlens_q
  const int32_t* seqused_k;     // [batch] per-sequence key length <= seqlen_k
                                // (key-padding mask); overrides the length from
                                // cu_seqlens_k / seqlen_k, and is the len_k used
                                // by bottom-right alignment.

  // ---- masking ------------------------------------------------------------
  int32_t window_left;   // < 0: unbounded
  int32_t window_right;  // < 0: unbounded; 0 with window_left < 0 is causal
  bool bottom_right;     // diagonal alignment, see above

  MaskKind mask_kind;
  const void* mask;  // [b|1, hq|1, sq|1, sk] (never with varlen); last dim contiguous
  int64_t mask_batch_stride, mask_head_stride, mask_row_stride;  // 0 = broadcast

  // ---- scores -------------------------------------------------------------
  float scale;      // softmax scale, usually 1/sqrt(d)
  float scale_log2; // scale * log2(e), for exp2-based kernels (0 when softcap > 0)
  float softcap;    // 0: off

  // ---- KV cache (attention_with_kvcache; all zero / nullptr otherwise) ----
  // Set only by csrc/attention/kvcache_api.cpp for the kvcache kernel
  // (csrc/cpu/attention_paged.h); the other kernels ignore these fields.
  // k / v are then the cache itself. Key j (0 <= j < len_k, len_k from
  // seqused_k) of sequence bi sits at absolute cache position
  // t = j + (cache_leftpad ? cache_leftpad[bi] : 0), and in memory at
  //   contiguous: r * k_batch_stride + t * k_row_stride,
  //               r = cache_batch_idx ? cache_batch_idx[bi] : bi
  //   paged     : block_table[bi * block_table_batch_stride + t / page_block_size]
  //               * k_batch_stride + (t % page_block_size) * k_row_stride
  // (the same for v with v's strides), see kv_row_offset below.
  const int32_t* block_table;        // [b, max_blocks] or nullptr (contiguous cache)
  int64_t block_table_batch_stride;  // elements
  int32_t page_block_size;           // rows per block (paged only)
  const int32_t* cache_batch_idx;    // [b] or nullptr: batch row -> cache row
  const int32_t* cache_leftpad;      // [b] or nullptr: first cache position of each sequence
  int32_t num_splits;                // split-KV chunks per (sequence, kv head); 0: the kernel picks
  // ---- dropout and ALiBi (issue 17; appended, zero = off) -------------------
  // Dropout on the softmax weights: P[i][j] is kept iff dropout_keep(dropout,
  // b, h, i, j) (csrc/attention/dropout.h) and then scaled by dropout_rescale;
  // the row sum (and lse) is taken before dropout, as in torch.
  float dropout_p;               // 0: off
  float dropout_rescale;         // 1 / (1 - p); 0 when p = 1 (every weight dropped)
  const int64_t* dropout_rng;    // [2] (seed, offset) on the kernel's device; nullptr: off
  DropoutKey dropout;            // seed, offset (filled on the host when dropout_rng is
                                 // on the CPU) and threshold (always)
  // ALiBi: score(i, j) += -slope[b, h] * |i + len_k - len_q - j| (natural-log
  // units, after softcap, like an additive mask; FlashAttention's convention,
  // whatever the causal alignment).
  const float* alibi_slopes;     // [b|1, hq] fp32; nullptr: off
  int64_t alibi_batch_stride;    // 0 for slopes of shape [hq]
};

// Backward kernels write dq for rows i < len_q and dk/dv for rows j < len_k of
// every sequence; every other row is pre-zeroed by the caller.
struct AttentionBwdParams : AttentionFwdParams {
  // o and lse (inherited) are inputs here: the saved forward results.
  const void* dout;  // [b, sq, hq, dv] or [total_q, hq, dv]
  int64_t do_batch_stride, do_row_stride, do_head_stride;

  void* dq;  // [b, sq, hq, d]   layout like q, dtype of q
  void* dk;  // [b, sk, hk, d]   layout like k: GQA groups are summed here
  void* dv;  // [b, sk, hk, dv]  layout like v
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
  int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
  int64_t dv_batch_stride, dv_row_stride, dv_head_stride;

  bool deterministic;  // bit-identical results run to run
};

// Helpers every kernel needs, identical on host and device.
#if defined(__CUDACC__)
#define PFA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PFA_HOST_DEVICE inline
#endif

// Where sequence `bi` lives and how long it really is. Varlen mode is
// cu_seqlens_q != nullptr (cu_seqlens_k is then set too).
struct SeqInfo {
  int32_t bi;
  bool varlen;
  int64_t q_start, k_start;  // varlen: first packed row; dense: 0
  int32_t len_q, len_k;      // actual lengths
  int32_t offset;            // diagonal offset: len_k - len_q if bottom_right else 0

  PFA_HOST_DEVICE SeqInfo(const AttentionFwdParams& p, int32_t b) : bi(b) {
    varlen = p.cu_seqlens_q != nullptr;
    if (varlen) {
      q_start = p.cu_seqlens_q[bi];
      len_q = p.cu_seqlens_q[bi + 1] - p.cu_seqlens_q[bi];
      k_start = p.cu_seqlens_k[bi];
      len_k = p.cu_seqlens_k[bi + 1] - p.cu_seqlens_k[bi];
    } else {
      q_start = k_start = 0;
      len_q = p.seqlen_q;
      len_k = p.seqlen_k;
    }
    if (p.seqused_k) len_k = p.seqused_k[bi];
    offset = p.bottom_right ? len_k - len_q : 0;
  }

  // Element offset of query row i (resp. key row j) in a tensor laid out like
  // q (resp. k), before the head offset.
  PFA_HOST_DEVICE int64_t q_row(int32_t i, int64_t batch_stride, int64_t row_stride) const {
    return varlen ? (q_start + i) * row_stride : int64_t(bi) * batch_stride + int64_t(i) * row_stride;
  }
  PFA_HOST_DEVICE int64_t k_row(int32_t j, int64_t batch_stride, int64_t row_stride) const {
    return varlen ? (k_start + j) * row_stride : int64_t(bi) * batch_stride + int64_t(j) * row_stride;
  }
  // Offset of lse[bi, h, i] (dense) or lse[h, q_start + i] (varlen).
  PFA_HOST_DEVICE int64_t lse_index(const AttentionFwdParams& p, int32_t h, int32_t i) const {
    return varlen ? int64_t(h) * p.lse_head_stride + q_start + i
                  : int64_t(bi) * p.lse_batch_stride + int64_t(h) * p.lse_head_stride + i;
  }

  // Visible key columns of query row i form the half-open range [lo, hi),
  // before the optional attn_mask. Empty when lo >= hi.
  PFA_HOST_DEVICE int32_t key_lo(const AttentionFwdParams& p, int32_t i) const {
    if (p.window_left < 0) return 0;
    int64_t lo = int64_t(i) + offset - p.window_left;
    return lo < 0 ? 0 : (lo > len_k ? len_k : int32_t(lo));
  }
  PFA_HOST_DEVICE int32_t key_hi(const AttentionFwdParams& p, int32_t i) const {
    if (p.window_right < 0) return len_k;
    int64_t hi = int64_t(i) + offset + p.window_right + 1;
    return hi < 0 ? 0 : (hi > len_k ? len_k : int32_t(hi));
  }
};

// Element offset, before the head offset, of key j of sequence bi in a KV
// cache laid out like k (batch_stride / row_stride of k or of v); see the KV
// cache block of AttentionFwdParams. Every index was checked on the host.
PFA_HOST_DEVICE int64_t kv_row_offset(const AttentionFwdParams& p, int32_t bi, int32_t j,
                                      int64_t batch_stride, int64_t row_stride) {
  const int64_t t = int64_t(j) + (p.cache_leftpad ? p.cache_leftpad[bi] : 0);
  if (p.block_table) {
    const int64_t blk = p.block_table[int64_t(bi) * p.block_table_batch_stride + t / p.page_block_size];
    return blk * batch_stride + (t % p.page_block_size) * row_stride;
  }
  const int64_t r = p.cache_batch_idx ? p.cache_batch_idx[bi] : bi;
  return r * batch_stride + t * row_stride;
}

}  // namespace pyfastattn
