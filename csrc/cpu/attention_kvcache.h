// CPU kernels of attention over a KV cache (pyfastattn.attention_with_kvcache):
// the append / rotary prologue and the split-KV, paged forward.
//
// Both take AttentionFwdParams with its KV cache block filled (params.h):
// k / v are the cache, seqused_k the number of keys each sequence attends
// (cache_seqlens + s_new - leftpad), bottom_right alignment. Every index the
// fields imply was checked on the host by csrc/attention/kvcache_api.cpp.
#pragma once

#include "../attention/params.h"

namespace pyfastattn {
namespace cpu {

// What the prologue writes: new keys / values into the cache rows after each
// sequence's cached keys, with rotary on k (and on a copy of q).
struct KvAppendParams {
  const void* k_new;  // [b, s_new, hk, d]  or nullptr (nothing to append)
  const void* v_new;  // [b, s_new, hk, dv]
  int64_t kn_batch_stride, kn_row_stride, kn_head_stride;
  int64_t vn_batch_stride, vn_row_stride, vn_head_stride;
  int32_t s_new;
  const int32_t* cache_seqlens;  // [b] absolute cache position of the first new row

  // Rotary (rotary_dim = 0: off). cos / sin [seqlen_ro, rotary_dim / 2],
  // rows contiguous; dtype of q or float32 (rotary_fp32).
  const void* rotary_cos;
  const void* rotary_sin;
  int64_t rotary_row_stride;
  int32_t rotary_dim;
  bool rotary_fp32;
  bool rotary_interleaved;  // pairs (2i, 2i+1); else (i, i + rotary_dim / 2)
  // q [b, sq, hq, d] -> q_rot [b, sq, hq, d] (nullptr: no rotary). Query
  // row i is at position cache_seqlens[b] + i when q_per_row (causal or a
  // window), else every row at cache_seqlens[b] (FlashAttention 2's rule).
  const void* q;
  void* q_rot;
  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t qr_batch_stride, qr_row_stride, qr_head_stride;
  bool q_per_row;
};

// Writes k_new / v_new (rotated) into the cache p.k / p.v at absolute
// positions cache_seqlens[b] + s, and the rotated q into q_rot.
void kvcache_append(const AttentionFwdParams& p, const KvAppendParams& a);

// out / lse of every query row over the cache. Splits each sequence's keys
// into chunks computed in parallel when batch x kv heads cannot fill the
// cores, then merges the chunks by their LSE.
void attention_kvcache_fwd(const AttentionFwdParams& p);

// Whether a call has enough query rows per kv head (seqlen_q x group) for the
// tiled forward (attention_fwd), which reads the same cache in place (paged,
// batch-indexed, left-padded): prefill and long chunks. Shape only.
bool kvcache_suits_tiled_kernel(const AttentionFwdParams& p);

// The chunk length (keys) attention_kvcache_fwd uses for this call; for tests
// and the benchmark's report. Depends on the shape only (never the thread
// count), so results are the same bits for any number of threads.
int64_t kvcache_chunk_keys(const AttentionFwdParams& p);

}  // namespace cpu
}  // namespace pyfastattn
