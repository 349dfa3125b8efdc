// The autograd of pyfastattn::attention_fwd on CPU, in C++.
//
// pyfastattn/_ops.py registers the op's autograd in Python
// (torch.library.register_autograd, the Autograd alias key). On CPU a call
// with inputs that require grad paid ~85 us of Python per forward and ~55 us
// per backward for it (B1 H8 S16 D64 fp32, one thread: forward 96 us in grad
// mode against 10 us under no_grad; PERF_NOTES.md "The fixed cost of a call",
// v3), more than the kernels themselves at small sizes.
// This kernel, registered for AutogradCPU, takes precedence over the alias
// there and does the same: the forward below the autograd keys, saving q, k, v,
// out, lse and every optional input; the backward calls
// pyfastattn::attention_bwd with the same arguments (`deterministic` from
// torch.are_deterministic_algorithms_enabled(), dout made last-dim contiguous),
// lse not differentiable. Other devices keep the Python autograd, which also
// handles the CUDA backward's declined cases (a reference fallback).
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "op_handles.h"

namespace pyfastattn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
at::Tensor def(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }

// Saved tensors, in this order.
enum Saved { kQ, kK, kV, kOut, kLse, kMask, kCuQ, kCuK, kUsed, kRng, kSlopes };

struct AttentionFwdFunction : public torch::autograd::Function<AttentionFwdFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptTensor& attn_mask, const OptTensor& cu_q, const OptTensor& cu_k,
                               const OptTensor& used, int64_t max_q, int64_t max_k, double scale, double softcap,
                               int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
                               const OptTensor& dropout_rng, const OptTensor& alibi_slopes) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = attention_fwd_op().call(q, k, v, attn_mask, cu_q, cu_k, used, max_q, max_k, scale,
                                              softcap, window_left, window_right, bottom_right, dropout_p,
                                              dropout_rng, alibi_slopes);
    ctx->save_for_backward({q, k, v, out, lse, def(attn_mask), def(cu_q), def(cu_k), def(used), def(dropout_rng),
                            def(alibi_slopes)});
    ctx->saved_data["max_q"] = max_q;
    ctx->saved_data["max_k"] = max_k;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["softcap"] = softcap;
    ctx->saved_data["window_left"] = window_left;
    ctx->saved_data["window_right"] = window_right;
    ctx->saved_data["bottom_right"] = bottom_right;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list s = ctx->get_saved_variables();
    at::Tensor dout = grad_outputs[0];
    variable_list grads(17);  // one per forward input; only q, k, v get one
    if (!dout.defined()) return grads;
    if (dout.stride(-1) != 1) dout = dout.contiguous();
    const auto& d = ctx->saved_data;
    auto [dq, dk, dv] = attention_bwd_op().call(
        dout, s[kQ], s[kK], s[kV], s[kOut], s[kLse], opt(s[kMask]), opt(s[kCuQ]), opt(s[kCuK]), opt(s[kUsed]),
        d.at("max_q").toInt(), d.at("max_k").toInt(), d.at("scale").toDouble(), d.at("softcap").toDouble(),
        d.at("window_left").toInt(), d.at("window_right").toInt(), d.at("bottom_right").toBool(),
        at::globalContext().deterministicAlgorithms(), d.at("dropout_p").toDouble(), opt(s[kRng]),
        opt(s[kSlopes]));
    grads[0] = dq;
    grads[1] = dk;
    grads[2] = dv;
    return grads;
  }
};

std::tuple<at::Tensor, at::Tensor> attention_fwd_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& attn_mask,
    const OptTensor& cu_q, const OptTensor& cu_k, const OptTensor& used, int64_t max_q, int64_t max_k,
    double scale, double softcap, int64_t window_left, int64_t window_right, bool bottom_right,
    double dropout_p, const OptTensor& dropout_rng, const OptTensor& alibi_slopes) {
  variable_list r = AttentionFwdFunction::apply(q, k, v, attn_mask, cu_q, cu_k, used, max_q, max_k, scale, softcap,
                                                window_left, window_right, bottom_right, dropout_p, dropout_rng,
                                                alibi_slopes);
  return {r[0], r[1]};
}

// attention_bwd is not differentiable (no second derivatives). Without an
// autograd kernel of its own, a backward with create_graph=True (a gradient
// penalty, a Hessian-vector product, MAML) ran it under torch's
// autograd-not-implemented fallback, whose outputs differentiate to silent
// zeros. Recorded under grad mode, its outputs now raise when differentiated,
// as torch's own flash-attention backward does; outside grad mode (every
// ordinary backward) the call goes straight below autograd.
struct AttentionBwdFunction : public torch::autograd::Function<AttentionBwdFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& dout, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                               const at::Tensor& lse, const OptTensor& attn_mask, const OptTensor& cu_q,
                               const OptTensor& cu_k, const OptTensor& used, int64_t max_q, int64_t max_k,
                               double scale, double softcap, int64_t window_left, int64_t window_right,
                               bool bottom_right, bool deterministic, double dropout_p,
                               const OptTensor& dropout_rng, const OptTensor& alibi_slopes) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [dq, dk, dv] = attention_bwd_op().call(dout, q, k, v, out, lse, attn_mask, cu_q, cu_k, used, max_q,
                                                max_k, scale, softcap, window_left, window_right, bottom_right,
                                                deterministic, dropout_p, dropout_rng, alibi_slopes);
    return {dq, dk, dv};
  }

  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "pyfastattn: double backward (a gradient of a gradient, create_graph=True) through the "
                "attention kernel is not supported: its backward is not differentiable. Run that attention "
                "under pyfastattn.backend(\"reference\") (plain PyTorch ops, twice differentiable).");
    return {};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_autograd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const OptTensor& attn_mask, const OptTensor& cu_q, const OptTensor& cu_k,
    const OptTensor& used, int64_t max_q, int64_t max_k, double scale, double softcap, int64_t window_left,
    int64_t window_right, bool bottom_right, bool deterministic, double dropout_p, const OptTensor& dropout_rng,
    const OptTensor& alibi_slopes) {
  const bool record = at::GradMode::is_enabled() && (dout.requires_grad() || q.requires_grad() ||
                                                     k.requires_grad() || v.requires_grad() || out.requires_grad());
  if (!record) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return attention_bwd_op().call(dout, q, k, v, out, lse, attn_mask, cu_q, cu_k, used, max_q, max_k, scale,
                                   softcap, window_left, window_right, bottom_right, deterministic, dropout_p,
                                   dropout_rng, alibi_slopes);
  }
  variable_list r = AttentionBwdFunction::apply(dout, q, k, v, out, lse, attn_mask, cu_q, cu_k, used, max_q, max_k,
                                                scale, softcap, window_left, window_right, bottom_right,
                                                deterministic, dropout_p, dropout_rng, alibi_slopes);
  return {r[0], r[1], r[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyfastattn, AutogradCPU, m) { m.impl("attention_fwd", &attention_fwd_autograd); }

// Every device: the Python autograd of attention_fwd (pyfastattn/_ops.py)
// calls attention_bwd too.
TORCH_LIBRARY_IMPL(pyfastattn, Autograd, m) { m.impl("attention_bwd", &attention_bwd_autograd); }

}  // namespace pyfastattn
