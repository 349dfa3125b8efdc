// The device-generic FFN implementation of csrc/ffn/ffn_ops.cpp, for other
// backends to reuse: csrc/cuda/ffn_cuda_api.cpp runs it with the CUDA
// elementwise step (cuBLAS GEMMs + one fused pass) where its own fused GEMMs
// are not chosen.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "params.h"

namespace pyfastattn {

using ActFwdStep = void (*)(const FfnActFwdParams&);
using ActBwdStep = void (*)(const FfnActBwdParams&);

struct FfnShape {
  int64_t tokens, d_model, d_ff, d_out;
  bool gated;
  int64_t n_in() const { return gated ? 2 : 1; }
};

// ffn_bwd's outputs and output_mask: (dx, dw1, db1, dw2, db2, dw3, db3).
enum Grad { kDx = 0, kDw1, kDb1, kDw2, kDb2, kDw3, kDb3, kNumGrads };
using GradTuple =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// "gelu" | "gelu_tanh" | "relu" | "silu", else a TORCH_CHECK error.
Activation parse_activation(c10::string_view name);

// The schema's invariants (shapes, dtypes, devices); returns the sizes.
FfnShape check_inputs(const at::Tensor& x, const at::Tensor& w1,
                      const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                      const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& w3,
                      const std::optional<at::Tensor>& b3);

// The forward step's params over [tokens, d_ff] buffers gate [, up] -> out.
// b1/b3 are added by the step only where the GEMM did not add them (fp32);
// pass std::nullopt when `gate`/`up` already hold their biases.
FfnActFwdParams fwd_step_params(const FfnShape& s, Activation act, const at::Tensor& x,
                                const at::Tensor& gate, const at::Tensor& up,
                                const std::optional<at::Tensor>& b1,
                                const std::optional<at::Tensor>& b3, at::Tensor& out);

// ffn_fwd / ffn_bwd as at::mm / at::addmm GEMMs plus the given fused steps.
// The forward saves act_in = the first GEMMs' results, with the biases
// added for bf16/fp16 (inside the GEMM) and not for fp32.
std::tuple<at::Tensor, at::Tensor> ffn_fwd_impl(
    ActFwdStep step, const at::Tensor& x, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1_, const at::Tensor& w2,
    const std::optional<at::Tensor>& b2, const std::optional<at::Tensor>& w3,
    const std::optional<at::Tensor>& b3_, c10::string_view activation, bool save_for_backward);

GradTuple ffn_bwd_impl(ActFwdStep fwd_step, ActBwdStep bwd_step, const at::Tensor& dout,
                       const at::Tensor& x, const at::Tensor& w1,
                       const std::optional<at::Tensor>& b1_, const at::Tensor& w2,
                       const std::optional<at::Tensor>& w3, const std::optional<at::Tensor>& b3_,
                       const at::Tensor& act_in, c10::string_view activation, bool recompute,
                       std::array<bool, kNumGrads> mask);

}  // namespace pyfastattn
