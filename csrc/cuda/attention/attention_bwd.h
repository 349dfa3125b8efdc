// Host-side entry of the CUDA attention backward. Plain CUDA: no torch headers.
//
// Three launches on one stream:
//   1. preprocess, per query row: D = rowsum(dO * O) and lse * log2(e) (fp32
//      workspace), and the row of the fp32 dQ accumulator set to 0;
//   2. the main kernel, one CTA per (key block, kv head, sequence): dK and dV
//      in registers, dQ added to the accumulator with red.global.add.f32;
//   3. convert: dQ = accumulator * scale in the output dtype.
//
// The caller (csrc/cuda/attention_cuda_api.cpp) guarantees what
// attention_fwd.h lists for the forward (dtype, head dims, 16-byte alignment
// of every base pointer and stride, validated metadata), for dout/out/dq/dk/dv
// too, and allocates the workspace below.
#pragma once

#include <cuda_runtime.h>

#include "../../attention/params.h"

namespace pyfastattn {
namespace cuda {

// The backward params plus the workspace the CUDA kernels share.
struct AttentionBwdKernelParams : AttentionBwdParams {
  // Per query row, laid out [b, hq, sq] (varlen: [hq, total_q]), contiguous.
  float* lse_log2;  // lse * log2(e); +inf where lse = -inf (a row with no visible key)
  float* dsum;      // D = sum_d dO * O
  int64_t ws_batch_stride, ws_head_stride;  // varlen: batch stride unused
  // fp32 dQ accumulator, [b, sq, hq, d] (varlen: [total_q, hq, d]), contiguous.
  float* dq_accum;
  int64_t dqa_batch_stride, dqa_row_stride, dqa_head_stride;
  // deterministic only: [b, hq, m_blocks] int32 counters, zeroed by the caller.
  // Counter (b, h, m) counts the key blocks that have added their dQ
  // contribution to query block m; key blocks add in increasing order.
  int32_t* dq_semaphore;
  int32_t m_blocks;  // ceil(seqlen_q / block_m)
  // deterministic only: one counter, zeroed by the caller. The main kernel's
  // CTAs take tickets from it in the order they start and compute the block
  // of their ticket, not of their blockIdx (see sm80::cta_start_ticket: the
  // turns then never wait for a CTA that has not started).
  uint32_t* cta_ticket;
};

// Query rows per main-kernel step for the variant that runs `p` (the
// semaphore's m_blocks is ceil(seqlen_q / this)).
int attention_bwd_block_m(const AttentionBwdParams& p);

// nullptr when a compiled variant covers `p` on a device of compute capability
// `sm`; otherwise a short reason, for the backend rule's error.
const char* attention_bwd_unsupported_reason(const AttentionBwdParams& p, int sm);

// Launches the three kernels on `stream`. Returns the first launch error
// (cudaSuccess if none) and, when `failed_kernel` is given, points it at the
// name of the kernel whose launch failed. Never synchronises.
cudaError_t attention_bwd(const AttentionBwdKernelParams& p, cudaStream_t stream,
                          const char** failed_kernel = nullptr);

}  // namespace cuda
}  // namespace pyfastattn
