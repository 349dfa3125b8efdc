// The whole FFN forward for a few tokens (decode sizes), in one CPU kernel:
// at T <= 16 tokens the FFN's time is the time to read its weights once, so
// the kernel streams every weight row exactly once, in address order, and
// does all the arithmetic on the way (csrc/cpu/ffn_small_tokens.cpp).
#pragma once

#include <cstdint>

#include "../ffn/params.h"

namespace pyfastattn {
namespace cpu {

// y = W2 act(W1 x + b1) + b2, or gated y = W2 (act(W1 x + b1) * (W3 x + b3)) + b2
// (the maths of csrc/ffn/params.h); optionally also the pre-activations the
// op saves for its backward (act_in).
struct FfnSmallTokensParams {
  const void* x;   // [tokens, d_model], rows x_row_stride apart, contiguous within a row
  const void* w1;  // [d_ff, d_model] contiguous (nn.Linear layout: a feature's weights are one row)
  const void* w3;  // [d_ff, d_model] contiguous; nullptr unless gated
  const void* w2;  // [d_out, d_ff] contiguous
  const void* b1;  // [d_ff] or nullptr
  const void* b3;  // [d_ff] or nullptr (always nullptr unless gated)
  const void* b2;  // [d_out] or nullptr
  void* out;       // [tokens, d_out] contiguous
  void* act_in;    // [gated ? 2 : 1, tokens, d_ff] contiguous, or nullptr: x W1^T (and x W3^T)
  bool act_in_bias;  // act_in includes b1 / b3 (ffn_ops.cpp's bias_in_gemm: bf16/fp16)
  int64_t x_row_stride;
  int64_t tokens;  // 1 .. kFfnSmallTokensMax
  int64_t d_model, d_ff, d_out;
  Activation act;
  bool gated;
  DType dtype;  // of every tensor; arithmetic is fp32 (bf16 products in vdpbf16ps)
};

// The most tokens the kernel takes (its per-task buffers are sized for it).
constexpr int64_t kFfnSmallTokensMax = 32;

// Parallel over output features (at::parallel_for); the result is
// bit-identical for any thread count: each output element is one thread's
// dot product, summed in a fixed order over the reduced dimension.
void ffn_fwd_small_tokens(const FfnSmallTokensParams& p);

// The largest token count the CPU ffn_fwd routes here for dtype dt:
// PYFASTATTN_CPU_FFN_SMALL_TOKENS (read on every call, every dtype; 0 turns
// the kernel off), else the measured crossover (bf16 16, fp32 and fp16 32);
// capped at kFfnSmallTokensMax.
int64_t ffn_small_tokens_limit(DType dt);

// The instruction set the kernel runs with here: "avx512_bf16", "avx512",
// "avx2" or "portable" (lowered by PYFASTATTN_FFN_ISA, as the FFN step's).
const char* ffn_small_tokens_isa();

}  // namespace cpu
}  // namespace pyfastattn
