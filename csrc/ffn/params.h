// The params structs of the fused feed-forward network (FFN), shared by the
// CPU kernels and the future CUDA ones.
//
// Plain data, no torch headers: kernels in .cu files include this alone.
// csrc/ffn/ffn_ops.cpp fills every field from validated tensors, so a kernel
// may trust it: pointers are valid for every index the fields imply.
//
// The network, in torch.nn.Linear weight layout (W is [out, in]):
//   plain : y = W2 act(W1 x + b1) + b2
//   gated : y = W2 (act(W1 x + b1) * (W3 x + b3)) + b2
// with x [tokens, d_model], W1/W3 [d_ff, d_model], W2 [d_model, d_ff]. The
// gated form uses the LLaMA names: W1 = gate_proj, W3 = up_proj,
// W2 = down_proj (SwiGLU for silu, GeGLU for gelu).
//
// What is fused. The GEMMs are plain products, without bias. Everything
// elementwise between them is one step, described by the structs below:
//   forward  ("epilogue" of the first GEMMs):
//     h = act(gate + b1) [* (up + b3)]
//   backward ("epilogue" of the dH = dY W2 GEMM), with a = gate + b1:
//     plain : dgate = dh * act'(a)
//     gated : dgate = dh * (up + b3) * act'(a),  dup = dh * act(a)
//     dbias_gate = sum over rows of dgate, dbias_up = sum over rows of dup,
//     and, when asked, h recomputed (for the dW2 GEMM).
// On CPU each step is one pass after at::mm (csrc/cpu/ffn_cpu.cpp); a CUDA
// GEMM applies the same step to its accumulator tile before the store.
// A caller may fold a bias into the GEMM instead (the CPU op does for
// bf16/fp16, see csrc/ffn/ffn_ops.cpp): then `gate`/`up` already hold
// x W^T + b and the bias pointer is nullptr.
//
// Activations, in fp32 (definitions match pyfastattn/reference.py):
//   gelu      : 0.5 x (1 + erf(x / sqrt 2))                       (exact, erf)
//   gelu_tanh : 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
//   relu      : max(x, 0); derivative 1 for x > 0, else 0 (torch's convention)
//   silu      : x sigmoid(x)
//
// Layout: every [rows, cols] operand is row-major with a contiguous last
// dimension and its own row stride (in elements); bias vectors are
// contiguous. Storage dtype is `dtype` for every operand except the fp32
// bias-gradient accumulators; all arithmetic is fp32.
//
// Aliasing: an output may share memory with an input at the *same* index
// (the CPU op runs in place where it can: h over gate, dgate over dout, ...).
// A kernel must read every input of an element before it writes any output
// of that element. No other overlap is allowed.
#pragma once

#include <cstdint>

#include "../dtype.h"

namespace pyfastattn {

enum class Activation : int32_t { kGelu = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3 };

// h = act(gate + bias_gate) [* (up + bias_up)]
struct FfnActFwdParams {
  const void* gate;       // [rows, cols] x W1^T (+ b1 when bias_gate is nullptr)
  const void* up;         // [rows, cols] x W3^T (+ b3 when bias_up is nullptr); nullptr unless gated
  const void* bias_gate;  // [cols] b1, or nullptr
  const void* bias_up;    // [cols] b3, or nullptr (always nullptr unless gated)
  void* out;              // [rows, cols] h
  int64_t gate_row_stride, up_row_stride, out_row_stride;

  int64_t rows;  // tokens
  int64_t cols;  // d_ff
  Activation act;
  bool gated;
  DType dtype;
};

// The backward of FfnActFwdParams' step (see the file comment for the maths).
struct FfnActBwdParams {
  // ---- inputs -------------------------------------------------------------
  const void* gate;       // [rows, cols] saved or recomputed x W1^T (+ b1, as forward)
  const void* up;         // [rows, cols] x W3^T (+ b3); nullptr unless gated
  const void* bias_gate;  // [cols] or nullptr
  const void* bias_up;    // [cols] or nullptr
  const void* dout;       // [rows, cols] dL/dh = dY W2
  int64_t gate_row_stride, up_row_stride, dout_row_stride;

  // ---- outputs ------------------------------------------------------------
  void* dgate;         // [rows, cols] dL/d(x W1^T)
  void* dup;           // [rows, cols] dL/d(x W3^T); nullptr unless gated
  void* out;           // [rows, cols] h recomputed, or nullptr when not wanted
  float* dbias_gate;   // [cols] fp32, sum over rows of dgate; nullptr: skip
  float* dbias_up;     // [cols] fp32, sum over rows of dup;   nullptr: skip
  int64_t dgate_row_stride, dup_row_stride, out_row_stride;

  int64_t rows;  // tokens
  int64_t cols;  // d_ff
  Activation act;
  bool gated;
  DType dtype;
  // The bias sums are bit-identical for any thread count on CPU (the row
  // blocking depends only on `rows`); there is no other reduction.
};

}  // namespace pyfastattn
