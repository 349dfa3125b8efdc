// Tensors -> params. Shared by the CPU and CUDA op implementations.
//
// Python (pyfastattn/functional.py) validates user input first and gives the
// friendly errors. This layer re-checks only what would otherwise let a kernel
// read or write outside a tensor: shapes, dtypes, devices, strides, and the
// values of cu_seqlens / seqused_k, so that direct callers of
// torch.ops.pyfastattn.* and compiled graphs are memory-safe too.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "../torch_dtype.h"
#include "params.h"

namespace pyfastattn {

struct AttentionShape {
  bool varlen;
  int64_t batch, seqlen_q, seqlen_k, total_q, total_k;
  int64_t heads, heads_k, head_dim, head_dim_v;
  // Varlen: rows of the packed tensors that belong to some sequence
  // (cu_seqlens[-1]); rows past them are never touched by a kernel.
  int64_t used_rows_q, used_rows_k;
  bool has_seqused_k;
};

// Checks q, k, v, mask and the varlen metadata; returns the sizes.
AttentionShape check_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v,
                                      const std::optional<at::Tensor>& attn_mask,
                                      const std::optional<at::Tensor>& cu_seqlens_q,
                                      const std::optional<at::Tensor>& cu_seqlens_k,
                                      const std::optional<at::Tensor>& seqused_k,
                                      int64_t max_seqlen_q, int64_t max_seqlen_k);

// out [.., hq, dv] (dense: its (b, s, h) dims in the memory order of q's, as
// torch's SDPA does; varlen: contiguous) and lse [b, hq, sq] or [hq, total_q] (fp32).
// Packed rows past cu_seqlens_q[-1] are set here (out 0, lse -inf), since no
// kernel visits them.
std::tuple<at::Tensor, at::Tensor> empty_fwd_outputs(const at::Tensor& q,
                                                     const AttentionShape& s);

// dq, dk, dv like q, k, v (contiguous). Kernels write every row a sequence
// owns up to its real length; where some rows are owned by none (varlen tails,
// keys past seqused_k) the gradients start as zeros instead.
std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_bwd_outputs(const at::Tensor& q,
                                                                 const at::Tensor& k,
                                                                 const at::Tensor& v,
                                                                 const AttentionShape& s);

void fill_fwd_params(AttentionFwdParams& p, const AttentionShape& s, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                     const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask,
                     const std::optional<at::Tensor>& cu_seqlens_q,
                     const std::optional<at::Tensor>& cu_seqlens_k,
                     const std::optional<at::Tensor>& seqused_k, double scale, double softcap,
                     int64_t window_left, int64_t window_right, bool bottom_right);

// Checks out / lse / dout against the forward shape.
void check_bwd_inputs(const AttentionShape& s, const at::Tensor& q, const at::Tensor& dout,
                      const at::Tensor& out, const at::Tensor& lse);

void fill_bwd_grads(AttentionBwdParams& p, const at::Tensor& dout, const at::Tensor& dq,
                    const at::Tensor& dk, const at::Tensor& dv, bool deterministic);

// Dropout and ALiBi (issue 17): checks dropout_p, the (seed, offset) pair and
// the slopes, and fills their params fields (all off when p = 0 and no slopes).
void fill_dropout_alibi(AttentionFwdParams& p, const AttentionShape& s, const at::Tensor& q,
                        double dropout_p, const std::optional<at::Tensor>& dropout_rng,
                        const std::optional<at::Tensor>& alibi_slopes);

}  // namespace pyfastattn
