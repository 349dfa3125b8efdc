// CPU attention kernels over the shared params struct
// (csrc/attention/params.h defines every field's meaning).
//
// Algorithm: FlashAttention-2 tiling with an online softmax, accumulating in
// fp32; scores are kept in log2 units (scale * log2(e) folded in) so that
// every exponential is an exp2. The products are our own register-blocked
// GEMM micro-kernels, chosen at run time per instruction set:
//   AVX-512        fp32 FMA for fp32 and fp16 inputs (fp16 converted to fp32);
//   AVX512-BF16    bf16 dot products for bf16 inputs (P and dS rounded to bf16
//                  for their products, as PyTorch's bf16 matmuls do);
//   AVX2 + FMA     fp32 for every dtype;
//   anything else  portable C++ in fp32.
//
// Where each step lives (csrc/cpu/):
//   simd.h                  vector types, conversions, exp2 (shared with the FFN)
//   micro_gemm.h            the tile products C (+)= A B
//   attention_schedule.h/.cpp  Ctx, tasks, instruction-set choice and entry
//                           points, block sizes, the parallel task loop
//   attention_tile.h        shared tile steps: operand loads, masks, scores
//   attention_fwd.cpp       forward: online softmax over key tiles
//   attention_decode.h      forward of a one-row block on AVX-512 (decode)
//   attention_bwd.h         backward steps shared by both forms: P, dS, D
//   attention_bwd.cpp       backward, two-pass form (dQ; then dK, dV)
//   attention_bwd_fused.cpp backward, one-pass form (dK, dV, dQ partials)
//
// On one Zen 5 core (B1 H8 S1024 D64, GFLOP/s from CPU time): forward 212
// fp32 / 375 bf16 against 93 / 90 for PyTorch's flash SDPA; backward 144 / 266
// against 89 / 151.
#pragma once

#include "../attention/params.h"

namespace pyfastattn {
namespace cpu {

// Writes p.o and p.lse. Parallel over batch x heads x query blocks with
// at::parallel_for, so it follows torch.set_num_threads.
void attention_fwd(const AttentionFwdParams& p);

// Reads dout, o, lse; writes dq, dk, dv (fully overwritten, never accumulated
// into). Deterministic for any thread count.
void attention_bwd(const AttentionBwdParams& p);

}  // namespace cpu
}  // namespace pyfastattn
