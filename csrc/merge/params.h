// Parameters of pyfastattn::merge_attention_states, shared by the CPU and CUDA
// kernels (plain data, no torch headers).
//
// Two partial attentions over disjoint key sets, (out_a, lse_a) and
// (out_b, lse_b), combine exactly into the attention over the union:
//
//   lse = log(exp(lse_a) + exp(lse_b))            computed as m + log(wa + wb),
//   out = (wa * out_a + wb * out_b) / (wa + wb)   m = max(lse_a, lse_b),
//                                                 wa = exp(lse_a - m), wb = exp(lse_b - m)
//
// in fp32 whatever the storage dtypes. A row where both lse are -inf (no key
// seen by either part) gives out 0 and lse -inf, never NaN; a part whose
// weight is 0 is never read, so garbage (even NaN) in a fully masked part
// cannot leak into the result.
#pragma once

#include <cstdint>

#include "../attention/params.h"  // DType

namespace pyfastattn {

struct MergeParams {
  const void* out_a;  // [b, s, h, d], dtype a_dtype
  const void* out_b;  // [b, s, h, d], dtype b_dtype
  const float* lse_a;  // [b, h, s]
  const float* lse_b;  // [b, h, s]
  void* out;           // [b, s, h, d], dtype a_dtype, contiguous
  float* lse;          // [b, h, s], contiguous

  int64_t batch, seqlen, heads, head_dim;

  // Element strides of the (batch, row, head) dims; the last dim of every
  // out tensor is contiguous.
  int64_t a_batch_stride, a_row_stride, a_head_stride;
  int64_t b_batch_stride, b_row_stride, b_head_stride;
  int64_t o_batch_stride, o_row_stride, o_head_stride;
  // Element strides of the (batch, head, row) dims of the lse tensors.
  int64_t la_batch_stride, la_head_stride, la_row_stride;
  int64_t lb_batch_stride, lb_head_stride, lb_row_stride;
  int64_t lo_batch_stride, lo_head_stride, lo_row_stride;

  DType a_dtype;  // also the output's dtype
  DType b_dtype;
};

}  // namespace pyfastattn
