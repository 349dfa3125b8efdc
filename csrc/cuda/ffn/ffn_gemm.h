// The FFN's GEMM-with-epilogue kernels (csrc/cuda/ffn/ffn_gemm_kernel.cuh):
// a plain-data params struct and the launcher, no torch headers.
//
// Three epilogues over one tensor-core main loop, C[m, n] = sum_k A[m, k] B(k, n):
//   kFwdAct       A = x, B = W1 (and W3) in nn.Linear layout [n, k] ("NT"):
//                 h = act(C + b1) [* (C_up + b3)], and optionally the
//                 pre-activations C + b1, C_up + b3 saved for the backward.
//                 Gated: the CTA computes the gate and up tiles of the same
//                 (rows, cols) block, so h is written once at width d_ff.
//   kBiasResidual A = h, B = W2 [n, k] (NT): y = C + b2 [+ residual].
//   kBwdAct       A = dY, B = W2 as [k, n] ("NN"): C = dH; reads the saved or
//                 recomputed pre-activations and writes dgate [, dup] and
//                 optionally h, plus fp32 column sums of dgate [and dup] per
//                 half CTA tile of rows (the bias gradients' partials).
// Element type: fp16 or bf16 (dtype), fp32 accumulation and epilogue maths.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../../ffn/params.h"

namespace pyfastattn {
namespace cuda {
namespace ffn {

enum class GemmEpilogue : int32_t { kFwdAct = 0, kBiasResidual = 1, kBwdAct = 2 };

struct FfnGemmParams {
  GemmEpilogue epilogue;
  const void* a;     // [m, k]: x (kFwdAct), h (kBiasResidual), dY (kBwdAct)
  const void* b;     // NT: [n, k] W1 or W2;  NN (kBwdAct): [k, n] W2
  const void* b_up;  // kFwdAct gated: [n, k] W3; else nullptr
  int64_t a_row_stride, b_row_stride;  // elements; b_up shares b's stride
  int64_t m, n, k;

  // ---- epilogue inputs -------------------------------------------------------
  const void* bias;      // [n] b1 (kFwdAct, kBwdAct) or b2 (kBiasResidual), or nullptr
  const void* bias_up;   // [n] b3 (gated), or nullptr
  const void* residual;  // [m, n] added to y (kBiasResidual), or nullptr
  const void* gate_in;   // kBwdAct: [m, n] pre-activation x W1^T (+ b1 when bias is nullptr)
  const void* up_in;     // kBwdAct gated: [m, n] x W3^T (+ b3 when bias_up is nullptr)
  int64_t residual_row_stride, gate_in_row_stride, up_in_row_stride;

  // ---- outputs -------------------------------------------------------------
  void* out;       // [m, n] h (kFwdAct), y (kBiasResidual), dgate (kBwdAct)
  void* out_up;    // kBwdAct gated: [m, n] dup; else nullptr
  void* out_h;     // kBwdAct: [m, n] h recomputed, or nullptr
  void* pre_gate;  // kFwdAct: [m, n] x W1^T + b1 saved for the backward, or nullptr
  void* pre_up;    // kFwdAct gated: [m, n] x W3^T + b3, or nullptr
  int64_t out_row_stride, out_up_row_stride, out_h_row_stride, pre_gate_row_stride,
      pre_up_row_stride;
  // kBwdAct: [gemm_bias_partial_rows(m), n] fp32; row r holds the column
  // sums of dgate (dup) over rows [r * bm / 2, (r + 1) * bm / 2) with
  // bm = gemm_block_m(m), zero past m. Every element is written, so the
  // caller sums the rows without zeroing first. nullptr: skip.
  float* dbias_partial;
  float* dbias_up_partial;

  Activation act;
  bool gated;  // kFwdAct, kBwdAct
  DType dtype;  // kFloat16 or kBFloat16
};

// Rows per CTA tile, chosen from m alone: 64-row tiles when m <= 64, where a
// 128-row tile would be mostly predicated-off rows (tokens 16 of a decode
// step). Either way the CTA has two warps along m.
inline int64_t gemm_block_m(int64_t m) { return m <= 64 ? 64 : 128; }
// kBwdAct's bias partials: one row per warp along m, i.e. per half CTA tile.
inline int64_t gemm_bias_partial_rows(int64_t m) {
  return (m + gemm_block_m(m) - 1) / gemm_block_m(m) * 2;
}

namespace gemm_detail {
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
// Optional operands: absent, or 16-byte aligned rows.
inline bool opt_ok(const void* ptr, int64_t row_stride) {
  return ptr == nullptr || (aligned16(ptr) && row_stride % 8 == 0);
}

}  // namespace gemm_detail

// nullptr when the kernel can run these params, else why not (the caller then
// uses the cuBLAS + elementwise composition): alignment (16-byte rows and
// pointers), k and n multiples of 8, grid limits, dtype.
inline const char* ffn_gemm_unsupported_reason(const FfnGemmParams& p) {
  if (p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    return "the FFN GEMM kernels take float16 or bfloat16 only";
  if (p.m < 0 || p.n <= 0 || p.k <= 0) return "the FFN GEMM kernels need n > 0 and k > 0";
  if (p.k % 8 != 0 || p.n % 8 != 0)
    return "the FFN GEMM kernels need d_model, d_ff and d_out to be multiples of 8";
  if (!gemm_detail::aligned16(p.a) || !gemm_detail::aligned16(p.b) || p.a_row_stride % 8 != 0 || p.b_row_stride % 8 != 0)
    return "the FFN GEMM kernels need 16-byte aligned operands with row strides a multiple of 8";
  if (p.gated && p.epilogue == GemmEpilogue::kFwdAct && !gemm_detail::aligned16(p.b_up))
    return "the FFN GEMM kernels need 16-byte aligned operands with row strides a multiple of 8";
  if (!gemm_detail::opt_ok(p.bias, 0) || !gemm_detail::opt_ok(p.bias_up, 0) ||
      !gemm_detail::opt_ok(p.residual, p.residual_row_stride) || !gemm_detail::opt_ok(p.gate_in, p.gate_in_row_stride) ||
      !gemm_detail::opt_ok(p.up_in, p.up_in_row_stride) || !gemm_detail::opt_ok(p.out, p.out_row_stride) ||
      !gemm_detail::opt_ok(p.out_up, p.out_up_row_stride) || !gemm_detail::opt_ok(p.out_h, p.out_h_row_stride) ||
      !gemm_detail::opt_ok(p.pre_gate, p.pre_gate_row_stride) || !gemm_detail::opt_ok(p.pre_up, p.pre_up_row_stride))
    return "the FFN GEMM kernels need 16-byte aligned epilogue tensors with row strides a "
           "multiple of 8";
  if (p.out == nullptr) return "the FFN GEMM kernels need an output";
  // grid.y = column blocks (64 or 128 columns); grid.x = row blocks.
  if ((p.n + 63) / 64 > 65535) return "the FFN GEMM kernels take at most 4194240 columns";
  if ((p.m + 63) / 64 > 2147483647LL) return "too many rows for the FFN GEMM grid";
  return nullptr;
}


// Launches on `stream`; returns the launch error, never synchronises.
cudaError_t ffn_gemm(const FfnGemmParams& p, cudaStream_t stream);

}  // namespace ffn
}  // namespace cuda
}  // namespace pyfastattn
