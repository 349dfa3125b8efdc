// Typed dispatcher handles of torch.ops.pyfastattn.attention_fwd and
// attention_bwd for the C++ callers (fast_call.cpp, attention_autograd.cpp).
// The signatures follow the schemas in csrc/ops.cpp; a call through them goes
// through the dispatcher (autograd, profiler, modes) with unboxed arguments.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace pyfastattn {

using AttentionFwdSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    double softcap, int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
    const std::optional<at::Tensor>& dropout_rng, const std::optional<at::Tensor>& alibi_slopes);

using AttentionBwdSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, const std::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double scale, double softcap, int64_t window_left, int64_t window_right, bool bottom_right,
    bool deterministic, double dropout_p, const std::optional<at::Tensor>& dropout_rng,
    const std::optional<at::Tensor>& alibi_slopes);

inline const c10::TypedOperatorHandle<AttentionFwdSig>& attention_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pyfastattn::attention_fwd", "").typed<AttentionFwdSig>();
  return op;
}

inline const c10::TypedOperatorHandle<AttentionBwdSig>& attention_bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("pyfastattn::attention_bwd", "").typed<AttentionBwdSig>();
  return op;
}

}  // namespace pyfastattn
